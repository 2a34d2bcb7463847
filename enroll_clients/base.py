"""The protocol-neutral interface between the agent's lifecycle code and the EST/CMP clients.

Invariants:
- A client never stores anything and never looks credentials up: the caller passes keys (``cryptography``
  private-key objects, which may live in a TPM or PKCS#11 token), certificates and trust anchors.
- A client returns only what it has verified at protocol level (response protection, transaction binding,
  that the certificate is the one we asked for where the protocol says so). Verify-before-store against the
  domain trust anchor is the keystore's job and happens afterwards.
- Every error is an ``EnrollError`` whose ``str()`` names what was wrong and where (URL, CMP status and
  failInfo, HTTP status and the server's text).
"""
from __future__ import annotations

import abc
import dataclasses
import datetime
from typing import Any, Sequence

from cryptography import x509


class EnrollError(Exception):
    """Root of all enrollment-client errors.

    ``validity`` is "not-yet-valid" or "expired" when the failure was a certificate's validity period checked
    against this device's clock (e.g. the EST server's TLS certificate): the clock may be the cause, not the trust
    anchors (the daemon says so when it has evidence, ``agent.policy.clock_hint``).
    """

    validity: str | None = None


class TransportError(EnrollError):
    """The peer could not be reached or the connection broke (retryable)."""


class ProtocolError(EnrollError):
    """The peer answered with something malformed or not bound to our request (never retried)."""


class ProtectionError(ProtocolError):
    """Response protection failed: wrong MAC, bad signature, untrusted signer, TLS failure."""


class ServerError(EnrollError):
    """The server refused the request (HTTP 4xx/5xx, CMP rejection with PKIStatusInfo)."""

    def __init__(self, message: str, *, status: Any = None, fail_info: Sequence[str] = (), text: str = ""):
        super().__init__(message)
        self.status = status
        self.fail_info = tuple(fail_info)
        self.text = text


class UnsupportedError(EnrollError):
    """The protocol or server does not offer this operation (e.g. revocation over EST)."""


@dataclasses.dataclass(frozen=True)
class ClientAuth:
    """How we authenticate to the server. Any combination may be set; the client uses what its protocol can.

    - ``certificate``/``private_key``/``chain``: signature protection (CMP) or TLS client auth (EST).
      ``key_file``/``key_password`` optionally give the same key as an (encrypted) PEM file for TLS stacks
      that need a file; absent for TPM/PKCS#11 keys.
    - ``reference``/``secret``: CMP MAC protection (senderKID + shared secret).
    - ``username``/``password``: HTTP Basic (EST).
    """

    certificate: x509.Certificate | None = None
    private_key: Any = None
    chain: tuple[x509.Certificate, ...] = ()
    key_file: str | None = None
    key_password: bytes | None = None
    reference: bytes | None = None
    secret: bytes | None = dataclasses.field(default=None, repr=False)
    username: str | None = None
    password: bytes | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class CertRequest:
    """What to ask for. ``csr`` is built by the keystore (only keystore builds CSRs) and signed by
    ``private_key``; CMP ir/cr/kur build a CRMF request from ``private_key`` + ``subject`` + ``sans`` +
    ``extensions`` instead. With ``server_keygen`` the key is generated centrally and both are None."""

    subject: x509.Name
    private_key: Any = None
    csr: x509.CertificateSigningRequest | None = None
    sans: tuple[x509.GeneralName, ...] = ()
    extensions: tuple[x509.Extension, ...] = ()
    key_type: str | None = None
    server_keygen: bool = False
    profile: str | None = None
    # The same CSR for a given challengePassword: ``csr_builder(challenge_password=bytes) -> CSR`` (built by the
    # keystore, signed by ``private_key``), for protocols that bind the CSR to their session (EST tls-unique,
    # RFC 7030 §3.5). None: no binding possible.
    csr_builder: Any = None


@dataclasses.dataclass(frozen=True)
class EnrollResult:
    """What an enrollment returned: certificate, chain, CA certificates and what the server said."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()
    ca_certs: tuple[x509.Certificate, ...] = ()
    private_key: Any = None  # only for server-side key generation
    server_time: datetime.datetime | None = None
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CaCertsResult:
    """The CA certificates a server returned, with root CA key update links when there are any."""

    ca_certs: tuple[x509.Certificate, ...]
    # Root CA key update (CMP rootCaCert genp, or derived from EST /cacerts): verified links.
    new_root: x509.Certificate | None = None
    new_with_old: x509.Certificate | None = None
    old_with_new: x509.Certificate | None = None
    server_time: datetime.datetime | None = None


@dataclasses.dataclass(frozen=True)
class EnrollOptions:
    """Everything a client may need to be built. Unused fields are ignored by a protocol."""

    server: str
    trust_anchors: tuple[x509.Certificate, ...] = ()  # for the server (TLS for EST, CMP response signer)
    domain: str | None = None
    profile: str | None = None
    label: str | None = None  # EST arbitrary label
    timeout_s: float = 30.0
    retries: int = 2
    # CMP specifics
    recipient: x509.Name | None = None
    implicit_confirm: bool = False
    mac: str = "pbm"  # "pbm" (RFC 4210 PasswordBasedMac) or "pbmac1" (RFC 9481)
    reqout: str | None = None  # file transport: write request(s) here
    rspin: str | None = None  # file transport: read response(s) from here
    # EST specifics
    ca_fingerprint: str | None = None  # "sha256:HEX" for /cacerts bootstrap
    max_wait_s: float = 300.0  # bound on 202 Retry-After waits
    extra: dict = dataclasses.field(default_factory=dict)


class EnrollmentClient(abc.ABC):
    """A protocol client; async because it waits on the network."""

    protocol: str = ""

    @abc.abstractmethod
    async def enroll(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        """Initial enrollment (CMP ir or p10cr, EST simpleenroll / serverkeygen)."""

    @abc.abstractmethod
    async def request(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        """Additional certificate authenticated by an existing credential (CMP cr, EST simpleenroll)."""

    @abc.abstractmethod
    async def renew(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        """Renewal of ``auth.certificate`` (CMP kur, EST simplereenroll). ``request.private_key`` is the
        new key (rekey) or the old one."""

    @abc.abstractmethod
    async def revoke(self, certificate: x509.Certificate, auth: ClientAuth, reason: str) -> None:
        """Revocation (CMP rr). EST raises UnsupportedError."""

    @abc.abstractmethod
    async def ca_certs(self, auth: ClientAuth | None = None) -> CaCertsResult:
        """Current CA certificates (EST /cacerts, CMP genm caCerts + rootCaCert)."""
