"""CMP transports behind one small interface: ``await transport.exchange(request_der) -> response_der``.

- ``HttpTransport``: RFC 6712 HTTP POST of ``application/pkixcmp`` (stdlib ``http.client``), with a
  timeout per message and retries on transport errors only (connect/read failures, timeouts); an HTTP error
  status, a wrong Content-Type or an empty body is a ``ServerError``/``ProtocolError`` and is never retried,
  except that an HTTP error carrying an ``application/pkixcmp`` body is returned as the CMP answer (a CMP error
  message; the client checks it like any response). One connection per message unless ``keep_alive=True``.
  With ``operation_labels`` the URL is a base and each message goes to ``<base>/<operation label>``
  (RFC 9483 6.1); ``path_profile`` inserts a certificate profile segment before the label.
- ``FileTransport``: writes each request to a file and waits for the response file (air-gapped, serial or
  USB-stick onboarding, and OpenSSL's socket-less mock server). Requests are written atomically.
- ``CallableTransport``: an in-memory peer (``fn(bytes) -> bytes``, sync or async) for simulators and tests.

Transports move bytes only; they never interpret CMP content (that is ``messages``' job).
"""
from __future__ import annotations

import abc
import asyncio
import inspect
import os
import socket
import threading

from enroll_clients import tls_probe
from enroll_clients.base import EnrollError, ProtectionError, ProtocolError, ServerError, TransportError

CONTENT_TYPE = "application/pkixcmp"
USER_AGENT = "devagent-cmp/1"
RETRY_BASE_S = 0.5
MAX_RESPONSE_BYTES = 1 << 20  # a CMP response larger than 1 MiB is not something a device should parse
FILE_POLL_S = 0.05


class Transport(abc.ABC):
    """Moves one CMP request to the server and returns its response bytes."""

    @abc.abstractmethod
    async def exchange(self, request: bytes, *, operation: str | None = None) -> bytes:
        """Send ``request`` (DER PKIMessage), return the response DER. Raises TransportError/ServerError.

        ``operation``: the RFC 9483 6.1 operation label of the message's transaction ("initialization",
        "certification", "keyupdate", "p10", "revocation", "getcacerts", "getrootupdate",
        "getcertreqtemplate"); transports that route by URL use it, others ignore it."""

    async def aclose(self) -> None:  # noqa: B027 -- optional hook, most transports hold nothing
        """Release connections/files. Idempotent."""

    def describe(self) -> str:
        return type(self).__name__


OPERATION_LABELS = ("initialization", "certification", "keyupdate", "p10", "revocation", "getcacerts",
                    "getrootupdate", "getcertreqtemplate", "getcrls", "nested")


class HttpTransport(Transport):
    """RFC 6712 over HTTP(S). ``url`` is the full CMP endpoint, e.g. ``http://ca:8080/pkix/``, or with
    ``operation_labels`` the base the RFC 9483 6.1 labels are appended to
    (``https://ca/.well-known/cmp/p/plant`` -> ``.../p/plant/initialization``). ``path_profile`` (a
    certificate profile name) is inserted as a path segment before the label (``.../p/plant/<profile>/...``),
    for servers that read the profile from the path.

    On the standard library's ``http.client`` (one POST per message needs no more; httpx + anyio cost
    ~60-80 ms of start-up, most of a short ``devagent enroll``): the blocking round trip runs in a daemon
    thread, so a cancelled exchange returns at once (its socket is shut down) and never holds up the event
    loop's shutdown. ``timeout_s`` bounds the connect and each read/write. Redirects are not followed (a 3xx
    is a ``ServerError``). ``verify``: True = the system trust store (OpenSSL's default paths, which honour
    ``SSL_CERT_FILE``/``SSL_CERT_DIR``), False = no verification, a CA file or directory path, a sequence of
    ``x509.Certificate`` (the TLS trust anchors, e.g. the domain's ``tls`` store: ``--tls-trust``), or an
    ``ssl.SSLContext``. A server certificate that does not verify (not trusted, not for the URL's host, expired
    or not yet valid) is a final ``ProtectionError`` naming why (the server failed to authenticate: exit 5, as
    EST's), never retried; so is an answer that is not TLS (a plain HTTP server at an ``https://`` URL).
    ``trust_source`` names where the trust comes from in the error of an untrusted server certificate (default:
    described from ``verify``). ``use_client_credential(auth)`` presents a
    certificate as the TLS client certificate (``--tls-client-auth``, RFC 9483 6.1: TLS besides the CMP message
    protection). A server's TLS alert (it refused our client certificate, or wants one) is a final
    ``ProtectionError`` naming it (an authentication refusal, as EST's: exit 5), never retried. Under TLS 1.3 the
    server judges our certificate after our side of the handshake is done, and one that closes at once can lose
    its alert: the request then meets a closed or reset connection. When that happens with a client certificate
    presented, one refusal probe (``_probe``) tells a refusal from a drop: a new connection, the handshake, and no
    request; a server that accepted the certificate waits for the request, one that refuses it sends its alert or
    closes. A refusal is final: the alert's ``ProtectionError``, or a ``TransportError`` naming the likely cause
    when it closes again without an alert (a silent close proves no refusal: a transport failure, exit 6); a drop
    is retried as before. With no client certificate presented, such a close is probed too, for TLS 1.3's
    certificate_required alert (116) that a server requiring one sends after our request was written and can
    lose with it: the alert read is final (it requires a TLS client certificate and we sent none); a silent close
    or a waiting server is a drop, retried. The close of a kept connection (``keep_alive``: one that served a
    request already, which a server may close while we are idle) is never probed: a refusal can only end a
    connection's first request; it is retried on a new connection as a drop. Under TLS 1.2 a refusal without its
    alert is a close in the handshake, which the probe cannot tell from a drop: retried, and when the last attempt
    closed in the handshake in which we presented a certificate, the final error says the server may have refused
    it (``enroll_clients.tls.handshake_close_hint``); with none presented, to retry later and then check that the
    URL's port is the server's TLS port (as over EST). An HTTP proxy from ``http_proxy``/``https_proxy``/
    ``all_proxy`` is used unless ``no_proxy`` names the host (as curl and httpx do; https goes through a CONNECT
    tunnel)."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, retries: int = 2, verify=True,
                 retry_base_s: float = RETRY_BASE_S, headers: dict | None = None, keep_alive: bool = False,
                 operation_labels: bool = False, path_profile: str | None = None, trust_source: str | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"CMP URL must start with http:// or https://: {url!r}")
        if timeout_s <= 0 or retries < 0:
            raise ValueError("timeout_s must be > 0 and retries >= 0")
        if path_profile is not None and (not path_profile or "/" in path_profile or path_profile in (".", "..")):
            raise ValueError(f"certificate profile {path_profile!r} cannot be a URL path segment")
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"CMP URL has no host: {url!r}")
        try:
            _ = parts.port  # a port that is not a number is refused here, not on the first message
        except ValueError as e:
            raise ValueError(f"CMP URL {url!r}: {e}") from None
        self.url = url
        self.operation_labels = operation_labels
        self.path_profile = path_profile
        self._last_url = url
        self.timeout_s = timeout_s
        self.retries = retries
        if isinstance(verify, (list, tuple)):
            verify = tuple(verify)
            if not verify:
                raise ValueError("TLS trust anchors: the sequence is empty (give at least one CA certificate, or "
                                 "verify=True for the system trust store)")
        self.verify = verify
        self.trust_source = trust_source
        self.retry_base_s = retry_base_s
        self.keep_alive = keep_alive
        self.headers = {"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE, "Cache-Control": "no-cache",
                        "User-Agent": USER_AGENT, **(headers or {})}
        if not keep_alive:
            # One connection per message by default: OpenSSL 3.0's CMP server loses the transaction when the
            # certConf arrives on an HTTP/1.1 persistent connection ("unexpected pkibody"); seen in
            # tests/interop. A CMP message is self-contained, so nothing is lost but a TCP handshake.
            self.headers.setdefault("Connection", "close")
        self._ssl = None  # the TLS context, built on the first https request (loading CAs costs 20-80 ms)
        self._client_auth = None  # ClientAuth whose certificate is our TLS client certificate
        self._client_id = None
        self._conn = None  # (key, http.client connection) kept between messages with keep_alive
        self._lock = None

    def describe(self) -> str:
        return self._last_url

    def url_for(self, operation: str | None) -> str:
        """The URL a message of transaction ``operation`` is posted to."""
        if not self.operation_labels and self.path_profile is None:
            return self.url
        from urllib.parse import quote

        parts = [self.url.rstrip("/")]
        if self.path_profile is not None:
            parts.append(quote(self.path_profile, safe=""))
        if self.operation_labels:
            if operation not in OPERATION_LABELS:
                raise ValueError(f"no RFC 9483 operation label for this message ({operation!r})")
            parts.append(operation)
        return "/".join(parts)

    async def exchange(self, request: bytes, *, operation: str | None = None) -> bytes:
        import http.client
        import ssl  # http.client has loaded it already

        url = self._last_url = self.url_for(operation)
        if self._lock is None:
            self._lock = asyncio.Lock()
        last = None
        probed = False
        closed_in_handshake = False  # the last attempt's connection closed (or reset) in the TLS handshake
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.retry_base_s * (2 ** (attempt - 1)))
            closed_in_handshake = False
            try:
                if self.keep_alive:  # one kept connection: one message at a time on it
                    async with self._lock:
                        status, reason, ctype, body = await self._post(url, request)
                else:
                    status, reason, ctype, body = await self._post(url, request)
            except TimeoutError as e:
                last = TransportError(f"POST {url}: no response within {self.timeout_s:g} s "
                                      f"({type(e).__name__}); attempt {attempt + 1} of {self.retries + 1}")
                continue
            except ssl.SSLCertVerificationError as e:  # the same certificate next time: retrying cannot help
                raise self._server_certificate_error(url, e) from None
            except ssl.SSLError as e:
                if "ALERT" in (e.reason or ""):
                    raise self._alert_error(url, e) from None
                from enroll_clients.tls import not_tls  # failure paths only: not on an enroll's start-up

                if not_tls(e):  # the same answer next time
                    raise ProtectionError(f"POST {url}: {type(e).__name__}: {e}: the server did not answer in TLS; "
                                          "is it a plain HTTP endpoint (http://)?") from None
                last = TransportError(f"POST {url}: {type(e).__name__}: {e}; attempt {attempt + 1} of "
                                      f"{self.retries + 1}")  # EOF/reset in the middle of TLS: a dropped connection
                error, closed_in_handshake, kept = _drop_facts(e)
            except (OSError, http.client.HTTPException) as e:
                last = TransportError(f"POST {url}: {type(e).__name__}: {e or 'connection failed'}; "
                                      f"attempt {attempt + 1} of {self.retries + 1}")
                error, closed_in_handshake, kept = _drop_facts(e)
            else:
                return self._check(status, reason, ctype, body, url, operation)
            # With no client certificate, a close after the handshake is probed too: a TLS 1.3 server requiring one
            # sends certificate_required (116) after our request was written, and its close of our unread request
            # can lose the alert; the probe reads it. Only an alert counts then (a silent close blames nothing).
            # Never for the close of a kept connection (keep_alive): it passed its handshake and served a request,
            # and a refusal ends a connection's first request; the server closed it while idle: retried as is.
            anonymous = self._client_auth is None
            if (not probed and not kept and url.startswith("https:") and tls_probe.closed_early(error)
                    and not (anonymous and closed_in_handshake)):
                probed = True  # once per message: a server that accepted the certificate then is not asked again
                refusal = await tls_probe.in_daemon_thread(self._probe, url, name="devagent-cmp-probe")
                if refusal is not None and not (anonymous and isinstance(refusal, str)):
                    raise self._refusal_error(url, error, refusal) from None
        if closed_in_handshake:  # still a transport failure: a close proves nothing (as over EST)
            from enroll_clients.tls import handshake_close_hint

            a = self._client_auth
            subject = a.certificate.subject.rfc4514_string() if a is not None else None
            last = TransportError(f"{last}: the server closed the connection in the TLS handshake; "
                                  f"{handshake_close_hint(subject)}")
        raise last

    def _probe(self, url: str):
        """The refusal probe (see the class docstring and ``enroll_clients.tls_probe.probe``), blocking."""
        return tls_probe.probe(self._new_connection(url), min(tls_probe.REFUSAL_PROBE_S, self.timeout_s))

    def _refusal_error(self, url: str, error: BaseException, refusal) -> EnrollError:
        if not isinstance(refusal, str):  # the probe read the alert the first connection lost
            return self._alert_error(url, refusal)
        subject = self._client_auth.certificate.subject.rfc4514_string()
        return TransportError(tls_probe.refusal_message(f"POST {url}", "CMP", subject, error, refusal))

    async def _post(self, url: str, request: bytes):
        """One POST in a daemon thread -> (status, reason, content type, body of at most MAX+1 bytes).

        The connection's socket is owned by the worker thread, which closes it; a cancelled exchange only shuts it
        down (so the worker's blocking call returns) and never after the worker closed it: ``gate`` orders the two,
        so a shutdown can never reach a descriptor number the kernel has meanwhile given to another socket or file
        of the process (the DTLS transport's, the event loop's self-pipe, a keystore file)."""
        conn, target, headers = self._connection(url)
        kept = conn.sock is not None  # a kept connection, connected: it has served a request already
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        gate = threading.Lock()
        state = {"closed": False, "finished": False, "cancelled": False}

        def close_conn():
            with gate:
                if state["closed"]:
                    return
                state["closed"] = True
            conn.close()

        def worker():
            try:
                conn.request("POST", target, body=request, headers=headers)
                rsp = conn.getresponse()
                body = rsp.read(MAX_RESPONSE_BYTES + 1)
                outcome, error = (rsp.status, rsp.reason, rsp.getheader("Content-Type", ""), body), None
                if not self.keep_alive or rsp.will_close or len(body) > MAX_RESPONSE_BYTES:
                    close_conn()
            except BaseException as e:  # handed to the awaiting task, which decides
                if isinstance(e, OSError) and _in_tls_handshake(conn):
                    e.in_tls_handshake = True  # before any answer: how a TLS 1.2 refusal without its alert looks
                if kept:
                    e.on_kept_connection = True  # not a refusal: that can only end a connection's first request
                close_conn()
                outcome, error = None, e
            with gate:
                state["finished"] = True
                abandoned = state["cancelled"]
            if abandoned:  # a kept connection the cancelled caller dropped: nobody uses it any more
                close_conn()
            try:
                loop.call_soon_threadsafe(tls_probe.settle, done, outcome, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        threading.Thread(target=worker, name="devagent-cmp-http", daemon=True).start()
        try:
            return await done
        except BaseException:
            self._drop(conn)
            with gate:
                state["cancelled"] = True
                if not state["finished"] and not state["closed"]:
                    # cancelled mid-exchange: make the worker's blocking call return now (the worker closes)
                    _abort(conn)
                idle = state["finished"] and not state["closed"]
            if idle:  # the worker kept it open for keep-alive and is gone: close it here
                close_conn()
            raise

    def _connection(self, url: str):
        """(connection for ``url`` (kept or new), request target (the path, or the URL via a proxy), headers)."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        https = parts.scheme == "https"
        host, port = parts.hostname, parts.port or (443 if https else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        proxy = _proxy_for(parts.scheme, host)
        key = (parts.scheme, host, port, proxy)
        headers = self.headers
        if proxy is not None and not https:  # plain HTTP via a proxy: the absolute URL as the request target
            target = url
            if proxy[2]:
                headers = {**headers, "Proxy-Authorization": proxy[2]}
        if self._conn is not None:
            if self._conn[0] == key:
                return self._conn[1], target, headers
            old, self._conn = self._conn[1], None
            old.close()
        conn = self._new_connection(url)
        if self.keep_alive:
            self._conn = (key, conn)
        return conn, target, headers

    def _new_connection(self, url: str):
        """A new (not yet connected) http.client connection for ``url``: direct, or through the environment's
        proxy (a CONNECT tunnel for https)."""
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        https = parts.scheme == "https"
        host, port = parts.hostname, parts.port or (443 if https else 80)
        proxy = _proxy_for(parts.scheme, host)
        if proxy is None:
            conn = (http.client.HTTPSConnection(host, port, timeout=self.timeout_s, context=self._context())
                    if https else http.client.HTTPConnection(host, port, timeout=self.timeout_s))
        else:
            p_host, p_port, p_auth = proxy
            tunnel_headers = {"Proxy-Authorization": p_auth} if p_auth else None
            if https:  # CONNECT to the server, then TLS to it (server_hostname = the CMP host)
                conn = http.client.HTTPSConnection(p_host, p_port, timeout=self.timeout_s, context=self._context())
                conn.set_tunnel(host, port, headers=tunnel_headers)
            else:
                conn = http.client.HTTPConnection(p_host, p_port, timeout=self.timeout_s)
        conn._create_connection = _create_connection  # http.client's own hook for its socket.create_connection
        return conn

    def _drop(self, conn) -> None:
        if self._conn is not None and self._conn[1] is conn:
            self._conn = None

    def use_client_credential(self, auth) -> None:
        """Present ``auth.certificate`` (+ ``auth.chain``, key ``auth.key_file``/``auth.private_key``) as the TLS
        client certificate from the next connection on; None: none."""
        cid = None
        if auth is not None:
            from cryptography.hazmat.primitives.hashes import SHA256

            cid = (auth.certificate.fingerprint(SHA256()), auth.key_file, id(auth.private_key))
        if cid != self._client_id:
            self._client_auth, self._client_id, self._ssl = auth, cid, None
            if self._conn is not None:  # a kept connection carries the old identity
                conn, self._conn = self._conn[1], None
                conn.close()

    def _context(self):
        if self._ssl is None:
            ctx = _ssl_context(self.verify)
            a = self._client_auth
            if a is not None:
                from enroll_clients.tls import load_client_credential

                load_client_credential(ctx, a.certificate, tuple(a.chain), private_key=a.private_key,
                                       key_file=a.key_file, key_password=a.key_password)
            self._ssl = ctx
        return self._ssl

    def _alert_error(self, url: str, e) -> ProtectionError:
        """A TLS alert from the server: the server refused the connection on authentication grounds, which no
        retry cures (the same credential meets the same refusal next time): final, exit 5 like EST's alert."""
        from enroll_clients.tls import client_certificate_refusal, handshake_failure_causes

        reason = e.reason or str(e)
        a = self._client_auth
        how = ("--tls-client-auth presents the IDevID (enroll --idevid) or the LDevID (request, renew, revoke, "
               "ca-update)")
        if "HANDSHAKE_FAILURE" in reason:  # alert 40: no client certificate, or no shared version/cipher suite
            subject = a.certificate.subject.rfc4514_string() if a is not None else None
            return ProtectionError(f"POST {url}: the CMP server ended the TLS handshake with "
                                   f"{handshake_failure_causes(e, subject)}" + ("" if a is not None else f"; {how}"))
        cert_alert = any(x in reason for x in ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED"))
        if cert_alert and a is not None:
            return ProtectionError(f"POST {url}: the CMP server "
                                   f"{client_certificate_refusal(a.certificate.subject.rfc4514_string(), reason)}")
        if "CERTIFICATE_REQUIRED" in reason:  # TLS 1.3's alert 116: it says what it wants
            return ProtectionError(f"POST {url}: the CMP server ended the TLS handshake ({reason}): it requires a TLS "
                                   f"client certificate and we sent none; {how}")
        if cert_alert:
            return ProtectionError(f"POST {url}: the CMP server ended the TLS handshake ({reason}): it probably "
                                   f"requires a TLS client certificate; {how}")
        return ProtectionError(f"POST {url}: the CMP server ended the TLS handshake with an alert ({reason})")

    def _server_certificate_error(self, url: str, e) -> ProtectionError:
        """The server's TLS certificate did not verify: the server failed to authenticate, which no retry cures
        (the same certificate next time): final, exit 5 like EST's. Named by why: not for the URL's host, outside
        its validity period by this device's clock (``validity`` set, for the daemon's clock hint), or not
        trusted by the TLS trust (where that came from, and what to do)."""
        from enroll_clients.tls import server_certificate_failure, validity_error

        kind, detail = server_certificate_failure(e)
        what = f"POST {url}: {type(e).__name__}: certificate verify failed: {detail}"
        if kind == "hostname":
            return ProtectionError(f"{what}: the CMP server's TLS certificate is not valid for this host name; check "
                                   "the URL")
        if kind != "untrusted":
            return validity_error(f"POST {url}: {type(e).__name__}: certificate verify failed", "CMP server's TLS",
                                  kind, detail)
        source, hint = self._trust_description()
        return ProtectionError(f"{what}: the CMP server's TLS certificate is not trusted by {source}; {hint}")

    def _trust_description(self) -> tuple[str, str]:
        """(where the TLS trust comes from, what to do) for the error of a server certificate that does not
        verify: the option, file or store a user can act on."""
        give = "give the CA that issued the server's TLS certificate with --tls-trust FILE"
        if self.trust_source:
            return self.trust_source, give
        v = self.verify
        if v is True:
            env = [f"{k}={os.environ[k]}" for k in ("SSL_CERT_FILE", "SSL_CERT_DIR") if os.environ.get(k)]
            where = ", ".join(env) if env else "OpenSSL's default paths"
            return (f"the system trust store ({where})",
                    f"{give} (it then replaces the system store), or add that CA to the system store")
        if isinstance(v, (str, os.PathLike)):
            return f"the CA {'directory' if os.path.isdir(v) else 'file'} {os.fspath(v)}", give
        if isinstance(v, tuple):
            return f"the {len(v)} TLS trust anchor(s) given", give
        return "the given ssl.SSLContext", "load the CA that issued the server's TLS certificate into it"

    def _check(self, status: int, reason: str, ctype: str, body: bytes, url: str,
               operation: str | None = None) -> bytes:
        ctype = (ctype or "").split(";")[0].strip().lower()
        if status != 200:
            if ctype == CONTENT_TYPE and body and len(body) <= MAX_RESPONSE_BYTES:
                # A CMP error message with an HTTP error status (RFC 6712 3.3 allows it): the client checks and
                # reports it; that says far more than the status line.
                return body
            snippet = _printable(body[:200]) if ctype.startswith("text/") else f"{len(body)} bytes of {ctype or 'unknown type'}"
            hint = ""
            if status == 404:
                hint = " -- check the CMP path/alias in the URL"
            elif status in (502, 503, 504):
                hint = " -- server temporarily unavailable; retry later"
            elif status >= 500:
                what = f" {operation}" if operation else " this"
                hint = (f" -- the server failed without a CMP answer: it may not implement{what} request "
                        "(a retry will not help; check the server's log or its supported operations"
                        + ("" if self.operation_labels else ", or whether it wants one URL per operation "
                           "(--operation-labels)") + ")")
            if not reason:
                import http

                try:
                    reason = http.HTTPStatus(status).phrase
                except ValueError:
                    reason = ""
            raise ServerError(f"POST {url}: HTTP {status} {reason}: {snippet}{hint}", status=status, text=snippet)
        if ctype != CONTENT_TYPE:
            raise ProtocolError(f"POST {url}: server answered Content-Type {ctype or '(none)'!r}, not "
                                f"{CONTENT_TYPE!r} (RFC 6712); is this a CMP endpoint? First bytes: "
                                f"{_printable(body[:80])!r}")
        if not body:
            raise ProtocolError(f"POST {url}: empty {CONTENT_TYPE} response")
        if len(body) > MAX_RESPONSE_BYTES:
            raise ProtocolError(f"POST {url}: response of more than {MAX_RESPONSE_BYTES} bytes")
        return body

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn[1], None
            conn.close()


def _drop_facts(e: BaseException) -> tuple[BaseException, bool, bool]:
    """What ``HttpTransport.exchange`` keeps of a dropped connection's error ``e`` (an ``ssl.SSLError`` that is no
    alert and not ``not_tls``, or an ``OSError``/``http.client.HTTPException``): ``(error, closed_in_handshake,
    kept)``. ``error`` is ``e``; ``closed_in_handshake``: it closed early (``tls_probe.closed_early``) in the TLS
    handshake (``e.in_tls_handshake``, set by ``_post``); ``kept``: it was a kept connection's (``e.on_kept_connection``,
    set by ``_post``), which is never probed."""
    closed_in_handshake = tls_probe.closed_early(e) and getattr(e, "in_tls_handshake", False)
    return e, closed_in_handshake, getattr(e, "on_kept_connection", False)


def _in_tls_handshake(conn) -> bool:
    """Did ``conn`` (an http.client connection whose request failed) fail in its TLS handshake: TCP connected, its
    socket not yet an ``SSLSocket`` (http.client replaces the socket when the handshake has finished)?"""
    import http.client
    import ssl

    return isinstance(conn, http.client.HTTPSConnection) and conn.sock is not None and (
        not isinstance(conn.sock, ssl.SSLSocket))


def _abort(conn) -> None:
    """Shut down a connection's socket from another thread: a blocked send/recv on it returns at once."""
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _ssl_context(verify):
    """The TLS context for ``verify`` (see ``HttpTransport``): TLS 1.2 or later, host name checked."""
    import ssl

    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is True:
        ctx = ssl.create_default_context()
    elif verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif isinstance(verify, tuple):  # x509.Certificate anchors: these only, not the system store (as curl --cacert)
        from cryptography.hazmat.primitives.serialization import Encoding

        try:
            pem = "".join(c.public_bytes(Encoding.PEM).decode() for c in verify)
        except AttributeError:
            raise TypeError("TLS trust anchors must be x509.Certificate objects") from None
        ctx = ssl.create_default_context(cadata=pem)
    elif isinstance(verify, (str, os.PathLike)):
        path = os.fspath(verify)
        if os.path.isdir(path):
            ctx = ssl.create_default_context(capath=path)
        elif os.path.isfile(path):
            ctx = ssl.create_default_context(cafile=path)
        else:
            raise ValueError(f"TLS trust {path!r}: no such CA file or directory")
    else:
        raise TypeError(f"verify must be a bool, a CA path, x509.Certificate anchors or an ssl.SSLContext, not "
                        f"{type(verify).__name__}")
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _create_connection(address, *args, **kwargs):
    """``socket.create_connection`` with an ASCII host name passed as bytes: ``getaddrinfo`` then takes it as it
    is, where for a str it loads the ``idna`` codec (with ``unicodedata``, ~2 ms on a process's first
    connection) to encode it. Only a non-ASCII (internationalized) name needs that codec."""
    host, port = address
    if isinstance(host, str) and host.isascii():
        host = host.encode()
    return socket.create_connection((host, port), *args, **kwargs)


def _proxy_for(scheme: str, host: str):
    """(host, port, Proxy-Authorization or None) of the HTTP proxy the environment names for ``scheme://host``,
    or None. Proxy variables are looked at only when one is set (urllib.request costs start-up time)."""
    if not any(k.lower().endswith("_proxy") for k in os.environ):
        return None
    import urllib.request
    from urllib.parse import unquote, urlsplit

    proxies = urllib.request.getproxies_environment()
    spec = proxies.get(scheme) or proxies.get("all")
    if not spec or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    if "://" not in spec:
        spec = "http://" + spec
    p = urlsplit(spec)
    if p.scheme != "http" or not p.hostname:
        raise TransportError(f"proxy {spec!r} (from the {scheme}_proxy/all_proxy environment): only http:// "
                             "proxies are supported for CMP")
    auth = None
    if p.username is not None:
        import base64

        auth = "Basic " + base64.b64encode(f"{unquote(p.username)}:{unquote(p.password or '')}".encode()).decode()
    return p.hostname, p.port or 80, auth


def _printable(b: bytes) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in b.decode("utf-8", "replace")).strip()


class FileTransport(Transport):
    """Request n (1-based) is written to ``reqout[n]`` and the response read from ``rspin[n]``.

    ``reqout``/``rspin``: a comma-separated list (as ``openssl cmp -reqout a.der,b.der``), a list, or one
    template containing ``{n}`` (``req-{n}.der``). A single plain name is used for message 1 and gets
    ``.n`` inserted before the suffix for later messages. The transport waits up to ``wait_s`` for the
    response file to appear (someone carries the request to the CA and brings the answer back); a response
    file that exists already is used as is.
    """

    def __init__(self, reqout, rspin, *, wait_s: float = 300.0, poll_s: float = FILE_POLL_S):
        self.reqout = _names(reqout)
        self.rspin = _names(rspin)
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.count = 0

    def describe(self) -> str:
        return f"files {self.reqout[0]} -> {self.rspin[0]}"

    async def exchange(self, request: bytes, *, operation: str | None = None) -> bytes:
        self.count += 1
        req_path = _nth(self.reqout, self.count)
        rsp_path = _nth(self.rspin, self.count)
        try:
            await asyncio.to_thread(_write_atomic, req_path, request)
        except OSError as e:
            raise TransportError(f"writing CMP request to {req_path}: {e}") from e
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while True:
            try:
                data = await asyncio.to_thread(_read_stable, rsp_path)
                if data is not None:
                    return data
            except OSError as e:
                raise TransportError(f"reading CMP response from {rsp_path}: {e}") from e
            if loop.time() >= deadline:
                raise TransportError(f"no CMP response in {rsp_path} within {self.wait_s:g} s "
                                     f"(request written to {req_path})")
            await asyncio.sleep(self.poll_s)


def _names(spec) -> list[str]:
    if isinstance(spec, (list, tuple)):
        names = [os.fspath(s) for s in spec]
    else:
        names = [s.strip() for s in os.fspath(spec).split(",") if s.strip()]
    if not names:
        raise ValueError("file transport needs at least one file name")
    return names


def _nth(names: list[str], n: int) -> str:
    if len(names) > 1:
        if n > len(names):
            raise TransportError(f"file transport: message {n} but only {len(names)} file names given")
        return names[n - 1]
    name = names[0]
    if "{n}" in name:
        return name.replace("{n}", str(n))
    if n == 1:
        return name
    root, ext = os.path.splitext(name)
    return f"{root}.{n}{ext}"


def _write_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".cmp-req-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_stable(path: str) -> bytes | None:
    """The file's bytes once it exists and is not growing (a writer that is not atomic), else None."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with open(path, "rb") as f:
        data = f.read(MAX_RESPONSE_BYTES + 1)
    if len(data) != size:
        return None
    return data


class CallableTransport(Transport):
    """An in-memory peer: ``handler(request_bytes) -> response_bytes`` (plain or async function)."""

    def __init__(self, handler):
        self.handler = handler
        self.requests: list[bytes] = []
        self.operations: list[str | None] = []  # the operation label of each request

    async def exchange(self, request: bytes, *, operation: str | None = None) -> bytes:
        self.requests.append(request)
        self.operations.append(operation)
        rsp = self.handler(request)
        if inspect.isawaitable(rsp):
            rsp = await rsp
        return rsp
