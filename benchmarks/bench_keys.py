"""Key generation and one signature per key type: software vs TPM (swtpm) vs PKCS#11 (SoftHSM2).

Figures only, no pass/fail on time. Run::

    .venv/bin/python -m pytest benchmarks/bench_keys.py --benchmark-group-by=group --benchmark-columns=min,median,max,rounds

Rounds are fixed and small (``benchmark.pedantic``) so the whole file runs in a few seconds even where RSA key
generation in swtpm takes up to a second; set ``DEVAGENT_BENCH_ROUNDS`` to scale them. Key generation is
measured through the backend as the keystore calls it: generate *and persist* (encrypted PKCS#8 file for
software keys, TSS2 blob for the TPM, token object for PKCS#11), then deleted outside the timing.
"""
from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

from keystore.csr import build_csr, parse_subject
from keystore.store import Keystore
from tests.peers.pkcs11 import softhsm  # noqa: F401  (pytest fixture)
from tests.peers.tpm import swtpm  # noqa: F401  (pytest fixture)

SCALE = max(1, int(os.environ.get("DEVAGENT_BENCH_ROUNDS", "1")))
KEY_TYPES = ("p256", "p384", "rsa2048", "rsa3072")
BACKENDS = ("soft", "tpm", "pkcs11")
KEYGEN_ROUNDS = {"p256": 3, "p384": 3, "rsa2048": 1, "rsa3072": 1}
SIGN_ROUNDS = 10


@pytest.fixture(scope="module")
def keystores(tmp_path_factory, swtpm, softhsm):  # noqa: F811
    root = tmp_path_factory.mktemp("bench")
    ks = Keystore.init(root / "ks", backend_options={"tpm": swtpm.options, "pkcs11": softhsm.options})
    yield ks
    ks.close()


@pytest.fixture(scope="module")
def made_keys(keystores):
    """One key per (backend, key type) kept from the keygen run for the signing run (RSA keygen is slow)."""
    keys: dict = {}
    yield keys
    for (backend, _), uri in keys.items():
        keystores.backend(backend).delete(uri)


def _sign_args(kt: str):
    if kt.startswith("rsa"):
        return (padding.PKCS1v15(), hashes.SHA256())
    return (ec.ECDSA(hashes.SHA384() if kt == "p384" else hashes.SHA256()),)


@pytest.mark.parametrize("kt", KEY_TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_keygen(benchmark, keystores, made_keys, backend, kt):
    be = keystores.backend(backend)
    made = []
    benchmark.group = f"keygen {kt}"
    benchmark.extra_info.update(backend=backend, key_type=kt)
    benchmark.pedantic(lambda: made.append(be.generate(kt, "bench")), rounds=KEYGEN_ROUNDS[kt] * SCALE,
                       iterations=1, warmup_rounds=0)
    made_keys.setdefault((backend, kt), made.pop())
    for uri in made:
        be.delete(uri)


@pytest.mark.parametrize("kt", KEY_TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sign(benchmark, keystores, made_keys, backend, kt):
    be = keystores.backend(backend)
    if (backend, kt) not in made_keys:
        made_keys[(backend, kt)] = be.generate(kt, "bench")
    key = be.load(made_keys[(backend, kt)])
    args = _sign_args(kt)
    benchmark.group = f"sign {kt}"
    benchmark.extra_info.update(backend=backend, key_type=kt)
    # The first (warm-up) signature of a TPM key re-creates the primary key and loads the blob; the timed
    # ones reload its cached saved context, as a long-running agent does.
    sig = benchmark.pedantic(key.sign, args=(b"x" * 256, *args), rounds=SIGN_ROUNDS * SCALE, iterations=1,
                             warmup_rounds=1)
    key.public_key().verify(sig, b"x" * 256, *args)
    # One CSR per key: the whole signing path the enrollment clients use.
    assert build_csr(key, parse_subject("CN=bench")).is_signature_valid
