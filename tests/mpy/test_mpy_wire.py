"""Serial frames, CBOR and CoAP+HMAC under MicroPython and CPython (no sockets; see test_transports)."""
from tests.mpy.helpers import run_case


def test_wire_cases(runtime, vectors, out_dir):
    run_case(runtime, "case_wire", vectors, out_dir)
