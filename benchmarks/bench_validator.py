"""The validator's cost per purpose (issue #13), next to the code it replaced, on the same chains.

P-256 and RSA-2048 chains of depth 2 (root -> leaf) and 3 (root -> intermediate -> leaf), built with
``tests/certfactory.py``. Per purpose, one call as the callers make it, ``Policy`` construction included:

| purpose | new | old (replaced) |
|---|---|---|
| credential | ``validate(..., Policy.for_purpose("credential", now, eku={"clientAuth"}), public_key=...)`` | ``keystore.verify.verify_certificate(..., purpose="clientAuth")`` |
| cmp-signer | ``validate(..., Policy.for_purpose("cmp-signer", now))`` (RA with cmcRA) | ``enroll_clients.cmp.verify.verify_signer(..., at=now)`` |
| est-tls-server | ``validate(..., Policy.for_purpose("est-tls-server", now))`` | ``enroll_clients.est.messages.build_chain`` |

``new`` validates a chain it has not seen (the memo of pyca-verified paths cleared before each call);
``new-repeat`` validates the same chain again, as a flow does (EST or CoAP check, then the keystore's
verify-before-store; every response of a CMP transaction): the remembered path is reused after its validity is
re-checked, and the per-purpose checks run again.

The old code is not in the tree any more: it is loaded at benchmark time from the last commit that had it
(``OLD_COMMIT``, via ``git show``), so it is never copied into the repository. Without git history (a source
tarball) the old rows are skipped with a message. Figures only, no pass/fail on time;
``benchmarks/report.py`` prints the "validator" section (median per call, old / new ratio).
"""
from __future__ import annotations

import datetime
import subprocess
import sys
import types

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from benchmarks.conftest import REPO
from keystore import validator as V
from keystore.validator import OID_CMC_RA, Policy, validate
from tests.certfactory import Spec, chain

OLD_COMMIT = "a9dadce"  # main just before keystore/validator.py landed: keystore/verify.py, cmp/verify.py, est build_chain
KINDS = ("p256", "rsa2048")
DEPTHS = (2, 3)
PURPOSES = ("credential", "cmp-signer", "est-tls-server")
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


def _new(purpose: str, cold: bool):
    def call(ch, now):
        if cold:
            V._PATH_MEMO.clear()  # a chain never seen before: the full path validation
        if purpose == "credential":
            return validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose("credential", now, eku={"clientAuth"}),
                            public_key=ch.leaf_key.public_key())
        return validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose(purpose, now))
    return call


@pytest.mark.parametrize("impl", ["new", "new-repeat", "old"])
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("purpose", PURPOSES)
def test_validator(benchmark, old, purpose, kind, depth, impl):
    ch = chain(kind, depth=depth, leaf=LEAF[purpose])
    now = datetime.datetime.now(datetime.timezone.utc)
    if impl == "old":
        if old is None:
            pytest.skip(f"old code not available: no git history with {OLD_COMMIT} (source tarball?)")
        fn = old[purpose]
    else:
        fn = _new(purpose, cold=impl == "new")
    fn(ch, now)  # both must accept the chain (and warm any caches the same way)
    benchmark.group = "validator"
    benchmark.extra_info.update(purpose=purpose, key_type=kind, depth=depth, impl=impl)
    benchmark(fn, ch, now)
