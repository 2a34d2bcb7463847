"""The device side of OPC UA push management (OPC 10000-12 §7.7 ServerConfiguration, §7.8.2 TrustList),
independent of the OPC UA stack: ``agent.opcua.server`` binds these methods to the standard ns=0 nodes.

A management client (a GDS, or devagent's CLM) with the SecurityAdmin role, over an encrypted channel:
``create_signing_request`` (the key is generated in devagent's keystore backend — software, TPM or PKCS#11 — and
never leaves), ``update_certificate`` (verify-before-store: for our pending key, chains to the trust list, an OPC UA
Application Instance Certificate for our applicationUri), the TrustList file methods and Add/RemoveCertificate, and
``apply_changes``.

Invariants:
- Transactions (OPC 10000-12 §7.10.9 semantics): UpdateCertificate and CloseAndUpdate only stage changes, owned by
  the calling session, and return applyChangesRequired = TRUE; another session gets Bad_TransactionPending until
  ApplyChanges, CancelChanges or the owner's session ends. Nothing is stored before ApplyChanges, and a refused call
  changes nothing.
- ApplyChanges writes a journal (``<state>/opcua/apply.json``) of what was already verified, then commits: the
  trust list's CA certificates become the domain's keystore trust anchors, the certificates are stored through
  ``Keystore.store_certificate`` (verify-before-store again), the trust list version is made live, the OPC UA PKI
  directories are switched in one rename (``agent.opcua.deploy``), the hooks run, the journal goes. A crash at any
  instant leaves the deployed PKI directory on the old or the new version, and the next start rolls the journal
  forward (every step is idempotent).
- Every refusal is a ``PushError`` with the OPC UA StatusCode name and a message of facts for the log.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.opcua import trustlist as tlmod
from agent.opcua.errors import PushError, status_for
from agent.opcua.trustlist import TrustList, TrustListStore
from keystore import fsutil

log = logging.getLogger("devagent.opcua")

PENDING_SOURCE = "opcua"
BOOTSTRAP_SOURCE = "opcua-bootstrap"
DEFAULT_APPLICATION_GROUP = 14156  # ServerConfiguration_CertificateGroups_DefaultApplicationGroup
MIN_NONCE = 32  # OPC 10000-12 §7.10.10: at least 32 bytes when regeneratePrivateKey is TRUE
MAX_OPEN_FILES = 16  # TrustList handles open at once (each holds a copy of the list)
MODE_READ = 0x01
MODE_WRITE_ERASE = 0x06  # Write + EraseExisting: the only write mode a TrustList supports (§7.8.2.1)
DER = serialization.Encoding.DER


@dataclasses.dataclass(frozen=True)
class CertSlot:
    """One CertificateType of the DefaultApplicationGroup and the keystore credential that holds it."""

    type_id: int  # ns=0 numeric NodeId of the CertificateType
    type_name: str
    key_type: str  # devagent key type generated for it
    credential: str

    @property
    def rsa(self) -> bool:
        return self.key_type.startswith("rsa")


def slots_for(name: str, rsa_key_type: str = "rsa2048") -> tuple[CertSlot, ...]:
    """The certificate types devagent serves: RSA-SHA256 (the secure channel's) and ECC nist P-256 / P-384."""
    return (CertSlot(12560, "RsaSha256ApplicationCertificateType", rsa_key_type, name),
            CertSlot(23538, "EccNistP256ApplicationCertificateType", "p256", f"{name}-p256"),
            CertSlot(23539, "EccNistP384ApplicationCertificateType", "p384", f"{name}-p384"))


@dataclasses.dataclass(frozen=True)
class PushConfig:
    """Settings of the OPC UA Part 12 push server: application, domain, credential name and key."""

    application_uri: str
    domain: str
    name: str = "opcua"
    key_backend: str = "soft"
    rsa_key_type: str = "rsa2048"
    hostnames: tuple[str, ...] = ("localhost",)
    subject: str = ""  # default subject of a CSR when the caller sends none and there is no current certificate
    admin_subjects: tuple[str, ...] = ()  # RFC 4514 DNs whose certificates carry SecurityAdmin
    admin_issuers: tuple[str, ...] = ()  # issuer DNs: every certificate they issued carries SecurityAdmin
    max_trust_list_size: int = 65536  # bytes (MaxTrustListSize; 0 = no limit)
    check_validity: bool = True
    allow_lockout: bool = False  # accept a TrustList change that would untrust the calling client
    file_timeout_s: float = 120.0  # an open TrustList file is closed after this much inactivity
    max_rejected: int = 64
    bootstrap_credential: str | None = None  # e.g. the IDevID, used for the channel until the first push

    @property
    def slots(self) -> tuple[CertSlot, ...]:
        return slots_for(self.name, self.rsa_key_type)


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who calls: one session of one client (``agent.opcua.server`` fills it from the secure channel)."""

    session: str
    encrypted: bool
    admin: bool
    who: str = "-"
    certificate: x509.Certificate | None = None
    chain: tuple[x509.Certificate, ...] = ()


@dataclasses.dataclass
class Staged:
    """A certificate written by UpdateCertificate, applied at ApplyChanges."""

    slot: CertSlot
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key_uri: str


@dataclasses.dataclass
class Transaction:
    """The changes one session has staged since its last ApplyChanges."""

    session: str
    who: str
    started: float
    certificates: dict = dataclasses.field(default_factory=dict)  # slot credential -> Staged
    trustlist: TrustList | None = None


@dataclasses.dataclass
class OpenFile:
    """A TrustList file opened through the FileType methods."""

    session: str
    mode: int
    data: bytearray
    pos: int = 0
    written: bool = False
    touched: float = dataclasses.field(default_factory=time.monotonic)


def _split_der(blob: bytes) -> list[bytes]:
    """Split concatenated DER SEQUENCEs (a certificate followed by its chain, as AddCertificate may send them)."""
    out, i = [], 0
    while i < len(blob):
        if blob[i] != 0x30 or i + 2 > len(blob):
            raise ValueError(f"byte {i}: not a DER SEQUENCE")
        n = blob[i + 1]
        hdr = 2
        if n & 0x80:
            k = n & 0x7F
            if not 1 <= k <= 4 or i + 2 + k > len(blob):
                raise ValueError(f"byte {i}: bad DER length")
            n = int.from_bytes(blob[i + 2:i + 2 + k], "big")
            hdr += k
        if i + hdr + n > len(blob):
            raise ValueError(f"byte {i}: truncated DER ({n} bytes announced)")
        out.append(blob[i:i + hdr + n])
        i += hdr + n
    return out


def _cert(der: bytes, what: str) -> x509.Certificate:
    from keystore.certs import load_der_certificate
    from keystore.errors import CorruptFileError

    if not isinstance(der, (bytes, bytearray)) or not der:
        raise PushError("BadCertificateInvalid", f"{what} is empty")
    try:
        return load_der_certificate(bytes(der), what)  # the one parse boundary for certificate bytes
    except CorruptFileError as e:
        raise PushError("BadCertificateInvalid", str(e)) from None


def parse_subject_name(text: str) -> x509.Name:
    """An OPC 10000-12 §7.6.4 subjectName ("CN=App/O=Org/DC=host") or an RFC 4514 DN ("CN=App,O=Org")."""
    from keystore.csr import parse_subject

    t = text.strip()
    if "/" in t and "," not in t and "=" in t:
        t = ",".join(p for p in t.split("/") if p)  # written in the order of an RFC 4514 string (as UA .NET does)
    return parse_subject(t)


class PushService:
    """Binds a keystore to the ServerConfiguration methods. One instance per device application."""

    def __init__(self, keystore, config: PushConfig, state_dir, *, deploy=None, on_apply=None):
        """``deploy(creds, trustlist)`` is awaited at the end of ApplyChanges (``agent.opcua.deploy``);
        ``on_apply(changed_slots)`` lets the server re-bind its endpoint."""
        self.ks = keystore
        self.config = config
        self.dir = fsutil.ensure_dir(Path(state_dir) / "opcua")
        self.trust = TrustListStore(self.dir)
        self.deploy = deploy
        self.on_apply = on_apply
        self._txn: Transaction | None = None
        self._files: dict[int, OpenFile] = {}
        self._next_handle = 1
        self._lock = asyncio.Lock()

    # ---- start-up --------------------------------------------------------------------------------------------
    async def initialize(self) -> None:
        """First start: the trust list from the domain's keystore anchors, and an application certificate for the
        secure channel (the configured one, or a self-signed one the operator accepts once). Then finish an
        ApplyChanges a crash interrupted."""
        await asyncio.to_thread(self._initialize)
        journal = self.dir / "apply.json"
        if journal.exists():
            log.warning("an ApplyChanges was interrupted; finishing it from %s", journal)
            await asyncio.to_thread(self._roll_forward, json.loads(journal.read_bytes()))
            if await self._deploy():
                journal.unlink()
                fsutil.fsync_dir(self.dir)
        if self.endpoint_credential() is None:
            await asyncio.to_thread(self._make_bootstrap)

    def _initialize(self) -> None:
        if self.trust.version() == 0:
            anchors = self.ks.trust_anchors(self.config.domain)
            if anchors:
                v = self.trust.write_version(TrustList(trusted_certificates=tuple(a.public_bytes(DER)
                                                                                   for a in anchors)))
                self.trust.make_live(v)

    def _bootstrap_file(self) -> Path:
        return self.dir / "bootstrap.json"

    def _make_bootstrap(self) -> None:
        from keystore.csr import build_self_signed, parse_san
        from keystore.keytypes import parse_key_type

        c = self.config
        kt = parse_key_type(c.rsa_key_type)
        # Not pending: this key serves the secure channel for as long as no managed certificate is pushed, across
        # restarts of this process; a pending key would be discarded by keystore gc once its owner process is gone.
        uri = self.ks.generate_key(kt, backend=c.key_backend, label=f"{c.name}-bootstrap",
                                   pending_for={"source": BOOTSTRAP_SOURCE, "name": c.name}, pending=False)
        try:
            key = self.ks.private_key(uri)
            cert = build_self_signed(key, self._default_subject(), self._sans(parse_san),
                                     key_usage=self._key_usage(True),
                                     extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH))
            fsutil.atomic_write(self._bootstrap_file(), json.dumps({
                "key_uri": uri, "certificate": cert.public_bytes(DER).hex()}).encode())
        except BaseException:
            self.ks.discard_key(uri)
            raise
        from keystore.certs import fingerprint

        self.ks.audit("opcua-bootstrap", name=c.name, key_uri=uri, fingerprint=fingerprint(cert))
        log.warning("first start: self-signed application certificate %s (%s); a GDS accepts it once, then pushes "
                    "a managed one", cert.subject.rfc4514_string(), fingerprint(cert))

    def endpoint_credential(self) -> tuple[x509.Certificate, str, tuple] | None:
        """(certificate, key URI, chain) the secure channel uses: the RSA slot's live credential, else the
        configured bootstrap credential, else the self-signed bootstrap certificate."""
        from keystore.errors import NotFoundError

        rsa_slot = self.config.slots[0]
        for name in (rsa_slot.credential, self.config.bootstrap_credential):
            if not name:
                continue
            try:
                cred = self.ks.get(name)
            except NotFoundError:
                continue
            return cred.certificate, cred.key_uri, cred.chain
        try:
            b = json.loads(self._bootstrap_file().read_bytes())
        except FileNotFoundError:
            return None
        return x509.load_der_x509_certificate(bytes.fromhex(b["certificate"])), b["key_uri"], ()

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _default_subject(self) -> x509.Name:
        from keystore.csr import parse_subject

        return parse_subject(self.config.subject or f"CN={self.config.name},O=devagent")

    def _sans(self, parse_san) -> list:
        import ipaddress

        sans = [x509.UniformResourceIdentifier(self.config.application_uri)]
        for h in self.config.hostnames:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(parse_san(f"dns:{h}"))
        return sans

    @staticmethod
    def _key_usage(rsa: bool) -> x509.KeyUsage:
        # OPC 10000-6 §6.2.2: digitalSignature, nonRepudiation (+ keyEncipherment, dataEncipherment for RSA)
        return x509.KeyUsage(True, True, rsa, rsa, False, False, False, False, False)

    def _slot(self, group_id, type_id) -> CertSlot:
        if group_id not in (None, 0, DEFAULT_APPLICATION_GROUP):
            raise PushError("BadInvalidArgument", f"certificateGroupId {group_id} is not the DefaultApplicationGroup "
                            f"(ns=0;i={DEFAULT_APPLICATION_GROUP}), the only group of this server")
        if type_id in (None, 0):
            return self.config.slots[0]
        for s in self.config.slots:
            if s.type_id == type_id:
                return s
        raise PushError("BadInvalidArgument", f"certificateTypeId {type_id} is not one of the group's CertificateTypes "
                        f"({', '.join(f'{s.type_name} i={s.type_id}' for s in self.config.slots)})")

    def _authorize(self, caller: Caller, what: str) -> None:
        if not caller.admin:
            raise PushError("BadUserAccessDenied", f"{what}: client {caller.who} does not have the SecurityAdmin role")
        if not caller.encrypted:
            raise PushError("BadSecurityModeInsufficient", f"{what}: the secure channel of {caller.who} is not "
                            "encrypted (SignAndEncrypt required)")

    def _check_txn(self, caller: Caller, what: str) -> None:
        t = self._txn
        if t is not None and t.session != caller.session:
            raise PushError("BadTransactionPending", f"{what}: a transaction of another session ({t.who}) is pending "
                            "until its ApplyChanges or CancelChanges")

    def _transaction(self, caller: Caller) -> Transaction:
        if self._txn is None:
            self._txn = Transaction(caller.session, caller.who, time.monotonic())
        return self._txn

    def current_trustlist(self) -> TrustList:
        return self.trust.load()

    def _effective_trustlist(self, caller: Caller) -> TrustList:
        t = self._txn
        if t is not None and t.session == caller.session and t.trustlist is not None:
            return t.trustlist
        return self.current_trustlist()

    def _pending(self, slot: CertSlot) -> list[dict]:
        return [k for k in self.ks.pending_keys() if (k.get("pending_for") or {}).get("source") == PENDING_SOURCE
                and k["pending_for"].get("slot") == slot.credential]

    def _current_key(self, slot: CertSlot) -> str | None:
        from keystore.errors import NotFoundError

        try:
            return self.ks.get(slot.credential).key_uri
        except NotFoundError:
            pass
        if slot is self.config.slots[0]:
            ep = self.endpoint_credential()
            if ep is not None:
                return ep[1]
        return None

    def _current_subject(self, slot: CertSlot) -> x509.Name:
        from keystore.errors import NotFoundError

        try:
            return self.ks.get(slot.credential).certificate.subject
        except NotFoundError:
            pass
        if slot is self.config.slots[0]:
            ep = self.endpoint_credential()
            if ep is not None:
                return ep[0].subject
        return self._default_subject()

    def session_closed(self, session: str) -> None:
        """The owner's session ended: its transaction and open files are discarded (nothing was stored)."""
        if self._txn is not None and self._txn.session == session:
            log.info("session of %s closed: its pending transaction is discarded", self._txn.who)
            self._txn = None
        for h in [h for h, f in self._files.items() if f.session == session]:
            del self._files[h]

    # ---- CreateSigningRequest --------------------------------------------------------------------------------
    async def create_signing_request(self, caller: Caller, group_id, type_id, subject_name: str | None,
                                     regenerate: bool, nonce: bytes | None) -> bytes:
        """Returns the DER PKCS#10 request. Raises PushError."""
        self._authorize(caller, "CreateSigningRequest")
        slot = self._slot(group_id, type_id)
        async with self._lock:
            self._check_txn(caller, "CreateSigningRequest")
            if subject_name:
                try:
                    subject = parse_subject_name(subject_name)
                except ValueError as e:
                    raise PushError("BadInvalidArgument", f"subjectName {subject_name!r}: {e}") from None
            else:
                subject = self._current_subject(slot)
            if regenerate and len(nonce or b"") < MIN_NONCE:
                raise PushError("BadInvalidArgument", f"nonce of {len(nonce or b'')} bytes: at least {MIN_NONCE} are "
                                "required when regeneratePrivateKey is TRUE (OPC 10000-12 §7.10.10)")
            der = await asyncio.to_thread(self._make_csr, slot, subject, regenerate, caller)
        log.info("CSR for %s (%s, %s key) made for %s", slot.credential, subject.rfc4514_string(),
                 "new" if regenerate else "existing", caller.who)
        return der

    def _make_csr(self, slot: CertSlot, subject: x509.Name, regenerate: bool, caller: Caller) -> bytes:
        from keystore.csr import build_csr, parse_san

        key_uri = None if regenerate else self._current_key(slot)
        created = False
        if key_uri is None:
            # A new key pair: it replaces an earlier one of this slot that was never made active (§7.10.10).
            for k in self._pending(slot):
                self.ks.discard_key(k["uri"])
            # The nonce is not mixed in: the key comes from the backend's own generator (a TPM's, a token's).
            key_uri = self.ks.generate_key(slot.key_type, backend=self.config.key_backend, label=slot.credential,
                                           pending_for={"source": PENDING_SOURCE, "slot": slot.credential,
                                                        "who": caller.who})
            created = True
        try:
            csr = build_csr(self.ks.private_key(key_uri), subject, self._sans(parse_san),
                            key_usage=self._key_usage(slot.rsa),
                            extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH))
        except Exception:
            if created:
                self.ks.discard_key(key_uri)
            raise
        self.ks.audit("opcua-csr", name=slot.credential, key_uri=key_uri, regenerated=created, client=caller.who)
        return csr.public_bytes(DER)

    # ---- UpdateCertificate -----------------------------------------------------------------------------------
    async def update_certificate(self, caller: Caller, group_id, type_id, certificate: bytes,
                                 issuer_certificates, private_key_format: str | None,
                                 private_key: bytes | None) -> bool:
        """Verify and stage a certificate. Returns applyChangesRequired (always TRUE). Raises PushError."""
        self._authorize(caller, "UpdateCertificate")
        slot = self._slot(group_id, type_id)
        if private_key_format or private_key:
            raise PushError("BadNotSupported", "UpdateCertificate with a privateKey: this device generates its keys "
                            "itself (SupportedPrivateKeyFormats is empty); use CreateSigningRequest")
        cert = _cert(certificate, "certificate")
        issuers = tuple(_cert(d, f"issuerCertificates[{i}]") for i, d in enumerate(issuer_certificates or ()))
        async with self._lock:
            self._check_txn(caller, "UpdateCertificate")
            tl = self._effective_trustlist(caller)
            staged = await asyncio.to_thread(self._verify_update, slot, cert, issuers, tl)
            self._transaction(caller).certificates[slot.credential] = staged
        log.info("UpdateCertificate %s: %s (serial %x) staged by %s; ApplyChanges makes it live", slot.credential,
                 cert.subject.rfc4514_string(), cert.serial_number, caller.who)
        return True

    def _verify_update(self, slot: CertSlot, cert, issuers, tl: TrustList) -> Staged:
        from keystore.certs import same_public_key
        from keystore.errors import VerificationError
        from keystore.keytypes import key_type_of
        from keystore.purpose_opcua import validate_application

        candidates = [k["uri"] for k in self._pending(slot)]
        current = self._current_key(slot)
        if current:
            candidates.append(current)
        key_uri = next((u for u in candidates if same_public_key(cert.public_key(), self.ks.public_key(u))), None)
        if key_uri is None:
            raise PushError("BadCertificateInvalid", f"certificate {cert.subject.rfc4514_string()} is for another key: "
                            f"its public key matches neither a key made by CreateSigningRequest for {slot.type_name} "
                            "nor the current one")
        try:
            if key_type_of(cert.public_key()) != slot.key_type and not (slot.rsa and key_type_of(
                    cert.public_key()).startswith("rsa")):
                raise PushError("BadCertificateInvalid", f"a {key_type_of(cert.public_key())} certificate cannot "
                                f"fill {slot.type_name}")
            path = validate_application(cert, [*issuers, *tl.issuers()], tl.anchors(),
                                        application_uri=self.config.application_uri, role="server",
                                        public_key=self.ks.public_key(key_uri),
                                        clock_trusted=self.config.check_validity,
                                        what=f"{slot.type_name} certificate")
        except VerificationError as e:
            raise PushError(status_for(e), str(e)) from None
        return Staged(slot, cert, tuple(path[1:]), key_uri)

    # ---- GetRejectedList -------------------------------------------------------------------------------------
    def reject(self, cert_der: bytes, why: str) -> None:
        """Remember a client certificate the server refused (GetRejectedList; the operator can move it to trusted)."""
        d = fsutil.ensure_dir(self.dir / "rejected")
        fsutil.atomic_write(d / f"{tlmod.thumbprint(cert_der)}.der", cert_der, mode=0o644)
        files = sorted(d.glob("*.der"), key=lambda p: p.stat().st_mtime)
        for p in files[:-self.config.max_rejected]:
            p.unlink()
        log.warning("rejected client certificate %s: %s", tlmod.thumbprint(cert_der), why)

    def rejected(self) -> list[bytes]:
        d = self.dir / "rejected"
        return [p.read_bytes() for p in sorted(d.glob("*.der"), key=lambda p: p.stat().st_mtime)] if d.is_dir() else []

    async def get_rejected_list(self, caller: Caller) -> list[bytes]:
        self._authorize(caller, "GetRejectedList")
        return self.rejected()

    # ---- TrustList file methods ------------------------------------------------------------------------------
    def _expire_files(self) -> None:
        now = time.monotonic()
        for h in [h for h, f in self._files.items() if now - f.touched > self.config.file_timeout_s]:
            log.info("TrustList handle %d closed after %.0f s without activity", h, self.config.file_timeout_s)
            del self._files[h]

    def _handle(self, caller: Caller, handle, what: str) -> OpenFile:
        self._expire_files()
        f = self._files.get(handle)
        if f is None or f.session != caller.session:
            raise PushError("BadInvalidArgument", f"{what}: fileHandle {handle} is not open in this session (Open "
                            "first)")
        f.touched = time.monotonic()
        return f

    def _new_handle(self, f: OpenFile) -> int:
        if len(self._files) >= MAX_OPEN_FILES:
            raise PushError("BadTooManyOperations", f"TrustList Open: {MAX_OPEN_FILES} handles are open already; "
                            "Close one (idle handles close after the activity timeout)")
        h = self._next_handle
        self._next_handle = self._next_handle % 0xFFFFFFFF + 1
        self._files[h] = f
        return h

    async def open(self, caller: Caller, mode: int) -> int:
        self._authorize(caller, "TrustList Open")
        self._expire_files()
        if mode == MODE_READ:
            data = tlmod.encode(self.current_trustlist())
            return self._new_handle(OpenFile(caller.session, mode, bytearray(data)))
        if mode != MODE_WRITE_ERASE:
            raise PushError("BadInvalidArgument", f"TrustList Open mode {mode:#x}: only Read (0x1) and Write + "
                            "EraseExisting (0x6) are supported (OPC 10000-12 §7.8.2.1)")
        async with self._lock:
            self._check_txn(caller, "TrustList Open for writing")
            if any(f.mode != MODE_READ for f in self._files.values()):
                raise PushError("BadInvalidState", "TrustList Open for writing: it is already open for writing")
            return self._new_handle(OpenFile(caller.session, mode, bytearray()))

    async def open_with_masks(self, caller: Caller, masks: int) -> int:
        self._authorize(caller, "TrustList OpenWithMasks")
        if masks & ~tlmod.ALL:
            raise PushError("BadInvalidArgument", f"OpenWithMasks masks {masks:#x}: only TrustListMasks bits 0..15")
        data = tlmod.encode(self.current_trustlist(), masks)
        return self._new_handle(OpenFile(caller.session, MODE_READ, bytearray(data)))

    async def read(self, caller: Caller, handle: int, length: int) -> bytes:
        self._authorize(caller, "TrustList Read")
        f = self._handle(caller, handle, "TrustList Read")
        if f.mode != MODE_READ:
            raise PushError("BadInvalidState", f"TrustList Read: fileHandle {handle} is open for writing")
        if length < 0:
            raise PushError("BadInvalidArgument", f"TrustList Read: length {length} is negative")
        out = bytes(f.data[f.pos:f.pos + length])
        f.pos += len(out)
        return out

    async def write(self, caller: Caller, handle: int, data: bytes) -> None:
        self._authorize(caller, "TrustList Write")
        f = self._handle(caller, handle, "TrustList Write")
        if f.mode == MODE_READ:
            raise PushError("BadInvalidState", f"TrustList Write: fileHandle {handle} is open for reading")
        data = data or b""
        limit = self.config.max_trust_list_size
        if limit and f.pos + len(data) > limit:
            del self._files[handle]
            raise PushError("BadEncodingLimitsExceeded", f"TrustList Write: {f.pos + len(data)} bytes exceed "
                            f"MaxTrustListSize {limit}; the file was closed and what was written discarded")
        f.data[f.pos:f.pos + len(data)] = data
        f.pos += len(data)
        f.written = True

    async def close(self, caller: Caller, handle: int) -> None:
        self._authorize(caller, "TrustList Close")
        self._handle(caller, handle, "TrustList Close")
        del self._files[handle]

    async def get_position(self, caller: Caller, handle: int) -> int:
        self._authorize(caller, "TrustList GetPosition")
        return self._handle(caller, handle, "TrustList GetPosition").pos

    async def set_position(self, caller: Caller, handle: int, position: int) -> None:
        self._authorize(caller, "TrustList SetPosition")
        f = self._handle(caller, handle, "TrustList SetPosition")
        if position < 0:
            raise PushError("BadInvalidArgument", f"TrustList SetPosition: position {position} is negative")
        f.pos = min(position, len(f.data))

    async def close_and_update(self, caller: Caller, handle: int) -> bool:
        """Decode, merge (SpecifiedLists), validate and stage the written TrustList. Returns applyChangesRequired."""
        self._authorize(caller, "TrustList CloseAndUpdate")
        f = self._handle(caller, handle, "TrustList CloseAndUpdate")
        del self._files[handle]  # closed whatever the outcome (§7.8.2.5)
        if f.mode == MODE_READ:
            raise PushError("BadInvalidState", f"TrustList CloseAndUpdate: fileHandle {handle} was opened for reading")
        if not f.written:
            raise PushError("BadInvalidState", "TrustList CloseAndUpdate: nothing was written (Write the "
                            "TrustListDataType first)")
        mask, update = tlmod.decode(bytes(f.data))
        async with self._lock:
            self._check_txn(caller, "TrustList CloseAndUpdate")
            new = tlmod.merge(self._effective_trustlist(caller), mask, update)
            await asyncio.to_thread(self._check_trustlist, new, caller)
            self._transaction(caller).trustlist = new
        log.info("TrustList update staged by %s: %d trusted, %d issuer certificates, %d CRLs", caller.who,
                 len(new.trusted_certificates), len(new.issuer_certificates),
                 len(new.trusted_crls) + len(new.issuer_crls))
        return True

    def _check_trustlist(self, new: TrustList, caller: Caller) -> None:
        from keystore.errors import VerificationError
        from keystore.purpose_opcua import validate_application

        limit = self.config.max_trust_list_size
        if limit and new.size() > limit:
            raise PushError("BadEncodingLimitsExceeded", f"the new TrustList has {new.size()} bytes, more than "
                            f"MaxTrustListSize {limit}")
        tlmod.check(new, check_validity=self.config.check_validity)
        if caller.certificate is not None and not self.config.allow_lockout:
            try:
                validate_application(caller.certificate, [*caller.chain, *new.issuers()], new.anchors(),
                                     application_uri=None, role="any", clock_trusted=self.config.check_validity,
                                     what="calling client's certificate")
            except VerificationError as e:
                raise PushError("BadRequestNotAllowed", f"the new TrustList would no longer trust the calling client "
                                f"{caller.who} ({e}); keep its anchor, or start the server with "
                                "--allow-trust-lockout") from None

    async def add_certificate(self, caller: Caller, certificate: bytes, is_trusted: bool) -> None:
        """AddCertificate (§7.8.2.6): the certificate (its CA chain after it) joins the TrustList; applied at once,
        or at ApplyChanges when the caller has a transaction open."""
        self._authorize(caller, "TrustList AddCertificate")
        if not is_trusted:
            raise PushError("BadCertificateInvalid", "AddCertificate with isTrustedCertificate FALSE: issuer "
                            "certificates are added by writing the TrustList (OPC 10000-12 §7.8.2.6)")
        try:
            ders = _split_der(bytes(certificate or b""))
        except ValueError as e:
            raise PushError("BadCertificateInvalid", f"AddCertificate: not DER certificates: {e}") from None
        if not ders:
            raise PushError("BadCertificateInvalid", "AddCertificate: the certificate is empty")
        certs = [_cert(d, f"AddCertificate certificate[{i}]") for i, d in enumerate(ders)]
        await self._edit(caller, "AddCertificate", lambda tl: TrustList(
            trusted_certificates=tl.trusted_certificates + tuple(d for d in ders[:1] if d not in
                                                                 tl.trusted_certificates),
            trusted_crls=tl.trusted_crls,
            issuer_certificates=tl.issuer_certificates + tuple(d for d in ders[1:] if d not in
                                                               tl.issuer_certificates),
            issuer_crls=tl.issuer_crls), certs[0].subject.rfc4514_string())

    async def remove_certificate(self, caller: Caller, thumbprint: str, is_trusted: bool) -> None:
        """RemoveCertificate (§7.8.2.7): by SHA-1 thumbprint, with the CRLs that CA issued."""
        self._authorize(caller, "TrustList RemoveCertificate")
        field = "trusted_certificates" if is_trusted else "issuer_certificates"
        crl_field = "trusted_crls" if is_trusted else "issuer_crls"
        want = (thumbprint or "").replace(":", "").strip().upper()

        def edit(tl: TrustList) -> TrustList:
            ders = getattr(tl, field)
            hit = [d for d in ders if tlmod.thumbprint(d) == want]
            if not hit:
                raise PushError("BadInvalidArgument", f"RemoveCertificate: no certificate with thumbprint {want} in "
                                f"{'TrustedCertificates' if is_trusted else 'IssuerCertificates'}")
            gone = x509.load_der_x509_certificate(hit[0])
            crls = tuple(c for c in getattr(tl, crl_field) if x509.load_der_x509_crl(c).issuer != gone.subject)
            return dataclasses.replace(tl, **{field: tuple(d for d in ders if d != hit[0]), crl_field: crls})

        await self._edit(caller, "RemoveCertificate", edit, want)

    async def _edit(self, caller: Caller, what: str, change, label: str) -> None:
        async with self._lock:
            self._check_txn(caller, f"TrustList {what}")
            self._expire_files()
            if self._files:
                raise PushError("BadInvalidState", f"TrustList {what}: the TrustList is open; Close it first")
            new = change(self._effective_trustlist(caller))
            await asyncio.to_thread(self._check_trustlist, new, caller)
            t = self._txn
            if t is not None and t.session == caller.session:
                t.trustlist = new
                log.info("TrustList %s %s staged by %s", what, label, caller.who)
                return
            txn = Transaction(caller.session, caller.who, time.monotonic(), trustlist=new)
            await self._apply(txn)
        log.info("TrustList %s %s applied for %s", what, label, caller.who)

    # ---- ApplyChanges / CancelChanges ------------------------------------------------------------------------
    async def apply_changes(self, caller: Caller) -> list[str]:
        """Commit the caller's transaction. Returns the credentials changed. Raises PushError."""
        self._authorize(caller, "ApplyChanges")
        async with self._lock:
            t = self._txn
            if t is None:
                raise PushError("BadInvalidState", "ApplyChanges: no changes are pending (UpdateCertificate or "
                                "CloseAndUpdate first)")
            self._check_txn(caller, "ApplyChanges")
            changed = await self._apply(t)
            self._txn = None
        return changed

    async def cancel_changes(self, caller: Caller) -> None:
        self._authorize(caller, "CancelChanges")
        async with self._lock:
            self._check_txn(caller, "CancelChanges")
            self._txn = None

    async def _apply(self, t: Transaction) -> list[str]:
        journal = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(), "who": t.who,
                   "trustlist_version": None, "certificates": []}

        def write_journal():
            if t.trustlist is not None:
                journal["trustlist_version"] = self.trust.write_version(t.trustlist)
            for s in t.certificates.values():
                journal["certificates"].append({
                    "credential": s.slot.credential, "key_uri": s.key_uri, "certificate": s.certificate.public_bytes(
                        DER).hex(), "chain": [c.public_bytes(DER).hex() for c in s.chain]})
            fsutil.atomic_write(self.dir / "apply.json", json.dumps(journal).encode())

        try:
            await asyncio.to_thread(write_journal)
        except Exception as e:
            log.error("ApplyChanges: could not write the journal: %s", e)
            raise PushError("BadInternalError", f"ApplyChanges: the journal could not be written: {e}") from e
        try:
            changed = await asyncio.to_thread(self._roll_forward, journal)
        except PushError:
            raise
        except Exception as e:
            log.error("ApplyChanges: commit failed (%s); the journal stays and the next start finishes it", e)
            raise PushError("BadInternalError", f"ApplyChanges: commit failed: {e}") from e
        if self._txn is t:
            self._txn = None  # committed: whatever the deployment does, the transaction is over
        deployed = await self._deploy()
        if deployed:
            (self.dir / "apply.json").unlink(missing_ok=True)
            fsutil.fsync_dir(self.dir)
        self.ks.audit("opcua-apply", client=t.who, credentials=changed, deployed=deployed,
                      trustlist_version=journal["trustlist_version"])
        if self.on_apply is not None:
            await self.on_apply(changed)
        if not deployed:
            raise PushError("BadInternalError", "ApplyChanges: committed to the keystore, but the deployment into "
                            "the PKI directory or a hook failed (see the log); the next start of the server retries it")
        return changed

    async def _deploy(self) -> bool:
        """Deploy the live state (PKI directories, hooks). False (logged) when a target or hook fails: the commit
        stands, the journal stays, and the next start retries."""
        if self.deploy is None:
            return True
        from agent.hooks import DeployError

        try:
            await self.deploy(self._live_credentials(), self.current_trustlist())
            return True
        except DeployError as e:
            log.error("OPC UA deployment failed: %s", e)
            self.ks.audit("opcua-deploy-failed", error=str(e)[:500])
            return False

    def _live_credentials(self) -> list:
        from keystore.errors import NotFoundError

        out = []
        for s in self.config.slots:
            try:
                out.append(self.ks.get(s.credential))
            except NotFoundError:
                pass
        return out

    def _roll_forward(self, journal: dict) -> list[str]:
        """Carry out a journal up to the deployment (idempotent; see the module invariants). Returns the
        credentials stored."""
        from keystore.certs import fingerprint
        from keystore.errors import NotFoundError, VerificationError

        domain = self.config.domain
        v = journal.get("trustlist_version")
        tl = self.trust.load(v) if v else None
        if tl is not None:
            cas = [c for c in tl.anchors() if tlmod._is_ca(c)]
            if cas:
                self.ks.add_trust_anchors(domain, cas, source=f"opcua TrustList from {journal.get('who')}",
                                          verified_by="SecurityAdmin")
        changed = []
        for e in journal["certificates"]:
            cert = x509.load_der_x509_certificate(bytes.fromhex(e["certificate"]))
            try:
                if fingerprint(self.ks.get(e["credential"]).certificate) == fingerprint(cert):
                    continue
            except NotFoundError:
                pass
            chain = [x509.load_der_x509_certificate(bytes.fromhex(h)) for h in e["chain"]]
            try:
                self.ks.store_certificate(e["credential"], cert, chain, key_uri=e["key_uri"], kind="app",
                                          domain=domain, check_validity=self.config.check_validity,
                                          server=journal.get("who"), meta={"via": "opcua-push"})
            except VerificationError as err:
                raise PushError(status_for(err), f"ApplyChanges: {e['credential']}: {err}") from None
            changed.append(e["credential"])
        if tl is not None:
            keep = {fingerprint(c) for c in tl.anchors()}
            for a in self.ks.trust_anchors(domain):
                if fingerprint(a) not in keep:
                    self.ks.remove_trust_anchor(domain, fingerprint(a))
            self.trust.make_live(v)
        return changed
