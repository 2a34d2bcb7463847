"""Keystore operations at 10, 100 and 1,000 credentials (issue 2): time per operation and how it grows.

- add:  ``Keystore.store_certificate`` of a new credential (verify-before-store, fsynced version files, one atomic
  index replace). The key and the certificate are made in the untimed setup; the credential added by the previous
  round is deleted there too, so the store keeps its size.
- load: ``Keystore.get`` of a random credential (index lookup, PEM parse of certificate and chain).
- list: ``Keystore.list`` of every credential.

The tinydb index is one JSON document rewritten atomically on every change, so add grows with the store size;
these figures show by how much. CI mode: sizes 5 and 10.
"""
from __future__ import annotations

import itertools
import random

import pytest

from benchmarks.conftest import DOMAIN, n_samples, record, sizes

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

    def add(name, cert, uri):
        ks.store_certificate(name, cert, chain, key_uri=uri, domain=DOMAIN)

    benchmark.pedantic(add, setup=setup, rounds=n_samples(30, 3), iterations=1)
    while added:
        ks.delete(added.pop(), force=True)
    assert len(ks.list()) == size
    record(benchmark, config={"op": "add", "size": size}, stage="add")


@pytest.mark.benchmark(group="keystore")
def test_keystore_load(benchmark, filled):
    size, ks, _ = filled
    rng = random.Random(size)

    def setup():
        return (f"cred{rng.randrange(size)}",), {}

    benchmark.pedantic(ks.get, setup=setup, rounds=n_samples(100, 3), iterations=1)
    record(benchmark, config={"op": "load", "size": size}, stage="load")


@pytest.mark.benchmark(group="keystore")
def test_keystore_list(benchmark, filled):
    size, ks, _ = filled
    result = benchmark.pedantic(ks.list, rounds=n_samples(20, 2), iterations=1)
    assert len(result) == size
    record(benchmark, config={"op": "list", "size": size}, stage="list")
