"""Verify-before-store: is this certificate ours, trusted, currently valid and fit for its purpose?

Pure and synchronous. Every rejection is a ``VerificationError`` with a stable ``reason`` code and a message
naming the certificate and the check that failed. Path building is by issuer name + signature (with the
authority/subject key identifier as a tie-breaker), bounded in depth; trust anchors are compared by their
DER bytes, so a certificate that merely claims an anchor's name is not trusted.
"""
from __future__ import annotations

import datetime
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from keystore.certs import dn, fingerprint, same_public_key
from keystore.errors import VerificationError

MAX_PATH_LEN = 8
PURPOSE_EKU = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
}
KNOWN_CRITICAL = {
    ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.NAME_CONSTRAINTS, ExtensionOID.POLICY_CONSTRAINTS,
    ExtensionOID.CERTIFICATE_POLICIES, ExtensionOID.INHIBIT_ANY_POLICY, ExtensionOID.POLICY_MAPPINGS,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
}


def _name(cert: x509.Certificate) -> str:
    return dn(cert.subject) or "(empty subject)"


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer``'s key verifies ``cert``'s signature and the names chain."""
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def _ext(cert, cls):
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _check_extensions_parse(cert: x509.Certificate) -> None:
    try:
        exts = cert.extensions
    except ValueError as e:
        raise VerificationError("malformed", f"certificate {_name(cert)}: malformed extension: {e}") from e
    for ext in exts:
        if ext.critical and ext.oid not in KNOWN_CRITICAL:
            raise VerificationError("unknown-critical-extension",
                                    f"certificate {_name(cert)} has an unknown critical extension {ext.oid.dotted_string}")


def _check_validity(cert, now, role):
    if now < cert.not_valid_before_utc:
        raise VerificationError("not-yet-valid", f"{role} certificate {_name(cert)} is not valid before "
                                f"{cert.not_valid_before_utc.isoformat()} (now {now.isoformat()}; is the clock right?)")
    if now > cert.not_valid_after_utc:
        raise VerificationError("expired", f"{role} certificate {_name(cert)} expired at "
                                f"{cert.not_valid_after_utc.isoformat()} (now {now.isoformat()})")


def build_path(cert: x509.Certificate, intermediates: Sequence[x509.Certificate],
               anchors: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """Return [cert, ..., anchor]: a signature-verified path from ``cert`` to one of ``anchors``.

    Raises:
        VerificationError("untrusted"): no path.
    """
    anchor_fps = {fingerprint(a) for a in anchors}
    path = [cert]
    current = cert
    for _ in range(MAX_PATH_LEN):
        if fingerprint(current) in anchor_fps:
            return path
        for a in anchors:
            if signed_by(current, a):
                return path + [a] if fingerprint(a) != fingerprint(current) else path
        nxt = None
        for c in intermediates:
            if c is current or fingerprint(c) in {fingerprint(p) for p in path}:
                continue
            if signed_by(current, c):
                nxt = c
                break
        if nxt is None:
            break
        path.append(nxt)
        current = nxt
    if not anchors:
        raise VerificationError("untrusted", f"certificate {_name(cert)}: no trust anchor is configured for "
                                "this domain (add one with 'devagent ca-update' or '--trust CA.pem')")
    raise VerificationError(
        "untrusted",
        f"certificate {_name(cert)} (issuer {dn(cert.issuer)}) does not chain to the trust anchor(s) "
        f"{', '.join(_name(a) for a in anchors)}")


def verify_certificate(
    cert: x509.Certificate,
    *,
    public_key=None,
    chain: Iterable[x509.Certificate] = (),
    trust_anchors: Sequence[x509.Certificate] = (),
    now: datetime.datetime | None = None,
    check_validity: bool = True,
    purpose: str | None = None,
    require_digital_signature: bool = True,
) -> list[x509.Certificate]:
    """Full verify-before-store check of an end-entity certificate.

    Args:
        cert: the certificate to accept.
        public_key: our key; the certificate must carry exactly it (None skips, e.g. CLM pre-verification).
        chain: intermediates offered with it (order irrelevant).
        trust_anchors: the domain's anchors; the path must end at one of them.
        now: the time to check against; ``check_validity=False`` when the clock is not trusted.
        purpose: "clientAuth"/"serverAuth" to require that EKU (when the certificate has an EKU).
    Returns:
        the verified path [cert, intermediates..., anchor].
    Raises:
        VerificationError: the first check that failed, with a reason code.
    """
    now = now or _utcnow()
    _check_extensions_parse(cert)
    if public_key is not None and not same_public_key(cert.public_key(), public_key):
        raise VerificationError("key-mismatch", f"certificate {_name(cert)} is for another key: its public key "
                                "does not match the key this request was made with (public key mismatch)")
    bc = _ext(cert, x509.BasicConstraints)
    if bc is not None and bc.ca:
        raise VerificationError("is-ca", f"certificate {_name(cert)} is a CA certificate, not an end-entity one")
    ku = _ext(cert, x509.KeyUsage)
    if ku is not None and require_digital_signature and not ku.digital_signature:
        raise VerificationError("bad-key-usage", f"certificate {_name(cert)}: key usage lacks digitalSignature")
    if purpose is not None:
        eku = _ext(cert, x509.ExtendedKeyUsage)
        want = PURPOSE_EKU.get(purpose)
        if eku is not None and want is not None and want not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
            raise VerificationError("bad-eku", f"certificate {_name(cert)}: extended key usage lacks {purpose}")
    if check_validity:
        _check_validity(cert, now, "end-entity")
    path = build_path(cert, list(chain), trust_anchors)
    for depth, ca in enumerate(path[1:], start=1):
        _check_extensions_parse(ca)
        cbc = _ext(ca, x509.BasicConstraints)
        if cbc is None or not cbc.ca:
            raise VerificationError("not-a-ca", f"issuer {_name(ca)} is not a CA (basicConstraints cA is not set)")
        if cbc.path_length is not None and depth - 1 > cbc.path_length:
            raise VerificationError("not-a-ca", f"issuer {_name(ca)}: path length constraint {cbc.path_length} exceeded")
        cku = _ext(ca, x509.KeyUsage)
        if cku is not None and not cku.key_cert_sign:
            raise VerificationError("bad-key-usage", f"issuer {_name(ca)}: key usage lacks keyCertSign")
        if check_validity:
            _check_validity(ca, now, "CA")
    return path


def verify_ca_chain(certs: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate],
                    now: datetime.datetime | None = None, check_validity: bool = True) -> None:
    """Check that every CA certificate in ``certs`` chains to ``anchors`` (used when updating a truststore).

    Raises:
        VerificationError: naming the first certificate that does not.
    """
    now = now or _utcnow()
    for c in certs:
        bc = _ext(c, x509.BasicConstraints)
        if bc is None or not bc.ca:
            raise VerificationError("not-a-ca", f"{_name(c)} is not a CA certificate")
        if check_validity:
            _check_validity(c, now, "CA")
        build_path(c, list(certs), anchors)
