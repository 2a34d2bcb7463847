"""Footprint of the real ``devagent`` executable: resident memory of ``devagent serve`` idle and under load, and
start-up time of ``devagent --help`` and ``devagent status`` (the agent runs on a Raspberry Pi Zero 2 W with 512 MB:
imports must stay lazy).

- serve: a ``devagent serve`` child process (OSCORE + DTLS-PSK contexts provisioned in its state directory) is
  measured from /proc: VmRSS once it answers, after an idle second, and VmRSS/VmHWM after a CLM has enrolled it
  K times over OSCORE (K = 50; CI: 5), with the child's CPU seconds.
- start-up: wall time of the console script, n runs each (20; CI: 3), plus ``python -c pass`` as the floor, with
  compiled bytecode (the session fixture byte-compiles the packages and site-packages first, as pip does when it
  installs: this machine sets PYTHONDONTWRITEBYTECODE=1). The heavy modules a command imports (cryptography,
  aiocoap, pyasn1 ...) and its ``python -X importtime`` profile (total, slowest packages) are listed next to its
  time; ``devagent enroll --protocol cmp`` is timed as a whole process next to ``openssl cmp -keep_alive 0``
  against OpenSSL's mock server in the same run.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.peers.coap import free_port_pair
from benchmarks.conftest import CI, DOMAIN, REPO, n_samples, record

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
    from coap_services.authz import Grant, write_grant
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
    # the LDevID above was stored on the device itself: the CLM may replace it only with this grant
    # (`devagent coap provision --allow-replace-cli`, docs/coap.md)
    write_grant(state / "coap", Grant("clm", (DOMAIN,), None, replace_cli=True))
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


def import_profile(args: list[str], env: dict, prefix: list[str] = (), top: int = 6) -> dict:
    """``python -X importtime`` of ``devagent ARGS``: total import time (ms, the top-level imports' cumulative
    times) and the ``top`` slowest top-level packages with their cumulative ms."""
    code = "import sys\nfrom agent.cli import main\nsys.argv=['devagent']+sys.argv[1:]\nmain()"
    p = subprocess.run([*prefix, sys.executable, "-X", "importtime", "-c", code, *args], capture_output=True,
                       text=True, env=env, timeout=120, cwd=REPO)
    cum: dict[str, int] = {}
    total = 0
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        depth, us, mod = len(m.group(3)) // 2, int(m.group(2)), m.group(4)
        if depth == 0:
            total += us
        if depth <= 1:
            pkg = mod.split(".")[0]
            cum[pkg] = max(cum.get(pkg, 0), us)
    slow = sorted(cum.items(), key=lambda kv: -kv[1])[:top]
    return {"import_ms": round(total / 1000, 1), "top_imports": {k: round(v / 1000, 1) for k, v in slow}}


@pytest.fixture(scope="session", autouse=True)
def compiled_bytecode():
    """Start-up is measured as an installed package runs: with compiled bytecode. This machine sets
    PYTHONDONTWRITEBYTECODE=1, so nothing would ever be cached and every run would compile every module; the
    repository's packages and the virtualenv's site-packages are byte-compiled once here (what pip does at install).
    """
    import site
    import sysconfig

    dirs = [str(REPO / d) for d in ("agent", "keystore", "enroll_clients", "coap_services", "board_profiles")]
    dirs.append(sysconfig.get_paths()["purelib"])
    dirs += [d for d in site.getsitepackages() if d not in dirs]
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *dirs], capture_output=True, timeout=600)


def _startup(benchmark, args: list[str], what: str, env: dict | None = None, cmd: list[str] | None = None,
             prefix: list[str] = ()):
    env = dict(os.environ, **(env or {}))
    cmd = [*prefix, *(cmd or devagent_cmd()), *args]
    samples: list[float] = []

    def run():
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, env=env, timeout=60)
        samples.append(time.perf_counter() - t0)
        assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.decode()[-1000:]}"

    run()  # warm the page cache
    samples.clear()
    benchmark.pedantic(run, rounds=n_samples(20, 3), iterations=1)
    ours = not (cmd[len(prefix)] == sys.executable and args[:1] == ["-c"]) and cmd[len(prefix)] != "openssl"
    heavy = _heavy_modules(args, env) if ours and not prefix else None
    profile = import_profile(args, env, list(prefix)) if ours else {}
    note = ("heavy modules imported: " + (", ".join(heavy) or "none")) if heavy is not None else ""
    if profile:
        note += (("; " if note else "") + f"imports {profile['import_ms']:.0f} ms (-X importtime; slowest: " +
                 ", ".join(f"{k} {v:.0f}" for k, v in profile["top_imports"].items()) + ")")
    record(benchmark, what=what, samples_s=samples, stage="startup", note=note, **profile)
    return samples


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


@pytest.mark.benchmark(group="footprint")
def test_startup_enroll_cmp_vs_openssl(benchmark, tmp_path):
    """``devagent enroll --protocol cmp`` (ir, P-256, MAC) as a whole process against OpenSSL's mock server (HTTP,
    in its own network namespace), next to ``openssl cmp -keep_alive 0`` doing the same ir in the same run.

    OpenSSL's mock server answers with its configured certificate, so both use its key (``--key`` /
    ``-newkey``); devagent stores the credential (verify-before-store, fsynced) each time, openssl writes a file.
    """
    from tests.peers import openssl_cmp as O

    O.require_tools()
    pki = O.make_pki(tmp_path / "pki")
    state, config = tmp_path / "state", tmp_path / "agent.toml"
    config.write_text("")
    env = {"DEVAGENT_STATE_DIR": str(state), "DEVAGENT_CONFIG": str(config)}
    full_env = dict(os.environ, **env)
    for args in (["keystore", "init"], ["keystore", "trust", "--domain", "plant", "--add", pki.path("root.pem")]):
        subprocess.run([*devagent_cmd(), *args], env=full_env, check=True, capture_output=True, timeout=60)
    with O.MockServer(pki, signed=False) as srv:
        ns = ["nsenter", f"--net=/proc/{srv.pid}/ns/net"]
        ours = _startup(benchmark, ["enroll", "--protocol", "cmp", "--server", srv.url, "--domain", "plant",
                                    "--name", "ldevid", "--ref", O.REF, "--secret", f"pass:{O.SECRET}",
                                    "--subject", "CN=device-0001,O=devagent test", "--key", pki.path("device_key.pem")],
                        "devagent enroll --protocol cmp (ir, P-256) vs OpenSSL's mock server, whole process",
                        env=env, prefix=ns)
        ossl: list[float] = []
        ossl_cmd = [*ns, "openssl", "cmp", "-config", "/dev/null", "-server", f"127.0.0.1:{srv.port}", "-path",
                    "pkix/", "-keep_alive", "0", "-cmd", "ir", "-ref", O.REF, "-secret", f"pass:{O.SECRET}",
                    "-newkey", pki.path("device_key.pem"), "-subject", "/CN=device-0001/O=devagent test",
                    "-trusted", pki.path("root.pem"), "-certout", str(tmp_path / "o.pem")]
        for _ in range(n_samples(20, 3)):
            t0 = time.perf_counter()
            subprocess.run(ossl_cmd, check=True, capture_output=True, timeout=60)
            ossl.append(time.perf_counter() - t0)
    import statistics

    ratio = statistics.median(ours) / statistics.median(ossl)
    benchmark.extra_info.update(openssl_samples_s=ossl, openssl_median_ms=statistics.median(ossl) * 1000,
                                ratio_vs_openssl=ratio)
    benchmark.extra_info["note"] += f"; openssl cmp -keep_alive 0: {statistics.median(ossl) * 1000:.0f} ms " \
                                    f"median, devagent/openssl {ratio:.0f}x"
