"""Keystore operations at 10, 100 and 1,000 credentials (issues 2, 19): time per operation, how it grows, and the
fsyncs each costs.

- add:  ``Keystore.store_certificate`` of a new credential (verify-before-store, fsynced version files, one atomic
  index replace). The key and the certificate are made in the untimed setup; the credential added by the previous
  round is deleted there too, so the store keeps its size.
- load: ``Keystore.get`` of a random credential (index lookup, PEM parse and check of certificate and chain), each
  round a first load: the process-wide cache of checked certificates (``keystore.certs``) is emptied in the setup.
- list: ``Keystore.list`` of every credential. Dates, names, serials come from the index; certificates are read
  when a caller first uses one (``Credential``), so this is what scheduling and ``keystore list`` pay. It returns N
  credentials, so the whole call grows with N by definition: the row also records the cost per listed credential
  (median round / N), whose growth is the figure that says whether listing scales (docs/performance.md).
- keygen: ``generate_key`` (pending P-256 key, encrypted file, index record) + its CSR: Table 1 stage (2) without
  CoAP.
- summary: ``list`` plus ``summary()`` of each, which reads every chain (what ``devagent status --json`` pays).

The index is one tinydb JSON document, cached in memory and re-validated by the file's inode/size/mtime on every
read, and rewritten atomically on every change with only the changed records re-encoded (docs/keystore.md). Each
row records ``fsyncs`` per operation (counted by ``keystore.fsutil``, through which every keystore fsync goes) and
``index_parses`` (how often the index file was actually parsed during the timed rounds). CI mode: sizes 5 and 10.
"""
from __future__ import annotations

import itertools
import random

import pytest

from benchmarks.conftest import CI, DOMAIN, n_samples, record, sizes
from keystore import certs, fsutil
from tests.peers.pkcs11 import softhsm  # noqa: F401  (session fixture)
from tests.peers.tpm import swtpm  # noqa: F401  (session fixture)

SIZES = sizes((10, 100, 1000), (5, 10))
_counter = itertools.count()


def _issue(ks, lab, name):
    from keystore.csr import build_csr, parse_subject

    uri = ks.generate_key("p256")
    csr = build_csr(ks.private_key(uri), parse_subject(f"CN={name}"), [])
    return uri, lab.issue_from_csr(DOMAIN, csr)


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"n{n}")
def filled(request, tmp_path_factory, lab_ca):
    from keystore.store import Keystore

    size = request.param
    ks = Keystore.init(tmp_path_factory.mktemp(f"ks{size}"))
    ks.add_trust_anchors(DOMAIN, [lab_ca.domain(DOMAIN).root_cert], source="bench")
    chain = lab_ca.domain(DOMAIN).chain
    for i in range(size):
        uri, cert = _issue(ks, lab_ca, f"cred{i}")
        ks.store_certificate(f"cred{i}", cert, chain, key_uri=uri, domain=DOMAIN)
    yield size, ks, chain
    ks.close()


@pytest.mark.benchmark(group="keystore")
def test_keystore_add(benchmark, filled, lab_ca):
    size, ks, chain = filled
    added: list[str] = []

    def setup():
        while added:
            ks.delete(added.pop(), force=True)
        name = f"extra{next(_counter)}"
        uri, cert = _issue(ks, lab_ca, name)
        added.append(name)
        return (name, cert, uri), {}

    fsyncs: list[int] = []

    def add(name, cert, uri):
        n = fsutil.fsync_count
        ks.store_certificate(name, cert, chain, key_uri=uri, domain=DOMAIN)
        fsyncs.append(fsutil.fsync_count - n)

    benchmark.pedantic(add, setup=setup, rounds=n_samples(30, 3), iterations=1)
    while added:
        ks.delete(added.pop(), force=True)
    assert len(ks.list()) == size
    record(benchmark, config={"op": "add", "size": size}, stage="add", fsyncs=max(fsyncs),
           index_bytes=(ks.root / "keystore.json").stat().st_size)


@pytest.mark.benchmark(group="keystore")
def test_keystore_load(benchmark, filled):
    size, ks, _ = filled
    rng = random.Random(size)

    def setup():
        certs.forget_checked()  # every size measures a first load (what a devagent process pays): docs/performance.md
        return (f"cred{rng.randrange(size)}",), {}

    n, p = fsutil.fsync_count, ks._storage.parses
    benchmark.pedantic(ks.get, setup=setup, rounds=n_samples(100, 3), iterations=1)
    record(benchmark, config={"op": "load", "size": size}, stage="load", fsyncs=fsutil.fsync_count - n,
           index_parses=ks._storage.parses - p)


@pytest.mark.benchmark(group="keystore")
def test_keystore_list(benchmark, filled):
    """``list`` returns every credential, so the whole call is O(N) by definition; what must not grow is the cost
    per listed credential (``items`` = N: report.py divides the median by it and shows both; docs/performance.md)."""
    size, ks, _ = filled
    n, p = fsutil.fsync_count, ks._storage.parses
    result = benchmark.pedantic(ks.list, rounds=n_samples(20, 2), iterations=1)
    assert len(result) == size
    record(benchmark, config={"op": "list", "size": size}, stage="list", fsyncs=fsutil.fsync_count - n,
           index_parses=ks._storage.parses - p, items=size)


@pytest.mark.benchmark(group="keystore")
def test_keystore_keygen(benchmark, filled):
    """Table 1 stage (2) without CoAP: a pending P-256 key in the keystore + its CSR (discarded in the setup)."""
    from keystore.csr import build_csr, default_key_usage, parse_subject

    size, ks, _ = filled
    made: list[str] = []
    fsyncs: list[int] = []

    def setup():
        while made:
            ks.discard_key(made.pop())
        return (), {}

    def keygen():
        n = fsutil.fsync_count
        uri = ks.generate_key("p256", label="ldevid", pending_for={"source": "bench", "name": "ldevid"})
        build_csr(ks.private_key(uri), parse_subject("CN=bench"), key_usage=default_key_usage("p256"))
        fsyncs.append(fsutil.fsync_count - n)
        made.append(uri)

    benchmark.pedantic(keygen, setup=setup, rounds=n_samples(30, 3), iterations=1)
    setup()
    record(benchmark, config={"op": "keygen", "size": size}, stage="keygen", fsyncs=max(fsyncs))


@pytest.mark.benchmark(group="keystore")
def test_keystore_summary(benchmark, filled):
    size, ks, _ = filled
    result = benchmark.pedantic(lambda: [c.summary() for c in ks.list()], rounds=n_samples(10, 2), iterations=1)
    assert len(result) == size and all(len(s["chain"]) == 2 for s in result)
    record(benchmark, config={"op": "summary", "size": size}, stage="summary", items=size)


# ---- many processes on one keystore, and kill -9 trials (issue 20) -------------------------------------------------
# N worker processes, each running tests/peers/keystore_load.worker_ops as separate devagent processes (request,
# renew of the shared LDevID and of its own credential, status, keystore check, a revoke) against the lab CMP
# server: commands per second over the whole run and the p50/p99 latency of one command. CI: software keys, N = 2
# and 4, one round; full: every backend, N = 2/4/10, two rounds.
CONC = [(b, n) for b in (("soft",) if CI else ("soft", "tpm", "pkcs11")) for n in ((2, 4) if CI else (2, 4, 10))]


@pytest.fixture(scope="module")
def load_lab(tmp_path_factory):
    from agent.lab.ca import LabCA
    from agent.lab.cmp_server import start_cmp_server
    from tests.peers.keystore_load import REF, SECRET

    lab = LabCA.create(tmp_path_factory.mktemp("load-lab"), domains=(DOMAIN, "other"))
    srv = start_cmp_server(lab, DOMAIN, secrets={REF.encode(): SECRET.encode()})
    yield lab, srv
    srv.stop()


def _quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


@pytest.mark.benchmark(group="keystore-concurrency")
@pytest.mark.parametrize("backend,n", CONC, ids=[f"{b}-N{n}" for b, n in CONC])
def test_keystore_concurrent(benchmark, load_lab, tmp_path, request, backend, n):
    from tests.peers.keystore_load import backend_peer, check_clean, close_zygotes, make_world, run_concurrently

    lab, srv = load_lab
    world = make_world(tmp_path, lab, srv.url, backend, backend_peer(request, backend))
    request.addfinalizer(world.clear)  # after close_zygotes (finalizers run last-in first-out)
    request.addfinalizer(close_zygotes)
    rounds = 1 if CI else 2
    out = {}
    benchmark.pedantic(lambda: out.update(run_concurrently(world, n, rounds, seed=n)), rounds=1, iterations=1)
    res = out["results"]
    lat = [r["s"] for r in res]
    failed = [r for r in res if r["code"] != 0]
    left = check_clean(world)
    assert not failed and left == {}, (failed[:3], left)
    record(benchmark, config={"backend": backend, "n": n, "rounds": rounds}, stage="concurrent",
           samples_s=lat, commands=len(res), wall_s=out["wall_s"], commands_per_s=len(res) / out["wall_s"],
           p50_ms=_quantile(lat, 0.5) * 1000, p99_ms=_quantile(lat, 0.99) * 1000, failed=len(failed),
           note=f"{len(res)} devagent commands by {n} processes in {out['wall_s']:.1f} s: "
                f"{len(res) / out['wall_s']:.1f}/s, p50 {_quantile(lat, 0.5) * 1000:.0f} ms, "
                f"p99 {_quantile(lat, 0.99) * 1000:.0f} ms; 0 failed, nothing left after keystore check")


@pytest.mark.benchmark(group="keystore-concurrency")
def test_keystore_kill_trials(benchmark, load_lab, tmp_path, request):
    """kill -9 trials per minute (software keys): a command (enroll, request, renew, serve, run in turn) killed at a
    random point of its run, then `devagent keystore check` and the leftovers count, as tests/fault does."""
    from tests.fault.test_kill_pending import run_trials
    from tests.peers.keystore_load import close_zygotes, make_world

    lab, srv = load_lab
    world = make_world(tmp_path, lab, srv.url, "soft")
    request.addfinalizer(close_zygotes)
    trials = n_samples(50, 5)
    out = {}

    def go():
        import time

        t0 = time.perf_counter()
        out.update(run_trials(world, lab, trials, seed=7))
        out["wall_s"] = time.perf_counter() - t0

    benchmark.pedantic(go, rounds=1, iterations=1)
    per_min = trials / out["wall_s"] * 60
    record(benchmark, config={"backend": "soft", "trials": trials}, stage="kill", trials=trials,
           trials_per_min=per_min, killed=out["killed"], finished=out["finished"], durations_ms=out["durations_ms"],
           note=f"{trials} trials ({out['killed']} killed mid-way) in {out['wall_s']:.1f} s, incl. command "
                f"calibration and a keystore check after each: {per_min:.0f} trials/min, nothing left behind")
