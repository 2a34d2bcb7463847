"""The validator's cost per purpose (issue #13), next to the code it replaced, on the same chains.

P-256 and RSA-2048 chains of depth 2 (root -> leaf) and 3 (root -> intermediate -> leaf), built with
``tests/certfactory.py``. Per purpose, one call as the callers make it, ``Policy`` construction included:

| purpose | new | old (replaced) |
|---|---|---|
| credential | ``validate(..., Policy.for_purpose("credential", now, eku={"clientAuth"}), public_key=...)`` | ``keystore.verify.verify_certificate(..., purpose="clientAuth")`` |
| cmp-signer | ``validate(..., Policy.for_purpose("cmp-signer", now))`` (RA with cmcRA) | ``enroll_clients.cmp.verify.verify_signer(..., at=now)`` |
| est-tls-server | ``validate(..., Policy.for_purpose("est-tls-server", now))`` | ``enroll_clients.est.messages.build_chain`` |

Two cells per chain shape, each timing old and new ALTERNATELY, round by round (old then new, then new then old,
...), so that both see the same host state: this VM switches between speed phases about 1.5x apart for seconds at
a time, and an old cell and a new cell run one after the other could land in different phases (docs/trust.md,
"Cost"). Every call is timed on its own (``perf_counter_ns``) and both sample lists go into ``extra_info``
(``old_s``, ``new_s``, seconds, every round, nothing dropped); pytest-benchmark's own statistics are those of one
old + new pair.

- ``first``: the FIRST validation of a chain: every call gets a chain nobody has validated (new intermediates and
  leaf, so new DER that no memo can know; old and new each their own chain of the same shape) as fresh
  certificate objects parsed from DER (so no per-object cache of pyca's, e.g. parsed extensions or public keys, is
  warm). The trust anchor is the same certificate each round, also as a fresh object: a domain's trust store,
  loaded again, as in a running agent (the validator keeps pyca's ``Store`` per anchor set; the first use of a new
  anchor set pays for it once). The chains are made before the timing starts (signing them between rounds would
  only evict the CPU caches).
- ``repeat``: the same chain objects again, as a flow validates them (EST or CoAP check, then the keystore's
  verify-before-store; every response of a CMP transaction): the validator reuses its remembered path after
  re-checking validity and runs the per-purpose checks again; the old code redoes all. Old and new each have
  their own chain objects (the same DER).

The old code is not in the tree any more: it is loaded at benchmark time from the last commit that had it
(``OLD_COMMIT``, via ``git show``), so it is never copied into the repository. Without git history (a source
tarball) the cells are skipped with a message (there is nothing to pair with). Figures only, no pass/fail on time;
``benchmarks/report.py`` prints the "validator" section (median of all rounds per call, old / new ratios, first and
repeat).
"""
from __future__ import annotations

import datetime
import time
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
MODES = ("first", "repeat")
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


def _copy(ch: Chain) -> Chain:
    """The same chain (same DER, same leaf key) as fresh certificate objects: old and new never share an object."""
    load = x509.load_der_x509_certificate
    der = lambda c: c.public_bytes(serialization.Encoding.DER)  # noqa: E731
    return Chain(load(der(ch.root)), [load(der(c)) for c in ch.untrusted], load(der(ch.leaf)), ch.leaf_key)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("purpose", PURPOSES)
def test_validator(benchmark, old, purpose, kind, depth, mode):
    if old is None:
        pytest.skip(f"old code not available: no git history with {OLD_COMMIT} (source tarball?)")
    ch = chain(kind, depth=depth, leaf=LEAF[purpose])
    now = datetime.datetime.now(datetime.timezone.utc)
    fns = {"old": old[purpose], "new": _new(purpose)}
    chs = {"old": _copy(ch), "new": _copy(ch)}
    for impl, fn in fns.items():  # both must accept the chain; this also warms what a running agent has warm (anchors)
        fn(chs[impl], now)
    samples: dict[str, list[float]] = {"old": [], "new": []}
    if mode == "first":  # made before the timing starts, so that signing them does not run between the rounds
        pools = {impl: iter([_fresh(kind, depth, purpose, ch.root) for _ in range(ROUNDS)]) for impl in fns}
        setup = lambda: ((next(pools["old"]), next(pools["new"])), {})  # noqa: E731
    else:
        setup = lambda: ((chs["old"], chs["new"]), {})  # noqa: E731
    def pair(old_ch: Chain, new_ch: Chain) -> None:
        """One old call and one new call, each timed on its own; which goes first alternates round by round."""
        order = ("old", "new") if len(samples["old"]) % 2 == 0 else ("new", "old")  # round 0, 1, ...
        for impl in order:
            c = old_ch if impl == "old" else new_ch
            t0 = time.perf_counter_ns()
            fns[impl](c, now)
            samples[impl].append((time.perf_counter_ns() - t0) / 1e9)

    benchmark.group = "validator"
    benchmark.extra_info.update(purpose=purpose, key_type=kind, depth=depth, mode=mode, paired=True)
    benchmark.pedantic(pair, setup=setup, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(old_s=samples["old"], new_s=samples["new"])
