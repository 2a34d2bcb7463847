"""Client-side cost of EST simpleenroll / simplereenroll on loopback against the lab EST server.

Figures, not pass/fail. Each round is one full exchange (new TLS connection, POST, parse, chain check) with a
CSR prepared beforehand, so key generation and CSR signing are not counted. Wall time includes the lab server's
issuance (same process, other thread); ``extra_info['client_cpu_s']`` is the process CPU time per round minus
nothing — the server runs in the same process, so it is an upper bound for the client's CPU.

Run: ``.venv/bin/python -m pytest benchmarks/bench_est.py --benchmark-only -p no:randomly``
"""
import asyncio
import time

import pytest

from enroll_clients.base import CertRequest, ClientAuth
from enroll_clients.est import client_from_options
from tests.peers.est import basic_auth, est_lab, est_options, est_root, est_server, make_csr, new_key  # noqa: F401


def _prepare(kind, n, cn):
    out = []
    for _ in range(n):
        k = new_key(kind)
        csr = make_csr(k, cn)
        out.append(CertRequest(subject=csr.subject, private_key=k, csr=csr))
    return out


@pytest.mark.parametrize("kind", ["p256", "rsa2048"])
def test_bench_simpleenroll(benchmark, est_server, est_root, kind):
    client = client_from_options(est_options(est_server.url, [est_root], label="plant"))
    asyncio.run(client.ca_certs())  # warm the /cacerts cache as a long-running agent would have it
    reqs = iter(_prepare(kind, 60, f"bench-{kind}"))
    cpu = []

    def one():
        c0 = time.process_time()
        asyncio.run(client.enroll(next(reqs), basic_auth()))
        cpu.append(time.process_time() - c0)

    benchmark.pedantic(one, rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info["client_cpu_s_median_upper_bound"] = sorted(cpu)[len(cpu) // 2]


@pytest.mark.parametrize("kind", ["p256", "rsa2048"])
def test_bench_simplereenroll(benchmark, est_server, est_root, kind):
    client = client_from_options(est_options(est_server.url, [est_root], label="plant"))
    key = new_key(kind)
    csr = make_csr(key, f"bench-renew-{kind}")
    first = asyncio.run(client.enroll(CertRequest(subject=csr.subject, private_key=key, csr=csr), basic_auth()))
    auth = ClientAuth(certificate=first.certificate, private_key=key, chain=first.chain[:-1])
    reqs = iter(_prepare(kind, 60, f"bench-renew-{kind}"))
    cpu = []

    def one():
        c0 = time.process_time()
        asyncio.run(client.renew(next(reqs), auth))
        cpu.append(time.process_time() - c0)

    benchmark.pedantic(one, rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info["client_cpu_s_median_upper_bound"] = sorted(cpu)[len(cpu) // 2]
