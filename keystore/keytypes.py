"""Key types the agent generates, their names, and how each signs.

Names (CLI and index): p256, p384, rsa2048, rsa3072, rsa4096, ed25519; rsa1024 only with ``allow_weak``
(benchmarks reproducing seed 003's Table 1).
"""
from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keystore.errors import UnsupportedKeyTypeError

KEY_TYPES = ("p256", "p384", "rsa2048", "rsa3072", "rsa4096", "ed25519")
WEAK_KEY_TYPES = ("rsa1024",)
ALIASES = {"ec": "p256", "ecc": "p256", "secp256r1": "p256", "prime256v1": "p256", "secp384r1": "p384",
           "rsa": "rsa2048", "p-256": "p256", "p-384": "p384"}
DEFAULT_KEY_TYPE = "p256"


def parse_key_type(name: str, allow_weak: bool = False) -> str:
    """Normalise a key type name.

    Raises:
        UnsupportedKeyTypeError: unknown name, or a weak type without ``allow_weak``.
    """
    n = ALIASES.get(name.strip().lower(), name.strip().lower())
    if n in KEY_TYPES:
        return n
    if n in WEAK_KEY_TYPES:
        if allow_weak:
            return n
        raise UnsupportedKeyTypeError(
            f"key type {name} is too weak for production; it is allowed only with the explicit "
            f"'weak, benchmarks only' flag (--allow-weak-keys)")
    raise UnsupportedKeyTypeError(f"unknown key type {name!r}; choose one of {', '.join(KEY_TYPES)}")


def generate_software_key(key_type: str):
    """Generate a software private key of ``key_type`` (already parsed)."""
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    raise UnsupportedKeyTypeError(f"unknown key type {key_type!r}")


def key_type_of(key) -> str:
    """Name of the type of a public or private key object.

    Raises:
        UnsupportedKeyTypeError: a key we do not handle (e.g. DSA, P-521).
    """
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        curve = key.curve.name
        if curve == "secp256r1":
            return "p256"
        if curve == "secp384r1":
            return "p384"
        raise UnsupportedKeyTypeError(f"unsupported elliptic curve {curve}")
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"rsa{key.key_size}"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    raise UnsupportedKeyTypeError(f"unsupported key type {type(key).__name__}")


def signature_hash(key):
    """Hash algorithm to sign with this key: SHA-384 for P-384, none for Ed25519, else SHA-256."""
    t = key_type_of(key)
    if t == "ed25519":
        return None
    if t == "p384":
        return hashes.SHA384()
    return hashes.SHA256()
