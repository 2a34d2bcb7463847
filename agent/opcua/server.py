"""``devagent opcua serve``: an asyncua server whose standard ns=0 ServerConfiguration (i=12637) answers push
management (OPC 10000-12 §7.7, §7.8.2) through ``agent.opcua.push.PushService``.

What this module adds to asyncua, and why:
- Handlers bound to the nodes asyncua's ns=0 nodeset already has (CreateSigningRequest i=12737, UpdateCertificate
  i=13737, ApplyChanges i=12740, CancelChanges i=25708, GetRejectedList i=12777, and the DefaultApplicationGroup's
  TrustList i=12642 with Open, OpenWithMasks, Read, Write, Close, CloseAndUpdate, GetPosition, SetPosition,
  AddCertificate, RemoveCertificate); no namespace of our own.
- Who calls: asyncua hands a method callback no session. Each connection's requests are processed one by one in
  that connection's task, and just before a Call the connection's ``PermissionRuleset`` is asked about the request;
  our ruleset (one per endpoint security mode) records the session's user and the channel's mode in a context
  variable the handlers read. A connection whose policy has no ruleset (a None channel opened without an endpoint
  for it) leaves it unset: such a caller is anonymous and unencrypted.
- Client certificates: asyncua calls ``certificate_validator`` at CreateSession; ours validates the client's
  application certificate against the live TrustList through the keystore's verify-before-store path
  (``keystore.purpose_opcua``, i.e. ``keystore.validator`` with the opcua-app purpose, clientAuth, its applicationUri) and records a refused one
  for GetRejectedList. The SecurityAdmin role comes from the configured subject or issuer DNs.
- Re-binding: after an ApplyChanges that changed the RSA application certificate, the endpoints, the security
  policy factories and the server's own certificate and key are switched in place; new secure channels use the
  new certificate, existing ones are closed after a short delay (OPC 10000-12 §7.10.9) — the process keeps running.
"""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import uuid

from asyncua import Server, ua
from asyncua.crypto.permission_rules import ADMIN_TYPES, PermissionRuleset, User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography import x509

from agent.opcua.errors import PushError
from agent.opcua.push import Caller, PushService

log = logging.getLogger("devagent.opcua")

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("devagent_opcua_caller", default=None)

POLICIES = {
    "Basic256Sha256": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    "Aes128_Sha256_RsaOaep": ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
    "Aes256_Sha256_RsaPss": ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
}
DEFAULT_POLICIES = ("Basic256Sha256", "Aes128_Sha256_RsaOaep")
_ADMIN_REQUESTS = {ua.NodeId(t) for t in ADMIN_TYPES}
TL = "ServerConfiguration_CertificateGroups_DefaultApplicationGroup_TrustList_"


@dataclasses.dataclass
class PushUser(User):
    """asyncua's User plus what push management needs: a session id, the role, the client's certificate."""

    session_id: str = ""
    admin: bool = False
    certificate: x509.Certificate | None = None
    chain: tuple = ()


class _Gate(PermissionRuleset):
    """Records (user, channel mode) for the handlers; refuses address-space changes (AddNodes ...)."""

    def __init__(self, owner: "PushServer", mode):
        self.owner = owner
        self.mode = mode

    def check_validity(self, user, action_type_id, body):
        if action_type_id in _ADMIN_REQUESTS:
            return False
        _CURRENT.set((user, self.mode))
        return True


class _Users(UserManager):
    def __init__(self, owner: "PushServer"):
        self.owner = owner

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username is not None:
            return None  # no user names on this endpoint: identify with a certificate
        return self.owner.user_for(certificate)


def _status(name: str) -> ua.StatusCode:
    return ua.StatusCode(getattr(ua.StatusCodes, name, ua.StatusCodes.BadInternalError))


class PushServer:
    """``async with PushServer(service, url) as s: ...`` — or ``await start()`` / ``await stop()``."""

    def __init__(self, service: PushService, endpoint_url: str, *, name: str = "devagent",
                 policies=DEFAULT_POLICIES, allow_none: bool = False, close_delay_s: float = 2.0):
        self.service = service
        self.url = endpoint_url
        self.name = name
        self.policies = tuple(policies)
        self.allow_none = allow_none
        self.close_delay_s = close_delay_s
        self.server: Server | None = None
        self._bound_fp: str | None = None
        self.rebinds = 0
        service.on_apply = self._after_apply
        from keystore.csr import parse_subject

        # Compared as X.509 names (attribute order and spelling as parsed), not as strings. ValueError: bad DN.
        self._admin_subjects = [parse_subject(d) for d in service.config.admin_subjects]
        self._admin_issuers = [parse_subject(d) for d in service.config.admin_issuers]

    # ---- identity --------------------------------------------------------------------------------------------
    def _anchors(self):
        tl = self.service.current_trustlist()
        return tl.anchors(), tl.issuers()

    def user_for(self, der: bytes | None) -> PushUser:
        from keystore.certs import dn
        from keystore.errors import VerificationError
        from keystore.purpose_opcua import validate_application

        sid = uuid.uuid4().hex
        if not der:
            return PushUser(role=UserRole.User, name="anonymous", session_id=sid)
        from keystore.certs import load_der_certificate
        from keystore.errors import CorruptFileError

        try:
            cert = load_der_certificate(bytes(der), "client certificate")
        except CorruptFileError:
            return PushUser(role=UserRole.User, name="(unreadable certificate)", session_id=sid)
        anchors, issuers = self._anchors()
        who = dn(cert.subject)
        try:
            path = validate_application(cert, issuers, anchors, application_uri=None, role="any",
                                        clock_trusted=self.service.config.check_validity,
                                        what="client certificate")
        except VerificationError as e:
            log.info("client %s is not trusted (%s): no role", who, e)
            return PushUser(role=UserRole.User, name=who, session_id=sid)
        admin = cert.subject in self._admin_subjects or cert.issuer in self._admin_issuers
        return PushUser(role=UserRole.Admin if admin else UserRole.User, name=who, session_id=sid, admin=admin,
                        certificate=cert, chain=tuple(path[1:]))

    async def _validate_client(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        """asyncua's certificate_validator: CreateSession with a client application certificate."""
        from asyncua.ua.uaerrors import UaStatusCodeError

        from agent.opcua.errors import status_for
        from keystore.errors import VerificationError
        from keystore.purpose_opcua import validate_application

        anchors, issuers = self._anchors()
        try:
            validate_application(cert, issuers, anchors, application_uri=app.ApplicationUri or None, role="client",
                                 clock_trusted=self.service.config.check_validity,
                                 what="client application certificate")
        except VerificationError as e:
            from cryptography.hazmat.primitives.serialization import Encoding

            await asyncio.to_thread(self.service.reject, cert.public_bytes(Encoding.DER), str(e))
            raise UaStatusCodeError(getattr(ua.StatusCodes, status_for(e))) from None

    def _caller(self) -> Caller:
        cur = _CURRENT.get()
        if cur is None:
            return Caller(session="", encrypted=False, admin=False, who="anonymous (no security)")
        user, mode = cur
        self._reap()
        if not isinstance(user, PushUser):
            return Caller(session="", encrypted=False, admin=False, who=str(user))
        return Caller(session=user.session_id, encrypted=mode == ua.MessageSecurityMode.SignAndEncrypt,
                      admin=user.admin, who=user.name or "-", certificate=user.certificate, chain=user.chain)

    def _reap(self) -> None:
        """Discard transactions and files of sessions that are gone."""
        sessions = getattr(self.server.iserver, "_external_sessions", None) if self.server else None
        if sessions is None:
            return
        alive = {getattr(s.user, "session_id", None) for s in sessions.values()}
        t = self.service._txn
        if t is not None and t.session not in alive:
            self.service.session_closed(t.session)
        for f in list(self.service._files.values()):
            if f.session not in alive:
                self.service.session_closed(f.session)

    # ---- method plumbing -------------------------------------------------------------------------------------
    def _method(self, name: str, n_in: int, call, out_types=()):
        async def handler(parent, *args):
            if len(args) < n_in:
                return _status("BadArgumentsMissing")
            if len(args) > n_in:
                return _status("BadTooManyArguments")
            caller = self._caller()
            try:
                values = [a.Value if isinstance(a, ua.Variant) else a for a in args]
                result = await call(caller, *values)
            except PushError as e:
                log.warning("%s refused for %s: %s", name, caller.who, e)
                return _status(e.status)
            except (TypeError, AttributeError, ValueError) as e:
                log.warning("%s: bad arguments from %s: %s", name, caller.who, e)
                return _status("BadTypeMismatch")
            except Exception:
                log.exception("%s failed", name)
                return _status("BadInternalError")
            if result is None:
                result = ()
            elif not isinstance(result, tuple):
                result = (result,)
            return [ua.Variant(v, t) for v, t in zip(result, out_types, strict=True)]
        return handler

    @staticmethod
    def _node_id(v) -> int | None:
        if v is None:
            return None
        if not isinstance(v, ua.NodeId):
            raise TypeError("expected a NodeId")
        if v.NamespaceIndex != 0 and not v.is_null():
            raise PushError("BadInvalidArgument", f"NodeId {v.to_string()} is not in namespace 0")
        return None if v.is_null() else int(v.Identifier)

    def _bind(self) -> None:
        s, svc, V = self.server, self.service, ua.VariantType
        nid = self._node_id

        async def csr(c, group, typ, subject, regenerate, nonce):
            return await svc.create_signing_request(c, nid(group), nid(typ), subject, bool(regenerate), nonce)

        async def update(c, group, typ, cert, issuers, pk_format, pk):
            return await svc.update_certificate(c, nid(group), nid(typ), cert, issuers or [], pk_format, pk)

        async def apply(c):
            await svc.apply_changes(c)

        async def opened(c, mode):
            h = await svc.open(c, int(mode))
            await self._open_count()
            return h

        async def opened_masks(c, masks):
            h = await svc.open_with_masks(c, int(masks))
            await self._open_count()
            return h

        async def closed(c, h):
            await svc.close(c, int(h))
            await self._open_count()

        async def close_update(c, h):
            try:
                return await svc.close_and_update(c, int(h))
            finally:
                await self._open_count()

        table = [
            ("ServerConfiguration_CreateSigningRequest", 5, csr, (V.ByteString,)),
            ("ServerConfiguration_UpdateCertificate", 6, update, (V.Boolean,)),
            ("ServerConfiguration_ApplyChanges", 0, apply, ()),
            ("ServerConfiguration_CancelChanges", 0, svc.cancel_changes, ()),
            ("ServerConfiguration_GetRejectedList", 0, svc.get_rejected_list, (V.ByteString,)),
            (TL + "Open", 1, opened, (V.UInt32,)),
            (TL + "OpenWithMasks", 1, opened_masks, (V.UInt32,)),
            (TL + "Read", 2, lambda c, h, n: svc.read(c, int(h), int(n)), (V.ByteString,)),
            (TL + "Write", 2, lambda c, h, d: svc.write(c, int(h), d), ()),
            (TL + "Close", 1, closed, ()),
            (TL + "CloseAndUpdate", 1, close_update, (V.Boolean,)),
            (TL + "GetPosition", 1, lambda c, h: svc.get_position(c, int(h)), (V.UInt64,)),
            (TL + "SetPosition", 2, lambda c, h, p: svc.set_position(c, int(h), int(p)), ()),
            (TL + "AddCertificate", 2, lambda c, d, t: svc.add_certificate(c, d, bool(t)), ()),
            (TL + "RemoveCertificate", 2, lambda c, t, b: svc.remove_certificate(c, t, bool(b)), ()),
        ]
        for name, n_in, call, outs in table:
            s.iserver.isession.add_method_callback(ua.NodeId(getattr(ua.ObjectIds, name)),
                                                   self._method(name, n_in, call, outs))

    async def _write(self, name: str, value, vtype) -> None:
        await self.server.get_node(ua.NodeId(getattr(ua.ObjectIds, name))).write_value(ua.Variant(value, vtype))

    async def _open_count(self) -> None:
        await self._write(TL + "OpenCount", len(self.service._files), ua.VariantType.UInt16)

    async def _properties(self) -> None:
        V, c = ua.VariantType, self.service.config
        await self._write("ServerConfiguration_ServerCapabilities", ["NA"], V.String)
        await self._write("ServerConfiguration_SupportedPrivateKeyFormats", [], V.String)
        await self._write("ServerConfiguration_MaxTrustListSize", c.max_trust_list_size, V.UInt32)
        await self._write("ServerConfiguration_MulticastDnsEnabled", False, V.Boolean)
        await self._write("ServerConfiguration_ApplicationUri", c.application_uri, V.String)
        await self._write("ServerConfiguration_CertificateGroups_DefaultApplicationGroup_CertificateTypes",
                          [ua.NodeId(s.type_id) for s in c.slots], V.NodeId)
        await self._write(TL + "Writable", True, V.Boolean)
        await self._write(TL + "UserWritable", True, V.Boolean)
        await self._open_count()
        await self._last_update()

    async def _last_update(self) -> None:
        import datetime

        t = self.service.trust.last_update() or datetime.datetime(1601, 1, 1, tzinfo=datetime.timezone.utc)
        await self._write(TL + "LastUpdateTime", t, ua.VariantType.DateTime)

    # ---- start / stop / re-bind ------------------------------------------------------------------------------
    async def start(self) -> None:
        from keystore.certs import fingerprint

        await self.service.initialize()
        s = Server(user_manager=_Users(self))
        await s.init()
        self.server = s
        s.set_endpoint(self.url)
        s.set_server_name(self.name)
        await s.set_application_uri(self.service.config.application_uri)
        types = [POLICIES[p] for p in self.policies]
        if self.allow_none:
            types.append(ua.SecurityPolicyType.NoSecurity)
        s.set_security_policy(types)
        s.set_identity_tokens([ua.AnonymousIdentityToken, ua.X509IdentityToken])
        s.set_certificate_validator(self._validate_client)
        cert, key_uri, _chain = self.service.endpoint_credential()
        s.iserver.certificate = cert
        s.iserver.private_key = self.service.ks.private_key(key_uri)
        self._bound_fp = fingerprint(cert)
        self._bind()
        await self._properties()
        await s.start()
        for f in s._policies:  # asyncua builds one factory per endpoint in start(); give each its mode's gate
            f.permission_ruleset = _Gate(self, f.mode)
        log.info("OPC UA push management on %s (%s), application certificate %s", self.url,
                 ", ".join(self.policies) + (", None" if self.allow_none else ""), self._bound_fp)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.stop()

    @property
    def endpoint_fingerprint(self) -> str | None:
        return self._bound_fp

    async def _after_apply(self, changed) -> None:
        await self._last_update()
        await self.rebind()

    async def rebind(self) -> bool:
        """Use the live RSA application certificate for new secure channels (if it changed). Returns True if so."""
        from cryptography.hazmat.primitives.serialization import Encoding

        from keystore.certs import fingerprint

        cert, key_uri, _ = self.service.endpoint_credential()
        if fingerprint(cert) == self._bound_fp:
            return False
        key = await asyncio.to_thread(self.service.ks.private_key, key_uri)
        s = self.server
        s.iserver.certificate = cert
        s.iserver.private_key = key
        der = cert.public_bytes(Encoding.DER)
        for f in s._policies:
            f.certificate = cert
            f.private_key = key
        for ep in s.iserver.endpoints:
            if ep.ServerCertificate:
                ep.ServerCertificate = der
        old = list(s.iserver.asyncio_transports)
        self._bound_fp = fingerprint(cert)
        self.rebinds += 1
        log.info("endpoint re-bound to application certificate %s; %d existing channel(s) close in %.1f s",
                 self._bound_fp, len(old), self.close_delay_s)

        async def close_old():
            await asyncio.sleep(self.close_delay_s)
            for t in old:
                t.close()
        if old:
            asyncio.get_running_loop().create_task(close_old())
        return True
