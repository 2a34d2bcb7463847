"""The edge CLM role (Astorga et al. 2021, §IV-A, §V): delegated enrollment on behalf of constrained devices.

For each device in the inventory the CLM asks the device over CoAP for a fresh CSR (the key stays on the
device), enrolls the CSR upstream (EST simpleenroll / CMP p10cr through ``enroll_clients`` with the CLM's own
credential, or the in-process lab CA in tests), pre-verifies the certificate with everything that needs no
private key (structure, CA signature and chain, validity by the CLM's clock, public key / subject / SAN equal to
the CSR), pushes it to the device's /verify and marks the device operational. ``Clm.run`` renews before expiry
(fraction of lifetime + jitter), so devices without a real-time clock never check dates themselves.

Scheduling comes from the inventory (``agent.inventory``, SQLite or PostgreSQL): a worker claims due devices
under a lease, keeps the lease alive while it works (``extend`` every quarter lease), and records the result with
the lease's fencing token. Several workers may share one inventory; none renews a device another holds, and a
dead worker's devices are claimed by another once its leases expire. A renewal whose lease can no longer be
vouched for (the inventory unreachable for most of a lease) is abandoned before the lease runs out, so two
workers never talk to one device at once.

Invariants:
- The CLM never holds a device's private key: it sees CSRs and certificates only; nothing it stores (inventory,
  certificate copies) contains key material.
- Every inventory change is one database transaction; the result of a renewal is recorded only by the worker
  whose lease is still current.
- ``enroll`` returns the per-stage durations of seed 003's Table 1, measured with ``time.perf_counter`` on the
  production path (the device reports its own key+CSR and verification times).
"""
from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import random
import shlex
import socket
import time
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("devagent.clm")

STATES = ("not operational", "operational")
DEFAULT_RETRIES = 3
DEFAULT_PARALLEL = 16
DEFAULT_LEASE_S = 60.0
LEASE_SAFETY = 0.8  # abandon a renewal at this share of a lease not confirmed by the inventory
RENEW_FRACTION = 0.66
RENEW_JITTER = 0.05
RETRY_BASE_S = 30.0
RETRY_MAX_S = 3600.0
HOOK_TIMEOUT_S = 30.0
DB_RETRY_BASE_S = 0.5
DB_RETRY_MAX_S = 30.0
DRAIN_S = 20.0  # on stop, how long renewals in flight may take to finish before they are cancelled


class ClmError(Exception):
    """Root of CLM errors (inventory, upstream, pre-verification, device refusals after retries)."""


class PreVerificationError(ClmError):
    """The certificate from upstream failed the CLM's pre-verification; it was not sent to the device."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"pre-verification failed ({reason}): {message}")
        self.reason = reason


class CredentialKeyError(ClmError):
    """The CLM's own credential (``--credential``, ``--opcua-credential``) is missing or its key cannot be used;
    found once at start-up, before any device is leased."""


def open_credential(ks, name: str, option: str):
    """The CLM's own credential ``name`` of keystore ``ks`` (given as ``option``), its key opened once where it
    lives (``Keystore.open_key``: decrypted, loaded into the TPM, the PKCS#11 token logged in to) and held by ``ks``.
    Checked at start-up so that an unreachable TPM, a wrong PIN, a removed token or a missing key file ends the
    command with one error instead of failing every device in turn.

    Raises:
        CredentialKeyError: naming the option, the credential, its key URI and what failed.
    """
    from keystore.errors import KeystoreError

    try:
        cred = ks.get(name)
    except KeystoreError as e:
        raise CredentialKeyError(f"{option} {name}: {e}") from e
    try:
        ks.open_key(cred.key_uri)
    except KeystoreError as e:
        raise CredentialKeyError(f"{option}: the key of credential {name} (key {cred.key_uri}) cannot be used: "
                                 f"{e}") from e
    return cred


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# ---- inventory ----------------------------------------------------------------------------------------------
# The inventory lives in agent.inventory (SQLite or PostgreSQL behind one interface); re-exported for callers.
from agent.inventory import (  # noqa: E402, F401
    Inventory, InventoryError, InventorySpecError, InventoryUnavailableError, open_inventory,
)


# ---- upstream -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class UpstreamResult:
    """A certificate an upstream CA issued for a device's CSR, with its chain."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()


class Upstream(abc.ABC):
    """Where the CLM sends a device's CSR: EST, CMP or the lab CA. One interface, identical path otherwise."""

    name = ""

    @abc.abstractmethod
    async def enroll(self, csr: x509.CertificateSigningRequest, *, domain: str,
                     profile: str | None = None) -> UpstreamResult:
        """Raises ClmError (wrapping the protocol client's EnrollError)."""

    @abc.abstractmethod
    def trust_anchors(self, domain: str) -> list[x509.Certificate]:
        """Roots the issued certificate must chain to (pre-verification, and the "ca" sent to the device)."""


class LabUpstream(Upstream):
    """The in-process test CA (``agent.lab.ca.LabCA.issue_from_csr``), for tests and fleet benchmarks."""

    name = "lab"

    def __init__(self, lab, lifetime_s: int | None = None):
        self.lab = lab
        self.lifetime_s = lifetime_s

    async def enroll(self, csr, *, domain, profile=None) -> UpstreamResult:
        from agent.lab.ca import LabCAError

        try:
            cert = await asyncio.to_thread(self.lab.issue_from_csr, domain, csr, profile or "ldevid", self.lifetime_s)
        except LabCAError as e:
            raise ClmError(f"lab CA refused the CSR: {e}") from e
        dom = self.lab.domain(domain)
        return UpstreamResult(cert, (dom.ca_cert, dom.root_cert))

    def trust_anchors(self, domain):
        return [self.lab.domain(domain).root_cert]


class EnrollClientUpstream(Upstream):
    """EST simpleenroll or CMP p10cr through ``enroll_clients``, authenticated with the CLM's own credential."""

    def __init__(self, protocol: str, options, auth, anchors: Sequence[x509.Certificate]):
        self.name = protocol
        self.protocol = protocol
        self.options = options
        self.auth = auth
        self._anchors = list(anchors)
        self._client = None

    async def enroll(self, csr, *, domain, profile=None) -> UpstreamResult:
        import enroll_clients
        from enroll_clients.base import CertRequest, EnrollError

        try:
            if self._client is None:
                self._client = enroll_clients.client_for(self.protocol, self.options)
            sans = ()
            with contextlib.suppress(x509.ExtensionNotFound):
                sans = tuple(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
            res = await self._client.enroll(CertRequest(subject=csr.subject, csr=csr, sans=sans,
                                                        profile=profile or self.options.profile), self.auth)
        except EnrollError as e:
            raise ClmError(f"{self.protocol} enrollment at {self.options.server} failed: {e}") from e
        return UpstreamResult(res.certificate, tuple(res.chain) or tuple(res.ca_certs))

    def trust_anchors(self, domain):
        return list(self._anchors)


# ---- MicroPython boards: CoAP with HMAC-SHA256 request authentication ------------------------------------------
class HmacDevice:
    """The CLM's client for a board running ``agent/mpy`` (``security: hmac`` in the inventory).

    Same interface as ``coap_services.client.DeviceClient`` (``csr``, ``verify``) and the same payload schema;
    only the protection differs: each request carries the board's HMAC option (agent/mpy/README.md "CoAP +
    HMAC"), computed with the one implementation of the scheme (``agent.mpy.coap``) under the commissioning
    secret in ``<context>/hmac.json``, and each answer must carry the board's matching response tag. The
    counter is wall-clock microseconds (strictly increasing within this process), so the CLM needs no state.
    A request is one CON datagram, retransmitted per RFC 7252 until ``timeout_s``; the board does no
    block-wise transfer, so a payload must fit ``agent.mpy.coap.MAX_DATAGRAM``.
    """

    ACK_TIMEOUT_S = 2.0
    _last_counter = 0

    def __init__(self, uri: str, context_dir, timeout_s: float = 30.0):
        from urllib.parse import urlsplit

        from coap_services.errors import SecurityConfigError
        from coap_services.security import load_hmac_context

        parts = urlsplit(uri)
        if parts.scheme != "coap" or not parts.hostname:
            raise SecurityConfigError(f"HMAC-protected boards are reached over coap://HOST:PORT, not {uri}")
        self.uri = uri.rstrip("/")
        self.addr = (parts.hostname, parts.port or 5683)
        self.board_id, self._secret = load_hmac_context(context_dir)
        self.timeout_s = timeout_s

    def __repr__(self) -> str:  # never show the secret
        return f"HmacDevice({self.uri!r}, board_id={self.board_id!r})"

    @classmethod
    def _counter(cls) -> int:
        cls._last_counter = max(time.time_ns() // 1000, cls._last_counter + 1)
        return cls._last_counter

    async def _request(self, path: str, payload: bytes, cf: int | None):
        """POST one request; returns (decoded answer Message, round trip s). Raises CoapServiceError."""
        from agent.mpy import coap as mcoap
        from agent.mpy.errors import AgentError
        from coap_services.errors import DeviceError, DeviceUnreachableError, PayloadError

        where = f"{self.uri}/{path}"
        counter = self._counter()
        token = os.urandom(4)
        mid = int.from_bytes(os.urandom(2), "big")
        dgram, tag = mcoap.make_request(self._secret, self.board_id, path, payload, cf, counter, mid=mid, token=token)
        if len(dgram) > mcoap.MAX_DATAGRAM:
            raise PayloadError("too-large", f"{where}: request of {len(dgram)} bytes exceeds the board's "
                               f"{mcoap.MAX_DATAGRAM}-byte datagram (no block-wise transfer on agent/mpy)")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future = loop.create_future()

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                if len(data) >= 4 + len(token) and data[4:4 + len(token)] == token and not answer.done():
                    answer.set_result(data)

            def error_received(self, exc):
                pass  # ICMP port unreachable while the board boots: keep retransmitting

        try:
            transport, _ = await loop.create_datagram_endpoint(Proto, remote_addr=self.addr)
        except OSError as e:
            raise DeviceUnreachableError(f"{where}: {e.strerror or e}") from e
        t0 = time.perf_counter()
        deadline = loop.time() + self.timeout_s
        wait = self.ACK_TIMEOUT_S * random.uniform(1.0, 1.5)
        try:
            while True:
                transport.sendto(dgram)
                left = deadline - loop.time()
                if left <= 0:
                    raise DeviceUnreachableError(f"{where}: no answer within {self.timeout_s:.0f} s (board down, "
                                                 "wrong address or port)")
                try:
                    data = await asyncio.wait_for(asyncio.shield(answer), min(wait, left))
                    break
                except asyncio.TimeoutError:
                    wait *= 2
        finally:
            transport.close()
        rtt = time.perf_counter() - t0
        try:
            m = mcoap.decode(data)
        except AgentError as e:
            raise PayloadError("bad-response", f"{where}: the answer is not a CoAP message ({e})") from None
        if not m.opt(mcoap.AUTH_OPTION):
            # 4.01 / 4.02 / 4.13 come before authentication and cannot be bound to the request
            reason, msg = mcoap.diagnostic(m)
            code = mcoap.code_str(m.code)
            if m.code >> 5 == 2:
                raise PayloadError("bad-response", f"{where}: unauthenticated {code} answer refused")
            hint = " (wrong commissioning secret or board id in hmac.json?)" if code == "4.01" else ""
            raise DeviceError(where, code, reason, msg[:500] + hint)
        try:
            m = mcoap.check_response(self._secret, data, tag)
        except AgentError:
            raise PayloadError("bad-response", f"{where}: response authentication failed (forged or corrupted "
                               "answer)") from None
        return m, rtt

    @staticmethod
    def _timing(m) -> float | None:
        from agent.mpy import coap as mcoap

        v = m.opt(mcoap.TIMING_OPTION)
        return int.from_bytes(v[0], "big") / 1e6 if v else None

    def _check(self, m, path):
        from agent.mpy import coap as mcoap
        from coap_services.errors import DeviceError

        if m.code >> 5 != 2:
            reason, msg = mcoap.diagnostic(m)
            raise DeviceError(f"{self.uri}{path}", mcoap.code_str(m.code), reason, msg[:1000])

    async def csr(self, req) -> tuple[x509.CertificateSigningRequest, bytes, float, float | None]:
        """POST /csr with the shared schema. Same returns and errors as ``DeviceClient.csr``."""
        from coap_services import codec
        from coap_services.errors import PayloadError

        m, rtt = await self._request("csr", codec.encode_csr_request(req), codec.CF_CBOR)
        self._check(m, "/csr")
        if m.content_format() not in (None, codec.CF_PKCS10):
            raise PayloadError("bad-response", f"{self.uri}/csr: answered content-format {m.content_format()}, "
                               f"expected {codec.CF_PKCS10}")
        try:
            csr = x509.load_der_x509_csr(m.payload)
        except ValueError as e:
            raise PayloadError("bad-response", f"{self.uri}/csr: the answer is not a DER PKCS#10 CSR") from e
        return csr, m.payload, rtt, self._timing(m)

    async def verify(self, payload: bytes, content_format: int) -> tuple[dict, float, float | None]:
        """POST /verify. Same returns and errors as ``DeviceClient.verify``."""
        from coap_services import codec
        from coap_services.errors import PayloadError

        m, rtt = await self._request("verify", payload, content_format)
        self._check(m, "/verify")
        try:
            answer = codec.decode_map(m.payload, "verify answer") if m.payload else {}
        except PayloadError:
            answer = {}
        return answer, rtt, self._timing(m)


# ---- pre-verification (pure) ----------------------------------------------------------------------------------
def _sans(obj) -> set:
    try:
        return set(obj.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return set()


def _weak_rsa_requested(csr, key=None) -> bool:
    """The device asked for an RSA-1024 key: it runs with --allow-weak-keys (seed 003's Table 1). ``key``: the
    CSR's public key when the caller has it already."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = csr.public_key() if key is None else key
    return isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048


def pre_verify(csr: x509.CertificateSigningRequest, cert: x509.Certificate, chain: Sequence[x509.Certificate],
               anchors: Sequence[x509.Certificate], now: datetime.datetime | None = None) -> list[x509.Certificate]:
    """Everything that needs no private key: structure, CA signature and chain to ``anchors``, validity by the
    CLM's clock, and that public key, subject and SAN are the ones the device requested in its CSR.

    Returns the verified path. Raises PreVerificationError(reason, message).
    """
    from keystore.errors import VerificationError
    from keystore.validator import Policy, validate

    if not anchors:
        raise PreVerificationError("untrusted", "no trust anchor for pre-verification: give the CLM the CA root "
                                   "(--trust) or use an upstream that knows it")
    try:
        key = csr.public_key()  # parsed once: the RSA size rule and the key the certificate must carry
        policy = Policy.for_purpose("clm-preverify", now or datetime.datetime.now(datetime.timezone.utc),
                                    min_rsa_bits=1024 if _weak_rsa_requested(csr, key) else 2048)
        path = list(validate(cert, chain, anchors, policy, public_key=key, what="issued certificate"))
    except VerificationError as e:
        raise PreVerificationError(e.reason, str(e)) from e
    if cert.subject != csr.subject:
        raise PreVerificationError("subject-mismatch", f"certificate subject {cert.subject.rfc4514_string()} is not "
                                   f"the requested {csr.subject.rfc4514_string()}")
    if _sans(cert) != _sans(csr):
        raise PreVerificationError("san-mismatch", "certificate subjectAltName differs from the CSR's")
    return path


def renewal_time(cert: x509.Certificate, fraction: float = RENEW_FRACTION, jitter: float = RENEW_JITTER,
                 rng: random.Random | None = None) -> datetime.datetime:
    """When to renew: ``fraction`` of the lifetime after notBefore, +- ``jitter`` of the lifetime, always
    before notAfter."""
    rng = rng or random
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    life = (na - nb).total_seconds()
    at = life * min(max(fraction + rng.uniform(-jitter, jitter), 0.05), 0.95)
    return nb + datetime.timedelta(seconds=at)


def _verify_payload(cert: x509.Certificate, chain: Sequence[x509.Certificate]) -> tuple[bytes, int]:
    from cryptography.hazmat.primitives.serialization import pkcs7

    from coap_services import codec

    # Send the issuing chain without self-signed roots: the device has (or adopts) the root as its anchor.
    inter = [c for c in chain if c.subject != c.issuer]
    if not inter:
        return cert.public_bytes(serialization.Encoding.DER), codec.CF_PKIX_CERT
    return pkcs7.serialize_certificates([cert, *inter], serialization.Encoding.DER), codec.CF_PKCS7_CERTS


# ---- the CLM --------------------------------------------------------------------------------------------------
def default_worker_id() -> str:
    """``HOST-PID``: unique among live workers, and says where a lease holder runs (``clm status``)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _chain_pem(cert: x509.Certificate, chain: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain))


@dataclasses.dataclass
class _InFlight:
    """A renewal a worker is running: its task, lease token and deadline, and which phase it is in."""

    task: asyncio.Task
    token: int
    deadline: float  # loop.time() by which the lease must have been confirmed again
    phase: str = "device"  # "device": talking to the device and CA; "recording": writing the result
    timeout: object = None  # the asyncio.timeout() guarding the device phase (rescheduled by the heartbeat)


class Clm:
    """``async with CoapClient() as c: await Clm(inventory, upstream, c).enroll("dev1")``.

    ``inventory`` is an ``agent.inventory.Inventory``. Inventory calls run on one worker thread of their own
    (SQLite and psycopg block), so the event loop keeps serving CoAP while the database commits.
    """

    def __init__(self, inventory: Inventory, upstream: Upstream, coap, *, retries: int = DEFAULT_RETRIES,
                 notify: str | None = None, fraction: float = RENEW_FRACTION, jitter: float = RENEW_JITTER,
                 retry_delay_s: float = 1.0, default_domain: str | None = None, default_key_type: str | None = None,
                 on_message=None, worker_id: str | None = None, lease_s: float = DEFAULT_LEASE_S,
                 opcua_identity=None):
        self.inventory = inventory
        self.opcua_identity = opcua_identity  # agent.opcua.client.Identity: the CLM's OPC UA client certificate
        self.upstream = upstream
        self.coap = coap
        self.retries = max(1, retries)
        self.notify = notify
        self.fraction = fraction
        self.jitter = jitter
        self.retry_delay_s = retry_delay_s
        self.default_domain = default_domain
        self.default_key_type = default_key_type
        self.on_message = on_message  # test hook: called with every payload the CLM sends or receives
        self.worker_id = worker_id or default_worker_id()
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.lease_s = float(lease_s)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._db_down_since: float | None = None

    async def _db(self, fn, *args, **kw):
        """Run one inventory call on the CLM's database thread."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="clm-inventory")
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kw))

    def _db_ok(self) -> None:
        if self._db_down_since is not None:
            log.warning("inventory %s reachable again after %.1f s", self.inventory.where,
                        time.monotonic() - self._db_down_since)
            self._db_down_since = None

    def _db_down(self, e: Exception) -> None:
        if self._db_down_since is None:
            self._db_down_since = time.monotonic()
            log.warning("%s; backing off and retrying", e)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def device(self, rec: dict):
        """The client for one inventory record: aiocoap (OSCORE / DTLS-PSK / none) for ``devagent serve``, or
        ``HmacDevice`` for a MicroPython board. Both speak the same /csr and /verify schema."""
        security = rec.get("security") or "none"
        if security == "hmac":
            return HmacDevice(rec["uri"], rec.get("context"), timeout_s=getattr(self.coap, "timeout_s", 30.0))
        return self.coap.device(rec["uri"], security, rec.get("context"))

    def _release_device(self, rec: dict) -> None:
        """Let go of the device's security context after a renewal (another worker may renew it next); a DTLS
        session is shut down here, on the loop's thread (``CoapClient.release``), not left to the garbage collector."""
        release = getattr(self.coap, "release", None)
        if release is not None and (rec.get("security") or "none") in ("oscore", "dtls-psk"):
            release(rec["uri"])

    def _seen(self, direction: str, payload: bytes) -> None:
        if self.on_message is not None:
            self.on_message(direction, payload)

    async def enroll_once(self, rec: dict) -> dict:
        """One delegated enrollment, no retries. Returns the stage durations (seconds) and the certificate."""
        from coap_services import codec

        if rec.get("security") == "opcua":
            return await self._enroll_opcua(rec)
        t_total = time.perf_counter()
        domain = rec.get("domain") or self.default_domain
        if not domain:
            raise ClmError(f"device {rec['id']}: no domain (set it with 'clm add-device --domain' or --domain)")
        anchors = self.upstream.trust_anchors(domain)
        dev = self.device(rec)
        req = codec.CsrRequest(subject=rec.get("subject"), san=tuple(rec.get("san") or ()),
                               key_type=rec.get("key_type") or self.default_key_type, name=rec.get("name"),
                               domain=domain, ca=tuple(a.public_bytes(serialization.Encoding.DER) for a in anchors))
        if self.on_message is not None:  # the test hook sees the request as sent; encoding it costs a renewal
            self._seen("csr-request", codec.encode_csr_request(req))
        csr, csr_der, rtt_csr, dev_keygen = await dev.csr(req)
        self._seen("csr-response", csr_der)
        t_enroll = time.perf_counter()
        if not csr.is_signature_valid:
            raise PreVerificationError("bad-csr", "the device's CSR signature does not verify")
        up = await self.upstream.enroll(csr, domain=domain, profile=rec.get("profile"))
        t_pre = time.perf_counter()
        pre_verify(csr, up.certificate, up.chain, anchors)
        t_enrolled = time.perf_counter()
        payload, cf = _verify_payload(up.certificate, up.chain)
        self._seen("verify-request", payload)
        answer, rtt_verify, dev_verify = await dev.verify(payload, cf)
        t_end = time.perf_counter()
        dev_keygen = dev_keygen or 0.0
        dev_verify = dev_verify or 0.0
        stages = {
            "coap_csr_s": max(rtt_csr - dev_keygen, 0.0),
            "keygen_csr_s": dev_keygen,
            "enroll_s": t_enrolled - t_enroll,
            "pre_verify_s": t_enrolled - t_pre,
            "coap_verify_s": max(rtt_verify - dev_verify, 0.0),
            "cert_verify_s": dev_verify,
            "total_s": t_end - t_total,
        }
        return {"stages": stages, "certificate": up.certificate, "chain": up.chain, "answer": answer}

    async def _enroll_opcua(self, rec: dict) -> dict:
        """OPC UA push management (``agent.opcua.clm_push``): the same upstream and pre-verification, its own stages."""
        from agent.opcua.clm_push import enroll_once
        from agent.opcua.errors import OpcuaError
        from keystore.certs import load_certificates

        domain = rec.get("domain") or self.default_domain
        if not domain:
            raise ClmError(f"device {rec['id']}: no domain (set it with 'clm add-device --domain' or --domain)")
        if self.opcua_identity is None:
            raise ClmError(f"device {rec['id']} is an OPC UA device: give the CLM's OPC UA client credential "
                           "(--opcua-credential NAME, a certificate with its applicationUri in the SAN)")
        pem = await self._db(self.inventory.certificate, rec["id"])
        try:
            return await enroll_once(rec, self.upstream, self.opcua_identity, domain=domain,
                                     timeout_s=getattr(self.coap, "timeout_s", 30.0),
                                     intermediates=load_certificates(pem)[1:] if pem else ())
        except OpcuaError as e:
            raise ClmError(f"device {rec['id']}: {e}") from e

    async def _attempts(self, rec: dict) -> dict:
        """Up to ``retries`` delegated enrollments of one device; returns the last ``enroll_once`` result with
        ``attempts``. Raises the last ClmError / CoapServiceError."""
        from coap_services.errors import CoapServiceError

        last = None
        try:
            for attempt in range(1, self.retries + 1):
                try:
                    res = await self.enroll_once(rec)
                except (ClmError, CoapServiceError) as e:
                    last = e
                    log.warning("device %s: enrollment attempt %d/%d failed: %s", rec["id"], attempt, self.retries, e)
                    if attempt < self.retries:
                        await asyncio.sleep(self.retry_delay_s * attempt)
                    continue
                res["stages"]["attempts"] = attempt
                return res
        finally:
            self._release_device(rec)
        raise last

    def _success_fields(self, rec: dict, res: dict) -> dict:
        cert = res["certificate"]
        return dict(state="operational", not_after=cert.not_valid_after_utc, last_error=None, failures=0,
                    enrolled_at=time.time(), serial=format(cert.serial_number, "x"),
                    next_renewal=renewal_time(cert, self.fraction, self.jitter), next_attempt=None,
                    enrollments=int(rec.get("enrollments") or 0) + 1, enrolled_by=self.worker_id,
                    last_duration_s=res["stages"]["total_s"])

    @staticmethod
    def _failure_fields(rec: dict, message: str) -> dict:
        now = time.time()
        na = rec.get("not_after")
        still_valid = bool(na) and datetime.datetime.fromisoformat(na).timestamp() > now
        failures = int(rec.get("failures") or 0) + 1
        delay = min(RETRY_BASE_S * 2 ** (failures - 1), RETRY_MAX_S)
        return dict(state="operational" if still_valid else "not operational", last_error=message[:500],
                    failures=failures, next_attempt=now + delay)

    async def _record(self, rec: dict, fields: dict, certificate: bytes | None, stop: asyncio.Event | None) -> bool:
        """Write a result under the device's lease, retrying while the inventory is unreachable (the result is
        already on the device). Returns False if the lease was lost or the worker stopped first."""
        delay = DB_RETRY_BASE_S
        while True:
            try:
                ok = await self._db(self.inventory.complete, rec["id"], self.worker_id, rec["lease_token"], fields,
                                    certificate)
                self._db_ok()
            except InventoryUnavailableError as e:
                self._db_down(e)
                if stop is not None and stop.is_set():
                    log.warning("device %s: stopping with the inventory unreachable; the result is not recorded "
                                "and the device will be renewed again", rec["id"])
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, DB_RETRY_MAX_S)
                continue
            if not ok:
                log.warning("device %s: its lease went to another worker; this result is not recorded (the other "
                            "worker renews it)", rec["id"])
            return ok

    async def _renew(self, rec: dict, info: _InFlight | None = None, stop: asyncio.Event | None = None) -> tuple:
        """Enroll one leased device and record the outcome. Returns (outcome, stages | None, error | None):
        outcome "ok", an error text, or "abandoned: …"."""
        dev_id = rec["id"]
        res = err = None
        try:
            if info is not None:
                async with asyncio.timeout_at(info.deadline) as cm:
                    info.timeout = cm
                    res = await self._attempts(rec)
            else:
                res = await self._attempts(rec)
        except TimeoutError:
            if info is None or info.timeout is None or not info.timeout.expired():
                raise
            log.warning("device %s: renewal abandoned: the lease could not be confirmed with the inventory in "
                        "time (another worker may take the device over)", dev_id)
            return "abandoned: lease not confirmed", None, None
        except ClmError as e:
            err = e
        except Exception as e:  # one broken device record must not stop the fleet's renewals
            from coap_services.errors import CoapServiceError
            from keystore.errors import KeyBackendError

            if isinstance(e, KeyBackendError):  # the CLM's own key (--credential): TPM/token unreachable, wrong PIN
                e = ClmError(f"the CLM's credential key: {e}")
            elif not isinstance(e, CoapServiceError):
                log.exception("device %s: unexpected error", dev_id)
                e = ClmError(f"internal error: {type(e).__name__}: {e}")
            err = e
        if info is not None:
            info.phase = "recording"
        if res is not None:
            cert = res["certificate"]
            recorded = await self._record(rec, self._success_fields(rec, res), _chain_pem(cert, res["chain"]), stop)
            stages = res["stages"]
            log.info("device %s operational: certificate %x until %s (%s)%s", dev_id, cert.serial_number,
                     cert.not_valid_after_utc.isoformat(),
                     ", ".join(f"{k}={v * 1000:.1f}ms" for k, v in stages.items() if k.endswith("_s")),
                     "" if recorded else " [not recorded]")
            return "ok", stages, None
        msg = f"device {dev_id}: enrollment failed after {self.retries} attempt(s): {err}"
        await self._record(rec, self._failure_fields(rec, str(err)), None, stop)
        await self._notify(dev_id, str(err))
        return msg, None, err

    async def enroll(self, device_id: str) -> dict:
        """Delegated enrollment of one device now, due or not, with up to ``retries`` attempts under a lease
        (so a ``clm run`` worker on the same inventory does not renew it at the same time); on failure the
        notification hook runs.

        Returns the stage durations of the successful attempt (plus ``attempts``).
        Raises:
            InventoryError: unknown device.
            ClmError: the device is leased by another worker, or every attempt failed (the device stays/becomes
            "not operational" unless its old certificate is still valid; ``last_error`` says why).
        """
        claimed = await self._db(self.inventory.claim, self.worker_id, limit=1, lease_s=self.lease_s,
                                 ids=[device_id])
        if not claimed:
            rec = await self._db(self.inventory.get, device_id)  # InventoryError if unknown
            raise ClmError(f"device {device_id} is being renewed by worker {rec.get('lease_owner')} (lease until "
                           f"{rec.get('lease_until')}); try again later")
        rec = claimed[0]
        loop = asyncio.get_running_loop()
        info = _InFlight(None, rec["lease_token"], loop.time() + self.lease_s * LEASE_SAFETY)
        info.task = asyncio.create_task(self._renew(rec, info))
        hb = asyncio.create_task(self._heartbeat({device_id: info}))
        try:
            outcome, stages, err = await info.task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise
            raise ClmError(f"device {device_id}: renewal abandoned: its lease went to another worker") from None
        finally:
            hb.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hb
        if stages is None:
            raise ClmError(outcome) from err
        return stages

    async def _notify(self, device_id: str, message: str) -> None:
        if not self.notify:
            return
        env = dict(os.environ, DEVAGENT_EVENT="enroll-failed", DEVAGENT_DEVICE=device_id,
                   DEVAGENT_ERROR=message[:1000])
        try:
            proc = await asyncio.create_subprocess_exec(*shlex.split(self.notify), env=env,
                                                        stdin=asyncio.subprocess.DEVNULL)
            rc = await asyncio.wait_for(proc.wait(), HOOK_TIMEOUT_S)
            if rc != 0:
                log.warning("notification hook %r exited with %d", self.notify, rc)
        except asyncio.TimeoutError:
            proc.kill()
            log.warning("notification hook %r timed out after %.0f s", self.notify, HOOK_TIMEOUT_S)
        except OSError as e:
            log.warning("notification hook %r could not run: %s", self.notify, e.strerror or e)

    def due(self, now: datetime.datetime | float | None = None) -> list[str]:
        """Devices to (re)enroll now and not leased: not operational (unless backing off) or past their renewal."""
        return self.inventory.due(now)

    async def _heartbeat(self, inflight: dict) -> None:
        """Every quarter lease, extend the leases of renewals in flight; cancel those whose lease went to
        another worker; push each renewal's deadline when its lease is confirmed."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.lease_s / 4)
            leases = [(d, i.token) for d, i in inflight.items()]
            if not leases:
                continue
            t0 = loop.time()
            try:
                held = await self._db(self.inventory.extend, self.worker_id, leases, self.lease_s)
                self._db_ok()
            except InventoryUnavailableError as e:
                self._db_down(e)
                continue  # each renewal's own deadline ends it in time
            for d, tok in leases:
                info = inflight.get(d)
                if info is None or info.token != tok:
                    continue
                if d in held:
                    info.deadline = t0 + self.lease_s * LEASE_SAFETY
                    if info.timeout is not None and info.phase == "device":
                        info.timeout.reschedule(info.deadline)
                elif info.phase == "device":
                    log.warning("device %s: lease lost to another worker; abandoning this renewal", d)
                    info.task.cancel()

    async def run(self, *, interval_s: float = 30.0, parallel: int = DEFAULT_PARALLEL, once: bool = False,
                  stop: asyncio.Event | None = None) -> dict:
        """Renew devices as they fall due, at most ``parallel`` at a time, until ``stop`` is set; with ``once``,
        until nothing is due. Sleeps until the next device is due (at most ``interval_s``, the poll interval
        for changes made by other processes). The inventory unreachable: back off and resume; renewals in
        flight keep their results and record them once it is back.

        Returns {device: "ok" | error text} of the renewals this call made.
        """
        stop = stop or asyncio.Event()
        parallel = max(1, parallel)
        loop = asyncio.get_running_loop()
        inflight: dict[str, _InFlight] = {}
        results: dict = {}
        seen: set[str] = set()
        hb = asyncio.create_task(self._heartbeat(inflight))
        stop_wait = asyncio.create_task(stop.wait())
        db_delay = DB_RETRY_BASE_S

        async def one(rec, info):
            try:
                outcome, _, _ = await self._renew(rec, info, stop)
            except asyncio.CancelledError:
                outcome = "abandoned (its lease went to another worker, or this worker stopped)"
            results[rec["id"]] = outcome

        try:
            while not stop.is_set():
                free = parallel - len(inflight)
                claimed = []
                timeout = interval_s
                if free > 0:
                    t0 = loop.time()
                    try:
                        claimed = await self._db(self.inventory.claim, self.worker_id, limit=free,
                                                 lease_s=self.lease_s)
                        self._db_ok()
                        db_delay = DB_RETRY_BASE_S
                    except InventoryUnavailableError as e:
                        self._db_down(e)
                        timeout = db_delay
                        db_delay = min(db_delay * 2, DB_RETRY_MAX_S)
                    fresh = 0
                    for rec in claimed:
                        if once and rec["id"] in seen:  # one pass: never twice (it fell due again already)
                            await self._db(self.inventory.release, rec["id"], self.worker_id, rec["lease_token"])
                            continue
                        fresh += 1
                        seen.add(rec["id"])
                        info = _InFlight(None, rec["lease_token"], t0 + self.lease_s * LEASE_SAFETY)
                        info.task = asyncio.create_task(one(rec, info))
                        info.task.add_done_callback(lambda _t, d=rec["id"]: inflight.pop(d, None))
                        inflight[rec["id"]] = info
                    if self._db_down_since is None and fresh < free:
                        if once and not inflight:
                            break
                        if not once:
                            try:
                                nd = await self._db(self.inventory.next_due_in)
                                if nd is not None:
                                    timeout = min(timeout, max(nd, 0.05))
                            except InventoryUnavailableError as e:
                                self._db_down(e)
                    elif fresh == free:
                        continue  # more may be due: claim again once a slot frees (below) or at once
                waits = [i.task for i in inflight.values()] + [stop_wait]
                await asyncio.wait(waits, timeout=None if once and inflight and self._db_down_since is None
                                   else timeout, return_when=asyncio.FIRST_COMPLETED)
                await asyncio.sleep(0)  # let finished renewals' callbacks run before claiming
        finally:
            if inflight:
                _, pending = await asyncio.wait([i.task for i in inflight.values()], timeout=DRAIN_S)
                cancelled = {d: i for d, i in inflight.items() if i.task in pending}
                for i in cancelled.values():
                    i.task.cancel()
                if cancelled:
                    await asyncio.wait([i.task for i in cancelled.values()])
                    for d, info in cancelled.items():  # let another worker have them at once
                        with contextlib.suppress(InventoryError):
                            await self._db(self.inventory.release, d, self.worker_id, info.token)
            hb.cancel()
            stop_wait.cancel()
            for t in (hb, stop_wait):
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        return results
