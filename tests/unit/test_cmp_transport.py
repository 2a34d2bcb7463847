"""CMP transports: HTTP (RFC 6712) against a real loopback HTTP(S) server that misbehaves on purpose (and an HTTP
proxy), and the file transport. Retries happen on transport errors only; HTTP errors and wrong content are never
retried."""
from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import threading
import time

import pytest

from enroll_clients.base import EnrollOptions, ProtectionError, ProtocolError, ServerError, TransportError
from enroll_clients.cmp import FileTransport, HttpTransport, client_from_options
from enroll_clients.cmp.client import CmpClient
from tests.peers.http_server import serving


class Handler(http.server.BaseHTTPRequestHandler):
    counts: dict = {}
    peers: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        n = Handler.counts[self.path] = Handler.counts.get(self.path, 0) + 1
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Handler.last_headers = dict(self.headers)
        if self.path == "/ok":
            self._send(200, "application/pkixcmp", body[::-1])
        elif self.path == "/404":
            self._send(404, "text/plain", b"no such CA alias")
        elif self.path == "/500":
            self._send(500, "text/html", b"<html><body>Internal error</body></html>")
        elif self.path in ("/500text", "/503"):
            self._send(int(self.path[1:4]), "text/plain", b"no suitable responder")
        elif self.path == "/400cmp":  # a CMP error message with an HTTP error status (RFC 6712 3.3)
            self._send(400, "application/pkixcmp", b"\x30\x00")
        elif self.path == "/302":
            self._send(302, "text/plain", b"moved", location="/ok")
        elif self.path == "/big":
            self._send(200, "application/pkixcmp", b"\x30" * ((1 << 20) + 10))
        elif self.path == "/chunked":
            self.protocol_version = "HTTP/1.1"
            self.send_response(200)
            self.send_header("Content-Type", "application/pkixcmp")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (body[:1], body[1:]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            self.close_connection = False  # HTTP/1.1 keep-alive
            Handler.peers.append(self.client_address)
        elif self.path == "/answer-then-close":  # a kept-alive answer (no "Connection: close"), then the server
            self.protocol_version = "HTTP/1.1"  # closes the connection: its keep-alive timeout while we were idle
            self._send(200, "application/pkixcmp", body[::-1])
            self.close_connection = True
        elif self.path == "/html":
            self._send(200, "text/html; charset=utf-8", b"<!DOCTYPE html><html>login portal</html>")
        elif self.path == "/empty":
            self._send(200, "application/pkixcmp", b"")
        elif self.path == "/slow":
            time.sleep(1.0)
            self._send(200, "application/pkixcmp", b"late")
        elif self.path == "/flaky":
            if n == 1:  # drop the connection without an answer: a transport error
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send(200, "application/pkixcmp", b"second try")

    def _send(self, code, ctype, body, location=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def http_server():
    with serving(Handler) as port:
        yield f"http://127.0.0.1:{port}"


def exchange(url, data=b"\x30\x00", **kw):
    async def go():
        t = HttpTransport(url, **kw)
        try:
            return await t.exchange(data)
        finally:
            await t.aclose()

    return asyncio.run(go())


def test_ok_content_type_and_headers(http_server):
    assert exchange(http_server + "/ok", b"abc") == b"cba"
    assert Handler.last_headers["Content-Type"] == "application/pkixcmp"
    assert Handler.last_headers["Connection"] == "close"


def test_http_4xx_names_status_and_text(http_server):
    with pytest.raises(ServerError, match=r"HTTP 404 Not Found: no such CA alias -- check the CMP path") as ei:
        exchange(http_server + "/404")
    assert ei.value.status == 404


def test_http_5xx_not_retried(http_server):
    Handler.counts.pop("/500", None)
    with pytest.raises(ServerError, match="HTTP 500"):
        exchange(http_server + "/500", retries=3, retry_base_s=0.01)
    assert Handler.counts["/500"] == 1


def test_html_instead_of_pkixcmp(http_server):
    with pytest.raises(ProtocolError, match="Content-Type 'text/html'.*not 'application/pkixcmp'.*login portal"):
        exchange(http_server + "/html")


def test_empty_body(http_server):
    with pytest.raises(ProtocolError, match="empty application/pkixcmp"):
        exchange(http_server + "/empty")


def test_timeout(http_server):
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"no response within 0.2 s"):
        exchange(http_server + "/slow", timeout_s=0.2, retries=0)
    assert time.monotonic() - t0 < 1.0


def test_retry_on_transport_error_only(http_server):
    Handler.counts.pop("/flaky", None)
    assert exchange(http_server + "/flaky", retries=1, retry_base_s=0.01) == b"second try"
    assert Handler.counts["/flaky"] == 2


@pytest.mark.parametrize("path,status,wanted,unwanted", [
    ("/500text", 500, "may not implement keyupdate request", "retry later"),
    ("/503", 503, "retry later", "may not implement"),
])
def test_http_5xx_wording(http_server, path, status, wanted, unwanted):
    async def go():
        t = HttpTransport(http_server + path, retries=0)
        return await t.exchange(b"x", operation="keyupdate")

    with pytest.raises(ServerError) as ei:
        asyncio.run(go())
    assert ei.value.status == status and "no suitable responder" in str(ei.value)
    assert wanted in str(ei.value) and unwanted not in str(ei.value)


def test_http_error_status_with_cmp_body_is_returned(http_server):
    assert exchange(http_server + "/400cmp") == b"\x30\x00"


def test_redirect_not_followed(http_server):
    Handler.counts.pop("/ok", None)
    with pytest.raises(ServerError, match=r"HTTP 302 Found: moved"):
        exchange(http_server + "/302", retries=2, retry_base_s=0.01)
    assert "/ok" not in Handler.counts


def test_oversized_response_refused(http_server):
    with pytest.raises(ProtocolError, match=r"response of more than 1048576 bytes"):
        exchange(http_server + "/big")


def test_chunked_response_and_keep_alive(http_server):
    async def go():
        t = HttpTransport(http_server + "/chunked", keep_alive=True)
        try:
            return [await t.exchange(b"abc"), await t.exchange(b"de")]
        finally:
            await t.aclose()

    Handler.peers.clear()
    assert asyncio.run(go()) == [b"abc", b"de"]
    assert "Connection" not in Handler.last_headers
    assert len(Handler.peers) == 2 and Handler.peers[0] == Handler.peers[1]  # one connection for both


def test_cancelled_exchange_returns_at_once(http_server):
    """A cancelled exchange (a daemon attempt timeout, Ctrl-C) does not wait for the server or the socket timeout,
    and the event loop closes without waiting for the worker thread."""
    async def go():
        t = HttpTransport(http_server + "/slow", timeout_s=30, retries=0)
        task = asyncio.create_task(t.exchange(b"x"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    t0 = time.monotonic()
    asyncio.run(go())
    assert time.monotonic() - t0 < 0.9  # the server answers /slow after 1 s


def test_cancel_after_the_answer_closes_the_kept_connection(http_server):
    """keep_alive: an exchange cancelled after its worker got the answer (before the caller took it) closes the
    connection it drops, on the caller's side, instead of leaving an open socket to the garbage collector; a
    shutdown from the canceller never comes after the worker's close (see HttpTransport._post)."""
    async def go():
        t = HttpTransport(http_server + "/chunked", timeout_s=30, retries=0, keep_alive=True)
        task = asyncio.create_task(t.exchange(b"xy"))
        await asyncio.sleep(0)  # the task has started its worker and waits for it
        conn = t._conn[1]
        deadline = time.monotonic() + 30
        while any(th.name == "devagent-cmp-http" for th in threading.enumerate()):
            assert time.monotonic() < deadline, "the worker did not finish"
            time.sleep(0.01)  # blocks the loop on purpose: the worker's answer waits in the loop's queue
        assert conn.sock is not None  # the worker kept it open for the next message
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert t._conn is None and conn.sock is None

    asyncio.run(go())


def test_connection_refused_after_retries():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(TransportError, match=r"attempt 3 of 3"):
        exchange(f"http://127.0.0.1:{port}/", retries=2, retry_base_s=0.01)


def test_bad_url():
    with pytest.raises(ValueError, match="http:// or https://"):
        HttpTransport("ftp://ca/")


# --- file transport ------------------------------------------------------------------------------
def test_file_transport_naming_and_wait(tmp_path):
    async def go():
        t = FileTransport(str(tmp_path / "req.der"), str(tmp_path / "rsp.der"), wait_s=5)

        async def operator():
            for n, (req, rsp) in enumerate([("req.der", "rsp.der"), ("req.2.der", "rsp.2.der")], 1):
                while not (tmp_path / req).exists():
                    await asyncio.sleep(0.01)
                (tmp_path / rsp).write_bytes(b"answer %d" % n)

        op = asyncio.create_task(operator())
        a = await t.exchange(b"one")
        b = await t.exchange(b"two")
        await op
        return a, b

    assert asyncio.run(go()) == (b"answer 1", b"answer 2")
    assert (tmp_path / "req.der").read_bytes() == b"one" and (tmp_path / "req.2.der").read_bytes() == b"two"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".cmp-req-")]  # no temp files left


def test_file_transport_lists_and_templates(tmp_path):
    t = FileTransport(f"{tmp_path}/a.der,{tmp_path}/b.der", str(tmp_path / "r-{n}.der"))
    from enroll_clients.cmp.transport import _nth

    assert _nth(t.reqout, 2) == f"{tmp_path}/b.der" and _nth(t.rspin, 2) == str(tmp_path / "r-2.der")
    with pytest.raises(TransportError, match="only 2 file names"):
        _nth(t.reqout, 3)


def test_file_transport_timeout(tmp_path):
    t = FileTransport(str(tmp_path / "q.der"), str(tmp_path / "never.der"), wait_s=0.1)
    with pytest.raises(TransportError, match=r"no CMP response in .*never.der within 0.1 s"):
        asyncio.run(t.exchange(b"x"))


def test_options_need_both_files():
    with pytest.raises(ValueError, match="both reqout"):
        client_from_options(EnrollOptions(server="file:", reqout="/tmp/x.der"))


def test_options_build_http_client():
    c = client_from_options(EnrollOptions(server="http://127.0.0.1:1/pkix/", mac="pbmac1", implicit_confirm=True,
                                          extra={"max_clock_skew_s": 60}))
    assert isinstance(c, CmpClient) and c.mac == "pbmac1" and c.implicit_confirm and c.max_clock_skew_s == 60
    assert isinstance(c.transport, HttpTransport)
    with pytest.raises(TypeError):
        client_from_options({"server": "x"})


# --- TLS and proxies -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    """The same handler over TLS, with a certificate for 127.0.0.1 from a test CA; yields (url, CA file)."""
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from tests.certfactory import Spec, chain

    ch = chain("p256", 2, leaf=Spec(san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    d = tmp_path_factory.mktemp("cmp-tls")
    files = ch.write(d)
    (d / "key.pem").write_bytes(ch.leaf_key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files["leaf"], d / "key.pem")
    with serving(Handler, lambda s: ctx.wrap_socket(s, server_side=True)) as port:
        yield f"https://127.0.0.1:{port}", str(files["root"])


def test_https_with_ca_file(https_server):
    url, ca = https_server
    assert exchange(url + "/ok", b"tls", verify=ca) == b"slt"


def test_https_untrusted_server_is_a_protection_error(https_server, monkeypatch):
    """README's exit codes: an untrusted TLS server certificate is the server failing to authenticate (exit 5, as
    over EST), not a network error."""
    from agent.cli import EXIT_SERVER, classify

    url, _ = https_server
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(ProtectionError, match=r"POST https://127\.0\.0\.1:\d+/ok: SSLCertVerificationError: .*"
                                              r"certificate verify failed") as e:
        exchange(url + "/ok", verify=True, retries=0)
    assert classify(e.value)[0] == EXIT_SERVER


def test_an_untrusted_server_certificate_is_not_retried(https_server, monkeypatch):
    url, _ = https_server
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(ProtectionError) as e:
        exchange(url + "/ok", verify=True, retries=2)
    assert "certificate verify failed" in str(e.value) and "is not trusted" in str(e.value)
    assert "attempt" not in str(e.value), "a TLS verification failure is final: no retry"


class _Counting:
    """A listening socket that counts the connections it accepts (each attempt of the client is one), counted
    before the TLS handshake (with ``ctx``), so a client that met the server's certificate was counted already."""

    def __init__(self, sock, ctx=None):
        self._sock, self._ctx, self.accepted = sock, ctx, 0

    def accept(self):
        conn, addr = self._sock.accept()
        self.accepted += 1
        return (conn if self._ctx is None else self._ctx.wrap_socket(conn, server_side=True)), addr

    def __getattr__(self, name):
        return getattr(self._sock, name)


@contextlib.contextmanager
def _tls_server(leaf_spec):
    """A TLS server (the Handler) with a leaf from ``leaf_spec``; yields (url, root, the counting socket)."""
    import ssl
    import tempfile

    from cryptography.hazmat.primitives import serialization

    from tests.certfactory import chain

    ch = chain("p256", 2, leaf=leaf_spec)
    with tempfile.TemporaryDirectory() as d:
        files = ch.write(__import__("pathlib").Path(d))
        key_file = os.path.join(d, "key.pem")
        with open(key_file, "wb") as f:
            f.write(ch.leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(files["leaf"], key_file)
    box = []

    def wrap(sock):
        box.append(_Counting(sock, ctx))
        return box[0]

    with serving(Handler, wrap) as port:
        yield f"https://127.0.0.1:{port}/ok", ch.root, box[0]


def _spec(case):
    import datetime
    import ipaddress

    from cryptography import x509

    from tests.certfactory import Spec

    ip = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    return {"untrusted": Spec(san=ip), "hostname": Spec(san=[x509.DNSName("ca.other.example")]),
            "expired": Spec(san=ip, not_before=now - 10 * day, not_after=now - day),
            "not-yet-valid": Spec(san=ip, not_before=now + day, not_after=now + 10 * day)}[case]


@pytest.mark.parametrize("case", ["untrusted", "hostname", "expired", "not-yet-valid"])
def test_a_server_certificate_that_does_not_verify_is_final_exit_5_naming_why(case):
    """Not trusted, for another host, expired or not yet valid by our clock: the server failed to authenticate;
    a ProtectionError (exit 5, as EST's) naming the URL and why, after one connection (no retry)."""
    from agent.cli import EXIT_SERVER, classify
    from tests.certfactory import Spec, chain, key

    why = {"untrusted": r"unable to get local issuer certificate: the CMP server's TLS certificate is not trusted "
                        r"by the 1 TLS trust anchor\(s\) given; give the CA",
           "hostname": r"IP address mismatch.*: the CMP server's TLS certificate is not valid for this host name; "
                       r"check the URL",
           "expired": r"a certificate of the CMP server's TLS chain is expired by this device's clock \(certificate "
                      r"has expired; the clock reads .*\): if the clock is wrong, .*the trust anchors are not the cause",
           "not-yet-valid": r"a certificate of the CMP server's TLS chain is not yet valid by this device's clock "
                            r"\(certificate is not yet valid;"}[case]
    with _tls_server(_spec(case)) as (url, root, listener):
        anchor = chain(root=Spec(key=key("p256", 41), subject=None)).root if case == "untrusted" else root
        with pytest.raises(ProtectionError, match=r"POST https://127\.0\.0\.1:\d+/ok: SSLCertVerificationError: "
                                                  r"certificate verify failed(: .*)?: " + why) as e:
            exchange(url, verify=[anchor], retries=2, retry_base_s=0.01)
        assert listener.accepted == 1, "a server that failed to authenticate is not asked again"
    assert "attempt" not in str(e.value)
    assert classify(e.value)[0] == EXIT_SERVER
    assert e.value.validity == (case if case in ("expired", "not-yet-valid") else None)


def test_https_to_a_plain_http_server_is_final_exit_5():
    """An https:// URL whose server answers the TLS handshake in plain HTTP: it answered wrongly, and will again
    (exit 5, as EST's), after one connection."""
    from agent.cli import EXIT_SERVER, classify

    box = []

    def wrap(sock):
        box.append(_Counting(sock))
        return box[0]

    with serving(Handler, wrap) as port:
        with pytest.raises(ProtectionError, match=rf"POST https://127\.0\.0\.1:{port}/ok: SSLError: .*"
                                                  r"WRONG_VERSION_NUMBER.*: the server did not answer in TLS; is it "
                                                  r"a plain HTTP endpoint \(http://\)\?") as e:
            exchange(f"https://127.0.0.1:{port}/ok", verify=True, retries=2, retry_base_s=0.01)
        assert box[0].accepted == 1
    assert classify(e.value)[0] == EXIT_SERVER


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_a_close_in_the_tls_handshake_is_a_transport_error_retried(reset):
    """A server that reads our ClientHello and closes (or resets) without an alert: a dropped connection, not a
    server that failed to authenticate (exit 6, as over EST), tried again; with no client certificate presented
    the final error says so and what to check (as EST's: an https:// URL at a port that is not the TLS one)."""
    from agent.cli import EXIT_NETWORK, classify
    from tests.peers.tls_front import handshake_dropper

    with handshake_dropper(reset=reset) as (port, accepted):
        with pytest.raises(TransportError, match=r"attempt 2 of 2") as e:
            exchange(f"https://127.0.0.1:{port}/ok", verify=True, retries=1, retry_base_s=0.01)
    assert classify(e.value)[0] == EXIT_NETWORK and len(accepted) == 2
    msg = str(e.value)
    assert msg.startswith(f"POST https://127.0.0.1:{port}/ok: "), msg
    assert msg.endswith("; attempt 2 of 2: the server closed the connection in the TLS handshake; retry later, and if "
                        "it persists check that the URL's port is the server's TLS port"), msg
    assert "may have refused" not in msg, "no client certificate was presented"


@contextlib.contextmanager
def _front(tmp_path, client_certificate_required=False, **kw):
    """The repo's TLS front (tests/peers/tls_front.py, OpenSSL on both ends) before the Handler, requiring a client
    certificate from its site CA if asked (``_client_auth``'s is not); yields it."""
    from tests.peers.tls_front import TlsFront, make_site_pki

    site = make_site_pki(tmp_path / "site")
    if client_certificate_required:
        kw["client_cas"] = site.ca_file
    with serving(Handler) as port, TlsFront(site, port, **kw) as front:
        front.ok_url = f"https://127.0.0.1:{front.port}/ok"
        yield front


def _exchange_once(front, auth=None):
    """One CMP exchange through ``front`` (two attempts at most), with ``auth`` as the TLS client credential."""

    async def go():
        t = HttpTransport(front.ok_url, verify=front.site.ca_file, retries=2, retry_base_s=0.01)
        t.use_client_credential(auth)
        try:
            return await t.exchange(b"\x30\x00")
        finally:
            await t.aclose()

    return go()


def _client_auth(cn="device-0001 IDevID"):
    """A TLS client credential from a CA no front trusts (the site CA issued the front's certificate only)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from enroll_clients.base import ClientAuth
    from tests.certfactory import Spec, chain

    ch = chain("p256", 2, leaf=Spec(subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])))
    return ClientAuth(certificate=ch.leaf, private_key=ch.leaf_key)


@pytest.mark.parametrize("case", ["no-client-certificate", "no-shared-cipher", "no-shared-cipher-certificate-sent"])
def test_a_handshake_failure_alert_names_both_likely_causes(tmp_path, case):
    """Alert 40 (handshake_failure) is what a TLS 1.2 server requiring a client certificate answers when it got
    none, and what any server answers when it shares no cipher suite or version with us: the error names the alert
    as OpenSSL reports it and both causes (as over EST), final (exit 5), after one connection."""
    from agent.cli import EXIT_SERVER, classify

    kw = ({"client_certificate_required": True, "max_tls12": True} if case == "no-client-certificate" else
          {"ciphers": "ECDHE-ECDSA-AES128-SHA"})  # a TLS 1.2 suite without forward-secure AEAD: not offered by us
    auth = _client_auth() if case.endswith("certificate-sent") else None

    with _front(tmp_path, **kw) as front:
        with pytest.raises(ProtectionError) as e:
            asyncio.run(_exchange_once(front, auth))
        assert len(front.failed) == 1 and front.forwarded == 0, front.failed
    msg = str(e.value)
    first = ("either it refused our TLS client certificate 'CN=device-0001 IDevID' (some servers answer a refused "
             "certificate so)" if auth else "either it requires a TLS client certificate and we sent none")
    assert (f"POST {front.ok_url}: the CMP server ended the TLS handshake with a handshake_failure alert (40; "
            f'OpenSSL: SSLV3_ALERT_HANDSHAKE_FAILURE, "sslv3 alert handshake failure"): {first}, or it shares no TLS '
            "version or cipher suite with us") in msg, msg
    assert ("--tls-client-auth presents" in msg) is (auth is None), msg
    assert "probably" not in msg and "attempt" not in msg, msg
    assert classify(e.value)[0] == EXIT_SERVER


def _assert_final(error, start: str) -> None:
    """``error`` is a final refusal (exit 5, no retry, no 'probably') whose text starts with ``start``."""
    from agent.cli import EXIT_SERVER, classify

    msg = str(error)
    assert msg.startswith(start), msg
    assert "attempt" not in msg and "probably" not in msg, msg
    assert classify(error)[0] == EXIT_SERVER


def test_a_tls12_refusal_of_the_client_certificate_with_its_alert_names_it(tmp_path):
    """A TLS 1.2-only server requiring client certificates from another CA (the front's site CA) refuses ours in
    the handshake and sends its alert: the server's explicit refusal of our credential, final (exit 5, as EST's),
    naming the certificate and the alert, after one connection; no refusal probe, nothing forwarded."""
    auth = _client_auth()

    with _front(tmp_path, client_certificate_required=True, max_tls12=True) as front:
        with pytest.raises(ProtectionError) as e:
            asyncio.run(_exchange_once(front, auth))
        assert len(front.failed) == 1 and front.forwarded == 0, front.failed
    _assert_final(e.value, f"POST {front.ok_url}: the CMP server refused our TLS client certificate "
                  "'CN=device-0001 IDevID' (TLSV1_ALERT_UNKNOWN_CA): check that it is issued by a CA the server "
                  "trusts for TLS clients and still valid")


def test_a_tls13_server_requiring_a_client_certificate_we_did_not_send_says_so(tmp_path):
    """TLS 1.3 (the front's default) requiring a client certificate, none sent: our handshake completes before the
    server reads the empty Certificate, and its certificate_required alert (116) arrives on the first read after the
    request, or is lost with it (the server closes on our unread request: a reset or EOF, then one probe reads it).
    The error says the server requires a TLS client certificate and we sent none, with the option that presents
    one; final (exit 5, as over EST and TLS 1.2's alert 40), not retried, nothing forwarded. Repeated: the alert is
    lost in about one run of three."""
    with _front(tmp_path, client_certificate_required=True) as front:
        for _ in range(6):
            with pytest.raises(ProtectionError) as e:
                asyncio.run(_exchange_once(front))
            _assert_final(e.value, f"POST {front.ok_url}: the CMP server ended the TLS handshake "
                          "(TLSV13_ALERT_CERTIFICATE_REQUIRED): it requires a TLS client certificate and we sent "
                          "none; --tls-client-auth presents")
        # at most the request's connection and the probe's for each: none retried
        assert len(front.failed) <= 12 and front.forwarded == 0, front.failed


@pytest.mark.parametrize("certificate", [False, True], ids=["anonymous", "client-certificate"])
def test_a_kept_connection_the_server_closed_is_retried_on_one_new_connection_without_a_probe(tmp_path, certificate):
    """keep_alive: the server closes the kept connection while we are idle (its keep-alive timeout, e.g. while a
    CMP client polls). The next message meets the close (an EOF or reset), which is not a refusal: a refusal ends a
    connection's first request, and a kept one has passed its handshake and served a request. So no refusal probe
    (a new connection and up to 2 s of waiting), with or without a client certificate: the retry goes through one
    new connection, and the front sees two handshakes, the kept connection's and the retry's."""
    import select

    from enroll_clients.base import ClientAuth
    from tests.certfactory import chain

    kw, auth = {}, None
    if certificate:  # a client certificate the front accepts: issued by the CA it trusts for TLS clients
        ch = chain("p256", 2)
        kw["client_cas"] = str(ch.write(tmp_path / "client")["root"])
        auth = ClientAuth(certificate=ch.leaf, private_key=ch.leaf_key)

    with _front(tmp_path, **kw) as front:
        url = f"https://127.0.0.1:{front.port}/answer-then-close"

        async def go():
            t = HttpTransport(url, verify=front.site.ca_file, keep_alive=True, retries=1, retry_base_s=0.01)
            t.use_client_credential(auth)
            try:
                first = await t.exchange(b"ab")
                sock = t._conn[1].sock
                assert sock is not None, "the answer did not say it closes: the connection is kept"
                assert select.select([sock], [], [], 10)[0], "the server did not close the kept connection"
                return first, await t.exchange(b"cd")
            finally:
                await t.aclose()

        assert asyncio.run(go()) == (b"ba", b"dc")
        assert front.handshakes == 2 and front.failed == [] and front.forwarded == 2, front.failed
    if certificate:
        assert front.client_subjects == ["commonName=device 1"] * 2


@pytest.mark.parametrize("silent", [True, False], ids=["refused-silently", "drop-in-handshake"])
def test_a_tls12_close_in_the_handshake_with_a_client_certificate_names_it(tmp_path, silent):
    """TLS 1.2: a server that refuses our client certificate without its alert closes in the handshake, which
    looks like a drop (the refusal probe cannot tell either: its handshake is closed too). It stays a transport
    failure, retried (exit 6: a close proves nothing), and the final error says the server may have refused the
    certificate, naming it; the same for a front that reads the ClientHello and closes, as the client cannot
    tell the two apart."""
    from agent.cli import EXIT_NETWORK, classify
    from tests.peers.tls_front import handshake_dropper

    auth = _client_auth()

    async def go(url, verify):
        t = HttpTransport(url, verify=verify, retries=1, retry_base_s=0.01)
        t.use_client_credential(auth)
        try:
            return await t.exchange(b"\x30\x00")
        finally:
            await t.aclose()

    if silent:
        with _front(tmp_path, client_certificate_required=True, max_tls12=True, silent_refusal=True) as front:
            with pytest.raises(TransportError) as e:
                asyncio.run(go(front.ok_url, front.site.ca_file))
            assert len(front.failed) == 3 and front.handshakes == 0, front.failed  # 2 attempts + the probe
    else:
        with handshake_dropper() as (port, accepted):
            with pytest.raises(TransportError) as e:
                asyncio.run(go(f"https://127.0.0.1:{port}/ok", True))
            assert len(accepted) == 3  # 2 attempts + the probe
    msg = str(e.value)
    assert "attempt 2 of 2: the server closed the connection in the TLS handshake; we presented our TLS client " \
           "certificate 'CN=device-0001 IDevID' in that handshake, and the server may have refused it" in msg, msg
    assert classify(e.value)[0] == EXIT_NETWORK


def test_https_with_certificate_anchors(https_server):
    """verify= x509.Certificate anchors (the domain's tls store): these alone authenticate the server."""
    from cryptography import x509

    url, ca = https_server
    root = x509.load_pem_x509_certificate(open(ca, "rb").read())
    assert exchange(url + "/ok", b"tls", verify=[root]) == b"slt"
    with pytest.raises(ValueError, match="sequence is empty"):
        exchange(url + "/ok", verify=())
    with pytest.raises(TypeError, match="x509.Certificate"):
        exchange(url + "/ok", verify=("not a certificate",))


def test_untrusted_server_error_names_where_trust_came_from(https_server, tmp_path, monkeypatch):
    from tests.certfactory import Spec, chain, key

    url, _ = https_server
    other = chain(root=Spec(key=key("p256", 41), subject=None)).root
    with pytest.raises(ProtectionError, match=r"not trusted by domain plant's tls store; give the CA that issued "
                                             r"the server's TLS certificate with --tls-trust FILE"):
        exchange(url + "/ok", verify=[other], retries=0, trust_source="domain plant's tls store")
    with pytest.raises(ProtectionError, match=r"not trusted by the 1 TLS trust anchor\(s\) given"):
        exchange(url + "/ok", verify=[other], retries=0)
    f = tmp_path / "other.pem"
    from cryptography.hazmat.primitives.serialization import Encoding

    f.write_bytes(other.public_bytes(Encoding.PEM))
    with pytest.raises(ProtectionError, match=f"not trusted by the CA file {f}"):
        exchange(url + "/ok", verify=str(f), retries=0)
    monkeypatch.setenv("SSL_CERT_FILE", str(f))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with pytest.raises(ProtectionError, match=rf"not trusted by the system trust store \(SSL_CERT_FILE={f}\); "
                                             r"give the CA .* with --tls-trust FILE \(it then replaces the system "
                                             r"store\)"):
        exchange(url + "/ok", verify=True, retries=0)


def test_https_bad_ca_path(https_server, tmp_path):
    with pytest.raises(ValueError, match="no such CA file or directory"):
        exchange(https_server[0] + "/ok", verify=str(tmp_path / "missing.pem"))


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """A forwarding HTTP proxy: absolute-URI requests, and CONNECT tunnels (for https)."""
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        import http.client
        from urllib.parse import urlsplit

        ProxyHandler.seen.append((self.command, self.path, self.headers.get("Proxy-Authorization")))
        u = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        c.request("POST", u.path, body=body, headers={"Content-Type": self.headers["Content-Type"]})
        r = c.getresponse()
        data = r.read()
        self.send_response(r.status)
        self.send_header("Content-Type", r.getheader("Content-Type"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_CONNECT(self):
        import select
        import socket

        ProxyHandler.seen.append((self.command, self.path, self.headers.get("Proxy-Authorization")))
        host, port = self.path.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)), timeout=10)
        self.send_response(200, "Connection established")
        self.end_headers()
        conns = [self.connection, upstream]
        while True:
            ready, _, _ = select.select(conns, [], [], 10)
            if not ready:
                break
            for s in ready:
                data = s.recv(65536)
                if not data:
                    upstream.close()
                    return
                (upstream if s is self.connection else self.connection).sendall(data)


@pytest.fixture(scope="module")
def proxy():
    with serving(ProxyHandler) as port:
        yield f"http://user:p%40ss@127.0.0.1:{port}"


def test_http_proxy_from_environment(http_server, https_server, proxy, monkeypatch):
    import base64

    for k in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
              "NO_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("http_proxy", proxy)
    monkeypatch.setenv("https_proxy", proxy)
    ProxyHandler.seen.clear()
    auth = "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert exchange(http_server + "/ok", b"via") == b"aiv"
    assert ProxyHandler.seen == [("POST", http_server + "/ok", auth)]
    url, ca = https_server
    assert exchange(url + "/ok", b"tunnel", verify=ca) == b"lennut"
    assert ProxyHandler.seen[1] == ("CONNECT", url.removeprefix("https://"), auth)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    ProxyHandler.seen.clear()
    assert exchange(http_server + "/ok", b"direct") == b"tcerid"
    assert ProxyHandler.seen == []


def test_unsupported_proxy_scheme_is_named(http_server, monkeypatch):
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setenv("http_proxy", "socks5://127.0.0.1:1080")
    with pytest.raises(TransportError, match=r"proxy 'socks5://127.0.0.1:1080'.*only http:// proxies"):
        exchange(http_server + "/ok")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_ascii_host_connects_without_the_idna_codec(http_server, host):
    """An ASCII host name goes to getaddrinfo as bytes: the first connection loads no idna codec (~2 ms)."""
    import subprocess
    import sys

    url = http_server.replace("127.0.0.1", host) + "/ok"
    code = ("import asyncio, sys; from enroll_clients.cmp import HttpTransport\n"
            "async def go():\n    t = HttpTransport(sys.argv[1])\n    try:\n        return await t.exchange(b'ab')\n"
            "    finally:\n        await t.aclose()\n"
            "assert asyncio.run(go()) == b'ba'; assert 'encodings.idna' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
