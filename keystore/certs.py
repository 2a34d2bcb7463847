"""Parsing of certificates, keys and PKCS#12 from untrusted bytes, with errors that name the source.

Pure functions: bytes in, ``cryptography`` objects out.
"""
from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12

from keystore.errors import CorruptFileError

PEM_CERT = b"-----BEGIN CERTIFICATE-----"
PEM_PKCS7 = (b"-----BEGIN PKCS7-----", b"-----BEGIN CMS-----")


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:HEX`` of the DER certificate."""
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def spki_der(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def same_public_key(a, b) -> bool:
    return spki_der(a) == spki_der(b)


def load_certificates(data: bytes, source: str = "input") -> list[x509.Certificate]:
    """Load one or more certificates from PEM (certificates or PKCS#7, text before the first block allowed),
    DER certificate, or DER PKCS#7.

    Raises:
        CorruptFileError: naming ``source`` and what was found instead.
    """
    if not data:
        raise CorruptFileError(f"{source}: empty, expected a certificate")
    try:
        # PEM may follow text (`openssl x509 -text`, `openssl pkcs7 -print_certs` write subject/issuer lines
        # first); DER starts with a SEQUENCE tag and is never taken for PEM.
        if data[:1] != b"\x30" and b"-----BEGIN" in data:
            if any(m in data for m in PEM_PKCS7):
                certs = pkcs7.load_pem_pkcs7_certificates(data)
            else:
                if PEM_CERT not in data:
                    kind = data[data.index(b"-----BEGIN"):].split(b"\n", 1)[0].decode("ascii", "replace")
                    raise CorruptFileError(f"{source}: expected a PEM certificate, found {kind}")
                certs = x509.load_pem_x509_certificates(data)
        else:
            try:
                certs = [x509.load_der_x509_certificate(data)]
            except ValueError:
                certs = pkcs7.load_der_pkcs7_certificates(data)
    except CorruptFileError:
        raise
    except ValueError as e:
        raise CorruptFileError(f"{source}: not a valid certificate or PKCS#7 certs-only structure "
                               f"(PEM or DER): {e}") from e
    if not certs:
        raise CorruptFileError(f"{source}: contains no certificate")
    return list(certs)


def load_certificate_file(path: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CorruptFileError(f"cannot read {path}: {e.strerror or e}") from e
    return load_certificates(data, path)


def load_private_key(data: bytes, source: str, password: bytes | None = None, *, trusted: bool = False):
    """Load a private key from PEM or DER (PKCS#8, traditional), optionally encrypted.

    ``trusted`` skips RSA key validation (~100 ms for RSA-2048): only for keys this keystore generated and
    encrypted itself, never for imported files.

    Raises:
        CorruptFileError: malformed, wrong password, or not a private key.
    """
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return serialization.load_pem_private_key(data, password, unsafe_skip_rsa_key_validation=trusted)
        return serialization.load_der_private_key(data, password, unsafe_skip_rsa_key_validation=trusted)
    except TypeError as e:
        raise CorruptFileError(f"{source}: {'key is encrypted; give its password' if password is None else e}") from e
    except (ValueError, Exception) as e:  # cryptography raises ValueError or UnsupportedAlgorithm
        hint = " (or the password is wrong)" if password is not None else ""
        raise CorruptFileError(f"{source}: not a valid private key{hint}: {e}") from e


def load_pkcs12(data: bytes, source: str, password: bytes | None):
    """Return (key, certificate, [additional certificates]) from a PKCS#12 file.

    Raises:
        CorruptFileError: malformed, wrong password, or missing key/certificate.
    """
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password)
    except ValueError as e:
        raise CorruptFileError(f"{source}: cannot open PKCS#12 (wrong password or corrupt file): {e}") from e
    if key is None:
        raise CorruptFileError(f"{source}: PKCS#12 holds no private key")
    if cert is None:
        raise CorruptFileError(f"{source}: PKCS#12 holds no certificate")
    return key, cert, list(extra or [])


def pem(certs) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


NAME_OVERRIDES = {x509.oid.NameOID.SERIAL_NUMBER: "serialNumber"}


def dn(name: x509.Name) -> str:
    """RFC 4514 string with readable attribute names (serialNumber instead of 2.5.4.5)."""
    return name.rfc4514_string(NAME_OVERRIDES)


def describe(cert: x509.Certificate) -> dict:
    """A JSON-friendly summary of a certificate (no secrets)."""
    return {
        "subject": dn(cert.subject),
        "issuer": dn(cert.issuer),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "fingerprint": fingerprint(cert),
    }
