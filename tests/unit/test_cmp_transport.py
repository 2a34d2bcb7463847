"""CMP transports: HTTP (RFC 6712) against a real loopback HTTP server that misbehaves on purpose, and the
file transport. Retries happen on transport errors only; HTTP errors and wrong content are never retried."""
from __future__ import annotations

import asyncio
import http.server
import os
import threading
import time

import pytest

from enroll_clients.base import EnrollOptions, ProtocolError, ServerError, TransportError
from enroll_clients.cmp import FileTransport, HttpTransport, client_from_options
from enroll_clients.cmp.client import CmpClient


class Handler(http.server.BaseHTTPRequestHandler):
    counts: dict = {}

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

    def _send(self, code, ctype, body):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def http_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


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
