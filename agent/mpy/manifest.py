# Freeze the board agent into MicroPython firmware:
#   make -C ports/esp32 BOARD=ESP32_GENERIC FROZEN_MANIFEST=/path/to/agent/mpy/manifest.py
#   make -C ports/rp2 BOARD=RPI_PICO_W FROZEN_MANIFEST=/path/to/agent/mpy/manifest.py
# The port's own modules stay in (include below); the agent is frozen as the package "mpy", so the
# board's main.py is the same as after `devagent mpy deploy`: `from mpy import run; run.serial_main()`.
# Frozen bytecode (and its bytes constants) live in flash, leaving the heap for the big-int arithmetic.
include("$(PORT_DIR)/boards/manifest.py")  # noqa: F821 - manifest builtins
package("mpy", base_path="..", files=[  # noqa: F821
    "__init__.py", "agent.py", "cbor.py", "coap.py", "compat.py", "csr.py", "der.py", "ec.py",
    "ecdsa.py", "errors.py", "frame.py", "hmac256.py", "rsa.py", "run.py", "serial_agent.py",
    "store.py", "x509.py",
], opt=3)
