"""The CLM's CoAP clients for the device services (the paper's CSR_generation_request and verify_certificate
clients), on one shared aiocoap client context.

Every request is bounded by a timeout: with a wrong DTLS PSK the device simply does not answer.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time

from cryptography import x509

from coap_services import codec
from coap_services.errors import DeviceError, DeviceUnreachableError, PayloadError
from coap_services.security import client_credentials

DEFAULT_TIMEOUT_S = 30.0
TRANSPORTS = ("tinydtls", "oscore", "udp6")


def _timing_s(msg) -> float | None:
    for o in msg.opt.get_option(codec.TIMING_OPTION):
        try:
            return int.from_bytes(o.encode(), "big") / 1e6
        except Exception:
            return None
    return None


# DTLS-PSK credentials, per (device base URI, context directory): (identity of dtls.json when it was read and
# checked, the aiocoap credential built from it). See ``_dtls_credentials``.
_DTLS_CACHE: dict[tuple[str, str], tuple[tuple, object]] = {}
_DTLS_CACHE_LOCK = threading.Lock()  # CLM clients may run on event loops in several threads
DTLS_CACHE_MAX = 4096


def _file_identity(path: str) -> tuple | None:
    """What ``read_private`` checks and reads, as ``lstat`` sees it without opening the file: inode, type and
    mode, owner, size and the modification and status-change times. A replaced file (new inode), a chmod or
    chown (ctime, mode, uid), a write (size, mtime, ctime) or a symlink planted in its place (lstat: a link)
    all give a different identity. None if it cannot be stat'ed (the caller then reads it and reports why)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _dtls_credentials(uri: str, context_dir) -> dict:
    """``{pattern: aiocoap DTLS credential}`` for ``uri``: ``client_credentials`` (read the PSK file with its
    checks: O_NOFOLLOW, regular file, owner, mode, PSK length), built once per content of the file.

    A CLM opens a fresh client context per renewal round and loads the device's PSK each time; reading, checking
    and having aiocoap build the credential (its loader introspects constructor signatures) cost about 0.25 ms
    per renewal. The result is kept keyed by the file's identity (``_file_identity``), checked on every call: a
    changed file is read and checked again, so a PSK edited to an unsafe mode or length is refused exactly as
    before. DTLS credentials are plain values (identity, key), safe to share between client contexts; OSCORE
    contexts carry sequence numbers and a lock file and are never cached here."""
    from aiocoap.credentials import CredentialsMap

    ident = _file_identity(os.path.join(os.fspath(context_dir), "dtls.json")) if context_dir else None
    key = (uri, os.fspath(context_dir) if context_dir else "")
    hit = _DTLS_CACHE.get(key)
    if hit is not None and ident is not None and hit[0] == ident:
        return dict(hit[1])
    creds = client_credentials(uri, "dtls-psk", context_dir)
    built = CredentialsMap()
    built.load_from_dict(creds)
    items = dict(built)
    with _DTLS_CACHE_LOCK:
        if ident is not None and ident == _file_identity(os.path.join(os.fspath(context_dir), "dtls.json")):
            # unchanged while it was read: the identity describes what was checked
            if key not in _DTLS_CACHE and len(_DTLS_CACHE) >= DTLS_CACHE_MAX:
                _DTLS_CACHE.pop(next(iter(_DTLS_CACHE)))  # the oldest entry
            _DTLS_CACHE[key] = (ident, items)
        else:
            _DTLS_CACHE.pop(key, None)
    return dict(items)


def _device_key(uri: str) -> str:
    """``scheme://host:port`` of a device URI (the DTLS connections held per device)."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}"


class CoapClient:
    """``async with CoapClient() as c: dev = c.device(uri, method, context_dir)``."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._ctx = None
        self._loaded: set[str] = set()
        # The DTLS connections this client has used, per device (scheme://host:port), held until ``release`` of
        # that device or close (see ``_hold``).
        self._dtls: dict[str, dict[int, object]] = {}

    async def __aenter__(self) -> "CoapClient":
        import aiocoap

        # Each request asks the transports in this order which one carries it. tinydtls takes only coaps://, so it
        # goes first (a DTLS-PSK request is not looked up as an OSCORE candidate first); OSCORE must stay ahead
        # of udp6, which would otherwise carry coap:// requests unprotected.
        self._ctx = await aiocoap.Context.create_client_context(transports=list(TRANSPORTS))
        return self

    async def __aexit__(self, *exc) -> None:
        if self._ctx is not None:
            from coap_services.security import release_oscore_contexts

            try:
                await self._ctx.shutdown()
            finally:
                try:
                    self._close_dtls()
                    await asyncio.sleep(0)  # the connections' cancelled retransmission tasks end here
                finally:
                    self._dtls.clear()
                    release_oscore_contexts(self._ctx.client_credentials)
                    self._ctx = None

    def _hold(self, uri: str, remote) -> None:
        """Keep the DTLS connection (aiocoap's tinydtls transport) a request to ``uri`` went over referenced until
        ``release`` of the device or ``close``.

        aiocoap's pool holds its connections weakly and each connection sits in reference cycles (its tasks), so a
        connection nobody references between two requests (the CLM's /csr and /verify, with the CA exchange in
        between) is left to the cyclic garbage collector, which runs in whatever thread allocates when it is due:
        the CMP transport's worker, an asyncio.to_thread worker, a lab server's request thread. Its finalizer then
        resets the live tinydtls session from that thread, beside the event loop that owns it; in ``make bench-ci``
        that crashed the process (SIGSEGV in DTLSSocket's resetPeer; the earlier SIGABRT in that row fits the same
        pattern: docs/cmp.md), and the next request needed a new DTLS handshake. Held here, a connection lives as
        long as the device is in use and is shut down on the loop's thread."""
        if type(remote).__module__ == "aiocoap.transports.tinydtls":
            self._dtls.setdefault(_device_key(uri), {}).setdefault(id(remote), remote)

    def _close_dtls(self, key: str | None = None) -> None:
        """Shut the held DTLS connections (of device ``key``, or all) down now, on this thread, and let go of them
        (``shutdown`` is idempotent in aiocoap; ``Context.shutdown`` does it for those still in its pool)."""
        held = [self._dtls.pop(key, {})] if key is not None else list(self._dtls.values())
        if key is None:
            self._dtls.clear()
        for remotes in held:
            for remote in remotes.values():
                try:
                    remote.shutdown()
                except Exception:  # noqa: BLE001 -- a connection that failed before it was set up has less to shut
                    pass

    def device(self, uri: str, method: str = "none", context_dir=None) -> "DeviceClient":
        """Raises SecurityConfigError for missing or unsafe context files."""
        uri = uri.rstrip("/")
        key = f"{uri}|{method}|{context_dir}"
        if key not in self._loaded:
            if method == "dtls-psk":
                self._ctx.client_credentials.update(_dtls_credentials(uri, context_dir))
            else:
                creds = client_credentials(uri, method, context_dir)
                if creds:
                    self._ctx.client_credentials.load_from_dict(creds)
            self._loaded.add(key)
        return DeviceClient(self, uri)

    def release(self, uri: str) -> None:
        """Unload the OSCORE context ``device()`` loaded for ``uri``: its sequence number is persisted and its
        lock file released, so another process (a second CLM worker) can use the context next, and a CLM
        serving many devices holds only the contexts of renewals in flight. A later ``device()`` reloads it. The
        DTLS connection to the device (if any) is shut down here too, on this (the event loop's) thread."""
        from urllib.parse import urlsplit

        from coap_services.security import release_oscore_contexts

        uri = uri.rstrip("/")
        self._close_dtls(_device_key(uri))
        keys = [k for k in self._loaded if k.startswith(uri + "|")]
        if not keys or self._ctx is None:
            return
        self._loaded.difference_update(keys)
        parts = urlsplit(uri)
        item = self._ctx.client_credentials.pop(f"{parts.scheme}://{parts.netloc}/*", None)
        if item is not None:
            release_oscore_contexts({"": item})

    async def request(self, uri: str, code, payload: bytes = b"", content_format: int | None = None,
                      accept: int | None = None):
        """Send one request, return (response, round-trip seconds).

        Raises:
            DeviceUnreachableError: no answer in time, or the transport failed.
        """
        import aiocoap
        from aiocoap import error as coap_error

        msg = aiocoap.Message(code=code, uri=uri, payload=payload)
        if content_format is not None:
            msg.opt.content_format = content_format
        if accept is not None:
            msg.opt.accept = accept
        t0 = time.perf_counter()
        req = self._ctx.request(msg)
        try:
            # asyncio.timeout around the response future itself: the task wakes in the loop iteration the response
            # arrives in (wait_for in 3.11 relays it through a second future: one more iteration per request)
            async with asyncio.timeout(self.timeout_s):
                resp = await req.response
        except TimeoutError:
            raise DeviceUnreachableError(f"{uri}: no answer within {self.timeout_s:.0f} s (device down, wrong "
                                         "address, or a wrong DTLS PSK: DTLS fails silently)") from None
        except coap_error.Error as e:
            raise DeviceUnreachableError(f"{uri}: {type(e).__name__}: {e}") from e
        except OSError as e:
            raise DeviceUnreachableError(f"{uri}: {e.strerror or e}") from e
        self._hold(uri, resp.remote)
        return resp, time.perf_counter() - t0


class DeviceClient:
    """One device: ``csr()``, ``verify()``, ``status()``; each returns timings for the benchmark stages."""

    def __init__(self, client: CoapClient, uri: str):
        self.client = client
        self.uri = uri

    def _check(self, resp, path):
        if not resp.code.is_successful():
            diag = codec.decode_diagnostic(resp.payload) if resp.opt.content_format in (None, codec.CF_CBOR) \
                else {"error": "unknown", "message": ""}
            raise DeviceError(f"{self.uri}{path}", resp.code.dotted, diag["error"], diag["message"],
                              resp.opt.max_age)

    async def csr(self, req: codec.CsrRequest) -> tuple[x509.CertificateSigningRequest, bytes, float, float | None]:
        """POST /csr. Returns (CSR, DER, round trip s, device key+CSR s).

        Raises:
            DeviceError, DeviceUnreachableError, PayloadError (the device sent something that is not a CSR).
        """
        from aiocoap.numbers.codes import Code

        resp, rtt = await self.client.request(f"{self.uri}/csr", Code.POST, codec.encode_csr_request(req),
                                              codec.CF_CBOR)
        self._check(resp, "/csr")
        if resp.opt.content_format not in (None, codec.CF_PKCS10):
            raise PayloadError("bad-response", f"{self.uri}/csr: answered content-format "
                               f"{resp.opt.content_format}, expected {codec.CF_PKCS10}")
        try:
            csr = x509.load_der_x509_csr(resp.payload)
        except ValueError as e:
            raise PayloadError("bad-response", f"{self.uri}/csr: the answer is not a DER PKCS#10 CSR") from e
        return csr, resp.payload, rtt, _timing_s(resp)

    async def verify(self, payload: bytes, content_format: int) -> tuple[dict, float, float | None]:
        """POST /verify with a DER certificate (287) or certs-only PKCS#7 (281). Returns (answer, rtt, device s).

        Raises:
            DeviceError (4.03 rejected, 4.09 no pending key, ...), DeviceUnreachableError.
        """
        from aiocoap.numbers.codes import Code

        resp, rtt = await self.client.request(f"{self.uri}/verify", Code.POST, payload, content_format)
        self._check(resp, "/verify")
        try:
            answer = codec.decode_map(resp.payload, "verify answer") if resp.payload else {}
        except PayloadError:
            answer = {}
        return answer, rtt, _timing_s(resp)

    async def status(self) -> dict:
        from aiocoap.numbers.codes import Code

        resp, _ = await self.client.request(f"{self.uri}/status", Code.GET)
        self._check(resp, "/status")
        return codec.decode_map(resp.payload, "status")

    async def well_known_core(self) -> str:
        from aiocoap.numbers.codes import Code

        resp, _ = await self.client.request(f"{self.uri}/.well-known/core", Code.GET)
        self._check(resp, "/.well-known/core")
        return resp.payload.decode("utf-8", "replace")
