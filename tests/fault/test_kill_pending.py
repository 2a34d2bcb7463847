"""devagent commands SIGKILLed at random points leave nothing behind once `keystore check` ran (issue 20).

Trials cycle through enroll, request, renew, serve (the device side of ``devagent serve``: /csr and /verify) and
run (``devagent run --once`` renewing a due LDevID), each killed after a random delay within the command's
duration. After each trial ``devagent keystore check`` must leave 0 pending keys, 0 retired keys, 0 key files or
TPM blobs without a record, 0 token objects without a record, and a clean consistency check.
``DEVAGENT_KILL_TRIALS`` (default 100) is the number of trials: 80 % with software keys, 10 % each with swtpm and
SoftHSM2 (at least 10 each). ``make soak`` runs 1,000 (DEVAGENT_KILL_TRIALS=1000).
"""
from __future__ import annotations

import os
import random
import time

import pytest

from agent.lab.cmp_server import start_cmp_server
from tests.peers.keystore_load import (
    KILL_OPS, REF, SECRET, check_clean, close_zygotes, kill_trial, make_world,
)
from tests.peers.pkcs11 import softhsm  # noqa: F401  (session fixture)
from tests.peers.tpm import swtpm  # noqa: F401  (session fixture)

TRIALS = int(os.environ.get("DEVAGENT_KILL_TRIALS", "100"))


@pytest.fixture(scope="module")
def cmp_server(lab):
    srv = start_cmp_server(lab, "plant", secrets={REF.encode(): SECRET.encode()})
    yield srv
    srv.stop()


def run_trials(world, lab, trials: int, seed: int) -> dict:
    """``trials`` kill trials; returns counts per outcome. Fails on the first trial that leaves something."""
    rnd = random.Random(seed)
    durations = {}
    for op in KILL_OPS:  # calibrate: how long each command takes here, unkilled (and it must succeed)
        t0 = time.perf_counter()
        code, out = kill_trial(world, op, 600.0, -1 - KILL_OPS.index(op), lab_dir=str(lab.dir))
        durations[op] = time.perf_counter() - t0
        assert code == 0, f"{op} (not killed) failed: exit {code}: {out[-2000:]}"
    counts = {"killed": 0, "finished": 0}
    for n in range(trials):
        op = KILL_OPS[n % len(KILL_OPS)]
        delay = rnd.uniform(0.0, 1.1 * durations[op])
        code, out = kill_trial(world, op, delay, n, lab_dir=str(lab.dir))
        counts["killed" if code == -9 else "finished"] += 1
        assert code in (0, -9), f"trial {n} ({op}): exit {code}: {out[-2000:]}"
        left = check_clean(world)
        assert left == {}, f"trial {n} ({op}, killed after {delay * 1000:.0f} ms): left behind {left}"
    counts["durations_ms"] = {op: round(d * 1000) for op, d in durations.items()}
    return counts


@pytest.mark.parametrize("backend", ["soft", "tpm", "pkcs11"])
def test_kill_9_at_random_points_leaves_nothing_behind(tmp_path, lab, cmp_server, request, backend):
    peer = None
    if backend == "tpm":
        peer = request.getfixturevalue("swtpm")
        peer.flush_all()
    elif backend == "pkcs11":
        peer = request.getfixturevalue("softhsm")
    world = make_world(tmp_path, lab, cmp_server.url, backend, peer)
    request.addfinalizer(world.clear)  # after close_zygotes (finalizers run last-in first-out)
    request.addfinalizer(close_zygotes)
    trials = TRIALS * 8 // 10 if backend == "soft" else max(10, TRIALS // 10)
    counts = run_trials(world, lab, trials, seed={"soft": 1, "tpm": 2, "pkcs11": 3}[backend])
    if backend == "pkcs11":  # objects SoftHSM2 left half-created when a kill hit C_GenerateKeyPair (scan_objects)
        counts["half_created_token_objects"] = peer.unreadable()
        counts["softhsm_token_file_restored"] = peer.restored  # this process's token (restore_token_file)
    print(f"{backend}: {counts}")
    assert counts["killed"] >= trials // 3, f"too few commands were killed mid-way to mean anything: {counts}"
