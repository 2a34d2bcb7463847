"""The management side of OPC UA push management: a client that calls a device's ServerConfiguration methods
(OPC 10000-12 §7.7, §7.8.2) over a SignAndEncrypt secure channel — what a GDS does, and what devagent's CLM does.

The device's own certificate is checked before anything is sent: it must chain to the anchors the caller gives
(through ``keystore.purpose_opcua`` and the validator: serverAuth, the device's applicationUri) or be the one
pinned by fingerprint (a device's first, self-signed certificate, accepted once by the operator). The client's
key may live in any keystore backend: asyncua is given the ``cryptography`` key object, never key bytes.

Every refusal from the device is a ``PushClientError`` carrying the StatusCode name (``status``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Sequence

from asyncua import Client, ua
from asyncua.crypto import security_policies
from asyncua.ua.uaerrors import UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.opcua import trustlist as tlmod
from agent.opcua.errors import PushClientError
from agent.opcua.trustlist import TrustList

log = logging.getLogger("devagent.opcua")

POLICY_CLASSES = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
SC = "ServerConfiguration_"
TL = "ServerConfiguration_CertificateGroups_DefaultApplicationGroup_TrustList_"
CHUNK = 16384  # TrustList Write/Read chunk: well under asyncua's and most stacks' message limits
CERT_TYPES = {"rsa": 12560, "p256": 23538, "p384": 23539}


def _first_der(blob: bytes) -> bytes:
    """The first certificate of a ServerCertificate that may carry its chain (concatenated DER, Part 4 §7.2)."""
    from agent.opcua.push import _split_der

    return _split_der(bytes(blob))[0] if blob else b""


def _nid(name: str) -> ua.NodeId:
    return ua.NodeId(getattr(ua.ObjectIds, name))


@dataclasses.dataclass(frozen=True)
class Identity:
    """The client's application instance certificate and key (any keystore backend), and its applicationUri."""

    certificate: x509.Certificate
    private_key: object
    application_uri: str
    chain: tuple[x509.Certificate, ...] = ()


class PushClient:
    """``async with PushClient(url, identity, anchors=[root]) as c: csr = await c.create_signing_request()``."""

    def __init__(self, url: str, identity: Identity, *, anchors: Sequence[x509.Certificate] = (),
                 intermediates: Sequence[x509.Certificate] = (), server_fingerprint: str | None = None, server_uri: str | None = None,
                 policy: str = "Basic256Sha256", timeout_s: float = 30.0):
        if policy not in POLICY_CLASSES:
            raise ValueError(f"unknown security policy {policy!r}; use {', '.join(POLICY_CLASSES)}")
        self.url = url
        self.identity = identity
        self.anchors = list(anchors)
        self.intermediates = list(intermediates)
        self.server_fingerprint = server_fingerprint.lower() if server_fingerprint else None
        self.server_uri = server_uri
        self.policy = policy
        self.timeout_s = timeout_s
        self.client: Client | None = None
        self.server_certificate: x509.Certificate | None = None
        self.endpoint_uri: str | None = None  # the ApplicationUri the endpoint describes
        self.timings: dict[str, float] = {}

    # ---- connection ------------------------------------------------------------------------------------------
    async def _endpoint(self) -> ua.EndpointDescription:
        probe = Client(self.url, timeout=self.timeout_s)
        try:
            endpoints = await probe.connect_and_get_server_endpoints()
        except (OSError, TimeoutError, UaStatusCodeError) as e:
            raise PushClientError(f"{self.url}: cannot get the endpoints: {e}") from e
        uri = POLICY_CLASSES[self.policy].URI
        for ep in endpoints:
            if ep.SecurityPolicyUri == uri and ep.SecurityMode == ua.MessageSecurityMode.SignAndEncrypt:
                return ep
        offered = ", ".join(f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name}" for e in endpoints)
        raise PushClientError(f"{self.url}: no {self.policy} SignAndEncrypt endpoint (offered: {offered or 'none'})")

    def check_server_certificate(self, cert: x509.Certificate, server_uri: str | None) -> None:
        """Pinned fingerprint, or a path to ``anchors`` and the OPC UA server purpose. Raises PushClientError."""
        from keystore.certs import fingerprint
        from keystore.errors import VerificationError
        from keystore.purpose_opcua import validate_application

        fp = fingerprint(cert)
        if self.server_fingerprint and fp == self.server_fingerprint:
            return
        if not self.anchors:
            raise PushClientError(f"{self.url}: the device's certificate {cert.subject.rfc4514_string()} ({fp}) is "
                                  "neither pinned nor can it be checked (no trust anchor given)")
        try:
            validate_application(cert, self.intermediates, self.anchors, application_uri=self.server_uri or server_uri,
                                 role="server", what="device's OPC UA server certificate")
        except VerificationError as e:
            hint = "" if self.server_fingerprint else " (a device's first, self-signed certificate is accepted by " \
                "its fingerprint: --server-fingerprint)"
            raise PushClientError(f"{self.url}: the device's certificate is not trusted: {e}{hint}") from e

    async def connect(self) -> None:
        t0 = time.perf_counter()
        ep = await self._endpoint()
        from keystore.certs import load_der_certificate
        from keystore.errors import CorruptFileError

        try:
            cert = load_der_certificate(_first_der(ep.ServerCertificate or b""), f"{self.url} endpoint certificate")
        except (CorruptFileError, ValueError) as e:
            raise PushClientError(f"{self.url}: the endpoint's server certificate does not parse: {e}") from e
        self.check_server_certificate(cert, ep.Server.ApplicationUri)
        self.server_certificate = cert
        self.endpoint_uri = ep.Server.ApplicationUri or None
        c = Client(self.url, timeout=self.timeout_s)
        c.application_uri = self.identity.application_uri
        c.security_policy = POLICY_CLASSES[self.policy](cert, self.identity.certificate, self.identity.private_key,
                                                       ua.MessageSecurityMode.SignAndEncrypt,
                                                       host_cert_chain=list(self.identity.chain))
        c.uaclient.set_security(c.security_policy)
        try:
            await c.connect()
        except (OSError, TimeoutError, UaStatusCodeError) as e:
            raise PushClientError(f"{self.url}: secure channel / session refused: {e}",
                                  getattr(e, "code", None) and ua.StatusCode(e.code).name) from e
        self.client = c
        self.timings["connect_s"] = time.perf_counter() - t0

    async def close(self) -> None:
        if self.client is not None:
            try:
                await self.client.disconnect()
            except Exception as e:  # the device may already have closed the channel (after a re-bind)
                log.debug("disconnect from %s: %s", self.url, e)
            self.client = None

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # ---- calls -----------------------------------------------------------------------------------------------
    async def call(self, obj: str, method: str, *args):
        """Call ``method`` on object ``obj`` (ObjectIds names). Returns the outputs (None, a value, or a list)."""
        if self.client is None:
            raise PushClientError("not connected")
        try:
            return await self.client.get_node(_nid(obj)).call_method(_nid(method), *args)
        except UaStatusCodeError as e:
            name = ua.StatusCode(e.code).name
            raise PushClientError(f"{self.url}: {method.rsplit('_', 1)[-1]} refused: {name}", name) from None
        except (OSError, TimeoutError, ConnectionError) as e:
            raise PushClientError(f"{self.url}: {method.rsplit('_', 1)[-1]}: {e}") from e

    async def create_signing_request(self, key_type: str = "rsa", subject: str = "", regenerate: bool = True,
                                     nonce: bytes | None = None) -> x509.CertificateSigningRequest:
        if regenerate and nonce is None:
            nonce = os.urandom(32)
        der = await self.call("ServerConfiguration", SC + "CreateSigningRequest",
                              ua.Variant(ua.NodeId(14156), ua.VariantType.NodeId),
                              ua.Variant(ua.NodeId(CERT_TYPES[key_type]), ua.VariantType.NodeId),
                              ua.Variant(subject, ua.VariantType.String),
                              ua.Variant(regenerate, ua.VariantType.Boolean),
                              ua.Variant(nonce or b"", ua.VariantType.ByteString))
        try:
            csr = x509.load_der_x509_csr(der)
            csr.extensions  # noqa: B018 - parse them now: a malformed CSR from a device is its error, named here
            return csr
        except (TypeError, ValueError) as e:
            raise PushClientError(f"{self.url}: CreateSigningRequest answered something that is not a DER PKCS#10 "
                                  "request") from e

    async def update_certificate(self, cert: x509.Certificate, issuers: Sequence[x509.Certificate] = (),
                                 key_type: str = "rsa") -> bool:
        return await self.call("ServerConfiguration", SC + "UpdateCertificate",
                               ua.Variant(ua.NodeId(14156), ua.VariantType.NodeId),
                               ua.Variant(ua.NodeId(CERT_TYPES[key_type]), ua.VariantType.NodeId),
                               ua.Variant(cert.public_bytes(Encoding.DER), ua.VariantType.ByteString),
                               ua.Variant([c.public_bytes(Encoding.DER) for c in issuers], ua.VariantType.ByteString),
                               ua.Variant("", ua.VariantType.String),
                               ua.Variant(b"", ua.VariantType.ByteString))

    async def apply_changes(self) -> None:
        await self.call("ServerConfiguration", SC + "ApplyChanges")

    async def cancel_changes(self) -> None:
        await self.call("ServerConfiguration", SC + "CancelChanges")

    async def get_rejected_list(self) -> list[bytes]:
        return list(await self.call("ServerConfiguration", SC + "GetRejectedList") or [])

    async def tl(self, method: str, *args):
        return await self.call("ServerConfiguration_CertificateGroups_DefaultApplicationGroup_TrustList",
                               TL + method, *args)

    async def read_trust_list(self, masks: int = tlmod.ALL) -> TrustList:
        h = await self.tl("OpenWithMasks", ua.Variant(masks, ua.VariantType.UInt32))
        data = b""
        try:
            while True:
                part = await self.tl("Read", ua.Variant(h, ua.VariantType.UInt32),
                                     ua.Variant(CHUNK, ua.VariantType.Int32))
                if not part:
                    break
                data += part
        finally:
            await self.tl("Close", ua.Variant(h, ua.VariantType.UInt32))
        return tlmod.decode(data)[1]

    async def write_trust_list(self, tl: TrustList, mask: int = tlmod.ALL) -> bool:
        """Open (Write + EraseExisting), Write in chunks, CloseAndUpdate. Returns applyChangesRequired."""
        data = tlmod.encode(tl, mask)
        h = await self.tl("Open", ua.Variant(0x06, ua.VariantType.Byte))
        try:
            for i in range(0, len(data), CHUNK):
                await self.tl("Write", ua.Variant(h, ua.VariantType.UInt32),
                              ua.Variant(data[i:i + CHUNK], ua.VariantType.ByteString))
        except PushClientError:
            try:
                await self.tl("Close", ua.Variant(h, ua.VariantType.UInt32))
            except PushClientError:
                pass  # already closed by the device (e.g. after an oversized write)
            raise
        return await self.tl("CloseAndUpdate", ua.Variant(h, ua.VariantType.UInt32))

    async def add_certificate(self, cert: x509.Certificate, trusted: bool = True) -> None:
        await self.tl("AddCertificate", ua.Variant(cert.public_bytes(Encoding.DER), ua.VariantType.ByteString),
                      ua.Variant(trusted, ua.VariantType.Boolean))

    async def remove_certificate(self, thumbprint: str, trusted: bool = True) -> None:
        await self.tl("RemoveCertificate", ua.Variant(thumbprint, ua.VariantType.String),
                      ua.Variant(trusted, ua.VariantType.Boolean))

    async def read_property(self, name: str):
        return await self.client.get_node(_nid(name)).read_value()
