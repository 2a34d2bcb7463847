"""EST client (RFC 7030 with RFC 8951 clarifications) behind the protocol-neutral ``EnrollmentClient``.

Invariants:
- TLS server authentication uses only the caller's EST trust anchors (or, for the RFC 7030 §4.1.1 bootstrap,
  a CA certificate the caller accepted by fingerprint); never the system store unless ``extra["system_trust"]``.
- No credential (Basic password or client certificate) is ever sent over an unauthenticated connection:
  bootstrap fetches only /cacerts, anonymously.
- A returned certificate is for the key we asked for and chains to the trust anchors (protocol-level checks);
  the keystore still verifies before it stores anything. The client stores nothing.
- Waiting on 202 is bounded by ``max_wait_s`` and ``MAX_POLLS``; redirects are followed only within the origin.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import re
import time
import urllib.parse
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from enroll_clients.base import (
    CaCertsResult,
    CertRequest,
    ClientAuth,
    EnrollError,
    EnrollmentClient,
    EnrollOptions,
    EnrollResult,
    ProtectionError,
    ProtocolError,
    ServerError,
    TransportError,
    UnsupportedError,
)
from enroll_clients.est import messages as m
from enroll_clients.est.transport import HttpResponse, HttpxTransport, TlsConfig, Transport

log = logging.getLogger("enroll_clients.est")
audit = logging.getLogger("devagent.audit")

MAX_POLLS = 100
MAX_REDIRECTS = 5
RETRY_AFTER_DEFAULT_S = 10.0  # a 202 without Retry-After violates RFC 7030 §4.2.3; wait this long
GET_RETRY_BASE_S = 0.5


class EstConfigError(EnrollError, ValueError):
    """A bad EST option (URL, label, fingerprint): the user must fix the configuration."""


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """What an unauthenticated /cacerts fetch returned (RFC 7030 §4.1.1). The caller decides whether to trust it.

    ``fingerprints[i]`` is ``sha256:HEX`` of ``ca_certs[i]``. ``accepted`` is the certificate that matched the
    expected fingerprint (None when none was given), ``validated`` the CA certificates that chain to it, and
    ``server_trusted`` whether the TLS server certificate chains to it too.
    """

    url: str
    ca_certs: tuple[x509.Certificate, ...]
    fingerprints: tuple[str, ...]
    server_certificate: x509.Certificate | None = None
    accepted: x509.Certificate | None = None
    validated: tuple[x509.Certificate, ...] = ()
    server_trusted: bool = False

    def describe(self) -> str:
        """Lines for a person to compare with the fingerprint published out of band."""
        lines = [f"CA certificates from {self.url} (NOT yet trusted):"]
        for c, fp in zip(self.ca_certs, self.fingerprints, strict=True):
            lines.append(f"  subject {c.subject.rfc4514_string()}\n    issuer  {c.issuer.rfc4514_string()}\n"
                         f"    valid   {c.not_valid_before_utc:%Y-%m-%d} .. {c.not_valid_after_utc:%Y-%m-%d}\n"
                         f"    {fp}")
        return "\n".join(lines)


class EstClient(EnrollmentClient):
    """RFC 7030 client. One instance per server/label; it caches /cacerts for chain building."""

    protocol = "est"

    def __init__(self, options: EnrollOptions, transport: Transport | None = None,
                 sleep: Callable[[float], Any] = asyncio.sleep, clock: Callable[[], float] = time.monotonic):
        if not isinstance(options, EnrollOptions):
            raise TypeError("options must be an EnrollOptions")
        extra = dict(options.extra or {})
        try:
            m.build_url(options.server, "cacerts", options.label, extra.get("base_path"), options.profile)
            if options.ca_fingerprint:
                m.parse_fingerprint(options.ca_fingerprint)
        except ValueError as e:
            raise EstConfigError(str(e)) from None
        if options.max_wait_s < 0 or options.timeout_s <= 0:
            raise EstConfigError("max_wait_s must be >= 0 and timeout_s > 0")
        self.options = options
        self._base_path = extra.get("base_path")
        self._system_trust = bool(extra.get("system_trust", False))
        self._ca_anchors = tuple(extra.get("ca_anchors", ()))
        self._anchors: tuple[x509.Certificate, ...] = tuple(options.trust_anchors)
        tu = extra.get("tls_unique", "auto")
        self._tls_unique = {True: "on", False: "off", None: "auto"}.get(tu, tu)
        if self._tls_unique not in ("on", "off", "auto"):
            raise EstConfigError(f"tls_unique must be on, off or auto, not {tu!r}")
        self._challenge_requested = False  # /csrattrs asked for a challengePassword (RFC 7030 §3.5)
        self._cacerts: tuple[x509.Certificate, ...] | None = None
        self._transport = transport or HttpxTransport()
        self._sleep = sleep
        self._clock = clock

    # ---- helpers ---------------------------------------------------------------------------------
    def url(self, operation: str, profile: str | None = None) -> str:
        """The full URL of an EST operation: server, base path, ``<label>[/<profile>]`` (``profile`` overrides
        ``options.profile``, e.g. a request's own profile)."""
        return m.build_url(self.options.server, operation, self.options.label, self._base_path,
                           profile or self.options.profile)

    @property
    def trust_anchors(self) -> tuple[x509.Certificate, ...]:
        return self._anchors

    def _tls(self, auth: ClientAuth | None, use_cert: bool, verify: bool = True) -> TlsConfig:
        if not verify:
            return TlsConfig(verify=False)
        cert = auth.certificate if (use_cert and auth is not None) else None
        return TlsConfig(trust_anchors=self._anchors, verify=True, system_trust=self._system_trust,
                         client_certificate=cert, client_chain=tuple(auth.chain) if cert else (),
                         client_key=auth.private_key if cert else None,
                         key_file=auth.key_file if cert else None, key_password=auth.key_password if cert else None)

    async def _exchange(self, operation: str, method: str, body: bytes | None = None,
                        content_type: str | None = None, *, auth: ClientAuth | None = None, use_cert: bool = False,
                        verify: bool = True, accept: str = "*/*", profile: str | None = None,
                        bind=None) -> HttpResponse:
        """One EST exchange with redirects, 202 waits and GET retries. ``bind``: ``make_body(tls_unique)`` for a
        body bound to the TLS session (each attempt binds to its own session)."""
        try:
            url = self.url(operation, profile)
        except ValueError as e:
            raise EstConfigError(str(e)) from None
        if not verify and auth is not None:
            raise EnrollError("refusing to send credentials over an unauthenticated TLS connection")
        tls = self._tls(auth, use_cert, verify)
        basic = None
        if auth is not None and auth.username is not None:
            if auth.password is None:
                raise EnrollError(f"HTTP Basic authentication for user {auth.username!r} needs a password")
            basic = (auth.username, auth.password)
        headers = {"Accept": accept, "User-Agent": "devagent-est/1"}
        if content_type:
            headers["Content-Type"] = content_type
        start = self._clock()
        deadline = start + self.options.max_wait_s
        polls = redirects = attempts = 0
        while True:
            try:
                if bind is not None:
                    if not hasattr(self._transport, "bound_request"):
                        raise UnsupportedError("this EST transport cannot bind a request to its TLS session")
                    resp = await self._transport.bound_request(method, url, headers, bind, tls, self.options.timeout_s,
                                                               basic, self.url("cacerts", profile))
                else:
                    resp = await self._transport.request(method, url, headers, body, tls, self.options.timeout_s,
                                                         basic)
            except TransportError as e:
                # POSTs are not repeated here: a CSR posted again can make the CA issue a second certificate,
                # orphaned (the agent's scheduler decides). GETs are idempotent; a refusal of our TLS client
                # certificate (``refused``, the transport's refusal probe) would meet the same refusal again.
                attempts += 1
                if method != "GET" or attempts > max(0, self.options.retries) or getattr(e, "refused", False):
                    raise
                if getattr(e, "refusal_probed", False):  # the server accepted the certificate: not asked again
                    tls = dataclasses.replace(tls, refusal_probe=False)
                await self._sleep(GET_RETRY_BASE_S * 2 ** (attempts - 1))
                continue
            if resp.status in (301, 302, 303, 307, 308):
                loc = resp.headers.get("location")
                if not loc:
                    raise ProtocolError(f"{method} {url}: HTTP {resp.status} redirect without a Location header")
                target = urllib.parse.urljoin(url, loc)
                if not m.same_origin(url, target):
                    raise ProtectionError(f"{method} {url}: redirect to another origin {target!r} refused "
                                          "(RFC 7030 §3.2.1: only the same origin is followed automatically)")
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise ProtocolError(f"{method} {url}: more than {MAX_REDIRECTS} redirects")
                url = target
                continue
            if resp.status == 202:
                polls += 1
                wait = m.parse_retry_after(resp.headers.get("retry-after"))
                if wait is None:
                    log.warning("%s %s: 202 without a valid Retry-After; waiting %.0f s", method, url,
                                RETRY_AFTER_DEFAULT_S)
                    wait = RETRY_AFTER_DEFAULT_S
                elapsed = self._clock() - start
                if polls > MAX_POLLS or self._clock() + wait > deadline:
                    raise ServerError(
                        f"{method} {url}: request still pending (HTTP 202) after {polls} answer(s) and "
                        f"{elapsed:.0f} s; the server asks to retry in {wait:.0f} s, beyond the bound of "
                        f"{self.options.max_wait_s:.0f} s (max_wait_s); try again later or ask the CA operator "
                        "to approve the request", status=202, text=m.server_text(resp.body))
                log.info("%s %s: pending (202), retrying in %.1f s", method, url, wait)
                await self._sleep(wait)
                continue
            if 200 <= resp.status < 300:
                return resp
            raise self._http_error(method, url, resp, basic, tls.client_certificate is not None)

    @staticmethod
    def _http_error(method: str, url: str, resp: HttpResponse, basic, client_cert: bool = False) -> ServerError:
        text = m.server_text(resp.body, resp.headers.get("content-type"))
        where = f"{method} {url}: HTTP {resp.status} {resp.reason}".rstrip()
        if resp.status == 401:
            challenge = resp.headers.get("www-authenticate", "")
            if re.search(r"proof.of.possession|\bpop\b|tls.unique", text, re.I):
                # libest estserver -t: the CSR must carry the TLS session's tls-unique value (RFC 7030 §3.5).
                hint = ("the server requires the CSR to be bound to the TLS session (challengePassword carrying "
                        "tls-unique, RFC 7030 §3.5): pass --tls-unique (remembered), or ask the operator to turn the "
                        "check off (libest: estserver without -t)")
            elif basic:
                hint = (f"authentication failed for user {basic[0]!r}: wrong username or password, or a one-time "
                        "password that was already used")
            elif client_cert:
                hint = ("the server requires HTTP authentication besides the TLS client certificate that was sent"
                        + (f" ({challenge})" if challenge else "")
                        + " (RFC 7030 §3.2.3): give --username and --password")
            else:
                hint = ("the server requires authentication"
                        + (f" ({challenge})" if challenge else "")
                        + ": give --username and --password, or a TLS client certificate (--idevid)")
            return ServerError(f"{where}: {hint}" + (f"; server says: {text}" if text else ""),
                               status=401, text=text)
        if resp.status == 403:
            hint = "the server refused this client (check the client certificate or the account's permissions)"
            if basic:
                hint += (f"; HTTP Basic user {basic[0]!r} was sent: some servers (Trustpoint) answer a wrong username or "
                         "password with 403")
            return ServerError(f"{where}: {hint}" + (f"; server says: {text}" if text else ""), status=403, text=text)
        return ServerError(f"{where}" + (f": {text}" if text else " (no text)"), status=resp.status, text=text)

    async def _ensure_anchors(self) -> None:
        if self._anchors or self._system_trust:
            return
        if self.options.ca_fingerprint:
            await self.bootstrap_cacerts()
            return
        raise EnrollError(f"no EST trust anchor for {self.options.server}: give the CA certificate that issued the "
                          "server's TLS certificate (--tls-trust or --trust), or bootstrap with --ca-fingerprint sha256:HEX "
                          "(RFC 7030 §4.1.1); the system trust store is not used by default")

    # ---- /cacerts --------------------------------------------------------------------------------
    async def bootstrap_cacerts(self, fingerprint: str | None = None) -> BootstrapResult:
        """Fetch /cacerts WITHOUT authenticating the server (RFC 7030 §4.1.1) and show what came back.

        With ``fingerprint`` (or ``options.ca_fingerprint``) the matching certificate is accepted as trust anchor
        for this client, the other CA certificates are validated against it, and the result says so. Without,
        nothing is trusted: the caller shows ``describe()`` and calls ``accept_bootstrap`` after confirmation.

        Raises:
            ProtectionError: a fingerprint was given and no certificate matches it.
            EnrollError: transport or encoding errors as for any request.
        """
        resp = await self._exchange("cacerts", "GET", verify=False, accept=m.CT_PKCS7)
        certs = m.parse_certs_body(resp.body, resp.headers.get("content-type"), f"GET {resp.url}")
        result = BootstrapResult(resp.url, certs, tuple(m.fingerprint(c) for c in certs), resp.peer_certificate)
        wanted = fingerprint or self.options.ca_fingerprint
        if wanted:
            return self.accept_bootstrap(result, wanted)
        return result

    def accept_bootstrap(self, result: BootstrapResult, fingerprint: str) -> BootstrapResult:
        """Trust the bootstrap certificate with ``fingerprint`` (the user confirmed it out of band).

        Returns the result with ``accepted``/``validated``/``server_trusted`` filled in; afterwards this client
        authenticates the server with the accepted certificate.

        Raises:
            ProtectionError: no certificate matches ``fingerprint``.
            EstConfigError: ``fingerprint`` is not ``sha256:HEX``.
        """
        try:
            match = m.match_fingerprint(result.ca_certs, fingerprint)
        except ValueError as e:
            raise EstConfigError(str(e)) from None
        if match is None:
            got = ", ".join(result.fingerprints) or "none"
            raise ProtectionError(f"bootstrap of {result.url}: no CA certificate matches the expected fingerprint "
                                  f"{fingerprint} (received: {got}); the server is not the one you expect — "
                                  "nothing was trusted")
        validated = [match]
        for c in result.ca_certs:
            if c is match:
                continue
            try:
                m.verified_chain(c, result.ca_certs, [match], purpose="ca-cert", what="CA certificate")
                validated.append(c)
            except ProtectionError:
                log.warning("bootstrap: %s does not chain to the accepted CA; ignored", c.subject.rfc4514_string())
        server_ok = False
        if result.server_certificate is not None:
            try:
                m.verified_chain(result.server_certificate, validated, [match], purpose="est-tls-server",
                                 what="TLS server certificate")
                server_ok = True
            except ProtectionError:
                pass
        self._anchors = (match,)
        self._cacerts = tuple(validated)
        return dataclasses.replace(result, accepted=match, validated=tuple(validated), server_trusted=server_ok)

    async def ca_certs(self, auth: ClientAuth | None = None) -> CaCertsResult:
        """GET /cacerts over TLS authenticated by the EST trust anchor (RFC 7030 §4.1).

        Raises:
            EnrollError: see ``EnrollmentClient``; ProtectionError for TLS trust failures.
        """
        boot_used = not self._anchors and not self._system_trust and self.options.ca_fingerprint
        if boot_used:
            boot = await self.bootstrap_cacerts()
            certs = boot.validated
        else:
            await self._ensure_anchors()
            resp = await self._exchange("cacerts", "GET", auth=auth, use_cert=auth is not None and
                                        auth.certificate is not None, accept=m.CT_PKCS7)
            certs = m.parse_certs_body(resp.body, resp.headers.get("content-type"), f"GET {resp.url}")
        self._cacerts = tuple(certs)
        links = m.rollover_links(certs, self._anchors)
        return CaCertsResult(tuple(certs), new_root=links.new_root, new_with_old=links.new_with_old,
                             old_with_new=links.old_with_new,
                             server_time=None if boot_used else m.http_date(resp.headers.get("date")))

    # ---- /csrattrs -------------------------------------------------------------------------------
    async def csrattrs(self, auth: ClientAuth | None = None) -> m.CsrAttrs:
        """GET /csrattrs and parse it (RFC 7030 §4.5). 204/404 mean "no attributes".

        Raises:
            EnrollError: transport, TLS, HTTP or encoding errors.
        """
        await self._ensure_anchors()
        try:
            resp = await self._exchange("csrattrs", "GET", auth=auth,
                                        use_cert=auth is not None and auth.certificate is not None,
                                        accept=m.CT_CSRATTRS)
        except ServerError as e:
            if e.status == 404:
                return m.CsrAttrs()
            raise
        if resp.status == 204:
            return m.CsrAttrs()
        mtype, _ = m.media_type(resp.headers.get("content-type"))
        if mtype == "text/html":
            raise ProtocolError(f"GET {resp.url}: got an HTML page instead of application/csrattrs: "
                                f"{m.server_text(resp.body, mtype)!r}")
        attrs = m.parse_csrattrs(resp.body, f"GET {resp.url}")
        self._challenge_requested = attrs.challenge_password
        return attrs

    # ---- enrollment --------------------------------------------------------------------------------
    async def enroll(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        """/simpleenroll (or /serverkeygen when ``request.server_keygen``), authenticated by Basic and/or the
        TLS client certificate in ``auth`` (IDevID for zero-touch)."""
        if request.server_keygen:
            return await self._serverkeygen(request, auth)
        return await self._enroll("simpleenroll", request, auth, use_cert=auth.certificate is not None)

    async def request(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        """/simpleenroll authenticated by an existing certificate (``auth.certificate``, the LDevID)."""
        if auth.certificate is None:
            raise EnrollError("EST request() authenticates with an existing certificate (ClientAuth.certificate); "
                              "use enroll() for an initial enrollment")
        if request.server_keygen:
            return await self._serverkeygen(request, auth)
        return await self._enroll("simpleenroll", request, auth, use_cert=True)

    async def renew(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        """/simplereenroll with ``auth.certificate`` (the credential being renewed) as TLS client certificate.

        Raises:
            EnrollError: no current certificate, or a CSR whose subject/SAN differ from it (RFC 7030 §4.2.2).
        """
        if auth.certificate is None:
            raise EnrollError("EST re-enrollment needs the current certificate and its key as TLS client credential "
                              "(ClientAuth.certificate + key)")
        csr = self._csr(request)
        if csr.subject != auth.certificate.subject:
            raise EnrollError(f"/simplereenroll: the CSR subject {csr.subject.rfc4514_string()!r} differs from the "
                              f"certificate being renewed {auth.certificate.subject.rfc4514_string()!r} "
                              "(RFC 7030 §4.2.2 requires them identical)")
        if _sans(csr) != _sans(auth.certificate):
            raise EnrollError("/simplereenroll: the CSR subjectAltName differs from the certificate being renewed "
                              "(RFC 7030 §4.2.2 requires them identical)")
        return await self._enroll("simplereenroll", request, auth, use_cert=True, csr=csr)

    async def revoke(self, certificate: x509.Certificate, auth: ClientAuth, reason: str) -> None:
        raise UnsupportedError("EST has no revocation; use CMP rr or your CA's interface")

    @staticmethod
    def _csr(request: CertRequest) -> x509.CertificateSigningRequest:
        csr = request.csr
        if csr is None:
            raise EnrollError("EST needs a PKCS#10 CSR (CertRequest.csr, built by the keystore)")
        if not isinstance(csr, x509.CertificateSigningRequest):
            raise TypeError("CertRequest.csr must be a cryptography CertificateSigningRequest")
        if request.private_key is not None and m._spki(request.private_key) != m._spki(csr):
            raise EnrollError("CertRequest.csr is not signed for CertRequest.private_key")
        return csr

    async def _enroll(self, op: str, request: CertRequest, auth: ClientAuth, *, use_cert: bool,
                      csr: x509.CertificateSigningRequest | None = None) -> EnrollResult:
        csr = csr or self._csr(request)
        await self._ensure_anchors()
        bind, bound = None, {}
        if self._binding():
            if request.csr_builder is None:
                raise EnrollError("binding the CSR to the TLS session (tls-unique, RFC 7030 §3.5) needs "
                                  "CertRequest.csr_builder (a CSR built by the keystore for a given challengePassword)")
            bind, bound = self._binder(request, request.csr_builder)
        resp = await self._exchange(op, "POST", m.encode_csr(csr), m.CT_PKCS10, auth=auth, use_cert=use_cert,
                                    accept=m.CT_PKCS7, profile=request.profile, bind=bind)
        csr = bound.get("csr", csr)
        what = f"POST {resp.url}"
        certs = m.parse_certs_body(resp.body, resp.headers.get("content-type"), what)
        ee, rest = m.split_issued(certs, csr.public_key(), what)
        chain = await self._verify_issued(ee, rest, auth, what)
        return EnrollResult(ee, chain, ca_certs=self._cacerts or (), server_time=m.http_date(resp.headers.get("date")),
                            info={"protocol": "est", "operation": op, "url": resp.url,
                                  "basic_auth_used": auth.username is not None,
                                  "tls_client_cert": use_cert, "tls_unique_bound": bind is not None})

    @property
    def binds_to_session(self) -> bool:
        """Whether POSTs now carry the RFC 7030 §3.5 tls-unique binding (see ``extra["tls_unique"]``)."""
        return self._binding()

    def _binding(self) -> bool:
        """Bind POSTs to the TLS session: ``tls_unique`` on, or ``auto`` after /csrattrs asked for a
        challengePassword."""
        return self._tls_unique == "on" or (self._tls_unique == "auto" and self._challenge_requested)

    @staticmethod
    def _binder(request: CertRequest, build):
        """(make_body for ``_exchange``, a dict that receives the CSR it built) when ``request`` asks for the RFC
        7030 §3.5 binding, else (None, {}). The challengePassword is the base64 of the session's tls-unique."""
        if request.csr_builder is None:
            return None, {}
        bound: dict = {}

        def make_body(tls_unique: bytes) -> bytes:
            # Signed here, inside the TLS session (a TPM/PKCS#11 key blocks for its one signature).
            csr = build(challenge_password=base64.b64encode(tls_unique))
            if request.private_key is not None and m._spki(request.private_key) != m._spki(csr):
                raise EnrollError("CertRequest.csr_builder built a CSR for another key than CertRequest.private_key")
            bound["csr"] = csr
            return m.encode_csr(csr)

        return make_body, bound

    async def _serverkeygen(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        csr = request.csr or _throwaway_csr(request)
        await self._ensure_anchors()
        bind = None
        if self._binding():
            builder = request.csr_builder or (lambda challenge_password: _throwaway_csr(request, challenge_password))
            bind, _ = self._binder(dataclasses.replace(request, private_key=None, csr_builder=builder), builder)
        resp = await self._exchange("serverkeygen", "POST", m.encode_csr(csr), m.CT_PKCS10, auth=auth,
                                    use_cert=auth.certificate is not None,
                                    accept=f"{m.CT_MULTIPART}", profile=request.profile, bind=bind)
        what = f"POST {resp.url}"
        skg = m.parse_serverkeygen(resp.headers.get("content-type") or "", resp.body, what)
        ee, rest = m.split_issued(skg.certificates, skg.private_key.public_key(), what)
        chain = await self._verify_issued(ee, rest, auth, what)
        audit.warning("EST serverkeygen: private key generated by the server %s for %s (serial %x, %s); "
                      "the key was transported over TLS and must be stored as a software key",
                      resp.url, ee.subject.rfc4514_string(), ee.serial_number, m.fingerprint(ee))
        return EnrollResult(ee, chain, ca_certs=self._cacerts or (), private_key=skg.private_key,
                            server_time=m.http_date(resp.headers.get("date")),
                            info={"protocol": "est", "operation": "serverkeygen", "url": resp.url,
                                  "server_generated_key": True, "basic_auth_used": auth.username is not None,
                                  "tls_client_cert": auth.certificate is not None})

    async def _verify_issued(self, ee: x509.Certificate, rest, auth: ClientAuth, what: str
                             ) -> tuple[x509.Certificate, ...]:
        anchors = tuple(self._anchors) + self._ca_anchors
        try:
            return m.verified_chain(ee, tuple(rest) + (self._cacerts or ()), anchors + self._implicit(), what=what)
        except ProtectionError:
            if self._cacerts is not None:
                raise
        # The issuing CA is usually not in the response (RFC 7030 §4.2.3): fetch /cacerts once.
        await self.ca_certs()
        return m.verified_chain(ee, tuple(rest) + (self._cacerts or ()), anchors + self._implicit(), what=what)

    def _implicit(self) -> tuple[x509.Certificate, ...]:
        # Roots from /cacerts received over TLS authenticated by the explicit TA (RFC 7030 §4.1.3 implicit TA).
        have = set(self._anchors) | set(self._ca_anchors)
        return tuple(c for c in (self._cacerts or ()) if c not in have and m.self_signed(c))


def _sans(obj) -> list:
    try:
        return sorted(str(g) for g in obj.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _throwaway_csr(request: CertRequest, challenge_password: bytes | None = None) -> x509.CertificateSigningRequest:
    """/serverkeygen still carries a CSR (RFC 7030 §4.4.1) for subject and extensions; its key is a throwaway
    whose type tells the server which key type to generate. It is never stored or used again."""
    kt = request.key_type or "p256"
    if kt.startswith("rsa"):
        key = rsa.generate_private_key(65537, int(kt[3:] or 2048))
    else:
        curve = {"p256": ec.SECP256R1, "p384": ec.SECP384R1, "p521": ec.SECP521R1}.get(kt)
        if curve is None:
            raise EnrollError(f"/serverkeygen: unsupported key type {kt!r} (p256, p384, p521, rsaNNNN)")
        key = ec.generate_private_key(curve())
    b = x509.CertificateSigningRequestBuilder().subject_name(request.subject)
    if request.sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(request.sans)), critical=False)
    for e in request.extensions:
        b = b.add_extension(e.value, critical=e.critical)
    if challenge_password is not None:
        b = b.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge_password)
    return b.sign(key, hashes.SHA256())
