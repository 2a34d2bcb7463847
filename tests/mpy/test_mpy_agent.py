"""Lifecycle and flash storage under MicroPython and CPython, with injected power cuts."""
from tests.mpy.helpers import run_case


def test_agent_cases(runtime, vectors, out_dir):
    run_case(runtime, "case_agent", vectors, out_dir)
