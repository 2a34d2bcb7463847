"""devagent: device-side identity agent (lifecycle, CLI, CLM role). See README.md and docs/ARCHITECTURE.md."""
__version__ = "0.1.0"
