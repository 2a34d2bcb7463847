"""Names of the CMP MAC choices (``--mac-alg``, ``--mac-owf``) and the RFC 9483 6.1 operation labels.

Pure and cheap (no pyasn1, no cryptography): the CLI and ``CmpClient.__init__`` validate options with it
before any ASN.1 is loaded.
"""
from __future__ import annotations

# What --mac-alg accepts (OpenSSL's -mac names). The HMAC of PasswordBasedMac; for PBMAC1 also the PBKDF2 PRF.
MAC_ALGS = ("hmac-sha1", "hmac-sha224", "hmac-sha256", "hmac-sha384", "hmac-sha512")
# What --mac-owf accepts: the one-way function of PasswordBasedMac (RFC 4210 5.1.3.1).
OWF_NAMES = ("sha1", "sha224", "sha256", "sha384", "sha512")
DEFAULT_MAC_ALG = "hmac-sha256"  # RFC 9481 6.1.1: PBM with SHA-256 / HMAC-SHA256 is the MUST
DEFAULT_OWF = "sha256"
MAC_SENDERS = ("subject", "null-dn")  # header sender of MAC-protected requests

# RFC 9483 6.1: operation label per request type (genm: per infoType, see client).
OPERATION_FOR_BODY = {"ir": "initialization", "cr": "certification", "kur": "keyupdate", "p10cr": "p10",
                      "rr": "revocation"}
PROFILE_LOCATIONS = ("generalinfo", "path", "both")  # where --profile goes


def mac_hash_name(mac_alg: str | None) -> str:
    """"hmac-sha1" -> "sha1" (None: the default); ValueError naming the allowed values otherwise."""
    alg = (mac_alg or DEFAULT_MAC_ALG).strip().lower()
    if alg not in MAC_ALGS:
        raise ValueError(f"unknown MAC algorithm {mac_alg!r} (one of {', '.join(MAC_ALGS)})")
    return alg[len("hmac-"):]


def owf_name(owf: str | None) -> str:
    """"SHA-256"/"sha256" -> "sha256" (None: the default); ValueError otherwise."""
    name = (owf or DEFAULT_OWF).strip().lower().replace("-", "")
    if name not in OWF_NAMES:
        raise ValueError(f"unknown PBM one-way function {owf!r} (one of {', '.join(OWF_NAMES)})")
    return name
