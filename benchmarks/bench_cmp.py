"""CMP client cost: CPU per ir/cr/kur (P-256, RSA-2048), ASN.1 import cost, and enroll wall time vs openssl.

Figures only, no pass/fail on time. Run::

    .venv/bin/python -m pytest benchmarks/bench_cmp.py --benchmark-columns=min,median,max,rounds

- ``test_client_cpu``: one ir/cr/kur through OpenSSL's socket-less mock server (``-use_mock_srv``, implicit
  confirm granted, so one message). The server runs in a child process, so ``time.process_time()`` of this
  process is the client's CPU: building the CRMF request, POP and protection (PBM for ir, signature for
  cr/kur), encoding, and fully checking the response (MAC/signature + chain, binding, key match). The figure
  also contains the parent side of spawning the openssl carrier (vfork/exec, a few hundred µs).
  ``extra_info["client_cpu_ms"]`` holds the per-run samples.
- ``test_import_cost``: fresh interpreters importing the package (must stay cheap), our ASN.1 layer
  (pyasn1-modules rfc4210 + local RFC 9480/9481 additions), and for comparison pyasn1-alt-modules' rfc9480.
- ``test_enroll_wall_vs_openssl``: the same MAC-protected ir + certConf against the same HTTP mock server (in
  a network namespace), ``openssl cmp -keep_alive 0`` vs a fresh ``python`` process running our client
  (cold: interpreter start + imports + enroll) and vs our client warm in-process; ratios in extra_info.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509

from enroll_clients.base import CertRequest, ClientAuth
from enroll_clients.cmp import CallableTransport, CmpClient, HttpTransport
from tests.peers import openssl_cmp as O

REPO = Path(__file__).resolve().parent.parent
CI = os.environ.get("DEVAGENT_BENCH_CI", "") not in ("", "0")
ROUNDS = 3 if CI else int(os.environ.get("DEVAGENT_BENCH_N", "20"))
SUBJECT = x509.Name.from_rfc4514_string("CN=device-0001,O=devagent test")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    O.require_tools()
    return O.make_pki(tmp_path_factory.mktemp("bench-cmp"))


def _socketless_transport(pki, workdir, **kw):
    def handler(der):
        return O.socketless(pki, der, workdir, **kw)

    return CallableTransport(handler)


@pytest.mark.parametrize("key_type", ["p256", "rsa2048"])
@pytest.mark.parametrize("body", ["ir", "cr", "kur"])
def test_client_cpu(benchmark, pki, tmp_path, body, key_type):
    rsa = key_type == "rsa2048"
    key = pki.device_rsa_key if rsa else pki.device_key
    cert = pki.device_rsa_cert if rsa else pki.device_cert
    signed = body != "ir"
    client = CmpClient(_socketless_transport(pki, tmp_path, rsa=rsa, signed=signed, grant_implicitconf=True),
                       trust_anchors=(pki.root,), implicit_confirm=True)
    auth = (ClientAuth(reference=O.REF.encode(), secret=O.SECRET.encode()) if body == "ir"
            else ClientAuth(certificate=cert, private_key=key, chain=(pki.root,)))
    method = {"ir": client.enroll, "cr": client.request, "kur": client.renew}[body]
    request = CertRequest(SUBJECT, key)
    asyncio.run(method(request, auth))  # warm: imports, first-use caches
    cpu = []

    def one():
        t0 = time.process_time()
        r = asyncio.run(method(request, auth))
        cpu.append((time.process_time() - t0) * 1000)
        assert r.certificate == cert

    benchmark.extra_info.update(body=body, key_type=key_type, protection="pbm" if body == "ir" else "signature")
    benchmark.pedantic(one, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(client_cpu_ms=cpu, client_cpu_ms_median=statistics.median(cpu))


IMPORTS = {
    "package (enroll_clients.cmp + client_from_options)":
        "import enroll_clients.cmp as c; from enroll_clients.base import EnrollOptions; "
        "c.client_from_options(EnrollOptions(server='http://127.0.0.1:1/'))",
    "asn1 layer (enroll_clients.cmp.messages)": "import enroll_clients.cmp.messages",
    "pyasn1_modules.rfc4210": "from pyasn1_modules import rfc4210",
    "pyasn1_alt_modules.rfc9480 (not used)": "from pyasn1_alt_modules import rfc9480",
    "httpx (first HTTP request)": "import httpx",
}
BASELINE = "import enroll_clients.base"


def _import_ms(stmt: str) -> float:
    code = f"import time; {BASELINE}; t=time.perf_counter(); {stmt}; print((time.perf_counter()-t)*1000)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return float(out.stdout.strip())


@pytest.mark.parametrize("what", list(IMPORTS))
def test_import_cost(benchmark, what):
    """Import time in a fresh interpreter, after ``enroll_clients.base`` (cryptography.x509) is loaded."""
    samples = []
    benchmark.pedantic(lambda: samples.append(_import_ms(IMPORTS[what])), rounds=max(3, ROUNDS // 4), iterations=1)
    benchmark.extra_info.update(what=what, import_ms=samples, import_ms_median=statistics.median(samples))


_COLD = """
import asyncio, sys, time
t0 = time.perf_counter()
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from enroll_clients.base import CertRequest, ClientAuth, EnrollOptions
from enroll_clients.cmp import client_from_options
d = sys.argv[1]
key = serialization.load_pem_private_key(open(d + "/device_key.pem", "rb").read(), None)
root = x509.load_pem_x509_certificate(open(d + "/root.pem", "rb").read())
async def main():
    c = client_from_options(EnrollOptions(server=sys.argv[2], trust_anchors=(root,), retries=0))
    r = await c.enroll(CertRequest(x509.Name.from_rfc4514_string("CN=device-0001,O=devagent test"), key),
                       ClientAuth(reference=sys.argv[3].encode(), secret=sys.argv[4].encode()))
    await c.aclose()
asyncio.run(main())
"""


def test_enroll_wall_vs_openssl(benchmark, pki, tmp_path):
    """Same ir (PBM, P-256 key, same subject) + certConf against the same mock server."""
    ns = lambda srv: ["nsenter", f"--net=/proc/{srv.pid}/ns/net"]  # noqa: E731
    with O.MockServer(pki, signed=False) as srv:
        ossl_cmd = ns(srv) + ["openssl", "cmp", "-config", "", "-server", f"127.0.0.1:{srv.port}", "-path", "pkix/",
                              "-keep_alive", "0", "-cmd", "ir", "-ref", O.REF, "-secret", f"pass:{O.SECRET}",
                              "-newkey", pki.path("device_key.pem"), "-subject", "/CN=device-0001/O=devagent test",
                              "-trusted", pki.path("root.pem"), "-certout", str(tmp_path / "o.pem")]
        py_cmd = ns(srv) + [sys.executable, "-c", _COLD, str(pki.dir), srv.url, O.REF, O.SECRET]
        env = dict(os.environ, PYTHONPATH=str(REPO))

        def wall(cmd):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=REPO)
            return (time.perf_counter() - t0) * 1000

        wall(ossl_cmd), wall(py_cmd)  # warm the page cache
        ossl, cold = [], []
        for _ in range(ROUNDS):
            ossl.append(wall(ossl_cmd))
            cold.append(wall(py_cmd))

        async def warm_runs():
            c = CmpClient(HttpTransport(srv.url, retries=0), trust_anchors=(pki.root,))
            out = []
            auth = ClientAuth(reference=O.REF.encode(), secret=O.SECRET.encode())
            await c.enroll(CertRequest(SUBJECT, pki.device_key), auth)
            for _ in range(ROUNDS):
                t0 = time.perf_counter()
                await c.enroll(CertRequest(SUBJECT, pki.device_key), auth)
                out.append((time.perf_counter() - t0) * 1000)
            await c.aclose()
            return out

        warm = srv.run_async(warm_runs)
        benchmark.pedantic(lambda: srv.run_async(warm_runs), rounds=1, iterations=1)
    m = statistics.median
    benchmark.extra_info.update(
        openssl_ms=ossl, ours_cold_process_ms=cold, ours_warm_in_process_ms=warm,
        openssl_ms_median=m(ossl), ours_cold_ms_median=m(cold), ours_warm_ms_median=m(warm),
        ratio_cold_vs_openssl=m(cold) / m(ossl), ratio_warm_vs_openssl=m(warm) / m(ossl))
