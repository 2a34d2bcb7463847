"""The device side of delegated enrollment (Astorga et al. 2021, §IV-B, §V-B), independent of CoAP.

``DeviceService.csr`` is the CSR_generation_request service: a new key pair is generated (never leaving the
device) and a PKCS#10 CSR signed with it is returned. A software key is held in this service's memory until
/verify (``Keystore.generate_held_key``: no record, no file, no fsync before the /csr answer); after the answer,
while the CLM talks to the CA, a task queued on the store lock writes its file (``Keystore.stage_held_key``: named
by nothing, kept from ``gc`` by this process's hold), and ``store_certificate(key=...)`` at /verify commits it with
the certificate without writing it again (if the staging failed, the commit writes it); a TPM or PKCS#11 key exists
in its device the moment it is made, so it is named first by a durable pending record (``Keystore.generate_key``). ``DeviceService.verify`` is the
verify_certificate service: the certificate must carry one of our pending keys and pass the keystore's
verify-before-store against the domain trust anchor; only then is it stored.

Authorization (coap_services.authz): every request comes from one provisioned security context (the peer claim
the transport authenticated). /csr is refused unless the context's grant covers the domain and name, and the
credential it would replace is one this context delivered itself in that domain (never an IDevID, another
domain's credential, another context's, or — unless the grant allows it — a CLI-enrolled one). /verify accepts
only a certificate for a key that the same context asked for, and checks the grant again before storing.
Credentials requested with a profile other than ``ldevid`` are stored as kind ``app``.

Invariants:
- Nothing is stored when a check fails; every refusal is a ``ServiceError`` with a CoAP code, a stable reason and
  a message built from facts (never internal exception text).
- At most one key generation runs at a time, /csr is rate limited, and at most ``max_pending`` keys made for the
  CLM are pending: a new /csr for a credential supersedes (destroys) the earlier pending key for that name.
- Blocking work (key generation, keystore fsyncs) runs in a worker thread, one keystore operation at a time.
- A pending key whose maker died is garbage (keystore/owner.py): ``devagent coap serve`` discards such keys at
  start (``Keystore.gc``, as ``devagent run`` does), and ``_pending`` ignores one the gc has not discarded yet, so
  a /verify for a key a killed service made gets 4.09 no-pending-key (the CLM starts again at /csr) whatever the
  start order.
- A TPM or PKCS#11 /csr answers only with a durably recorded key: the CSR is signed while the key's last fsync is
  in flight (``Keystore.generate_key(meanwhile=...)``), and returned after it. A held software key needs no
  durability at /csr: it could not survive the death of this process anyway (the rule above).
- A held key is dropped only when stored, superseded, pushed out by the bound or at shutdown (``close``): a staged
  file is then securely deleted (``Keystore.discard_held_key``, in a worker thread); a failed /verify keeps it and
  its staged file. A /verify that takes the store lock before the staging task cancels it (the store writes the
  file itself).
- /verify answers once the new version's commit and its audit line are durable; destroying the superseded key
  and pruning old versions (``Keystore.flush``) runs right after, as the next keystore operation (a crash in
  between is finished by the keystore's ``gc``: the commit lists the key in ``meta.destroying``). ``drain``
  waits for it.
- The cyclic garbage collector is paused (``gc_pause``) from just before /verify's verify-and-store until the task
  that runs after the answer has let its loop iterations pass; cancelled or not, that task's end resumes it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import gc
import logging
import threading
import time

from coap_services import codec
from coap_services.authz import DELEGATED_PROTOCOL, Grant, peer_of_claim
from coap_services.errors import (
    BAD_REQUEST, CONFLICT, FORBIDDEN, INTERNAL_SERVER_ERROR, SERVICE_UNAVAILABLE, ServiceError,
)
from coap_services.ratelimit import TokenBucket
from keystore import owner

log = logging.getLogger("devagent.coap")

PENDING_SOURCE = "coap"
FLUSH_YIELDS = 5  # event-loop iterations the cleanup after a /verify answer lets pass before it starts (see _after_answer)
_ANY_PEER = object()
# VerificationError reasons that mean "not acceptable" (4.03) rather than "not understood" (4.00).
FORBIDDEN_REASONS = {"key-mismatch", "untrusted", "bad-signature", "expired", "not-yet-valid", "not-a-ca",
                     "bad-key-usage", "bad-eku", "is-ca", "unknown-critical-extension", "subject-mismatch",
                     "path-length", "name-constraints", "policy", "weak-key", "bad-algorithm", "not-authorized"}


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """Defaults the device applies when the CLM's request leaves a field out, and service bounds."""

    device_id: str = "device"
    default_subject: str | None = None  # None: CN=<device_id>
    default_san: tuple[str, ...] = ()
    default_key_type: str = "p256"
    default_name: str = "ldevid"
    default_domain: str | None = None
    key_backend: str = "soft"
    csr_rate_per_min: float = 12.0
    csr_burst: int = 3
    max_pending: int = 4
    check_validity: bool = True  # False on boards without a real-time clock: the CLM checked the dates
    accept_ca_from_clm: bool = False  # a domain without anchor adopts the root the CLM sent, once it verifies
    allow_weak_keys: bool = False  # rsa1024, only to reproduce seed 003's Table 1


@dataclasses.dataclass(frozen=True)
class CsrResult:
    """A CSR made on the device for a delegated enrollment, with its pending key."""

    csr_der: bytes
    key_uri: str
    name: str
    domain: str
    elapsed_s: float  # key generation + CSR creation on the device


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """A certificate verified and stored on the device: credential, version, expiry."""

    name: str
    version: int
    not_after: datetime.datetime
    elapsed_s: float  # certificate verification + store

    def to_cbor(self) -> bytes:
        return codec.encode_map({"stored": self.name, "version": self.version,
                                 "not_after": int(self.not_after.timestamp()),
                                 "verify_us": codec.timing_us(self.elapsed_s)})


class _GcPause:
    """The cyclic collector paused across /verify's verify-and-store, resumed after the answer.

    Why: the store is the device's allocation peak (certificate parsing, path validation, the commit), so in a real
    serve about 1 /verify in 4-5 paid a young-generation collection of ~0.26 ms inside it and 1 in 50 a gen-1 of
    1.3-2.1 ms (docs/performance.md "The cyclic garbage collector in stage (5)"). What the collector frees there is
    cycles (aiocoap's, cryptography's): nothing stored or answered depends on when. Paused, the allocations it
    counts carry over and the collection they trigger runs at the first allocation after the resume, after the
    answer has left.

    Why process-wide is harmless: ``gc.disable`` stops only the cycle collector; reference counting still frees
    every object that is not in a cycle, at once, and the cycles made during one store wait a few milliseconds.
    The pause is reentrant and thread-safe (a count under a lock: several services or loops in one process, or a
    refused /verify's pause still open when the next one starts, keep it paused until the last resumes), and it
    resumes the collector only if it was enabled when the first pause began (a process whose owner disabled it
    stays so). Its bound: every pause is ended by the after-answer task, which ends it even when cancelled before
    its first step (a done callback), so shutdown and a cancelled request leave the collector as they found it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._resume = False  # enable the collector when the count drops to 0

    def begin(self) -> _GcPauseToken:
        with self._lock:
            if self._count == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._count += 1
        return _GcPauseToken(self)

    def _end(self) -> None:
        with self._lock:
            self._count -= 1
            if self._count == 0 and self._resume:
                self._resume = False
                gc.enable()

    @property
    def active(self) -> int:
        return self._count


class _GcPauseToken:
    """One pause; ``end`` resumes it once, however often it is called."""

    __slots__ = ("_pause", "_lock")

    def __init__(self, pause: _GcPause) -> None:
        self._pause = pause
        self._lock = threading.Lock()

    def end(self, *_args) -> None:  # *_args: usable as a task's done callback
        with self._lock:
            pause, self._pause = self._pause, None
        if pause is not None:
            pause._end()


gc_pause = _GcPause()


def _refuse(code, reason, message, **kw):
    return ServiceError(code, reason, message, **kw)


class DeviceService:
    """Binds a keystore to the two services. ``keystore`` is a ``keystore.store.Keystore``."""

    def __init__(self, keystore, config: DeviceConfig = DeviceConfig(), clock=time.monotonic,
                 grants: dict[str, Grant] | None = None):
        self.ks = keystore
        self.config = config
        self.grants = dict(grants or {})  # peer name -> Grant (coap_services.authz.load_grants)
        self.bucket = TokenBucket(config.csr_rate_per_min / 60.0, config.csr_burst, clock)
        self._keygen = asyncio.Lock()
        self._store = asyncio.Lock()
        self._cleanup: asyncio.Task | None = None  # the flush after the last /verify answer (see verify)
        self._staging: asyncio.Task | None = None  # the held key's file written after the last /csr answer (see csr)
        # Software-backend pending keys, held in memory only (Keystore.generate_held_key): uri -> the same dict a
        # pending record has (uri, created, pending_for) plus "held" (the HeldKey). Nothing is written until
        # /verify stores the certificate with its key in one commit.
        self._held: dict[str, dict] = {}

    # ---- CSR_generation_request ----------------------------------------------------------------------------
    # ---- authorization ------------------------------------------------------------------------------------
    def _grant(self, peer: str | None) -> Grant:
        name = self._principal(peer)
        return self.grants.get(name) or Grant(name)

    @staticmethod
    def _principal(peer: str | None) -> str:
        """The provisioned peer behind a claim: its OSCORE and DTLS-PSK contexts are one principal."""
        return peer_of_claim(peer) or "insecure"

    def _authorize(self, peer: str | None, name: str, domain: str, kind: str) -> None:
        """May the context ``peer`` create or replace credential ``name`` of ``kind`` in ``domain``?

        Raises:
            ServiceError: 4.03 with reason forbidden-domain, forbidden-name, read-only, other-domain,
                other-context, cli-enrolled or kind-mismatch.
        """
        grant = self._grant(peer)
        domains = grant.domains_for(self.config.default_domain)
        if domain not in domains:
            raise _refuse(FORBIDDEN, "forbidden-domain", f"this security context may manage domain(s) "
                          f"{', '.join(domains) or '(none)'} only, not {domain} (see 'devagent coap provision "
                          "--domain')")
        if grant.names is not None and name not in grant.names:
            raise _refuse(FORBIDDEN, "forbidden-name", f"this security context may manage credential(s) "
                          f"{', '.join(grant.names)} only, not {name}")
        cred = self.ks.lookup(name)  # the record's facts only: no certificate file is read
        if cred is None:
            return
        if cred.kind == "idevid":
            raise _refuse(FORBIDDEN, "read-only", f"{name} is the device's IDevID; it is never replaced")
        if cred.domain != domain:
            raise _refuse(FORBIDDEN, "other-domain", f"credential {name} belongs to another domain; it cannot be "
                          f"replaced by an enrollment in {domain}")
        if cred.record.get("protocol") == DELEGATED_PROTOCOL:
            delivered_by = (cred.record.get("meta") or {}).get("coap_context") or \
                peer_of_claim(cred.record.get("server"))
            if delivered_by != grant.peer:
                raise _refuse(FORBIDDEN, "other-context", f"credential {name} was delivered under another "
                              "security context; only that context may replace it")
        elif not grant.replace_cli:
            raise _refuse(FORBIDDEN, "cli-enrolled", f"credential {name} was enrolled on the device itself "
                          f"({cred.record.get('protocol') or 'import'}); a CLM may replace it only if provisioned "
                          "with --allow-replace-cli")
        if cred.kind != kind:
            raise _refuse(FORBIDDEN, "kind-mismatch", f"credential {name} is a {cred.kind} credential; a request "
                          f"for a {kind} credential cannot replace it")

    @staticmethod
    def _kind(profile: str | None) -> str:
        return "ldevid" if profile in (None, "", "ldevid") else "app"

    def _plan_csr(self, req: codec.CsrRequest, peer: str | None = None):
        """Validate a request against the device's rules; returns everything needed to generate."""
        from cryptography import x509

        from keystore.certs import load_der_certificate
        from keystore.csr import parse_san, parse_subject
        from keystore.errors import CorruptFileError, UnsupportedKeyTypeError
        from keystore.keytypes import parse_key_type
        from keystore.store import check_name

        c = self.config
        try:
            kt = parse_key_type(req.key_type or c.default_key_type, allow_weak=c.allow_weak_keys)
        except UnsupportedKeyTypeError:
            raise _refuse(BAD_REQUEST, "unknown-key-type", f"key type {req.key_type!r} is not supported by this "
                          "device (p256, p384, ed25519, rsa2048, rsa3072, rsa4096)") from None
        try:
            subject = parse_subject(req.subject or c.default_subject or f"CN={c.device_id}")
        except ValueError:
            raise _refuse(BAD_REQUEST, "bad-subject", "subject is not an RFC 4514 DN (e.g. CN=dev1,O=Plant)") from None
        sans = []
        for i, s in enumerate(req.san or c.default_san):
            try:  # checked before any key is generated (DNS label syntax and lengths included)
                sans.append(parse_san(s))
            except ValueError as e:
                raise _refuse(BAD_REQUEST, "bad-san", f"'san' entry {i}: {e}; use dns:NAME, ip:ADDR, uri:URI or "
                              "email:ADDR") from None
        name = req.name or c.default_name
        domain = req.domain or c.default_domain
        if domain is None:
            raise _refuse(BAD_REQUEST, "no-domain", "no domain: send \"domain\" or start the device service with "
                          "--domain")
        for what, v in (("credential name", name), ("domain", domain)):
            try:
                check_name(v, what)
            except ValueError:
                raise _refuse(BAD_REQUEST, "bad-name", f"{what} must be 1-64 letters, digits, '.', '_' or '-'") \
                    from None
        kind = self._kind(req.profile)
        self._authorize(peer, name, domain, kind)
        cas = []
        for i, der in enumerate(req.ca):
            try:
                cert = load_der_certificate(der, f"'ca' entry {i}")  # the parse boundary: every field checked
                bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            except CorruptFileError as e:
                raise _refuse(BAD_REQUEST, "malformed-ca", f"{e} (expected a DER CA certificate)") from None
            except x509.ExtensionNotFound:
                raise _refuse(BAD_REQUEST, "malformed-ca", f"'ca' entry {i} is not a CA certificate (no "
                              "basicConstraints)") from None
            if not bc.ca:
                raise _refuse(BAD_REQUEST, "malformed-ca", f"'ca' entry {i} is not a CA certificate")
            cas.append(cert)
        offered_roots = []
        if not self.ks.trust_anchors(domain):
            offered_roots = [x for x in cas if x.subject == x.issuer]
            if not (c.accept_ca_from_clm and offered_roots):
                raise _refuse(CONFLICT, "no-trust-anchor", f"the device has no trust anchor for domain {domain}: "
                              "commission one, or run the service with --accept-ca-from-clm and send the root "
                              "in \"ca\"")
        return kt, subject, sans, name, domain, cas, offered_roots, kind

    def _pending(self, peer=_ANY_PEER) -> list[dict]:
        """Pending keys made for a CLM (of security context ``peer``, when given) by a process that still runs.

        A pending key whose owner is gone (keystore/owner.py: pid, boot id and start time no longer match) is
        garbage, as ``Keystore.orphaned_pending`` says: it is not offered to /verify (4.09 no-pending-key), not
        counted in /status nor against the bound, whether or not the start-up gc has discarded it yet."""
        out = [k for k in self.ks.pending_keys() if (k.get("pending_for") or {}).get("source") == PENDING_SOURCE
               and owner.alive(k.get("owner")) is not False] + list(self._held.values())
        if peer is not _ANY_PEER:
            me = self._principal(peer)
            out = [k for k in out if self._principal(k["pending_for"].get("peer")) == me]
        return out

    def _make_room(self, name: str, peer: str | None) -> None:
        """Supersede this context's earlier pending key for ``name`` and bound its pending keys; another context's
        pending keys are never touched."""
        pending = sorted(self._pending(peer), key=lambda k: k.get("created", ""))
        superseded = [k for k in pending if k["pending_for"].get("name") == name]
        for k in superseded:
            self._discard(k)  # superseded by this new request
            log.info("discarded superseded pending key for %s", name)
        if superseded:  # read again: the keystore is the truth after a change
            pending = sorted(self._pending(peer), key=lambda k: k.get("created", ""))
        while len(pending) >= self.config.max_pending:
            self._discard(pending.pop(0))
            log.info("discarded oldest pending key (bound %d)", self.config.max_pending)

    def _discard(self, rec: dict) -> None:
        """Drop a pending key (in a worker thread: a staged held key's file is securely deleted)."""
        if "held" in rec:
            self._held.pop(rec["uri"], None)
            self.ks.discard_held_key(rec["held"])  # its staged file, if any (never staged: nothing was written)
        else:
            self.ks.discard_key(rec["uri"])

    def _public_key(self, rec: dict):
        return rec["held"].public_key if "held" in rec else self.ks.public_key(rec["uri"])

    def _key_type(self, rec: dict) -> str | None:
        return rec["held"].key_type if "held" in rec else (self.ks.key_record(rec["uri"]) or {}).get("key_type")

    def _generate(self, plan, peer) -> CsrResult:
        from cryptography.hazmat.primitives import serialization

        from keystore.certs import fingerprint
        from keystore.csr import build_csr, default_key_usage

        kt, subject, sans, name, domain, cas, offered_roots, kind = plan
        t0 = time.perf_counter()
        self._make_room(name, peer)
        pending_for = {"source": PENDING_SOURCE, "name": name, "domain": domain, "peer": peer, "kind": kind,
                       "subject": subject.rfc4514_string(), "ca_fps": [fingerprint(x) for x in cas],
                       "offered_roots": [x.public_bytes(serialization.Encoding.DER).hex() for x in offered_roots]}

        def sign(uri: str) -> bytes:
            # Built while the key's last fsync is in flight; generate_key returns (and /csr is answered) only once
            # the key is durable. A failure here undoes the key generation.
            csr = build_csr(self.ks.private_key(uri), subject, sans, key_usage=default_key_usage(kt))
            made.append(csr.public_bytes(serialization.Encoding.DER))

        if self.config.key_backend == "soft":
            # Held in memory until /verify (docs/coap.md): /csr writes nothing. A TPM or PKCS#11 key exists in
            # its device the moment it is made, so it is named by a durable pending record first (below).
            held = self.ks.generate_held_key(kt, label=name, allow_weak=self.config.allow_weak_keys)
            csr = build_csr(held.private_key, subject, sans, key_usage=default_key_usage(kt))
            self._held[held.uri] = {"uri": held.uri, "created": held.created, "pending_for": pending_for,
                                    "held": held}
            return CsrResult(csr.public_bytes(serialization.Encoding.DER), held.uri, name, domain,
                             time.perf_counter() - t0)
        made: list[bytes] = []
        uri = self.ks.generate_key(kt, backend=self.config.key_backend, label=name, pending_for=pending_for,
                                   allow_weak=self.config.allow_weak_keys, meanwhile=sign)
        return CsrResult(made[0], uri, name, domain, time.perf_counter() - t0)

    def _csr_in_worker(self, req: codec.CsrRequest, peer: str | None):
        """/csr's work, in one worker thread (one hand-off from the event loop and back instead of two): the
        request's checks (``_plan_csr``: a refused request takes no token), the rate limit, then the key and the
        CSR. Returns (plan, CsrResult). Called with ``_keygen`` and ``_store`` held, so the bucket is used by one
        thread at a time."""
        plan = self._plan_csr(req, peer)
        wait = self.bucket.take()
        if wait > 0:
            raise _refuse(SERVICE_UNAVAILABLE, "rate-limited", f"key generation is rate limited; retry in "
                          f"{TokenBucket.max_age(wait)} s", max_age=TokenBucket.max_age(wait))
        try:
            return plan, self._generate(plan, peer)
        except ServiceError:
            raise
        except Exception as e:
            log.error("key/CSR generation failed: %s: %s", type(e).__name__, e)
            raise _refuse(INTERNAL_SERVER_ERROR, "keygen-failed", "key or CSR generation failed on the device; "
                          "see its log") from e

    async def csr(self, req: codec.CsrRequest, peer: str | None = None) -> CsrResult:
        """Generate a pending key and a CSR for it.

        One request at a time: while a key is being generated, another /csr is answered 5.03 ``busy`` at once,
        before its fields are looked at; otherwise its fields are checked (4.00, 4.03, 4.09: no token taken), then
        the rate limit (5.03 ``rate-limited``), then the key is made.

        Raises:
            ServiceError: 4.00 bad request field, 4.09 no trust anchor, 5.03 rate limited or busy.
        """
        if self._keygen.locked():
            raise _refuse(SERVICE_UNAVAILABLE, "busy", "a key is being generated; retry shortly", max_age=2)
        async with self._keygen, self._store:
            plan, res = await asyncio.to_thread(self._csr_in_worker, req, peer)
            if res.key_uri in self._held:
                # The held key's file is written after the answer, while the CLM talks to the CA: queued on _store
                # now (its first step runs after the answer is sent), so a /verify that comes early waits for it.
                self._staging = asyncio.get_running_loop().create_task(self._stage_after_answer(res.key_uri),
                                                                       name="devagent-csr-stage")
        log.info("CSR for %s (domain %s, %s) issued to %s in %.3f s", res.name, res.domain, plan[0], peer or "-",
                 res.elapsed_s)
        return res

    async def _stage_after_answer(self, uri: str) -> None:
        async with self._store:
            for _ in range(FLUSH_YIELDS):  # as _after_answer: let the answer's datagrams go first
                await asyncio.sleep(0)
            rec = self._held.get(uri)
            if rec is None:  # stored or dropped meanwhile
                return
            try:
                await asyncio.to_thread(self.ks.stage_held_key, rec["held"])
            except Exception as e:  # noqa: BLE001 - e.g. ENOSPC: /verify writes the file in its commit instead
                log.warning("could not write the held key %s before /verify (%s: %s); /verify writes it with the "
                            "certificate", uri, type(e).__name__, e)

    # ---- verify_certificate ---------------------------------------------------------------------------------
    def _verify_and_store(self, certs, peer) -> VerifyResult:
        from cryptography import x509

        from keystore.certs import fingerprint, same_public_key
        from keystore.errors import KeystoreError, VerificationError
        from keystore.store import verification_policy
        from keystore.validator import validate

        t0 = time.perf_counter()
        everyone = self._pending()  # one read of the pending keys: this context's and the others'
        me = self._principal(peer)
        pending = [k for k in everyone if self._principal(k["pending_for"].get("peer")) == me]
        others = [k for k in everyone if self._principal(k["pending_for"].get("peer")) != me]
        if any(same_public_key(c.public_key(), self._public_key(k)) for k in others for c in certs):
            raise _refuse(FORBIDDEN, "other-context", "the certificate is for a key that another security context "
                          "requested; /verify must come from the context that asked for the CSR")
        if not pending:
            raise _refuse(CONFLICT, "no-pending-key", "the device has no pending key for this security context: "
                          "request a CSR (POST /csr) first")
        match = None
        for rec in pending:
            pub = self._public_key(rec)
            for cert in certs:
                if same_public_key(cert.public_key(), pub):
                    match = (cert, rec, pub)
                    break
            if match:
                break
        if match is None:
            raise _refuse(FORBIDDEN, "key-mismatch", "the certificate is for another key: its public key matches "
                          "none of the device's pending keys")
        cert, rec, pub = match
        pf = rec["pending_for"]
        chain = [c for c in certs if c is not cert]
        name, domain, kind = pf["name"], pf["domain"], pf.get("kind", "ldevid")
        self._authorize(peer, name, domain, kind)  # again: the keystore may have changed since /csr
        if pf.get("subject") and cert.subject.rfc4514_string() != pf["subject"]:
            raise _refuse(FORBIDDEN, "subject-mismatch", f"certificate subject {cert.subject.rfc4514_string()} is "
                          f"not the requested {pf['subject']}")
        ca_fps = pf.get("ca_fps")

        def announced_ca(path) -> None:
            # From the root down: the CLM announces its anchors, so the first fingerprint usually matches.
            if ca_fps and not any(fingerprint(p) in ca_fps for p in reversed(path[1:])):
                raise _refuse(FORBIDDEN, "unexpected-ca", "the certificate does not chain through the CA "
                              "certificate(s) announced in the CSR request")

        try:
            # One validation per /verify, the keystore's: store_certificate runs announced_ca on its verified path
            # before it locks or writes anything. The device validates the chain itself only to adopt an offered
            # root (judged before add_trust_anchors), or where its key-size rule is stricter than the store's: an
            # rsa1024 pending key (made under --allow-weak-keys) once weak keys are no longer allowed. Otherwise the
            # rules agree: the store accepts RSA-1024 only for an rsa1024 key, which exists only if weak keys were
            # allowed (and with weak keys allowed but another key type, the store refused an RSA-1024 CA before too).
            adopt = []
            if pf.get("offered_roots") and not self.ks.trust_anchors(domain):  # offered only if none at /csr
                adopt = [x509.load_der_x509_certificate(bytes.fromhex(h)) for h in pf["offered_roots"]]
            if adopt or (not self.config.allow_weak_keys and self._key_type(rec) == "rsa1024"):
                policy = verification_policy("coap-verify", None, self.config.check_validity,
                                             min_rsa_bits=1024 if self.config.allow_weak_keys else 2048)
                path = validate(cert, chain, adopt or self.ks.trust_anchors(domain), policy, public_key=pub,
                                what="certificate")
                announced_ca(path)
                if adopt:
                    self.ks.add_trust_anchors(domain, [path[-1]], source=f"coap {peer or 'insecure'} (CSR request)")
            key = {"key": rec["held"]} if "held" in rec else {"key_uri": rec["uri"]}
            cred = self.ks.store_certificate(name, cert, chain, **key, kind=kind, domain=domain,
                                             check_validity=self.config.check_validity, protocol=DELEGATED_PROTOCOL,
                                             server=peer, meta={"via": "clm", "coap_context": self._grant(peer).peer},
                                             defer_cleanup=True,  # flushed after the answer: see verify
                                             path_check=announced_ca)
        except VerificationError as e:
            code = FORBIDDEN if e.reason in FORBIDDEN_REASONS else BAD_REQUEST
            raise _refuse(code, e.reason, str(e)) from None
        except KeystoreError as e:
            log.error("storing the certificate failed: %s", e)
            raise _refuse(INTERNAL_SERVER_ERROR, "store-failed", "the device could not store the certificate; see "
                          "its log") from e
        self._held.pop(rec["uri"], None)  # stored: a key of the keystore now (on failure it stays held)
        return VerifyResult(cred.name, cred.version, cred.not_after, time.perf_counter() - t0)

    async def verify(self, certs, peer: str | None = None) -> VerifyResult:
        """Verify a certificate (plus chain) against a pending key and the domain anchor; store it.

        Raises:
            ServiceError: 4.09 no pending key, 4.03 rejected (reason = keystore VerificationError reason).
        """
        async with self._store:
            staging = self._staging
            if staging is not None and not staging.done():
                # Came before the staging task after a /csr answer got the lock (it holds it while it runs): the
                # store writes the key file itself, and the staging need not run after it.
                staging.cancel()
            pause = gc_pause.begin()  # resumed by the after-answer task (see _GcPause)
            try:
                res = await asyncio.to_thread(self._verify_and_store, certs, peer)
            finally:
                # The work that no guarantee needs before the answer, in a task whose first step runs once this one
                # yields, i.e. after the caller has sent the answer (aiocoap sends the rendered response in the same
                # step): the collector's resume, then the superseded key's destruction and the pruning of old
                # versions deferred by the store (queued on _store, ahead of the next request).
                task = asyncio.get_running_loop().create_task(self._after_answer(pause, self.ks.deferred),
                                                              name="devagent-verify-flush")
                task.add_done_callback(pause.end)  # also when cancelled before its first step
                self._cleanup = task
        log.info("stored certificate %s v%d (not after %s) from %s, verified in %.3f s", res.name, res.version,
                 res.not_after.isoformat(), peer or "-", res.elapsed_s)
        return res

    async def _after_answer(self, pause: _GcPauseToken, flush: bool) -> None:
        # Callbacks that are already due run first — a few loop iterations, so that the datagrams the answer just
        # released are processed (in the benchmark's one-process rig, the CLM's own reading of the answer) before
        # the collector or a worker thread starts competing for the interpreter.
        try:
            if not flush:
                for _ in range(FLUSH_YIELDS):
                    await asyncio.sleep(0)
                return
            async with self._store:  # background work: a request arriving now queues behind it
                for _ in range(FLUSH_YIELDS):
                    await asyncio.sleep(0)
                pause.end()
                try:
                    await asyncio.to_thread(self.ks.flush)  # logs and audits its own failures; gc finishes them
                except Exception as e:  # noqa: BLE001 - e.g. the keystore lock timed out: gc finishes it
                    log.error("deferred keystore cleanup failed: %s: %s", type(e).__name__, e)
        finally:
            pause.end()

    async def flush(self) -> None:
        """Wait until the work deferred by the last /verify (destroying the superseded key, pruning old
        versions) is done."""
        task = self._cleanup
        if task is not None:
            await asyncio.wait({task})  # done, or cancelled (shutdown): the flush below does its work then
        async with self._store:
            if self.ks.deferred:
                await asyncio.to_thread(self.ks.flush)

    async def drain(self) -> None:
        """Wait until a key generation or store in progress, the held key's file written after a /csr answer, and
        the cleanup after a /verify, have finished (clean shutdown)."""
        task = self._staging
        if task is not None:
            await asyncio.wait({task})
        await self.flush()

    async def close(self) -> None:
        """Shutdown: ``drain``, then drop the held keys (a staged key's file is securely deleted: no /verify
        will come for it)."""
        await self.drain()
        async with self._store:
            held = list(self._held.values())
            self._held.clear()
            for rec in held:
                try:
                    await asyncio.to_thread(self.ks.discard_held_key, rec["held"])
                except Exception as e:  # noqa: BLE001 - gc deletes an unnamed key file once this process is gone
                    log.error("could not delete the staged file of held key %s: %s: %s", rec["uri"],
                              type(e).__name__, e)

    # ---- status -------------------------------------------------------------------------------------------
    def _status(self) -> dict:
        now = datetime.datetime.now(datetime.timezone.utc)
        creds = []
        operational = False
        for c in self.ks.list():
            creds.append({"name": c.name, "kind": c.kind, "domain": c.domain or "",
                          "subject": c.certificate.subject.rfc4514_string(),
                          "serial": format(c.certificate.serial_number, "x"),
                          "not_after": int(c.not_after.timestamp())})
            if c.kind != "idevid" and (c.not_after > now or not self.config.check_validity):
                operational = True
        return {"device": self.config.device_id, "state": "operational" if operational else "not operational",
                "pending": len(self._pending()), "credentials": creds}

    async def status(self) -> dict:
        async with self._store:
            return await asyncio.to_thread(self._status)
