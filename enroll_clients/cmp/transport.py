"""CMP transports behind one small interface: ``await transport.exchange(request_der) -> response_der``.

- ``HttpTransport``: RFC 6712 HTTP POST of ``application/pkixcmp`` (httpx, imported on first use), with a
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
import tempfile

from enroll_clients.base import ProtocolError, ServerError, TransportError

CONTENT_TYPE = "application/pkixcmp"
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
    for servers that read the profile from the path."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, retries: int = 2, verify=True,
                 retry_base_s: float = RETRY_BASE_S, headers: dict | None = None, keep_alive: bool = False,
                 operation_labels: bool = False, path_profile: str | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"CMP URL must start with http:// or https://: {url!r}")
        if timeout_s <= 0 or retries < 0:
            raise ValueError("timeout_s must be > 0 and retries >= 0")
        if path_profile is not None and (not path_profile or "/" in path_profile or path_profile in (".", "..")):
            raise ValueError(f"certificate profile {path_profile!r} cannot be a URL path segment")
        self.url = url
        self.operation_labels = operation_labels
        self.path_profile = path_profile
        self._last_url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.verify = verify
        self.retry_base_s = retry_base_s
        self.headers = {"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE, "Cache-Control": "no-cache",
                        **(headers or {})}
        if not keep_alive:
            # One connection per message by default: OpenSSL 3.0's CMP server loses the transaction when the
            # certConf arrives on an HTTP/1.1 persistent connection ("unexpected pkibody"); seen in
            # tests/interop. A CMP message is self-contained, so nothing is lost but a TCP handshake.
            self.headers.setdefault("Connection", "close")
        self._client = None

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
        import httpx  # lazy: ~80-150 ms

        url = self._last_url = self.url_for(operation)

        if self._client is None:
            # Plain http:// needs no TLS context; building one loads the CA bundle (~20-80 ms at start-up).
            verify = self.verify if self.url.startswith("https://") else False
            self._client = httpx.AsyncClient(timeout=self.timeout_s, verify=verify)
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.retry_base_s * (2 ** (attempt - 1)))
            try:
                rsp = await self._client.post(url, content=request, headers=self.headers)
            except httpx.TimeoutException as e:
                last = TransportError(f"POST {url}: no response within {self.timeout_s:g} s "
                                      f"({type(e).__name__}); attempt {attempt + 1} of {self.retries + 1}")
                continue
            except httpx.TransportError as e:
                last = TransportError(f"POST {url}: {type(e).__name__}: {e or 'connection failed'}; "
                                      f"attempt {attempt + 1} of {self.retries + 1}")
                continue
            return self._check(rsp, url, operation)
        raise last

    def _check(self, rsp, url: str, operation: str | None = None) -> bytes:
        ctype = rsp.headers.get("content-type", "").split(";")[0].strip().lower()
        body = rsp.content
        if rsp.status_code != 200:
            if ctype == CONTENT_TYPE and body and len(body) <= MAX_RESPONSE_BYTES:
                # A CMP error message with an HTTP error status (RFC 6712 3.3 allows it): the client checks and
                # reports it; that says far more than the status line.
                return body
            snippet = _printable(body[:200]) if ctype.startswith("text/") else f"{len(body)} bytes of {ctype or 'unknown type'}"
            hint = ""
            if rsp.status_code == 404:
                hint = " -- check the CMP path/alias in the URL"
            elif rsp.status_code in (502, 503, 504):
                hint = " -- server temporarily unavailable; retry later"
            elif rsp.status_code >= 500:
                what = f" {operation}" if operation else " this"
                hint = (f" -- the server failed without a CMP answer: it may not implement{what} request "
                        "(a retry will not help; check the server's log or its supported operations"
                        + ("" if self.operation_labels else ", or whether it wants one URL per operation "
                           "(--operation-labels)") + ")")
            raise ServerError(f"POST {url}: HTTP {rsp.status_code} {rsp.reason_phrase}: {snippet}{hint}",
                              status=rsp.status_code, text=snippet)
        if ctype != CONTENT_TYPE:
            raise ProtocolError(f"POST {url}: server answered Content-Type {ctype or '(none)'!r}, not "
                                f"{CONTENT_TYPE!r} (RFC 6712); is this a CMP endpoint? First bytes: "
                                f"{_printable(body[:80])!r}")
        if not body:
            raise ProtocolError(f"POST {url}: empty {CONTENT_TYPE} response")
        if len(body) > MAX_RESPONSE_BYTES:
            raise ProtocolError(f"POST {url}: response of {len(body)} bytes exceeds {MAX_RESPONSE_BYTES}")
        return body

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


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
