"""CMP message protection: PasswordBasedMac (RFC 4210 5.1.3.1), PBMAC1 (RFC 9481 6.1.2), signatures.

Pure and synchronous. All crypto is ``cryptography``; private keys are used only through ``key.sign`` (they
may live in a TPM or PKCS#11 token). Parameters taken from a peer's message are bounded before use
(iteration counts, salt length) so a hostile response cannot make the device spin.
"""
from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as c_hmac
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.constant_time import bytes_eq
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from pyasn1.error import PyAsn1Error

from enroll_clients.base import ProtectionError
from enroll_clients.cmp import asn1 as A

# Bounds on the work a response's MAC parameters can ask of us, separately per scheme: a PBM iteration is one
# hash in Python, a PBKDF2 iteration one HMAC inside OpenSSL (~20x cheaper per iteration).
MAX_PBM_ITERATIONS = 100_000  # OpenSSL's own PBM limit
# RFC 9481 6.1.2 leaves the count to policy; OWASP (2023) recommends 600,000 for PBKDF2-HMAC-SHA256 and the
# Siemens MockCA answers with 262,144 (PBKDF2-SHA512). 1,000,000 costs ~0.3-0.6 s on x86 (several seconds on a
# Pi Zero 2 W), once per transaction (the derived key is cached).
MAX_PBKDF2_ITERATIONS = 1_000_000
MAX_ITERATIONS = MAX_PBM_ITERATIONS  # the old name (PBM)
# PasswordBasedMac iterates a hash in Python (no one-call primitive exists): 1000 rounds cost ~10 ms on x86,
# several times that on a Pi Zero. OpenSSL sends 500. The key is derived once per transaction (the salt is
# reused within it), so the cost is paid once per enrollment, not per message.
PBM_ITERATIONS = 1_000
PBMAC1_ITERATIONS = 10_000
SALT_BYTES = 16

_HASH_BY_OID = {
    str(A.id_sha1): hashes.SHA1, str(A.id_sha224): hashes.SHA224, str(A.id_sha256): hashes.SHA256,
    str(A.id_sha384): hashes.SHA384, str(A.id_sha512): hashes.SHA512,
}
_HMAC_BY_OID = {
    str(A.id_hmac_sha1): hashes.SHA1, str(A.id_hmacWithSHA1): hashes.SHA1,
    str(A.id_hmacWithSHA224): hashes.SHA224, str(A.id_hmacWithSHA256): hashes.SHA256,
    str(A.id_hmacWithSHA384): hashes.SHA384, str(A.id_hmacWithSHA512): hashes.SHA512,
}
_HASH_OID_BY_NAME = {h.name: oid for oid, h in _HASH_BY_OID.items()}
_HMAC_OID_BY_NAME = {"sha256": str(A.id_hmacWithSHA256), "sha384": str(A.id_hmacWithSHA384),
                     "sha512": str(A.id_hmacWithSHA512), "sha224": str(A.id_hmacWithSHA224),
                     "sha1": str(A.id_hmac_sha1)}
# PBKDF2's prf and PBMAC1's messageAuthScheme name HMAC-SHA1 by its PKCS#5 OID (RFC 8018), PBM by RFC 2104's.
_PKCS5_HMAC_OID_BY_NAME = {**_HMAC_OID_BY_NAME, "sha1": str(A.id_hmacWithSHA1), "sha224": str(A.id_hmacWithSHA224)}
DEFAULT_OWF = "sha256"

# Signature algorithms: OID -> (kind, hash class or None)
SIG_ALGS = {
    "1.2.840.10045.4.3.2": ("ecdsa", hashes.SHA256),
    "1.2.840.10045.4.3.3": ("ecdsa", hashes.SHA384),
    "1.2.840.10045.4.3.4": ("ecdsa", hashes.SHA512),
    "1.2.840.113549.1.1.11": ("rsa", hashes.SHA256),
    "1.2.840.113549.1.1.12": ("rsa", hashes.SHA384),
    "1.2.840.113549.1.1.13": ("rsa", hashes.SHA512),
    "1.3.101.112": ("ed25519", None),
    "1.3.101.113": ("ed448", None),
}
_SIG_OID = {("ecdsa", "sha256"): "1.2.840.10045.4.3.2", ("ecdsa", "sha384"): "1.2.840.10045.4.3.3",
            ("ecdsa", "sha512"): "1.2.840.10045.4.3.4", ("rsa", "sha256"): "1.2.840.113549.1.1.11",
            ("rsa", "sha384"): "1.2.840.113549.1.1.12", ("rsa", "sha512"): "1.2.840.113549.1.1.13"}


def alg_id(oid, params=None, null_params: bool = False):
    a = A.AlgorithmIdentifier()
    a["algorithm"] = A.ObjectIdentifier(str(oid))
    if params is not None:
        a["parameters"] = A.Any(A.der_encode(params))
    elif null_params:
        a["parameters"] = A.Any(A.der_encode(A.Null("")))
    return a


# --- MAC ------------------------------------------------------------------------------------------
def _hmac(hash_cls, key: bytes, data: bytes) -> bytes:
    h = c_hmac.HMAC(key, hash_cls())
    h.update(data)
    return h.finalize()


def _digest(hash_cls, data: bytes) -> bytes:
    h = hashes.Hash(hash_cls())
    h.update(data)
    return h.finalize()


def _bounded(name: str, n: int, limit: int) -> int:
    if not 1 <= n <= limit:
        raise ProtectionError(f"response MAC parameters: {name} {n} outside 1..{limit}; refusing")
    return n


def pbm_key(secret: bytes, salt: bytes, owf, iterations: int) -> bytes:
    """RFC 4210 5.1.3.1: BASEKEY = OWF^iterations(secret || salt).

    The iterations run on ``hashlib``'s constructor for the OWF (the same digest; ~0.6 µs a step against
    ~2.3 µs for a ``cryptography`` Hash object: 500 steps, OpenSSL's default, 0.3 ms instead of 1.1 ms);
    ``cryptography``'s for a hash that ``hashlib`` lacks."""
    k = secret + salt
    step = getattr(hashlib, owf.name, None)
    if step is None:
        for _ in range(iterations):
            k = _digest(owf, k)
        return k
    for _ in range(iterations):
        k = step(k).digest()
    return k


def new_mac_alg(kind: str, *, iterations: int | None = None, hash_name: str = "sha256", owf: str | None = None):
    """A fresh protectionAlg (new random salt) for ``kind`` "pbm" or "pbmac1".

    ``hash_name``: the HMAC's hash ("sha1" for OpenSSL's default PBM MAC hmac-sha1); PBMAC1 also uses it as the
    PBKDF2 PRF. ``owf``: the PBM one-way function (default: the MAC's hash, at least SHA-256, as OpenSSL's
    defaults: owf sha256 with mac hmac-sha1)."""
    salt = os.urandom(SALT_BYTES)
    if hash_name not in _HMAC_OID_BY_NAME:
        raise ValueError(f"unknown MAC hash {hash_name!r}")
    if kind == "pbm":
        owf = owf or (hash_name if hash_name in ("sha256", "sha384", "sha512") else DEFAULT_OWF)
        p = A.PBMParameter()
        p["salt"] = salt
        p["owf"] = alg_id(_HASH_OID_BY_NAME[owf])
        p["iterationCount"] = iterations or PBM_ITERATIONS
        p["mac"] = alg_id(_HMAC_OID_BY_NAME[hash_name])
        return alg_id(A.id_PasswordBasedMac, p)
    if kind == "pbmac1":
        hmac_oid = _PKCS5_HMAC_OID_BY_NAME[hash_name]
        kdf = A.PBKDF2Params()
        kdf["salt"] = salt
        kdf["iterationCount"] = iterations or PBMAC1_ITERATIONS
        kdf["keyLength"] = getattr(hashes, hash_name.upper()).digest_size
        kdf["prf"] = alg_id(hmac_oid, null_params=True)
        p = A.PBMAC1Params()
        p["keyDerivationFunc"] = alg_id(A.id_PBKDF2, kdf)
        p["messageAuthScheme"] = alg_id(hmac_oid, null_params=True)
        return alg_id(A.id_PBMAC1, p)
    raise ValueError(f"unknown MAC protection {kind!r} (expected 'pbm' or 'pbmac1')")


def is_mac_alg(alg) -> bool:
    return str(alg["algorithm"]) in (str(A.id_PasswordBasedMac), str(A.id_PBMAC1))


def compute_mac(alg, secret: bytes, data: bytes, key_cache: dict | None = None) -> bytes:
    """MAC over ``data`` per the protectionAlg ``alg`` (ours or a peer's; peer parameters are bounded).

    ``key_cache`` (a dict owned by one transaction) keeps derived keys by parameters, so a transaction that
    reuses its protectionAlg derives the PBM/PBKDF2 key once."""
    oid = str(alg["algorithm"])
    cache_key = None
    if key_cache is not None and alg["parameters"].isValue:
        cache_key = (oid, bytes(alg["parameters"]))
    if cache_key is not None and cache_key in key_cache:
        hash_cls, key = key_cache[cache_key]
        return _hmac(hash_cls, key, data)
    hash_cls, key = _derive(alg, oid, secret)
    if cache_key is not None:
        key_cache[cache_key] = (hash_cls, key)
    return _hmac(hash_cls, key, data)


def _derive(alg, oid: str, secret: bytes):
    """(HMAC hash class, key) for a MAC protectionAlg."""
    try:
        if oid == str(A.id_PasswordBasedMac):
            p = A.der_decode(bytes(alg["parameters"]), A.PBMParameter())
            owf = _HASH_BY_OID.get(str(p["owf"]["algorithm"]))
            mac = _HMAC_BY_OID.get(str(p["mac"]["algorithm"]))
            if owf is None or mac is None:
                raise ProtectionError(f"PasswordBasedMac with unsupported owf {p['owf']['algorithm']} "
                                      f"or mac {p['mac']['algorithm']}")
            key = pbm_key(secret, bytes(p["salt"]), owf,
                          _bounded("PBM iterationCount", int(p["iterationCount"]), MAX_PBM_ITERATIONS))
            return mac, key
        if oid == str(A.id_PBMAC1):
            p = A.der_decode(bytes(alg["parameters"]), A.PBMAC1Params())
            if str(p["keyDerivationFunc"]["algorithm"]) != str(A.id_PBKDF2):
                raise ProtectionError(f"PBMAC1 with unsupported KDF {p['keyDerivationFunc']['algorithm']}")
            kdf = A.der_decode(bytes(p["keyDerivationFunc"]["parameters"]), A.PBKDF2Params())
            prf = hashes.SHA1
            if kdf["prf"].isValue:
                prf = _HMAC_BY_OID.get(str(kdf["prf"]["algorithm"]))
            mac = _HMAC_BY_OID.get(str(p["messageAuthScheme"]["algorithm"]))
            if prf is None or mac is None:
                raise ProtectionError("PBMAC1 with unsupported PRF or MAC algorithm")
            length = int(kdf["keyLength"]) if kdf["keyLength"].isValue else mac.digest_size
            if not 1 <= length <= 64:
                raise ProtectionError(f"PBMAC1 keyLength {length} outside 1..64")
            key = PBKDF2HMAC(prf(), length, bytes(kdf["salt"]),
                             _bounded("PBKDF2 iterationCount", int(kdf["iterationCount"]),
                                      MAX_PBKDF2_ITERATIONS)).derive(secret)
            return mac, key
    except (ValueError, TypeError, PyAsn1Error) as e:  # pyasn1: a required parameter absent or of the wrong type
        raise ProtectionError(f"malformed MAC parameters in protectionAlg: {e}") from None
    raise ProtectionError(f"protectionAlg {oid} is not a MAC this client supports (PasswordBasedMac, PBMAC1)")


def mac_equal(a: bytes, b: bytes) -> bool:
    return bytes_eq(a, b)


# --- Signatures -----------------------------------------------------------------------------------
def signature_alg_for(key, hash_name: str | None = None):
    """(AlgorithmIdentifier, sign(data) -> bytes) for a ``cryptography`` private key (any backend)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        bits = key.curve.key_size
        h = hash_name or ("sha256" if bits <= 256 else "sha384" if bits <= 384 else "sha512")
        hc = getattr(hashes, h.upper())
        return alg_id(_SIG_OID[("ecdsa", h)]), (lambda d: key.sign(d, ec.ECDSA(hc())))
    if isinstance(key, rsa.RSAPrivateKey):
        h = hash_name or "sha256"
        hc = getattr(hashes, h.upper())
        return alg_id(_SIG_OID[("rsa", h)], null_params=True), (lambda d: key.sign(d, padding.PKCS1v15(), hc()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return alg_id("1.3.101.112"), key.sign
    if isinstance(key, ed448.Ed448PrivateKey):
        return alg_id("1.3.101.113"), key.sign
    raise TypeError(f"unsupported private key type {type(key).__name__} (EC, RSA, Ed25519, Ed448)")


def verify_signature(public_key, alg, signature: bytes, data: bytes) -> None:
    """Raises ProtectionError unless ``signature`` over ``data`` verifies with ``public_key`` per ``alg``."""
    oid = str(alg["algorithm"])
    if oid not in SIG_ALGS:
        raise ProtectionError(f"unsupported signature algorithm {oid} in protectionAlg")
    kind, hc = SIG_ALGS[oid]
    try:
        if kind == "ecdsa" and isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hc()))
        elif kind == "rsa" and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hc())
        elif kind == "ed25519" and isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        elif kind == "ed448" and isinstance(public_key, ed448.Ed448PublicKey):
            public_key.verify(signature, data)
        else:
            raise ProtectionError(f"signature algorithm {oid} does not fit the signer's {type(public_key).__name__}")
    except InvalidSignature:
        raise ProtectionError("response signature does not verify with the signer certificate's key") from None


def cert_hash(cert) -> tuple[bytes, object, bool]:
    """certConf certHash: (digest, hash class, needs_hashAlg). The hash is the one of the certificate's own
    signature algorithm (RFC 9480 2.10); EdDSA certs have none, so SHA-512 with an explicit hashAlg (pvno 3)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    h = cert.signature_hash_algorithm
    der = cert.public_bytes(Encoding.DER)
    if h is None:
        return _digest(hashes.SHA512, der), hashes.SHA512, True
    return _digest(type(h), der), type(h), False


def hash_oid(hash_cls) -> str:
    return _HASH_OID_BY_NAME[hash_cls.name]
