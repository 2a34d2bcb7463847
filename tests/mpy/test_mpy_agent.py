"""Lifecycle and flash storage under MicroPython and CPython, with injected power cuts."""
from conftest import run_case


def test_agent_cases(runtime, vectors, out_dir):
    run_case(runtime, "case_agent", vectors, out_dir)
