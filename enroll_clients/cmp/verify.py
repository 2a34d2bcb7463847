"""Protocol-level certificate checks for CMP: the response signer's chain and root CA key update links.

Only what CMP itself requires (RFC 9483 3.5, 4.3.2) is checked here, with ``cryptography`` alone: that a
response signer chains to the configured CMP trust anchor, and that a new root offered in a rootCaKeyUpdate
is bound to the old root. Verify-before-store of enrolled credentials against the domain trust anchor is the
keystore's job.
"""
from __future__ import annotations

import datetime

from cryptography import x509

from keystore.verify import signed_by
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enroll_clients.base import ProtectionError, ProtocolError

MAX_PATH = 8


def spki(obj) -> bytes:
    """DER SubjectPublicKeyInfo of a certificate, public key or private key."""
    if isinstance(obj, x509.Certificate):
        obj = obj.public_key()
    elif hasattr(obj, "public_key"):
        obj = obj.public_key()
    return obj.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _valid_at(cert: x509.Certificate, at: datetime.datetime | None, role: str) -> None:
    if at is None:
        return
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise ProtectionError(
            f"{role} certificate {cert.subject.rfc4514_string()} is not valid at {at:%Y-%m-%dT%H:%M:%SZ} "
            f"(valid {cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d}); "
            "check the device clock or the server's certificate")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_signer(leaf: x509.Certificate, untrusted, anchors, at: datetime.datetime | None):
    """Build and check a path leaf -> (untrusted intermediates) -> one of ``anchors``.

    Returns the path (leaf first, anchor last). Raises ProtectionError naming the signer if there is none.
    """
    if not anchors:
        raise ProtectionError("signature-protected response, but no CMP trust anchor is configured "
                              "(EnrollOptions.trust_anchors); cannot trust the signer")
    anchor_ders = {a.public_bytes(Encoding.DER) for a in anchors}
    _valid_at(leaf, at, "response signer")
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature:
            raise ProtectionError(f"response signer {leaf.subject.rfc4514_string()} lacks keyUsage digitalSignature")
    except x509.ExtensionNotFound:
        pass
    path = [leaf]
    current = leaf
    for _ in range(MAX_PATH):
        if current.public_bytes(Encoding.DER) in anchor_ders:
            return path
        for a in anchors:
            if signed_by(current, a):
                return path + [a]
        nxt = None
        for c in untrusted:
            if c is not current and _is_ca(c) and signed_by(current, c):
                nxt = c
                break
        if nxt is None:
            break
        _valid_at(nxt, at, "intermediate")
        path.append(nxt)
        current = nxt
    raise ProtectionError(
        f"response signer {leaf.subject.rfc4514_string()} (issuer {leaf.issuer.rfc4514_string()}) does not chain "
        "to the configured CMP trust anchor(s): untrusted signer")


def issuing_chain(cert: x509.Certificate, pool) -> tuple[x509.Certificate, ...]:
    """The issuer chain of ``cert`` found in ``pool`` (signature-checked), nearest issuer first."""
    out = []
    current = cert
    for _ in range(MAX_PATH):
        if current.issuer == current.subject and signed_by(current, current):
            break
        nxt = next((c for c in pool if c not in out and c != current and signed_by(current, c)), None)
        if nxt is None:
            break
        out.append(nxt)
        current = nxt
    return tuple(out)


def verify_root_update(old_root: x509.Certificate, new_with_new: x509.Certificate,
                       new_with_old: x509.Certificate | None, old_with_new: x509.Certificate | None) -> None:
    """RFC 9483 4.3.2: trust a new root only if it is self-signed, its key is certified by the old root
    (newWithOld, signed by the old root's key) and newWithOld carries the same key and subject.

    Raises ProtocolError naming the failed link.
    """
    if not signed_by(new_with_new, new_with_new):
        raise ProtocolError("rootCaKeyUpdate: newWithNew is not a valid self-signed certificate")
    if new_with_old is None:
        raise ProtocolError("rootCaKeyUpdate: newWithOld is missing, so the new root cannot be linked "
                            "to the old one; not trusting it")
    if spki(new_with_old) != spki(new_with_new) or new_with_old.subject != new_with_new.subject:
        raise ProtocolError("rootCaKeyUpdate: newWithOld does not carry newWithNew's subject and public key")
    try:
        new_with_old.verify_directly_issued_by(old_root)
    except (InvalidSignature, ValueError, TypeError) as e:
        raise ProtocolError(f"rootCaKeyUpdate: newWithOld does not verify with the old root "
                            f"{old_root.subject.rfc4514_string()} ({type(e).__name__}); not trusting the new root") from None
    if old_with_new is not None:
        if spki(old_with_new) != spki(old_root):
            raise ProtocolError("rootCaKeyUpdate: oldWithNew does not carry the old root's public key")
        if not signed_by(old_with_new, new_with_new):
            raise ProtocolError("rootCaKeyUpdate: oldWithNew does not verify with the new root")
