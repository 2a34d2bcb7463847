"""Entry points for a board's main.py (and for the unix port in tests).

    import mpy.run; mpy.run.serial_main()             # answer the host bridge on USB/UART (stdin/stdout)
    import mpy.run; mpy.run.coap_main()               # CoAP /csr and /verify on UDP port 5683
"""
import sys

from . import compat
from .agent import Agent, load_config
from .store import Store

DEFAULT_ROOT = "/devagent"


def make_agent(root=DEFAULT_ROOT):
    cfg = load_config(root + "/config.json")
    seed = cfg.get("seed_source")
    if seed:  # e.g. "machine_trng": a board driver module providing read(n)
        mod = __import__(seed)
        compat.set_seed_source(mod.read)
    return Agent(Store(root), cfg)


def serial_main(root=DEFAULT_ROOT, uart=None):
    """Serve the framed serial protocol on uart (a machine.UART) or stdin/stdout."""
    from . import serial_agent

    agent = make_agent(root)
    if uart is not None:
        def read(n):
            while True:
                b = uart.read(n)
                if b:
                    return b

        write = uart.write
    else:
        inp = getattr(sys.stdin, "buffer", sys.stdin)
        out = getattr(sys.stdout, "buffer", sys.stdout)
        read = inp.read

        def write(b):
            out.write(b)
            try:
                out.flush()
            except (OSError, AttributeError):  # MicroPython: flush() on a tty raises EINVAL
                pass

    serial_agent.serve(agent, read, write)


def coap_main(root=DEFAULT_ROOT, host="0.0.0.0", port=5683, max_requests=None):
    """Serve CoAP; the commissioning secret (hex) and device_id come from config.json."""
    import socket

    from . import coap

    agent = make_agent(root)
    secret = compat.unhexlify(agent.config.get("coap_secret", ""))
    srv = coap.Server(agent, secret, agent.config.get("device_id", ""))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(socket.getaddrinfo(host, port)[0][-1])
    try:
        srv.serve(s, max_requests)
    finally:
        s.close()
