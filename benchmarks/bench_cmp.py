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
  (own pyasn1 types, enroll_clients/cmp/asn1.py), and for comparison pyasn1-modules' rfc4210 (used until session
  17) and pyasn1-alt-modules' rfc9480.
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
    "pyasn1_modules.rfc4210 (the types used until session 17)": "from pyasn1_modules import rfc4210",
    "pyasn1_alt_modules.rfc9480 (not used)": "from pyasn1_alt_modules import rfc9480",
    "http.client (the CMP HTTP transport, first HTTP request)": "import http.client",
    "httpx (EST's transport; CMP's until session 5)": "import httpx",
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


# --- client CPU per operation next to `openssl cmp`, same server, same run ------------------------------------
# For each CMP server (the Siemens MockCA on 127.0.0.1, OpenSSL's own mock server over HTTP in a network
# namespace) and each operation, three figures of client CPU (user + system):
#   openssl:      the whole `openssl cmp` process (getrusage of the waited-for child);
#   ours_process: a fresh `python` process doing the same one operation with our client (interpreter start,
#                 imports, the exchange), also from getrusage;
#   ours_inproc:  time.process_time() around the operation in this process (warm; the server is another process).
# Ratios are of medians: ours_process/openssl and ours_inproc/openssl.
VS_ROUNDS = 1 if CI else ROUNDS  # each round starts two processes per operation: keep make bench-ci short
_ONE_OP = """
import asyncio, json, sys
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from enroll_clients.base import CertRequest, ClientAuth
from enroll_clients.cmp import CmpClient, HttpTransport
a = json.loads(sys.argv[1])
load = lambda p: x509.load_pem_x509_certificate(open(p, "rb").read())
key = serialization.load_pem_private_key(open(a["key"], "rb").read(), None)
new = serialization.load_pem_private_key(open(a.get("newkey") or a["key"], "rb").read(), None)
c = CmpClient(HttpTransport(a["url"], retries=0), trust_anchors=(load(a["root"]),),
              recipient=x509.Name.from_rfc4514_string(a["recipient"]) if a.get("recipient") else None,
              **a.get("client", {}))
subject = x509.Name.from_rfc4514_string(a["subject"])
async def main():
    if a["op"] == "ir":
        await c.enroll(CertRequest(subject, new), ClientAuth(reference=a["ref"].encode(), secret=a["secret"].encode()))
    else:
        auth = ClientAuth(certificate=load(a["cert"]), private_key=key,
                          chain=(load(a["root"]),) if a.get("send_chain") else ())
        if a["op"] == "cr":
            await c.request(CertRequest(subject, new), auth)
        elif a["op"] == "kur":
            await c.renew(CertRequest(subject, new), auth)
        else:
            await c.revoke(load(a["cert"]), auth, "superseded")
    await c.aclose()
asyncio.run(main())
"""


def _child_cpu_ms(cmd, **kw) -> float:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {(r.stdout + r.stderr)[-1500:]}")
    return ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1000


def _record_vs(benchmark, server, op, ossl, proc, inproc, note=""):
    m = statistics.median
    benchmark.extra_info.update(
        server=server, op=op, openssl_cpu_ms=ossl, ours_process_cpu_ms=proc, ours_inproc_cpu_ms=inproc,
        openssl_cpu_ms_median=m(ossl), ours_process_cpu_ms_median=m(proc), ours_inproc_cpu_ms_median=m(inproc),
        ratio_process=m(proc) / m(ossl), ratio_inproc=m(inproc) / m(ossl), note=note)


@pytest.fixture(scope="module")
def mock_http(pki):
    with O.MockServer(pki, signed=True) as srv:
        yield srv


@pytest.mark.benchmark(group="cmp-vs-openssl")
@pytest.mark.parametrize("op", ["ir", "cr", "kur", "rr"])
def test_cpu_vs_openssl_mock_server(benchmark, pki, mock_http, tmp_path, op):
    """OpenSSL's mock server (signed answers; the fixed certificate is the one device_key was made for)."""
    srv = mock_http
    ns = ["nsenter", f"--net=/proc/{srv.pid}/ns/net"]
    common = ["openssl", "cmp", "-config", "", "-server", f"127.0.0.1:{srv.port}", "-path", "pkix/",
              "-keep_alive", "0", "-trusted", pki.path("root.pem")]
    subj = "/CN=device-0001/O=devagent test"
    ossl_args = {
        "ir": ["-cmd", "ir", "-ref", O.REF, "-secret", f"pass:{O.SECRET}", "-newkey", pki.path("device_key.pem"),
               "-subject", subj, "-certout", str(tmp_path / "o.pem")],
        "cr": ["-cmd", "cr", "-cert", pki.path("device_cert.pem"), "-key", pki.path("device_key.pem"),
               "-newkey", pki.path("device_key.pem"), "-subject", subj, "-certout", str(tmp_path / "o.pem")],
        "kur": ["-cmd", "kur", "-cert", pki.path("device_cert.pem"), "-key", pki.path("device_key.pem"),
                "-newkey", pki.path("device_key.pem"), "-certout", str(tmp_path / "o.pem")],
        "rr": ["-cmd", "rr", "-cert", pki.path("device_cert.pem"), "-key", pki.path("device_key.pem"),
               "-oldcert", pki.path("device_cert.pem"), "-revreason", "4"],
    }[op]
    args = {"url": srv.url, "op": op, "key": pki.path("device_key.pem"), "cert": pki.path("device_cert.pem"),
            "root": pki.path("root.pem"), "subject": SUBJECT.rfc4514_string(), "ref": O.REF, "secret": O.SECRET}
    import json as _json

    py_cmd = ns + [sys.executable, "-c", _ONE_OP, _json.dumps(args)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    client = CmpClient(HttpTransport(srv.url, retries=0), trust_anchors=(pki.root,))
    mac = ClientAuth(reference=O.REF.encode(), secret=O.SECRET.encode())
    ldev = ClientAuth(certificate=pki.device_cert, private_key=pki.device_key)

    async def one_inproc():
        t0 = time.process_time()
        if op == "ir":
            await client.enroll(CertRequest(SUBJECT, pki.device_key), mac)
        elif op == "cr":
            await client.request(CertRequest(SUBJECT, pki.device_key), ldev)
        elif op == "kur":
            await client.renew(CertRequest(SUBJECT, pki.device_key), ldev)
        else:
            await client.revoke(pki.device_cert, ldev, "superseded")
        return (time.process_time() - t0) * 1000

    if not CI:
        _child_cpu_ms(ns + common + ossl_args), _child_cpu_ms(py_cmd, env=env, cwd=REPO)  # warm page cache
    srv.run_async(one_inproc)
    ossl, proc, inproc = [], [], []
    for _ in range(VS_ROUNDS):
        ossl.append(_child_cpu_ms(ns + common + ossl_args))
        proc.append(_child_cpu_ms(py_cmd, env=env, cwd=REPO))
        inproc.append(srv.run_async(one_inproc))
    benchmark.pedantic(lambda: srv.run_async(one_inproc), rounds=1, iterations=1)
    _record_vs(benchmark, "openssl-mock", op, ossl, proc, inproc)


@pytest.fixture(scope="module")
def mockca(tmp_path_factory):
    from tests.peers import mockca as MC

    d = tmp_path_factory.mktemp("bench-mockca")
    with MC.MockCA(d, allow_same_key=True) as srv:
        from cryptography.hazmat.primitives import serialization

        (d / "root.pem").write_bytes(srv.root.public_bytes(serialization.Encoding.PEM))
        yield srv


def _pem_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return k


@pytest.mark.benchmark(group="cmp-vs-openssl")
@pytest.mark.parametrize("op", ["ir", "cr", "kur", "rr"])
def test_cpu_vs_openssl_mockca(benchmark, mockca, tmp_path, op):
    """The Siemens MockCA. Its answers to signed requests are signed by a root without digitalSignature: OpenSSL
    needs -ignore_keyusage for cr/kur/rr, devagent its --ignore-keyusage switch (docs/cmp.md); its pkiConf
    repeats the ip's senderNonce (devagent: --tolerate-nonce-reuse)."""
    from tests.peers import mockca as MC

    root = str(mockca.workdir / "root.pem")
    client_kw = {"tolerate_nonce_reuse": True}
    if op != "ir":
        client_kw["ignore_keyusage"] = True
    cn = f"bench-{op}"
    key_path = tmp_path / "k.pem"
    key = _pem_key(key_path)
    subject = x509.Name.from_rfc4514_string(f"CN={cn}")
    recipient = x509.Name.from_rfc4514_string(MC.RECIPIENT)

    def new_client():
        return CmpClient(HttpTransport(mockca.url, retries=0), trust_anchors=(mockca.root,), recipient=recipient,
                         **client_kw)

    mac = ClientAuth(reference=cn.encode(), secret=MC.SECRET.encode())

    def issue(k) -> Path:
        """A fresh certificate (not measured): what cr/kur sign with and rr revokes."""
        r = asyncio.run(new_client().enroll(CertRequest(subject, k), mac))
        p = tmp_path / f"c-{r.certificate.serial_number:x}.pem"
        from cryptography.hazmat.primitives import serialization

        p.write_bytes(r.certificate.public_bytes(serialization.Encoding.PEM))
        return p

    def ossl_cmd(cert_path: Path, newkey: Path):
        base = ["openssl", "cmp", "-config", "", "-server", mockca.url, "-recipient", "/CN=Mock-CA",
                "-trusted", root, "-keep_alive", "0"]
        if op == "ir":
            return base + ["-cmd", "ir", "-ref", cn, "-secret", f"pass:{MC.SECRET}", "-subject", f"/CN={cn}",
                           "-newkey", str(key_path), "-certout", str(tmp_path / "o.pem")]
        signed = ["-cert", str(cert_path), "-key", str(key_path), "-extracerts", root, "-ignore_keyusage"]
        if op == "cr":
            return base + ["-cmd", "cr", *signed, "-newkey", str(key_path), "-subject", f"/CN={cn}",
                           "-certout", str(tmp_path / "o.pem")]
        if op == "kur":
            return base + ["-cmd", "kur", *signed, "-newkey", str(newkey), "-certout", str(tmp_path / "o.pem")]
        return base + ["-cmd", "rr", *signed, "-oldcert", str(cert_path), "-revreason", "4"]  # superseded, as ours

    import json as _json

    env = dict(os.environ, PYTHONPATH=str(REPO))

    def ours_cmd(cert_path: Path, newkey: Path):
        return [sys.executable, "-c", _ONE_OP, _json.dumps({
            "url": mockca.url, "op": op, "key": str(key_path), "newkey": str(newkey), "cert": str(cert_path),
            "root": root, "subject": f"CN={cn}", "ref": cn, "secret": MC.SECRET, "recipient": MC.RECIPIENT,
            "client": client_kw, "send_chain": True})]

    def fresh():
        """(certificate file, new key file) for one measured operation."""
        cert = issue(key) if op != "ir" else tmp_path / "none.pem"
        nk = tmp_path / f"nk-{len(list(tmp_path.iterdir()))}.pem"
        new_key = _pem_key(nk) if op == "kur" else key
        if op != "kur":
            nk = key_path
        return cert, nk, new_key

    async def inproc(cert_path, new_key):
        c = new_client()
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes()) if op != "ir" else None
        auth = ClientAuth(certificate=cert, private_key=key, chain=(mockca.root,)) if cert is not None else mac
        t0 = time.process_time()
        if op == "ir":
            await c.enroll(CertRequest(subject, key), mac)
        elif op == "cr":
            await c.request(CertRequest(subject, key), auth)
        elif op == "kur":
            await c.renew(CertRequest(subject, new_key), auth)
        else:
            await c.revoke(cert, auth, "superseded")
        return (time.process_time() - t0) * 1000

    cert, nk, new_key = fresh()
    asyncio.run(inproc(cert, new_key))  # warm
    ossl, proc, ins = [], [], []
    for _ in range(VS_ROUNDS):
        cert, nk, _k = fresh()
        ossl.append(_child_cpu_ms(ossl_cmd(cert, nk)))
        cert, nk, _k = fresh()
        proc.append(_child_cpu_ms(ours_cmd(cert, nk), env=env, cwd=REPO))
        cert, nk, new_key = fresh()
        ins.append(asyncio.run(inproc(cert, new_key)))
    cert, nk, new_key = fresh()
    benchmark.pedantic(lambda: asyncio.run(inproc(cert, new_key)), rounds=1, iterations=1)
    _record_vs(benchmark, "siemens-mockca", op, ossl, proc, ins,
               note="" if op == "ir" else "with -ignore_keyusage / --ignore-keyusage")
