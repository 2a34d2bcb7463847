"""PKCS#10 (RFC 2986) certificate signing requests, built only here.

The key may be a software, TPM or PKCS#11 key: anything with ``cryptography``'s private-key interface.
"""
from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID

from keystore.keytypes import signature_hash

SAN_FORMS = "dns:NAME, ip:ADDR, uri:URI, email:ADDR"


def parse_subject(dn: str) -> x509.Name:
    """Parse an RFC 4514 DN ("CN=dev1,O=Plant,serialNumber=123") or a bare common name.

    Raises:
        ValueError: malformed DN, naming it.
    """
    dn = dn.strip()
    if not dn:
        raise ValueError("empty subject")
    if "=" not in dn:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dn)])
    try:
        return x509.Name.from_rfc4514_string(dn, {"serialNumber": NameOID.SERIAL_NUMBER})
    except ValueError as e:
        raise ValueError(f"malformed subject {dn!r}: {e} (write it as RFC 4514, e.g. CN=dev1,O=Plant)") from e


def parse_san(item: str) -> x509.GeneralName:
    """Parse ``dns:``, ``ip:``, ``uri:`` or ``email:`` into a GeneralName.

    Raises:
        ValueError: unknown form or malformed value.
    """
    kind, sep, value = item.partition(":")
    kind = kind.lower()
    if not sep or not value:
        raise ValueError(f"malformed SAN {item!r}; use {SAN_FORMS}")
    if kind == "dns":
        return x509.DNSName(value)
    if kind == "ip":
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError as e:
            raise ValueError(f"malformed IP address in SAN {item!r}") from e
    if kind == "uri":
        return x509.UniformResourceIdentifier(value)
    if kind == "email":
        return x509.RFC822Name(value)
    raise ValueError(f"unknown SAN type {kind!r} in {item!r}; use {SAN_FORMS}")


def build_csr(
    private_key,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName] = (),
    *,
    key_usage: x509.KeyUsage | None = None,
    extended_key_usage: Sequence[x509.ObjectIdentifier] = (),
    extensions: Iterable[x509.Extension] = (),
    challenge_password: bytes | None = None,
) -> x509.CertificateSigningRequest:
    """Build and sign a CSR with ``private_key`` (signed inside its backend)."""
    b = x509.CertificateSigningRequestBuilder().subject_name(subject)
    seen = set()
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        seen.add(x509.SubjectAlternativeName.oid)
    if key_usage is not None:
        b = b.add_extension(key_usage, critical=True)
        seen.add(x509.KeyUsage.oid)
    if extended_key_usage:
        b = b.add_extension(x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False)
        seen.add(x509.ExtendedKeyUsage.oid)
    for ext in extensions:
        if ext.oid not in seen:
            b = b.add_extension(ext.value, critical=ext.critical)
            seen.add(ext.oid)
    if challenge_password is not None:
        b = b.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge_password)
    return b.sign(private_key, signature_hash(private_key))


def default_key_usage(key_type: str) -> x509.KeyUsage:
    """digitalSignature (+ keyEncipherment for RSA): what an LDevID/TLS credential needs."""
    rsa = key_type.startswith("rsa")
    return x509.KeyUsage(True, False, rsa, False, False, False, False, False, False)
