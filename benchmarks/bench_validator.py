"""The validator's cost per purpose (issue #13), next to the code it replaced, on the same chains.

P-256 and RSA-2048 chains of depth 2 (root -> leaf) and 3 (root -> intermediate -> leaf), built with
``tests/certfactory.py``. Per purpose, one call as the callers make it, ``Policy`` construction included:

| purpose | new | old (replaced) |
|---|---|---|
| credential | ``validate(..., Policy.for_purpose("credential", now, eku={"clientAuth"}), public_key=...)`` | ``keystore.verify.verify_certificate(..., purpose="clientAuth")`` |
| cmp-signer | ``validate(..., Policy.for_purpose("cmp-signer", now))`` (RA with cmcRA) | ``enroll_clients.cmp.verify.verify_signer(..., at=now)`` |
| est-tls-server | ``validate(..., Policy.for_purpose("est-tls-server", now))`` | ``enroll_clients.est.messages.build_chain`` |

Four cells per chain shape:

- ``new`` / ``old``: the FIRST validation of a chain: every round gets a chain nobody has validated (new
  intermediates and leaf, so new DER that no memo can know) as fresh certificate objects parsed from DER (so no
  per-object cache of pyca's, e.g. parsed extensions or public keys, is warm). The trust anchor is the same
  certificate each round, also as a fresh object: a domain's trust store, loaded again, as in a running agent
  (the validator keeps pyca's ``Store`` per anchor set; the first use of a new anchor set pays for it once).
  The chains are made before the timing starts (signing them between rounds would only evict the CPU caches).
- ``new-repeat`` / ``old-repeat``: the same chain objects again, as a flow validates them (EST or CoAP check, then
  the keystore's verify-before-store; every response of a CMP transaction): the validator reuses its
  remembered path after re-checking validity and runs the per-purpose checks again; the old code redoes all.

The old code is not in the tree any more: it is loaded at benchmark time from the last commit that had it
(``OLD_COMMIT``, via ``git show``), so it is never copied into the repository. Without git history (a source
tarball) the old rows are skipped with a message. Figures only, no pass/fail on time;
``benchmarks/report.py`` prints the "validator" section (median per call, old / new ratios, first and repeat).
"""
from __future__ import annotations

import datetime
import subprocess
import sys
import types

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from benchmarks.conftest import REPO, n_samples
from keystore import validator as V
from keystore.validator import OID_CMC_RA, Policy, validate
from tests import certfactory as F
from tests.certfactory import Chain, Spec, chain

OLD_COMMIT = "a9dadce"  # main just before keystore/validator.py landed: keystore/verify.py, cmp/verify.py, est build_chain
KINDS = ("p256", "rsa2048")
DEPTHS = (2, 3)
PURPOSES = ("credential", "cmp-signer", "est-tls-server")
IMPLS = ("new", "new-repeat", "old", "old-repeat")
ROUNDS = n_samples(full=300, ci=3)
LEAF = {
    "credential": Spec(eku=[ExtendedKeyUsageOID.CLIENT_AUTH]),
    "cmp-signer": Spec(eku=[OID_CMC_RA]),
    "est-tls-server": Spec(eku=[ExtendedKeyUsageOID.SERVER_AUTH], san=[x509.DNSName("est.plant.example")]),
}


def _git_show(path: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:{path}"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def _module(name: str, source: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__file__ = f"<git {OLD_COMMIT}:{name}>"
    sys.modules[name] = mod
    exec(compile(source, mod.__file__, "exec"), mod.__dict__)
    return mod


@pytest.fixture(scope="module")
def old():
    """The replaced functions, from ``OLD_COMMIT`` (module names prefixed ``_old_`` so nothing is shadowed)."""
    ks_src = _git_show("keystore/verify.py")
    cmp_src = _git_show("enroll_clients/cmp/verify.py")
    est_src = _git_show("enroll_clients/est/messages.py")
    if not (ks_src and cmp_src and est_src):
        return None
    ks_verify = _module("_old_keystore_verify", ks_src)
    cmp_verify = _module("_old_cmp_verify", cmp_src.replace("from keystore.verify import", "from _old_keystore_verify import"))
    est_messages = _module("_old_est_messages", est_src)
    return {
        "credential": lambda ch, now: ks_verify.verify_certificate(
            ch.leaf, public_key=ch.leaf_key.public_key(), chain=ch.untrusted, trust_anchors=[ch.root], now=now,
            purpose="clientAuth"),
        "cmp-signer": lambda ch, now: cmp_verify.verify_signer(ch.leaf, ch.untrusted, [ch.root], now),
        "est-tls-server": lambda ch, now: est_messages.build_chain(ch.leaf, ch.untrusted, [ch.root], now=now),
    }


def _new(purpose: str):
    def call(ch, now):
        if purpose == "credential":
            return validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose("credential", now, eku={"clientAuth"}),
                            public_key=ch.leaf_key.public_key())
        return validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose(purpose, now))
    return call


def _fresh(kind: str, depth: int, purpose: str, root: x509.Certificate) -> Chain:
    """A chain no validator has seen: new intermediates and leaf (new serials, so new DER) under ``root``'s key,
    every certificate a fresh object parsed from DER (the root too: same DER, as a trust store loaded again)."""
    load = x509.load_der_x509_certificate
    issuer, ik, inters = root, F.key(kind, 0), []
    for i in range(1, depth - 1):
        c, k = F.build(Spec(), issuer.subject, ik, "inter", kind, i)
        inters.append(c)
        issuer, ik = c, k
    leaf, lk = F.build(LEAF[purpose], issuer.subject, ik, "leaf", kind, 9)
    der = lambda c: c.public_bytes(serialization.Encoding.DER)  # noqa: E731
    return Chain(load(der(root)), [load(der(c)) for c in inters], load(der(leaf)), lk)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("purpose", PURPOSES)
def test_validator(benchmark, old, purpose, kind, depth, impl):
    ch = chain(kind, depth=depth, leaf=LEAF[purpose])
    now = datetime.datetime.now(datetime.timezone.utc)
    if impl.startswith("old"):
        if old is None:
            pytest.skip(f"old code not available: no git history with {OLD_COMMIT} (source tarball?)")
        fn = old[purpose]
    else:
        fn = _new(purpose)
    fn(ch, now)  # both must accept the chain; this also warms what a running agent has warm (the anchors)
    benchmark.group = "validator"
    benchmark.extra_info.update(purpose=purpose, key_type=kind, depth=depth, impl=impl)
    if impl.endswith("repeat"):
        benchmark.pedantic(fn, args=(ch, now), rounds=ROUNDS, iterations=1)
    else:  # made before the timing starts, so that signing them does not run between the rounds
        pool = iter([_fresh(kind, depth, purpose, ch.root) for _ in range(ROUNDS)])
        benchmark.pedantic(fn, setup=lambda: ((next(pool), now), {}), rounds=ROUNDS, iterations=1)
