"""EST transport: one HTTPS request over httpx with a TLS context built from explicit trust anchors.

Invariants:
- The server is authenticated against the EST trust anchors given by the caller and the host name in the URL;
  the system trust store is used only when explicitly asked (``system_trust``). TLS 1.2 is the minimum.
- Unverified TLS exists only for the RFC 7030 §4.1.1 bootstrap of /cacerts, and then no credential is sent.
- A client certificate's key reaches OpenSSL only as a file: a copy of the keystore's encrypted PEM (``key_file``,
  read once by descriptor, so a concurrent renewal replacing the keystore's file cannot break the handshake), or a
  software key written encrypted under a random one-time passphrase to a 0600 file in a 0700 temp directory that
  is removed as soon as OpenSSL has read it.
- Every foreign exception is wrapped once, here: ``TransportError`` (retryable: connect, reset, timeout, a
  connection closed without an alert, in the handshake too: with a client certificate presented its text says
  the server may have refused it, as a TLS 1.2 server refusing it without its alert looks) or
  ``ProtectionError`` (TLS: the server's certificate does not verify, an alert, an answer that is not TLS), as
  ``enroll_clients.cmp.transport`` sorts them.
- A request that presented a TLS client certificate and met an early close (EOF or reset before any answer, as
  a TLS 1.3 server that refuses the certificate and loses its alert) gets one refusal probe
  (``enroll_clients.tls_probe``): the server's alert -> its ``ProtectionError``; closed again -> a
  ``TransportError`` with ``refused = True`` (final: not worth a retry); accepted (it waits for a request) -> the
  drop's ``TransportError`` with ``refusal_probed = True``, and a retry with ``TlsConfig.refusal_probe`` off is
  not probed again. With no client certificate presented, an early close is probed too, for TLS 1.3's
  certificate_required alert (116) that a server requiring one sends after our request was written and can lose
  with it: the alert read -> its ``ProtectionError`` (it requires a TLS client certificate and this request sent
  none); anything else -> the close's ``TransportError`` with ``refusal_probed = True``. Only a connection's first
  request is probed: ``request`` opens one connection per request, and ``bound_request``'s second request, on the
  connection that answered its first, is not (its close is the close's ``TransportError``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import socket
import ssl
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_clients import tls_probe
from enroll_clients.base import EnrollError, ProtectionError, TransportError
from enroll_clients.tls import (
    client_certificate_refusal,
    handshake_close_hint,
    handshake_failure_causes,
    load_client_credential,
    not_tls,
    server_certificate_failure,
    validity_error,
)

MAX_RESPONSE_BYTES = 4 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class HttpResponse:
    """One HTTP response of the EST transport: status, headers, body and the server's certificate."""

    status: int
    reason: str
    headers: dict  # lower-case names
    body: bytes
    url: str
    peer_certificate: x509.Certificate | None = None


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """What the TLS layer needs for one request."""

    trust_anchors: tuple[x509.Certificate, ...] = ()
    verify: bool = True
    system_trust: bool = False
    client_certificate: x509.Certificate | None = None
    client_chain: tuple[x509.Certificate, ...] = ()
    client_key: Any = None
    key_file: str | None = None
    key_password: bytes | None = dataclasses.field(default=None, repr=False)
    refusal_probe: bool = True  # an early close with a client certificate gets one refusal probe (module doc)


class Transport(Protocol):
    async def request(self, method: str, url: str, headers: dict, body: bytes | None, tls: TlsConfig,
                      timeout_s: float, basic: tuple[str, bytes] | None) -> HttpResponse: ...

    # Optional: ``bound_request(method, url, headers, make_body, tls, timeout_s, basic, probe_url)`` for bodies
    # bound to the TLS session (HttpxTransport.bound_request).


def make_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """An SSLContext: TLS ≥ 1.2, server verified against ``tls.trust_anchors`` and host name, client cert loaded.

    Raises:
        EnrollError: no trust anchor (and no bootstrap / system trust), or a client key OpenSSL cannot use.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.verify:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in tls.trust_anchors)
        if pem:
            ctx.load_verify_locations(cadata=pem)
        if tls.system_trust:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if not pem and not tls.system_trust:
            raise EnrollError("no EST trust anchor: give the server's CA certificate (--tls-trust or --trust FILE), "
                              "or bootstrap "
                              "/cacerts with --ca-fingerprint sha256:HEX (RFC 7030 §4.1.1); the system trust "
                              "store is used only when asked for explicitly")
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.client_certificate is not None:
        _load_client_credential(ctx, tls)
    return ctx


def _load_client_credential(ctx: ssl.SSLContext, tls: TlsConfig) -> None:
    load_client_credential(ctx, tls.client_certificate, tls.client_chain, private_key=tls.client_key,
                           key_file=tls.key_file, key_password=tls.key_password)


TIMEOUT_PHASES = {"ConnectTimeout": "connect", "ReadTimeout": "read", "WriteTimeout": "write",
                  "PoolTimeout": "connection pool"}


def _key_name(cert: x509.Certificate | None) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = cert.public_key() if cert is not None else None
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    return type(key).__name__.replace("PublicKey", "").lstrip("_") if key is not None else "none"


def _tls_error(url: str, e: BaseException, timeout_s: float | None = None,
               client_certificate: x509.Certificate | None = None) -> EnrollError:
    text = str(e)
    name = type(e).__name__
    if name in TIMEOUT_PHASES or isinstance(e, TimeoutError):
        # Checked first: under httpx's timeouts lies the SSLWantReadError of an unfinished handshake or read,
        # which is not a TLS failure. A TLS handshake that never completes is a connect timeout.
        phase = TIMEOUT_PHASES.get(name, "read")
        after = f" after {timeout_s:g} s" if timeout_s else ""
        return TransportError(f"{url}: timed out{after} ({phase}): the server accepted no connection or sent no "
                              "answer in time; check that it is up, or raise --timeout")
    chain = e
    while chain is not None and not isinstance(chain, ssl.SSLError):
        chain = chain.__cause__ or chain.__context__
    if isinstance(chain, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        kind, detail = server_certificate_failure(chain if isinstance(chain, ssl.SSLCertVerificationError) else None,
                                                  text)
        if kind == "hostname":
            return ProtectionError(f"TLS to {url}: the server certificate is not valid for this host name "
                                   f"({detail}); check the URL")
        if kind != "untrusted":  # its validity period, checked against the local clock
            return validity_error(f"TLS to {url}", "server's", kind, detail)
        return ProtectionError(f"TLS to {url}: the server certificate is not trusted by the EST trust anchor "
                               f"({detail}); give the CA that issued the server's TLS certificate with --tls-trust "
                               "(--trust when it is the domain's CA), or bootstrap with --ca-fingerprint")
    subject = client_certificate.subject.rfc4514_string() if client_certificate is not None else None
    eof = isinstance(chain, (ssl.SSLEOFError, ssl.SSLZeroReturnError))
    reset = None
    if name == "ConnectError" and chain is None:  # a reset in the handshake (TCP's connect is refused, not reset)
        cause = e
        while cause is not None and not isinstance(cause, (ConnectionResetError, ConnectionAbortedError)):
            cause = cause.__cause__ or cause.__context__
        reset = cause
    if (eof and name not in ("ReadError", "RemoteProtocolError", "WriteError")) or reset is not None:
        # Closed (or reset) in the handshake without an alert: no proof of a refusal or of a server that failed to
        # authenticate, a transport failure (exit 6), as over CMP; read/write failures are named below.
        how = (f"closed the connection in the TLS handshake, without an alert ({chain.reason or chain})" if eof else
               f"ended the connection in the TLS handshake with a reset, without an alert ({type(reset).__name__}: "
               f"{reset})")
        return TransportError(f"{url}: the server {how}; {handshake_close_hint(subject)}")
    if isinstance(chain, ssl.SSLError) and not eof:
        if "ALERT_HANDSHAKE_FAILURE" in text:  # alert 40: no client certificate, or no shared version/cipher suite
            return ProtectionError(f"TLS to {url}: the server ended the TLS handshake with "
                                   f"{handshake_failure_causes(chain, subject)}")
        if "CERTIFICATE_REQUIRED" in text and subject is None:  # TLS 1.3's alert 116: it says what it wants
            return ProtectionError(f"TLS to {url}: the server requires a TLS client certificate, and this request "
                                   f"sent none ({chain.reason})")
        if any(a in text for a in ("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "CERTIFICATE_REQUIRED",
                                   "ALERT_CERTIFICATE_REVOKED", "ALERT_CERTIFICATE_EXPIRED")):
            return ProtectionError(f"TLS to {url}: the server "
                                   f"{client_certificate_refusal(subject, chain.reason or str(chain))}")
        if "ILLEGAL_PARAMETER" in text and client_certificate is not None:
            return ProtectionError(
                f"TLS to {url}: the server ended the handshake with alert 47 (illegal parameter) after our TLS client "
                f"certificate ({_key_name(client_certificate)} key): it does not accept that key type or curve "
                "(libest offers only the P-256 curve); a credential that must authenticate to this server needs a "
                f"key it supports ({chain.reason})")
        if not_tls(chain):
            return ProtectionError(f"TLS to {url} failed: {chain}: the server did not answer in TLS; is it a plain "
                                   "HTTP endpoint (http://)?")
        return ProtectionError(f"TLS to {url} failed: {chain}")
    if name in ("ReadError", "RemoteProtocolError"):
        return TransportError(f"{url}: the connection broke while reading the response "
                              f"({name}: {text or 'reset by peer'}); retry later")
    if name == "ConnectError":
        cause = e.__cause__ or e.__context__
        while not text and cause is not None:  # anyio's error over a reset: the reset's words, not "refused"
            text = str(cause) and f"{type(cause).__name__}: {cause}"
            cause = cause.__cause__ or cause.__context__
        return TransportError(f"{url}: cannot connect ({text or 'refused'}); is the EST server running?")
    return TransportError(f"{url}: {name}: {text or 'connection failed'}")


@contextlib.contextmanager
def _transport_errors(method: str, url: str, timeout_s: float, tls: TlsConfig):
    """httpx / TLS / socket failures of one exchange -> the EnrollError that names them (``_tls_error``)."""
    import httpx

    try:
        yield
    except EnrollError:
        raise
    except (httpx.HTTPError, ssl.SSLError, OSError) as e:
        raise _tls_error(f"{method} {url}", e, timeout_s, tls.client_certificate) from e


class HttpxTransport:
    """The production transport: httpx over TLS, one connection per request (EST exchanges are rare)."""

    async def request(self, method: str, url: str, headers: dict, body: bytes | None, tls: TlsConfig,
                      timeout_s: float, basic: tuple[str, bytes] | None) -> HttpResponse:
        import httpx

        ctx = make_ssl_context(tls)
        with _transport_errors(method, url, timeout_s, tls):
            async with httpx.AsyncClient(verify=ctx, timeout=timeout_s, follow_redirects=False,
                                         trust_env=False, http2=False) as client:
                resp, _ = await _send(client, method, url, headers, body, tls, timeout_s, basic, ctx)
                return resp

    async def bound_request(self, method: str, url: str, headers: dict, make_body, tls: TlsConfig, timeout_s: float,
                            basic: tuple[str, bytes] | None, probe_url: str) -> HttpResponse:
        """A request whose body is bound to its TLS session (RFC 7030 §3.5 proof-of-possession linking).

        On one TLS 1.2 connection (tls-unique does not exist in TLS 1.3): an anonymous GET ``probe_url`` completes
        the handshake, ``make_body(tls_unique)`` builds the body from that connection's tls-unique value (the
        first Finished message, RFC 5929), and the request goes over the same connection.

        Raises:
            ProtocolError: the server closed the connection after the probe, so the body cannot be bound to it.
        """
        import httpx

        from enroll_clients.base import ProtocolError

        ctx = make_ssl_context(tls)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with _transport_errors(method, url, timeout_s, tls):
            async with httpx.AsyncClient(verify=ctx, timeout=timeout_s, follow_redirects=False,
                                         trust_env=False, http2=False) as client:
                _, stream = await _send(client, "GET", probe_url, {"Accept": "*/*", "User-Agent":
                                        headers.get("User-Agent", "devagent-est/1")}, None, tls, timeout_s, None,
                                        ctx)
                sslobj = stream.get_extra_info("ssl_object") if stream is not None else None
                tls_unique = sslobj.get_channel_binding("tls-unique") if sslobj is not None else None
                if not tls_unique:
                    raise ProtocolError(f"{method} {url}: the TLS session has no tls-unique value (TLS "
                                        f"{sslobj.version() if sslobj else '?'}); the CSR cannot be bound to it")
                resp, stream2 = await _send(client, method, url, headers, make_body(tls_unique), tls, timeout_s,
                                            basic, ctx, kept=True)
                if stream2 is not stream:
                    raise ProtocolError(f"{method} {url}: the server closed the TLS connection after GET {probe_url}, "
                                        "so the request went over a new session and its binding (tls-unique) "
                                        "cannot match; the server must keep the connection open (HTTP keep-alive)")
                return resp


async def _send(client, method: str, url: str, headers: dict, body: bytes | None, tls: TlsConfig, timeout_s: float,
                basic: tuple[str, bytes] | None, ctx: ssl.SSLContext, kept: bool = False):
    """One request on ``client``: (HttpResponse with the body read and bounded, the connection's network stream).

    ``ctx``: the client's TLS context, for the refusal probe after an early close (module doc); every failure of
    a request ends it, so a request is probed at most once. ``kept``: the request is meant for a kept connection
    that answered one already (``bound_request``'s second): its early close is not probed, since a refusal can
    only end a connection's first request."""
    import httpx

    auth = httpx.BasicAuth(basic[0], basic[1]) if basic else None
    req = client.build_request(method, url, headers=headers, content=body)
    try:
        resp = await client.send(req, auth=auth, stream=True)
    except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as e:
        what = f"{method} {url}"
        err = _tls_error(what, e, timeout_s, tls.client_certificate)
        if isinstance(err, ProtectionError):
            raise err from e
        if kept:  # a kept connection's close is no refusal (that ends a connection's first request): not probed
            raise err from e
        if tls.client_certificate is None:
            # A TLS 1.3 server requiring a client certificate sends certificate_required (116) after our request
            # was written, and its close of our unread request can lose the alert (a reset): one probe reads it.
            # Only an alert counts (a silent close blames nothing); a drop stays the drop, probed once.
            if tls.refusal_probe and _closed_early(e):
                alert = await tls_probe.in_daemon_thread(_probe, url, ctx, timeout_s, name="devagent-est-probe")
                if isinstance(alert, ssl.SSLError):
                    raise _tls_error(what, alert, timeout_s, None) from e
                err.refusal_probed = True
            raise err from e
        if not _closed_early(e):
            if isinstance(e, httpx.WriteError):
                raise err from e
            # TLS 1.3 rejects a client certificate after the client's handshake finished: the
            # alert may arrive as a plain reset before any response.
            raise TransportError(f"{err}; the connection closed before any response, which is how a "
                                 "server rejects a TLS client certificate under TLS 1.3 — check that "
                                 "the certificate is issued by a CA the server trusts") from e
        if not tls.refusal_probe:  # a retry of an exchange whose probe found the certificate accepted
            drop = TransportError(f"{err}; the server closed the connection before any response, and it accepted "
                                  "our TLS client certificate earlier in this exchange (the refusal probe), so the "
                                  "connection was dropped")
            drop.refusal_probed = True
            raise drop from e
        refusal = await tls_probe.in_daemon_thread(_probe, url, ctx, timeout_s, name="devagent-est-probe")
        if isinstance(refusal, str):
            subject = tls.client_certificate.subject.rfc4514_string()
            final = TransportError(tls_probe.refusal_message(what, "EST", subject, e, refusal))
            final.refused = True
            raise final from e
        if refusal is not None:  # the probe read the alert the request's connection lost
            raise _tls_error(what, refusal, timeout_s, tls.client_certificate) from e
        drop = TransportError(f"{err}; the server closed the connection before any response, and a new connection "
                              "with the same TLS client certificate was not refused (the refusal probe), so the "
                              "connection was dropped")
        drop.refusal_probed = True
        raise drop from e
    try:
        peer = None
        stream = resp.extensions.get("network_stream")
        sslobj = stream.get_extra_info("ssl_object") if stream is not None else None
        if sslobj is not None:
            der = sslobj.getpeercert(binary_form=True)
            peer = x509.load_der_x509_certificate(der) if der else None
        chunks, size = [], 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise TransportError(f"{method} {url}: response larger than {MAX_RESPONSE_BYTES} bytes")
            chunks.append(chunk)
    finally:
        await resp.aclose()
    return (HttpResponse(resp.status_code, resp.reason_phrase, {k.lower(): v for k, v in resp.headers.items()},
                         b"".join(chunks), url, peer), stream)


def _closed_early(e: BaseException) -> bool:
    """Did the server end the connection before any answer (``tls_probe.closed_early`` somewhere in the chain
    of httpx's error, httpcore's EOF before the response, or anyio's ``BrokenResourceError``)?

    A server that refuses our certificate under TLS 1.3 and closes while we still send the request resets the
    connection: the write fails (anyio: ``BrokenResourceError`` from the reset), httpcore drops that ``WriteError``
    to read a response anyway, and the read meets the stream anyio has marked broken: a bare
    ``BrokenResourceError`` whose cause, the reset, is gone. It is raised only for a stream that ended (EOF, reset,
    a failed send); a TLS alert read is an ``ssl.SSLError`` instead (``_tls_error``)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        if tls_probe.closed_early(e) or name == "BrokenResourceError" or (
                name == "RemoteProtocolError" and "disconnected without sending a response" in str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


class _ProbeConnection:
    """The refusal probe's connection (``tls_probe.probe``): TCP to the URL's host, the TLS handshake with the
    request's context (server verified by name, our client certificate), no proxy (the transport uses none)."""

    def __init__(self, url: str, ctx: ssl.SSLContext, timeout_s: float):
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 443
        self.ctx, self.timeout_s = ctx, timeout_s
        self.sock = None

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        try:
            self.sock = self.ctx.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def _probe(url: str, ctx: ssl.SSLContext, timeout_s: float):
    """The refusal probe for ``url``, blocking (run in a thread): ``tls_probe.probe``'s answer."""
    return tls_probe.probe(_ProbeConnection(url, ctx, timeout_s), min(tls_probe.REFUSAL_PROBE_S, timeout_s))
