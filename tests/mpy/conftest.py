"""Fixtures for the MicroPython agent tests (defined in helpers.py so test modules can import helpers)."""
from tests.mpy.helpers import out_dir, runtime, vectors  # noqa: F401
