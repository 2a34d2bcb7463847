"""The OPC UA application purpose: what an Application Instance Certificate must be (OPC 10000-6 §6.2.2).

``validate_application`` is the one trust decision of the OPC UA roles (the device's UpdateCertificate, its client
and role checks, the CLM's check of a device's endpoint certificate). The path, validity, end-entity role, key,
keyUsage and EKU go through ``keystore.validator`` with its ``opcua-app`` purpose (the EKU narrowed to the role:
serverAuth for a server's certificate, clientAuth for a client's). What the validator's purpose does not cover,
and Part 6 asks for, is checked here on the validated leaf:

- the application is named: its applicationUri is a URI in subjectAltName (compared exactly);
- RSA keys: keyUsage keyEncipherment (the channel's asymmetric encryption, RSA-OAEP). nonRepudiation and
  dataEncipherment are listed by Part 6 for RSA too, but no stack needs them: their absence is accepted
  (tolerant where security does not live).
"""
from __future__ import annotations

import datetime
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from keystore.certs import dn
from keystore.errors import VerificationError

ROLES = ("server", "client", "any")
NO_CLOCK_UNCERTAINTY_S = 20 * 365 * 86400.0  # a board without RTC: each certificate valid at *some* time near now


def application_uris(cert: x509.Certificate) -> list[str]:
    """The URIs in the certificate's subjectAltName (an OPC UA applicationUri is one of them)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except ValueError as e:
        raise VerificationError("malformed", f"certificate {dn(cert.subject)}: malformed subjectAltName: {e}") from e
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def policy(role: str = "server", at: datetime.datetime | None = None, clock_trusted: bool = True):
    """The validator policy for an OPC UA certificate of ``role`` (server, client, or any: path only)."""
    from keystore.validator import Policy

    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    at = at or datetime.datetime.now(datetime.timezone.utc)
    eku = {"server": {"serverAuth"}, "client": {"clientAuth"}, "any": set()}[role]
    kw = {} if clock_trusted else {"clock": "estimate", "uncertainty_s": NO_CLOCK_UNCERTAINTY_S}
    return Policy.for_purpose("opcua-app", at=at, eku=frozenset(eku), **kw)


def validate_application(cert: x509.Certificate, untrusted: Iterable[x509.Certificate],
                         anchors: Sequence[x509.Certificate], *, application_uri: str | None, role: str = "server",
                         public_key=None, at: datetime.datetime | None = None, clock_trusted: bool = True,
                         what: str = "OPC UA application certificate") -> tuple[x509.Certificate, ...]:
    """Validate ``cert`` as an OPC UA Application Instance Certificate. Returns the path (leaf ... anchor).

    Args:
        untrusted: intermediates offered (the TrustList's issuer certificates, issuerCertificates).
        anchors: the trusted certificates (CAs, or pinned application certificates).
        application_uri: the URI the SAN must contain; None skips that check (a peer whose URI is not known).
        role: "server" (serverAuth), "client" (clientAuth) or "any" (no EKU requirement, e.g. a user token).
        public_key: the certificate must carry exactly this key (verify-before-store).
        clock_trusted: False on a board without a real-time clock (validity then only has to hold at some time).
    Raises:
        VerificationError: the validator's reasons, plus ``bad-application-uri`` and ``bad-key-usage``.
    """
    from keystore.validator import validate

    path = validate(cert, list(untrusted), list(anchors), policy(role, at, clock_trusted), public_key=public_key,
                    what=what)
    check_application_certificate(cert, application_uri, role)
    return path


def check_application_certificate(cert: x509.Certificate, application_uri: str | None, role: str = "server") -> None:
    """The Part 6 checks the validator's ``opcua-app`` purpose does not make (see the module docstring).

    Raises:
        VerificationError: ``bad-application-uri``, ``bad-key-usage``, ``malformed``.
    """
    name = dn(cert.subject) or "(empty subject)"
    if application_uri is not None and role != "any":
        uris = application_uris(cert)
        if application_uri not in uris:
            found = ", ".join(uris) or "no URI"
            raise VerificationError("bad-application-uri", f"certificate {name}: subjectAltName has {found}, not "
                                    f"the application's URI {application_uri} (OPC 10000-6 §6.2.2)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    except ValueError as e:
        raise VerificationError("malformed", f"certificate {name}: malformed keyUsage: {e}") from e
    if ku is not None and role != "any" and isinstance(cert.public_key(), rsa.RSAPublicKey) \
            and not ku.key_encipherment:
        raise VerificationError("bad-key-usage", f"certificate {name}: key usage lacks keyEncipherment (needed "
                                "by an RSA OPC UA secure channel)")
