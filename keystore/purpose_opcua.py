"""The OPC UA application purpose: what an Application Instance Certificate must be (OPC 10000-6 §6.2.2).

Pure checks on one certificate, made *in addition to* the path validation of ``keystore.verify`` (chain to the
domain's anchors, validity, our key): the certificate must name the application (its applicationUri as a URI in
subjectAltName, compared exactly), must not be a CA, and its key usage and extended key usage must allow what an
OPC UA secure channel does with it:

- keyUsage (when present, which Part 6 requires): digitalSignature always; keyEncipherment for RSA keys (the
  channel's asymmetric encryption, RSA-OAEP). nonRepudiation and dataEncipherment are listed by Part 6 for RSA but
  no stack needs them, so their absence is accepted (tolerant where security does not live).
- extendedKeyUsage (when present): serverAuth for a server's certificate, clientAuth for a client's; anyExtendedKeyUsage
  satisfies both.

This is the single place for these rules; when the trust core's validator (keystore/validator.py) lands they
become its "OPC UA application" purpose and this module goes.
"""
from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from keystore.certs import dn
from keystore.errors import VerificationError

ROLES = ("server", "client")


def application_uris(cert: x509.Certificate) -> list[str]:
    """The URIs in the certificate's subjectAltName (an OPC UA applicationUri is one of them)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def check_application_certificate(cert: x509.Certificate, application_uri: str | None, role: str = "server") -> None:
    """Raise ``VerificationError`` unless ``cert`` is a usable OPC UA Application Instance Certificate.

    Args:
        cert: the certificate (its chain is checked elsewhere).
        application_uri: the application's URI the SAN must contain; None skips that check (a client whose
            applicationUri is not known in advance).
        role: "server" (serverAuth) or "client" (clientAuth).
    Raises:
        VerificationError: reasons ``bad-application-uri``, ``is-ca``, ``bad-key-usage``, ``bad-eku``, ``malformed``.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    name = dn(cert.subject) or "(empty subject)"
    try:
        exts = cert.extensions
    except ValueError as e:
        raise VerificationError("malformed", f"certificate {name}: malformed extension: {e}") from e
    if application_uri is not None:
        uris = application_uris(cert)
        if application_uri not in uris:
            found = ", ".join(uris) or "no URI"
            raise VerificationError("bad-application-uri", f"certificate {name}: subjectAltName has {found}, not "
                                    f"this application's URI {application_uri} (OPC 10000-6 §6.2.2)")
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        raise VerificationError("is-ca", f"certificate {name} is a CA certificate, not an application instance "
                                "certificate")
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None:
        if not ku.digital_signature:
            raise VerificationError("bad-key-usage", f"certificate {name}: key usage lacks digitalSignature")
        if isinstance(cert.public_key(), rsa.RSAPublicKey) and not ku.key_encipherment:
            raise VerificationError("bad-key-usage", f"certificate {name}: key usage lacks keyEncipherment (needed "
                                    "by an RSA OPC UA secure channel)")
    try:
        eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None:
        want = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        if want not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
            raise VerificationError("bad-eku", f"certificate {name}: extended key usage lacks "
                                    f"{'serverAuth' if role == 'server' else 'clientAuth'}")
