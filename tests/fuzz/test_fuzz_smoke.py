"""Smoke run of every fuzz target inside ``make test`` (seconds each; ``make fuzz`` is the long run).

Each target runs its committed seeds, its committed regression inputs and a few hundred deterministic mutants
through the production parser; the test fails on any foreign exception, hang, accepted mutant or stored-state
change, naming the saved input. The board parsers also run under the MicroPython unix port.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import engine, mpy_host
from tests.fuzz.targets import all_targets, cleanup

SMOKE_INPUTS = int(os.environ.get("DEVAGENT_FUZZ_SMOKE_INPUTS", "300"))
SMOKE_SECONDS = float(os.environ.get("DEVAGENT_FUZZ_SMOKE_SECONDS", "4"))
TARGETS = all_targets()


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    cleanup()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_smoke(name):
    t = TARGETS[name]
    assert t.seed_inputs(), f"{name}: no committed seeds in {engine.CORPUS / (t.seeds or t.name)}"
    if t.setup:
        t.setup()
    try:
        s = engine.run_mutation(t, inputs=SMOKE_INPUTS, seconds=SMOKE_SECONDS, seed=20240601)
    finally:
        if t.teardown:
            t.teardown()
    print(engine.format_table([s]))
    assert s.ok, engine.format_table([s])
    if t.allowed:  # (a target whose contract is "never raises", est_headers, refuses nothing)
        assert s.refused > 0, f"{name}: no input was refused: the mutants never reached the parser's checks"


def test_seeds_are_accepted_where_they_should_be():
    """The recorded real responses must pass: a corpus the parsers refuse would fuzz nothing but the front door."""
    for name in ("cmp_accept", "cmp_client", "est_certs", "est_csrattrs", "mpy_parsers"):
        t = TARGETS[name]
        s = engine.Stats(name, "seeds")
        for data in t.seed_inputs():
            engine.execute(t, data, s, save=False)
        assert s.accepted >= len(t.seed_inputs()) // 2, (name, s)
        assert s.ok, engine.format_table([s])


def test_board_parsers_under_micropython():
    """The board parsers under the MicroPython unix port: no foreign exception, no hang, and no warning
    (MicroPython prints a bytes/str comparison as a warning instead of raising; mpy_host counts those)."""
    st = mpy_host.run_mpy(1500, 7, timeout=300)
    assert st.engine == "mpy-unix" and st.refused > 0, st
    assert st.ok, engine.format_table([st])


def test_coap_answers_are_matched_to_their_request():
    """A CoAP ping (answered with a RST) before a valid POST /csr: the harness must take the /csr's 2.04 for its
    answer, not the ping's RST, and see the site at rest before its snapshot (the long run on f5b92a9 counted
    the /csr as refused and its key generation, still running, as a stored-state change of the next input)."""
    from tests.fuzz import coap_target

    data = (engine.REGRESSIONS / "coap_device" / "ping-then-csr.bin").read_bytes()
    coap_target.setup()
    try:
        for _ in range(3):
            coap_target.run(data)  # returns: a 2.04 seen (CoapRefused / StateChanged otherwise)
    finally:
        coap_target.teardown()


def test_in_process_cli_keeps_no_streams():
    """Each in-process CLI invocation's output streams are freed (click caches them for good otherwise, and the
    heap that grows with every input makes full garbage collections, charged to single inputs, take seconds)."""
    import gc

    t = TARGETS["keystore_index"]
    seed = t.seed_inputs()[0]

    def streams():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o).__name__ == "_NamedTextIOWrapper")

    for _ in range(3):
        t.run(seed)
    n0 = streams()
    for _ in range(30):
        t.run(seed)
    assert streams() - n0 < 10
