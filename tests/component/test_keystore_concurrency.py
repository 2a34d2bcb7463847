"""N devagent processes at once on one keystore (issue 20): request, renew, revoke, status and keystore check.

N = 2, 4 and 10 worker processes, each running its commands as separate ``devagent`` processes against the lab CMP
server, with software keys, TPM keys (swtpm) and PKCS#11 keys (SoftHSM2). Every command succeeds (none of them
fails when run one after another), none ends in an internal error, and afterwards ``keystore check`` is clean,
every credential's key matches its certificate, and nothing is left behind (tests/peers/keystore_load.py).

The shared LDevID is renewed by every worker while the others authenticate their requests with it: the situation
of the report (a renewal destroying the key another process was using; two processes pruning the same versions).
"""
from __future__ import annotations

import os

import pytest

from agent.lab.cmp_server import start_cmp_server
from tests.peers.keystore_load import (
    REF, SECRET, backend_peer, check_clean, close_zygotes, make_world, ops_per_worker, revoked_name, run_concurrently,
)
from tests.peers.pkcs11 import softhsm  # noqa: F401  (session fixture)
from tests.peers.tpm import swtpm  # noqa: F401  (session fixture)

# (backend, N, rounds): bounded so that `make test` stays short (rounds 0: request, renew the shared LDevID,
# revoke). `make soak` sets DEVAGENT_SOAK_ROUNDS=R: every case then runs R rounds.
SOAK_ROUNDS = int(os.environ.get("DEVAGENT_SOAK_ROUNDS", "0"))
CASES = [(b, n, SOAK_ROUNDS or r) for b, n, r in (
    ("soft", 2, 1), ("soft", 4, 1), ("soft", 10, 1),
    ("tpm", 2, 1), ("tpm", 4, 0), ("tpm", 10, 0),
    ("pkcs11", 2, 1), ("pkcs11", 4, 0), ("pkcs11", 10, 0))]


@pytest.fixture(scope="module")
def cmp_server(lab):
    srv = start_cmp_server(lab, "plant", secrets={REF.encode(): SECRET.encode()})
    yield srv
    srv.stop()



@pytest.fixture(scope="module")
def est_server(lab):
    from agent.lab.est_server import start_est_server
    from tests.peers.keystore_load import EST_PASSWORD, EST_USER

    with start_est_server(lab, "plant", users={EST_USER: EST_PASSWORD.encode()}) as srv:
        yield srv


@pytest.mark.parametrize("n", [4, 10] if SOAK_ROUNDS else [4])
def test_n_processes_over_est_tls_client_auth(tmp_path, lab, cmp_server, est_server, request, n):
    """The report's case: requests authenticated by the LDevID's TLS client certificate while other processes
    renew that LDevID (a renewal used to destroy the key file another process's TLS stack was about to read)."""
    world = make_world(tmp_path, lab, cmp_server.url, "soft", est_url=est_server.url)
    request.addfinalizer(close_zygotes)
    out = run_concurrently(world, n, 1, seed=100 + n)
    results = out["results"]
    assert len(results) == n * ops_per_worker(1)
    failed = [r for r in results if r["code"] != 0]
    assert not failed, "\n".join(f"worker {r['p']} {r['op']}: exit {r['code']}: {r['err']}" for r in failed)
    assert check_clean(world) == {}
    ks = world.keystore()
    try:
        assert ks.get(world.ldevid).version == 1 + 2 * n
    finally:
        ks.close()


@pytest.mark.parametrize("backend,n,rounds", CASES, ids=[f"{b}-N{n}" for b, n, _ in CASES])
def test_n_processes_on_one_keystore(tmp_path, lab, cmp_server, request, backend, n, rounds):
    world = make_world(tmp_path, lab, cmp_server.url, backend, backend_peer(request, backend))
    request.addfinalizer(world.clear)  # after close_zygotes (finalizers run last-in first-out)
    request.addfinalizer(close_zygotes)
    out = run_concurrently(world, n, rounds, seed=n)
    results = out["results"]
    assert len(results) == n * ops_per_worker(rounds), "a worker died before finishing its commands"
    failed = [r for r in results if r["code"] != 0]
    assert not failed, "\n".join(f"worker {r['p']} {r['op']}: exit {r['code']}: {r['err']}" for r in failed)
    assert not any("internal error" in r["err"] or "Traceback" in r["err"] for r in results)
    assert check_clean(world) == {}
    ks = world.keystore()
    try:
        names = {c.name for c in ks.list()}
        assert names == {world.ldevid} | {f"{world.prefix}app-{p}" for p in range(n)} | \
            {f"{world.prefix}app-{p}-{r}" for p in range(n) for r in range(rounds)}
        ldevid = ks.get(world.ldevid)
        assert ldevid.version == 1 + n * max(rounds, 1), "every renewal of the shared LDevID made a version"
        for p in range(n):
            assert ks.get(revoked_name(world, p, rounds)).record["meta"].get("revoked") == "superseded"
    finally:
        ks.close()
