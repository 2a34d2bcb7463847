"""Fleet renewal: `devagent clm run` workers renewing N simulated devices, inventory in SQLite or PostgreSQL.

Seed 003 (§VII) leaves open whether frequent re-enrolment of short-lived certificates "might become a
bottleneck". Here the production CLM renews a fleet the way a plant runs it:

- the CLM is one or more ``python -m agent.cli clm run`` worker processes (``--upstream lab:`` — the lab CA
  in the worker — OSCORE to every device, ``--parallel 32``);
- the devices are ``agent.lab.fleet`` simulator processes: each device its own keystore directory, OSCORE
  context and ``coap_services`` device server on its own loopback address, the same code as ``devagent serve``,
  many devices per process (fleet and lab CA on a tmpfs, as each board's fsyncs go to its own flash);
- the inventory is SQLite (the default file, on disk) or PostgreSQL (a durable server the benchmark starts,
  data on disk).

Per configuration: untimed set-up (fleet, inventory, workers, a first pass that enrolls every device), then the
measured pass: every device is made due at once (``Inventory.set_due``) and renewed. Figures:

- renewals/s = N / (last renewal's end − first renewal's start), from the rows (``enrolled_at``,
  ``last_duration_s``); p50/p99 of ``last_duration_s`` (one renewal as the worker runs it, from its /csr to
  /verify, queueing behind the parallelism bound excluded);
- CPU per renewal, from /proc of each process: the CLM workers (including the in-process lab CA, measured apart
  as ``ca_cpu_ms`` per issuance so it can be subtracted) and, separately, the simulated devices;
- RSS: peak and end of the CLM workers (each) and of the simulator, sampled every 50 ms.

``make bench``: SQLite at N = 100, 1,000, 10,000; PostgreSQL with 1, 2, 4 workers at N = 1,000
(``DEVAGENT_BENCH_FLEET_PG_N`` to change). ``make bench-ci``: N = 20 with SQLite, 2 workers on PostgreSQL. Run the N = 10,000 case
alone: see benchmarks/README.md. Nothing here fails on a time; every pass must renew every device exactly once.
"""
from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from benchmarks.conftest import CI, DOMAIN, REPO, record, sizes

FLEET_SIZES = sizes((100, 1000, 10000), (20,))
PG_WORKERS = sizes((1, 2, 4), (2,))
PG_N = 20 if CI else int(os.environ.get("DEVAGENT_BENCH_FLEET_PG_N", "1000"))
PARALLEL = 32
DEVICES_PER_SHARD = 5000  # at most; fewer where RLIMIT_NOFILE is lower (fleet.devices_per_process())
LIFETIME_S = 30 * 86400


def _tmpfs() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="devagent-fleet-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="devagent-fleet-"))


# ---- per-process CPU and memory from /proc ----------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / _TICK


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """Peak RSS of each pid while a block runs."""

    def __init__(self, pids, interval_s: float = 0.05):
        self.pids = list(pids)
        self.peak = {p: 0.0 for p in self.pids}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self.interval_s = interval_s

    def _sample(self):
        for p in self.pids:
            try:
                self.peak[p] = max(self.peak[p], proc_rss_mb(p))
            except OSError:
                pass

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()


# ---- the world ----------------------------------------------------------------------------------------------------
class World:
    """Lab CA and simulated fleets (tmpfs), the CLM directory (disk); fleets are created once per size."""

    def __init__(self, disk: Path):
        from agent.lab.ca import LabCA

        self.shm = _tmpfs()
        self.disk = disk
        self.lab = LabCA.create(self.shm / "lab", domains=(DOMAIN,), lifetime_s=LIFETIME_S)
        self.fleets: dict[int, Path] = {}

    def fleet(self, n: int) -> Path:
        from agent.lab import fleet

        if n not in self.fleets:
            d = self.shm / f"fleet-{n}"
            fleet.create(d, n, self.disk / f"clm-{n}", self.shm / "lab")
            self.fleets[n] = d
        return self.fleets[n]

    def close(self):
        shutil.rmtree(self.shm, ignore_errors=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("fleet-bench"))
    yield w
    w.close()


@pytest.fixture(scope="module")
def pg():
    from tests.peers.postgres import start_server

    srv = start_server(durable=True)
    yield srv
    srv.close()


def ca_cpu_ms(lab, k: int = 40) -> float:
    """CPU ms of one lab-CA issuance (it runs inside each worker; subtract it for the CLM's own cost)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "ca-cost")]))
           .sign(key, hashes.SHA256()))
    t0 = time.process_time()
    for _ in range(k):
        lab.issue_from_csr(DOMAIN, csr)
    return (time.process_time() - t0) / k * 1000


def start_worker(world: World, clm_dir: Path, spec: str, name: str) -> tuple[subprocess.Popen, Path]:
    from agent.lab import fleet

    log = world.disk / f"{name}.log"
    ready = world.disk / f"{name}.ready"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--state-dir", str(world.disk / "edge"), "clm", "--clm-dir",
         str(clm_dir), "--inventory", spec, "run", "--upstream", f"lab:{world.shm / 'lab'}", "--interval", "0.2",
         "--parallel", str(PARALLEL), "--lease", "120", "--worker-id", name, "--retries", "2", "--timeout", "60",
         "--ready-file", str(ready)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=dict(os.environ, PYTHONUNBUFFERED="1"),
        preexec_fn=fleet.die_with_parent)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"worker {name} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, log


def wait_pass(inv, n: int, enrollments: int, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = inv.summary()
        if not s["due_now"] and not s["leased"]:
            rows = inv.list()
            if len(rows) == n and all(r["enrollments"] >= enrollments or r["last_error"] for r in rows):
                return rows
        time.sleep(0.25)
    raise AssertionError(f"the pass did not finish within {timeout_s:.0f} s: {inv.summary()}")


def _epoch(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def run_config(benchmark, world: World, *, n: int, inventory: str, workers: int, pg=None) -> None:
    from agent.inventory import open_inventory
    from agent.lab import fleet

    fdir = world.fleet(n)
    clm_dir = world.disk / f"clm-{n}"
    if inventory == "sqlite":
        db = world.disk / f"inv-{n}-{uuid.uuid4().hex[:6]}.sqlite"
        spec = f"sqlite:{db}"
    else:
        spec = pg.create_database(f"fleet_{n}_{workers}_{uuid.uuid4().hex[:6]}")
    inv = open_inventory(spec, clm_dir)
    inv.add_many(fleet.records(fdir))
    shards = -(-n // min(DEVICES_PER_SHARD, fleet.devices_per_process()))
    timeout_s = 120 + n * 0.5
    procs = []
    with fleet.FleetProcesses(fdir, shards=shards, timeout_s=timeout_s, log_dir=world.disk) as sim:
        try:
            for k in range(workers):
                procs.append(start_worker(world, clm_dir, spec, f"w{k}-{inventory}-{n}"))
            wait_pass(inv, n, 1, timeout_s)  # first pass: untimed set-up
            clm_pids = [p.pid for p, _ in procs]
            pids = clm_pids + sim.pids
            out = {}

            def renew_all():
                cpu0 = {p: proc_cpu_s(p) for p in pids}
                with RssSampler(pids) as rss:
                    t0 = time.time()
                    inv.set_due()
                    rows = wait_pass(inv, n, 2, timeout_s)
                cpu1 = {p: proc_cpu_s(p) for p in pids}
                out.update(rows=rows, t0=t0, cpu={p: cpu1[p] - cpu0[p] for p in pids}, rss_peak=rss.peak,
                           rss_end={p: proc_rss_mb(p) for p in pids})

            benchmark.pedantic(renew_all, rounds=1, iterations=1)
        finally:
            for p, _ in procs:
                p.send_signal(signal.SIGTERM)
            for p, _ in procs:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
    rows = out["rows"]
    bad = [r for r in rows if r["enrollments"] != 2 or r["last_error"]]
    inv.close()
    assert not bad, f"{len(bad)} device(s) not renewed exactly once: {[(r['id'], r['last_error']) for r in bad[:3]]}"
    ends = [_epoch(r["enrolled_at"]) for r in rows]
    starts = [e - r["last_duration_s"] for e, r in zip(ends, rows, strict=True)]
    wall = max(ends) - min(starts)
    lat = [r["last_duration_s"] for r in rows]
    clm_cpu = sum(out["cpu"][p] for p in clm_pids)
    dev_cpu = sum(out["cpu"][p] for p in sim.pids)
    record(benchmark, samples_s=lat, stage="renewal_latency", devices=n, inventory=inventory, workers=workers,
           parallel=PARALLEL, shards=shards, channel="oscore", renewals=len(rows) - len(bad), attempted=n,
           wall_s=wall, renewals_per_s=n / wall, clm_cpu_s=clm_cpu, device_cpu_s=dev_cpu,
           clm_cpu_ms_per_renewal=clm_cpu / n * 1000, device_cpu_ms_per_renewal=dev_cpu / n * 1000,
           ca_cpu_ms=ca_cpu_ms(world.lab),
           clm_rss_peak_mb=max(out["rss_peak"][p] for p in clm_pids),
           clm_rss_end_mb=max(out["rss_end"][p] for p in clm_pids),
           device_rss_peak_mb=sum(out["rss_peak"][p] for p in sim.pids), latencies_s=lat,
           by_worker={w: sum(1 for r in rows if r["enrolled_by"] == w) for w in {r["enrolled_by"] for r in rows}})


@pytest.mark.benchmark(group="fleet")
@pytest.mark.parametrize("n", FLEET_SIZES, ids=lambda n: f"sqlite-N{n}")
def test_fleet_sqlite(benchmark, world, n):
    run_config(benchmark, world, n=n, inventory="sqlite", workers=1)


@pytest.mark.benchmark(group="fleet")
@pytest.mark.parametrize("workers", PG_WORKERS, ids=lambda w: f"postgresql-{w}w")
def test_fleet_postgres(benchmark, world, pg, workers):
    run_config(benchmark, world, n=PG_N, inventory="postgresql", workers=workers, pg=pg)
