"""Footprint of the real ``devagent`` executable: resident memory of ``devagent serve`` idle and under load, and
start-up time of ``devagent --help`` and ``devagent status`` (the agent runs on a Raspberry Pi Zero 2 W with 512 MB:
imports must stay lazy).

- serve: a ``devagent serve`` child process (OSCORE + DTLS-PSK contexts provisioned in its state directory) is
  measured from /proc: VmRSS once it answers, after an idle second, and VmRSS/VmHWM after a CLM has enrolled it
  K times over OSCORE (K = 50; CI: 5), with the child's CPU seconds.
- start-up: wall time of the console script, n runs each (20; CI: 3), plus ``python -c pass`` as the floor. The
  heavy modules a command imports (cryptography, aiocoap, pyasn1 ...) are listed next to its time.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.peers.coap import free_port_pair
from benchmarks.conftest import CI, DOMAIN, n_samples, record

HEAVY = ("cryptography.x509", "aiocoap", "pyasn1", "pyasn1_modules", "pyasn1_alt_modules", "httpx", "tinydb",
         "cbor2", "tpm2_pytss", "pkcs11", "matplotlib")
LOAD_ENROLLMENTS = 5 if CI else 50


def devagent_cmd() -> list[str]:
    script = Path(sys.executable).parent / "devagent"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from agent.cli import main; main()"]


def proc_status(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024  # MB
    return out


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def device_state(tmp_path_factory, lab_ca):
    """A device state directory: keystore trusting the lab root, one LDevID, OSCORE + DTLS contexts for a CLM."""
    from coap_services.security import provision
    from keystore.csr import build_csr, parse_subject
    from keystore.store import Keystore

    root = tmp_path_factory.mktemp("footprint")
    state, clm_dir = root / "state", root / "clm"
    ks = Keystore.init(state)
    ks.add_trust_anchors(DOMAIN, [lab_ca.domain(DOMAIN).root_cert], source="bench")
    uri = ks.generate_key("p256")
    cert = lab_ca.issue_from_csr(DOMAIN, build_csr(ks.private_key(uri), parse_subject("CN=footprint-dev"), []))
    ks.store_certificate("ldevid", cert, lab_ca.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN)
    ks.close()
    provision("footprint-dev", state / "coap", clm_dir)
    return state, clm_dir


@contextlib.contextmanager
def devagent_serve(state: Path, port: int):
    env = dict(os.environ, DEVAGENT_STATE_DIR=str(state))
    cmd = devagent_cmd() + ["serve", "--port", str(port), "--device-id", "footprint-dev", "--domain", DOMAIN,
                            "--csr-rate", "100000", "--csr-burst", "100"]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _wait_ready(uri: str, proc, timeout_s: float = 30.0) -> float:
    from coap_services.client import CoapClient
    from coap_services.errors import CoapServiceError

    t0 = time.perf_counter()
    async with CoapClient(timeout_s=0.5) as c:
        dev = c.device(uri)
        while time.perf_counter() - t0 < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"devagent serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(CoapServiceError):
                await dev.well_known_core()
                return time.perf_counter() - t0
    raise RuntimeError(f"devagent serve did not answer on {uri} within {timeout_s} s")


async def _load(uri: str, clm_dir: Path, lab, k: int) -> None:
    from agent.clm import Clm, LabUpstream, open_inventory
    from coap_services.client import CoapClient

    inv = open_inventory(None, clm_dir / "inventory")
    inv.add("footprint-dev", uri, security="oscore", context=str(clm_dir / "contexts" / "footprint-dev"),
            key_type="p256", domain=DOMAIN, subject="CN=footprint-dev", replace=True)
    async with CoapClient(timeout_s=30.0) as c:
        clm = Clm(inv, LabUpstream(lab), c, retries=1)
        for _ in range(k):
            await clm.enroll("footprint-dev")


@pytest.mark.benchmark(group="footprint")
def test_serve_memory_idle(benchmark, device_state):
    """Timed: exec of ``devagent serve`` until it answers /.well-known/core; then RSS after an idle second."""
    state, _ = device_state
    port = free_port_pair()
    uri = f"coap://127.0.0.1:{port}"
    figures: dict = {}
    with devagent_serve(state, port) as proc:
        benchmark.pedantic(lambda: figures.update(ready_s=asyncio.run(_wait_ready(uri, proc))), rounds=1,
                           iterations=1)
        figures["ready"] = proc_status(proc.pid)
        time.sleep(1.0)
        figures["idle"] = proc_status(proc.pid)
    record(benchmark, what="devagent serve: RSS idle", rss_mb=figures["idle"]["VmRSS"],
           hwm_mb=figures["idle"]["VmHWM"], ready_s=figures["ready_s"],
           note=f"OSCORE + DTLS-PSK loaded; answers /.well-known/core {figures['ready_s'] * 1000:.0f} ms after exec")


@pytest.mark.benchmark(group="footprint")
def test_serve_memory_under_load(benchmark, device_state, lab_ca):
    """The same measurement reported as its own row: RSS after K enrollments, peak (VmHWM), server CPU."""
    state, clm_dir = device_state
    port = free_port_pair()
    uri = f"coap://127.0.0.1:{port}"
    with devagent_serve(state, port) as proc:
        asyncio.run(_wait_ready(uri, proc))
        cpu0 = proc_cpu_s(proc.pid)
        benchmark.pedantic(lambda: asyncio.run(_load(uri, clm_dir, lab_ca, LOAD_ENROLLMENTS)), rounds=1, iterations=1)
        st = proc_status(proc.pid)
        cpu = proc_cpu_s(proc.pid) - cpu0
    record(benchmark, what=f"devagent serve: RSS after {LOAD_ENROLLMENTS} delegated enrollments", rss_mb=st["VmRSS"],
           hwm_mb=st["VmHWM"], server_cpu_s=cpu,
           note=f"OSCORE, P-256, CLM in the benchmark process; server CPU {cpu:.2f} s "
                f"({cpu / LOAD_ENROLLMENTS * 1000:.1f} ms per enrollment)")


def _heavy_modules(args: list[str], env: dict) -> list[str]:
    """Heavy modules imported by ``devagent ARGS`` (run in-process in a child interpreter)."""
    code = ("import sys\nfrom agent.cli import main\nsys.argv=['devagent']+sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print('MODULES', ' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60)
    for line in p.stdout.splitlines():
        if line.startswith("MODULES"):
            return line.split()[1:]
    return ["?"]


def _startup(benchmark, args: list[str], what: str, env: dict | None = None, cmd: list[str] | None = None):
    env = dict(os.environ, **(env or {}))
    cmd = (cmd or devagent_cmd()) + args
    samples: list[float] = []

    def run():
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, env=env, timeout=60)
        samples.append(time.perf_counter() - t0)
        assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.decode()[-1000:]}"

    run()  # warm the page cache and .pyc files
    samples.clear()
    benchmark.pedantic(run, rounds=n_samples(20, 3), iterations=1)
    heavy = _heavy_modules(args, env) if cmd[0] != sys.executable or args[:1] != ["-c"] else []
    record(benchmark, what=what, samples_s=samples, stage="startup",
           note=("heavy modules imported: " + (", ".join(heavy) or "none")) if heavy is not None else "")


@pytest.mark.benchmark(group="footprint")
def test_startup_python_floor(benchmark):
    _startup(benchmark, ["-c", "pass"], "python -c pass (floor)", cmd=[sys.executable])
    benchmark.extra_info["note"] = "the interpreter alone"


@pytest.mark.benchmark(group="footprint")
def test_startup_help(benchmark):
    _startup(benchmark, ["--help"], "devagent --help start-up")


@pytest.mark.benchmark(group="footprint")
def test_startup_status(benchmark, device_state):
    state, _ = device_state
    _startup(benchmark, ["status"], "devagent status start-up (1 credential)", env={"DEVAGENT_STATE_DIR": str(state)})
