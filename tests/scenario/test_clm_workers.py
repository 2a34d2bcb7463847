"""Several `devagent clm run` workers on one PostgreSQL inventory renew a 500-device simulated fleet
(agent/lab/fleet.py: one process, each device its own keystore, OSCORE context and coap_services server).

- two workers: every device enrolled exactly once, by one of them, both working;
- four workers, one SIGKILLed while it holds leases (mid-renewal): every device renewed once per due time, the
  killed worker's devices taken over by the others after its leases expired; no lost update (the inventory's
  serial is the device's), and every device keystore holds one complete credential and no stray pending key;
- the database stopped and restarted while a worker runs: it backs off, resumes, and nothing is lost or done twice;
- a bad connection string: `clm run` exits with an error naming it.

Everything is real: PostgreSQL (tests/peers/postgres.py), the workers as `python -m agent.cli` processes, the
lab CA, CoAP + OSCORE on loopback. Waits are on conditions with deadlines, never on times.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.inventory import open_inventory
from agent.lab import fleet
from agent.lab.ca import LabCA
from keystore.certs import same_public_key
from keystore.store import Keystore

REPO = Path(__file__).resolve().parents[2]
N = 500
LEASE_S = 3.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    lab = LabCA.create(root / "lab", domains=("plant",), lifetime_s=3600)
    fleet.create(root / "fleet", N, root / "clm", root / "lab")
    with fleet.FleetProcesses(root / "fleet", shards=1, log_dir=root) as sim:
        yield {"root": root, "lab": lab, "sim": sim, "records": fleet.records(root / "fleet")}


def wait_for(cond, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Worker:
    def __init__(self, world, spec: str, name: str, lease_s: float = LEASE_S, parallel: int = 8):
        root = world["root"]
        self.name = name
        self.log = root / f"worker-{name}.log"
        ready = root / f"worker-{name}.ready"
        ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--state-dir", str(root / "edge"), "clm", "--clm-dir",
             str(root / "clm"), "--inventory", spec, "run", "--upstream", f"lab:{root / 'lab'}", "--interval", "0.3",
             "--parallel", str(parallel), "--lease", str(lease_s), "--worker-id", name, "--retries", "2",
             "--timeout", "15", "--ready-file", str(ready)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"), preexec_fn=fleet.die_with_parent)
        wait_for(lambda: ready.exists() or self.proc.poll() is not None, 60, f"worker {name} to start")
        assert self.proc.poll() is None, self.log.read_text()[-2000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def device_state(world, dev_id: str):
    """(ldevid version, serial hex, pending coap keys) from the device's own keystore; checks the credential is
    complete: its certificate is for its key, and the key is usable."""
    ks = Keystore.open(world["root"] / "fleet" / dev_id / "state")
    try:
        cred = ks.get("ldevid")
        key = ks.private_key(cred.key_uri)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert same_public_key(cred.certificate.public_key(), key.public_key())
        pending = [k for k in ks.pending_keys() if (k.get("pending_for") or {}).get("source") == "coap"]
        return cred.version, format(cred.certificate.serial_number, "x"), len(pending)
    finally:
        ks.close()


def _version(world, dev_id: str) -> int:
    from keystore.errors import NotFoundError

    try:
        return device_state(world, dev_id)[0]
    except NotFoundError:
        return 0


def all_done(inv, enrollments: int, ids=None):
    def check():
        s = inv.summary()
        if s["due_now"] or s["leased"]:
            return None
        rows = inv.list()
        if ids is not None:
            rows = [r for r in rows if r["id"] in ids]
        return rows if all(r["enrollments"] >= enrollments for r in rows) else None
    return check


def test_two_then_four_workers_one_killed_mid_renewal(world, postgres):
    spec = postgres.create_database(f"fleet_{uuid.uuid4().hex[:8]}")
    inv = open_inventory(spec, world["root"] / "clm")
    inv.add_many(world["records"])
    # -- pass 1: two workers enroll the whole fleet ---------------------------------------------------------
    workers = [Worker(world, spec, f"two-{k}") for k in range(2)]
    try:
        rows = wait_for(all_done(inv, 1), 600, "two workers to enroll 500 devices")
    finally:
        assert [w.stop() for w in workers] == [0, 0]
    assert all(r["state"] == "operational" and r["enrollments"] == 1 and r["last_error"] is None for r in rows)
    by = {r["enrolled_by"] for r in rows}
    assert by == {"two-0", "two-1"}, by  # both worked, nobody else
    first = {r["id"]: r["serial"] for r in rows}
    for r in rows[::25]:
        version, serial, pending = device_state(world, r["id"])
        assert (version, serial, pending) == (1, r["serial"], 0)
    # -- pass 2: four workers renew it; one is killed while it holds leases ----------------------------------
    assert inv.set_due() == N
    workers = [Worker(world, spec, f"four-{k}") for k in range(4)]
    victim = workers[0]
    try:
        held = wait_for(lambda: inv.summary()["leased"].get("four-0"), 300, "worker four-0 to hold leases")
        victim.proc.send_signal(signal.SIGKILL)
        assert victim.proc.wait(30) == -signal.SIGKILL
        killed_at = time.time()
        # What it held when it died: its leases outlive it (until they expire, LEASE_S), its results do not.
        leased_by_victim = {r["id"]: _epoch(r["lease_until"]) for r in inv.list() if r["lease_owner"] == "four-0"}
        rows = wait_for(all_done(inv, 2), 600, "the other workers to renew the fleet")
    finally:
        assert [w.stop() for w in workers[1:]] == [0, 0, 0]
    assert held and leased_by_victim
    assert all(r["enrollments"] == 2 and r["last_error"] is None and r["serial"] != first[r["id"]] for r in rows)
    taken_over = {r["id"]: r for r in rows if r["id"] in leased_by_victim}
    assert all(r["enrolled_by"] in ("four-1", "four-2", "four-3") for r in taken_over.values())
    # the takeover began only once the dead worker's lease had expired (SQLite/PostgreSQL clock = this host's;
    # 50 ms for the rounding of the stored times)
    for d, r in taken_over.items():
        started = _epoch(r["enrolled_at"]) - r["last_duration_s"]
        assert started >= leased_by_victim[d] - 0.05, (d, started, leased_by_victim[d])
        assert leased_by_victim[d] > killed_at - 1
    twice = set()
    for r in rows:
        version, serial, pending = device_state(world, r["id"])
        assert serial == r["serial"], r["id"]  # no lost update: the inventory has what the device has
        assert pending == 0, r["id"]  # a dead worker's pending key was superseded
        if version == 3:
            twice.add(r["id"])
        else:
            assert version == 2, (r["id"], version)
    # only a device the killed worker had already delivered to (but not recorded) was renewed twice
    assert twice <= set(leased_by_victim), twice - set(leased_by_victim)
    inv.close()


def _epoch(iso: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(iso).timestamp()


def test_database_restart_during_run(world, postgres):
    spec = postgres.create_database(f"restart_{uuid.uuid4().hex[:8]}")
    inv = open_inventory(spec, world["root"] / "clm")
    subset = world["records"][:60]
    inv.add_many(subset)
    ids = {r["id"] for r in subset}
    before = {d: _version(world, d) for d in sorted(ids)}  # 0 when this test runs alone (nothing enrolled yet)
    w = Worker(world, spec, "restart", lease_s=60, parallel=4)
    try:
        wait_for(lambda: len([r for r in inv.list(state="operational")]) >= 10, 300, "the first renewals")
        postgres.stop()
        try:
            wait_for(lambda: "backing off" in w.log.read_text(), 120, "the worker to notice the database is gone")
            assert w.proc.poll() is None
        finally:
            postgres.start()
        inv.close()
        inv = open_inventory(spec, world["root"] / "clm")
        rows = wait_for(all_done(inv, 1, ids), 600, "the worker to resume and finish")
        assert "reachable again" in w.log.read_text()
    finally:
        assert w.stop() == 0
    for r in rows:
        version, serial, _ = device_state(world, r["id"])
        assert version == before[r["id"]] + 1, r["id"]  # renewed exactly once, nothing lost
        assert serial == r["serial"] and r["enrollments"] == 1
    inv.close()


def test_bad_connection_string_is_named(world, postgres):
    root = world["root"]
    for spec, code, words in ((postgres.url("no_such_db"), 7, 'database "no_such_db" does not exist'),
                              ("postgresql://devagent:pw@127.0.0.1/x?nope=1", 7, "not a valid PostgreSQL"),
                              ("postgresql://devagent:hunter2@127.0.0.1:1/x", 6, "Connection refused")):
        r = subprocess.run([sys.executable, "-m", "agent.cli", "--state-dir", str(root / "edge"), "clm",
                            "--clm-dir", str(root / "clm"), "--inventory", spec, "run", "--upstream",
                            f"lab:{root / 'lab'}", "--once"], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PGCONNECT_TIMEOUT="5"))
        assert r.returncode == code, r.stderr
        assert words in r.stderr and "inventory postgresql://devagent" in r.stderr
        assert postgres.password not in r.stderr and "hunter2" not in r.stderr
