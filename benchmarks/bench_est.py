"""EST simpleenroll / simplereenroll: devagent's client next to curl + openssl doing the same request, in the same
run, against two servers: Cisco libest's ``estserver`` (in a private network namespace, tests/peers/libest.py) and
the lab EST server (its own process, ``python -m agent.lab.est_server``), for P-256 and RSA-2048 requests.

Figures, not pass/fail. One round is one full exchange on a new TLS connection with a CSR made beforehand (key
generation and CSR signing are not counted, for either client):

- devagent: ``EstClient.enroll`` / ``renew`` as the agent calls them (TLS with the trust anchor, POST, PKCS#7
  parse, certificate-for-our-key and chain checks; for re-enrollment the TLS client key handed to OpenSSL as an
  encrypted one-time file). /cacerts is fetched once before the rounds, as a running agent has it.
- curl + openssl: ``curl --cacert … --data-binary @req.b64 URL | base64 -d | openssl pkcs7 -print_certs`` then
  ``openssl verify`` of the result: the same request, parse and chain check done the way RFC 7030's examples do.

Wall time per round, and client CPU per round: the benchmark process's CPU time (``time.process_time``) for
devagent, the children's (``RUSAGE_CHILDREN``: bash, curl, base64, openssl) for the pipeline. Neither server
runs in this process, so both figures are client-only. ``extra_info`` holds both clients' medians and the
ratios devagent / (curl + openssl) of the medians; benchmarks/report.py renders them as one table.

Run: ``.venv/bin/python -m pytest benchmarks/bench_est.py --benchmark-only`` (``DEVAGENT_BENCH_CI=1``: 2 rounds).
"""
from __future__ import annotations

import asyncio
import os
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from benchmarks.conftest import n_samples
from enroll_clients.base import CertRequest, ClientAuth
from enroll_clients.est import client_from_options
from tests.peers import libest
from tests.peers.est import est_options, make_csr, new_key

ROUNDS = n_samples(full=20, ci=1)
USER, PASSWORD = "bench", "bench-pass"
PEM = serialization.Encoding.PEM


class Site:
    """One server as both clients see it: URL, trust files, Basic credentials, a way to run code next to it."""

    def __init__(self, name, url, root_pem: Path, chain_pem: Path | None, user, password, inside=None,
                 cmd_prefix=()):
        self.name, self.url, self.root_pem, self.chain_pem = name, url, root_pem, chain_pem
        self.user, self.password = user, password
        self.inside = inside or (lambda fn: fn())
        self.cmd_prefix = list(cmd_prefix)

    def root(self):
        from cryptography import x509

        return x509.load_pem_x509_certificate(self.root_pem.read_bytes())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab_site(tmp_path_factory):
    """The lab EST server in its own process, so this process's CPU time is the client's alone."""
    d = tmp_path_factory.mktemp("bench-est-lab")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agent.lab.est_server", "--lab", str(d / "lab"), "--domain",
                             "plant", "--port", str(port), "--user", f"{USER}:{PASSWORD}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("users:"):
            break
    if proc.poll() is not None or not lines or not lines[-1].startswith("users:"):
        proc.kill()
        pytest.fail(f"lab EST server did not start: {''.join(lines)[-2000:]}")
    lab = d / "lab" / "plant"
    yield Site("lab", f"https://127.0.0.1:{port}", lab / "root.pem", lab / "ca.pem", USER, PASSWORD)
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def libest_site(tmp_path_factory):
    """libest's estserver with -o (the client certificate alone authenticates re-enrollment)."""
    b = libest.build()
    ca = libest.make_ca(b, tmp_path_factory.mktemp("bench-libest-ca"))
    with libest.Netns() as ns, libest.EstServer(b, ca, ns, port=8085, auth_off_with_cert=True) as srv:
        yield Site("libest", srv.url, ca.cacert, None, libest.EST_USER, libest.EST_PASSWORD, inside=ns.run,
                   cmd_prefix=ns.cmd([]))


def _site(request, name) -> Site:
    return request.getfixturevalue(f"{name}_site")


def _write_key(path: Path, key) -> Path:
    path.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _curl_round(site: Site, op: str, req_b64: Path, work: Path, client=None) -> tuple[float, float]:
    """One curl + openssl exchange: (wall s, CPU s of the child processes)."""
    auth = (f"--cert {shlex.quote(str(client[0]))} --key {shlex.quote(str(client[1]))}" if client
            else f"--user {shlex.quote(site.user + ':' + site.password)}")
    out = work / "curl-out.pem"
    untrusted = f"-untrusted {shlex.quote(str(site.chain_pem))} " if site.chain_pem else ""
    script = (f"curl -sS --fail --cacert {shlex.quote(str(site.root_pem))} {auth} --data-binary "
              f"@{shlex.quote(str(req_b64))} -H 'Content-Type: application/pkcs10' {site.url}/.well-known/est/{op}"
              f" | base64 -d | openssl pkcs7 -inform DER -print_certs -out {shlex.quote(str(out))}"
              f" && openssl verify -CAfile {shlex.quote(str(site.root_pem))} {untrusted}{shlex.quote(str(out))}")
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([*site.cmd_prefix, "bash", "-o", "pipefail", "-c", script], capture_output=True, text=True,
                       timeout=60)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0 or ": OK" not in p.stdout:
        pytest.fail(f"curl + openssl {op} against {site.name} failed: {p.stdout[-500:]} {p.stderr[-1500:]}")
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def _csr_files(kind: str, cn: str, n: int, work: Path) -> list[Path]:
    """CSRs made beforehand for the curl rounds (base64 DER, as curl posts it)."""
    import base64

    out = []
    for i in range(n):
        csr = make_csr(new_key(kind), cn)
        p = work / f"{cn}-{i}.b64"
        p.write_bytes(base64.encodebytes(csr.public_bytes(serialization.Encoding.DER)))
        out.append(p)
    return out


def _requests(kind: str, cn: str, n: int) -> list[CertRequest]:
    out = []
    for _ in range(n):
        k = new_key(kind)
        csr = make_csr(k, cn)
        out.append(CertRequest(subject=csr.subject, private_key=k, csr=csr))
    return out


def _median(xs):
    return statistics.median(xs) if xs else None


@pytest.mark.benchmark(group="est")
@pytest.mark.parametrize("kind", ["p256", "rsa2048"])
@pytest.mark.parametrize("op", ["simpleenroll", "simplereenroll"])
@pytest.mark.parametrize("server", ["libest", "lab"])
def test_bench_est(benchmark, request, tmp_path, server, op, kind):
    site = _site(request, server)
    cn = f"bench-{op}-{kind}"
    client = client_from_options(est_options(site.url, [site.root()], timeout_s=30.0))
    basic = ClientAuth(username=site.user, password=site.password.encode())
    site.inside(lambda: asyncio.run(client.ca_certs()))  # warm /cacerts, as a running agent has it
    auth, curl_client = basic, None
    if op == "simplereenroll":
        # The credential being renewed: a certificate for a P-256 key (libest accepts only P-256 EC client keys).
        key = new_key("p256")
        csr = make_csr(key, cn)
        first = site.inside(lambda: asyncio.run(client.enroll(CertRequest(subject=csr.subject, private_key=key,
                                                                          csr=csr), basic)))
        auth = ClientAuth(certificate=first.certificate, private_key=key, chain=first.chain[:-1])
        cert_pem = tmp_path / "current.pem"
        cert_pem.write_bytes(b"".join(c.public_bytes(PEM) for c in (first.certificate, *first.chain[:-1])))
        curl_client = (cert_pem, _write_key(tmp_path / "current.key", key))
    call = client.renew if op == "simplereenroll" else client.enroll
    reqs = iter(_requests(kind, cn, ROUNDS + 1))
    cpu, wall = [], []

    def one():
        c0, t0 = time.process_time(), time.perf_counter()
        asyncio.run(call(next(reqs), auth))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)

    site.inside(lambda: benchmark.pedantic(one, rounds=ROUNDS, iterations=1, warmup_rounds=0 if ROUNDS < 3 else 1))
    curl_wall, curl_cpu = [], []
    for f in _csr_files(kind, cn, ROUNDS, tmp_path):
        w, c = _curl_round(site, op, f, tmp_path, curl_client)
        curl_wall.append(w)
        curl_cpu.append(c)
    d_wall, d_cpu, c_wall, c_cpu = map(_median, (wall[-ROUNDS:], cpu[-ROUNDS:], curl_wall, curl_cpu))
    benchmark.extra_info.update({
        "server": server, "operation": op, "key_type": kind, "rounds": ROUNDS,
        "devagent_wall_s": d_wall, "devagent_cpu_s": d_cpu, "curl_openssl_wall_s": c_wall,
        "curl_openssl_cpu_s": c_cpu, "wall_ratio": d_wall / c_wall if c_wall else None,
        "cpu_ratio": d_cpu / c_cpu if c_cpu else None,
        "devagent_wall_samples_s": wall[-ROUNDS:], "devagent_cpu_samples_s": cpu[-ROUNDS:],
        "curl_openssl_wall_samples_s": curl_wall, "curl_openssl_cpu_samples_s": curl_cpu,
    })
    assert os.path.exists(tmp_path / "curl-out.pem")
