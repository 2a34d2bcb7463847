"""TEST-ONLY fleet simulator: many device identities served by one process, with the real device code.

What a simulated device has is what ``devagent serve`` has, nothing shared: its own keystore directory (master key,
index, keys, certificates; trust anchor of the domain), its own OSCORE context pair (``coap provision``; the CLM
halves go to ``CLM_DIR/contexts/<id>``), its own ``coap_services`` ``DeviceService`` and ``DeviceServer`` (an
aiocoap server context bound to its own address). What it does not have is a process and an event loop of its own:
every device of a shard runs on one asyncio loop, so N = 10,000 needs a handful of processes, not 10,000.

Each device listens on its own loopback address, ``127.77.x.y`` (x = i // 250, y = i % 250 + 1), all on one UDP
port chosen at creation — the way a plant has one address per board on the CoAP port. Linux routes all of
127.0.0.0/8 to ``lo``, so nothing needs configuring.

File descriptors: a device holds three (its UDP socket, the lock of its OSCORE context and its keystore's cached
index), and briefly a key lock while it makes a key, so a process serves at most ``RLIMIT_NOFILE / FDS_PER_DEVICE``
devices; ``serve --shards K`` splits the fleet over K processes. Put the
fleet directory on a tmpfs (``/dev/shm``) for benchmarks: the devices' fsyncs would happen on N separate flash
chips in a plant, not serialised on this machine's one disk.

    python -m agent.lab.fleet create DIR --devices N --clm-dir CLM_DIR --lab LAB_DIR [--domain plant]
    python -m agent.lab.fleet serve DIR [--shards K] [--ready-file F]
    python -m agent.lab.fleet records DIR            # inventory records (JSON lines) for the CLM

``serve`` stops cleanly on SIGTERM (every keystore write in progress completes).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("devagent.fleet")

MANIFEST = "fleet.json"
NET = "127.77"
PER_OCTET = 250
SECURITY = "oscore"


def device_id(i: int) -> str:
    return f"sim{i:05d}"


def device_host(i: int) -> str:
    if i >= 256 * PER_OCTET:
        raise ValueError(f"the simulator addresses at most {256 * PER_OCTET} devices")
    return f"{NET}.{i // PER_OCTET}.{i % PER_OCTET + 1}"


def _free_udp_port() -> int:
    """A port that is free on the first and last simulated address and on 127.0.0.1."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for host in (device_host(0), device_host(PER_OCTET * 40 - 1)):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as t:
                    t.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free UDP port for the fleet simulator")


def die_with_parent() -> None:
    """``preexec_fn`` for helper processes (simulator shards, CLM workers in tests): SIGKILL the child when the
    process that started it dies, so a killed test run leaves nothing serving or renewing behind."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def load_manifest(fleet_dir: str | os.PathLike) -> dict:
    return json.loads((Path(fleet_dir) / MANIFEST).read_text())


# ---- create ---------------------------------------------------------------------------------------------------
def _create_range(fleet_dir: Path, clm_dir: Path, lab_dir: Path, domain: str, lo: int, hi: int) -> None:
    from agent.lab.ca import LabCA
    from coap_services.security import provision
    from keystore.store import Keystore

    anchor = LabCA(lab_dir).domain(domain).root_cert
    for i in range(lo, hi):
        d = fleet_dir / device_id(i)
        with Keystore.init(d / "state") as ks:
            ks.add_trust_anchors(domain, [anchor], source="fleet simulator")
        provision(device_id(i), d / "state" / "coap", clm_dir, methods=(SECURITY,))


def create(fleet_dir: str | os.PathLike, n: int, clm_dir: str | os.PathLike, lab_dir: str | os.PathLike,
           domain: str = "plant", jobs: int | None = None) -> dict:
    """Make N device identities (keystore + OSCORE contexts) and the manifest. ``jobs`` processes share the work
    (default: the CPU count). Returns the manifest."""
    from keystore import fsutil

    fleet_dir, clm_dir, lab_dir = Path(fleet_dir), Path(clm_dir), Path(lab_dir)
    fsutil.ensure_dir(fleet_dir)
    fsutil.ensure_dir(clm_dir)
    jobs = max(1, min(jobs or os.cpu_count() or 1, n // 50 or 1))
    if jobs == 1:
        _create_range(fleet_dir, clm_dir, lab_dir, domain, 0, n)
    else:
        bounds = [n * k // jobs for k in range(jobs + 1)]
        procs = [subprocess.Popen([sys.executable, "-m", "agent.lab.fleet", "_create", str(fleet_dir), str(clm_dir),
                                   str(lab_dir), domain, str(bounds[k]), str(bounds[k + 1])],
                                  preexec_fn=die_with_parent)
                 for k in range(jobs)]
        bad = [p.wait() for p in procs]
        if any(bad):
            raise RuntimeError(f"fleet creation failed (exit codes {bad})")
    manifest = {"devices": n, "port": _free_udp_port(), "domain": domain, "security": SECURITY,
                "clm_dir": str(clm_dir)}
    fsutil.atomic_write(fleet_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def records(fleet_dir: str | os.PathLike, **fields) -> list[dict]:
    """Inventory records (``agent.inventory.new_record``) for every simulated device."""
    from agent.inventory import new_record

    m = load_manifest(fleet_dir)
    clm_dir = Path(m["clm_dir"])
    return [new_record(device_id(i), f"coap://{device_host(i)}:{m['port']}", security=m["security"],
                       context=str(clm_dir / "contexts" / device_id(i)), domain=m["domain"], key_type="p256",
                       subject=f"CN={device_id(i)}", **fields)
            for i in range(m["devices"])]


# ---- serve ----------------------------------------------------------------------------------------------------
FDS_PER_DEVICE = 4  # socket, OSCORE context lock, keystore index (kept open by the keystore), a transient key lock
FDS_SPARE = 256


def devices_per_process() -> int:
    """How many devices one simulator process can serve under this machine's hard RLIMIT_NOFILE."""
    return max(1, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - FDS_SPARE) // FDS_PER_DEVICE)


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        raise SystemExit(f"fleet simulator: {need} file descriptors needed, the limit is {soft} (hard {hard}); "
                         "serve with more --shards")


async def _serve_shard(fleet_dir: Path, indices: range, ready_file: Path | None, stop: asyncio.Event) -> None:
    from coap_services.device import DeviceConfig, DeviceService
    from coap_services.security import load_server_security
    from coap_services.server import DeviceServer
    from keystore.store import Keystore

    m = load_manifest(fleet_dir)
    _raise_fd_limit(FDS_PER_DEVICE * len(indices) + FDS_SPARE)
    servers, services, stores = [], [], []
    t0 = time.perf_counter()
    try:
        for i in indices:
            d = fleet_dir / device_id(i)
            ks = Keystore.open(d / "state")
            stores.append(ks)
            svc = DeviceService(ks, DeviceConfig(device_id=device_id(i), default_domain=m["domain"],
                                                 default_key_type="p256", csr_rate_per_min=1e9, csr_burst=10 ** 6))
            services.append(svc)
            layers = load_server_security(d / "state" / "coap", methods=(m["security"],))
            servers.append(await DeviceServer.start(svc, layers, host=device_host(i), port=m["port"]))
        log.info("fleet simulator: %d devices listening in %.1f s", len(servers), time.perf_counter() - t0)
        if ready_file is not None:
            from keystore import fsutil

            fsutil.atomic_write(ready_file, f"{len(servers)}\n".encode())
        await stop.wait()
        await asyncio.gather(*(svc.close() for svc in services))
    finally:
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)
        for ks in stores:
            ks.close()


def serve(fleet_dir: str | os.PathLike, *, shard: int = 0, shards: int = 1, ready_file=None) -> None:
    """Serve shard ``shard`` of ``shards`` (devices i with i % shards == shard) until SIGTERM/SIGINT."""
    fleet_dir = Path(fleet_dir)
    n = load_manifest(fleet_dir)["devices"]

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await _serve_shard(fleet_dir, range(shard, n, shards), Path(ready_file) if ready_file else None, stop)

    asyncio.run(main())


class FleetProcesses:
    """``K`` simulator processes for a fleet directory; ``with FleetProcesses(dir, shards=2) as f: f.pids``."""

    def __init__(self, fleet_dir: str | os.PathLike, shards: int = 1, timeout_s: float = 600.0, log_dir=None):
        self.fleet_dir = Path(fleet_dir)
        self.shards = shards
        self.timeout_s = timeout_s
        self.log_dir = Path(log_dir or self.fleet_dir)
        self.procs: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __enter__(self) -> "FleetProcesses":
        ready = [self.log_dir / f".ready-{k}" for k in range(self.shards)]
        for r in ready:
            r.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for k in range(self.shards):
            with open(self.log_dir / f"sim-{k}.log", "ab") as log_f:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "agent.lab.fleet", "serve", str(self.fleet_dir), "--shard", str(k),
                     "--shards", str(self.shards), "--ready-file", str(ready[k])],
                    stdout=log_f, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent))
        deadline = time.monotonic() + self.timeout_s
        while not all(r.exists() for r in ready):
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                tail = (self.log_dir / "sim-0.log").read_text()[-2000:]
                raise RuntimeError(f"fleet simulator did not start ({'exited' if dead else 'timeout'}): {tail}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.lab.fleet", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create")
    c.add_argument("dir")
    c.add_argument("--devices", type=int, required=True)
    c.add_argument("--clm-dir", required=True)
    c.add_argument("--lab", required=True)
    c.add_argument("--domain", default="plant")
    c.add_argument("--jobs", type=int, default=None)
    s = sub.add_parser("serve")
    s.add_argument("dir")
    s.add_argument("--shard", type=int, default=0)
    s.add_argument("--shards", type=int, default=1)
    s.add_argument("--ready-file", default=None)
    r = sub.add_parser("records")
    r.add_argument("dir")
    i = sub.add_parser("_create")
    for a in ("dir", "clm_dir", "lab", "domain", "lo", "hi"):
        i.add_argument(a)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("coap-server").setLevel(logging.WARNING)
    logging.getLogger("devagent.coap").setLevel(logging.WARNING)
    if args.cmd == "create":
        print(json.dumps(create(args.dir, args.devices, args.clm_dir, args.lab, args.domain, args.jobs)))
    elif args.cmd == "_create":
        _create_range(Path(args.dir), Path(args.clm_dir), Path(args.lab), args.domain, int(args.lo), int(args.hi))
    elif args.cmd == "serve":
        serve(args.dir, shard=args.shard, shards=args.shards, ready_file=args.ready_file)
    else:
        for rec in records(args.dir):
            print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
