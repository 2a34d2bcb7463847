"""The device's CoAP server: resources /csr, /verify, /status and /.well-known/core on aiocoap.

Thin adapters around ``coap_services.device.DeviceService``: authenticate, bound the request size (also
per block, before aiocoap reassembles Block1), decode with ``codec``, call the service, render the answer or the
``ServiceError`` as code + CBOR diagnostic. aiocoap is imported only here and in ``coap_services.client``.

Transports: plain CoAP (udp6) on ``port``; DTLS-PSK (aiocoap's tinydtls server) on ``port + 1``; OSCORE inside
plain CoAP. Plain-CoAP requests carry no authenticated claims, so /csr, /verify and /status answer 4.01 to them
unless the service runs with ``insecure=True``.

Bounded memory (``coap_services.limits.ServeLimits``, docs/coap.md "Bounds under load"): aiocoap 0.4.17 remembers
every received message for EXCHANGE_LIFETIME (247 s) with one timer each, keeps abandoned Block1 uploads and
Block2 answers in unbounded dictionaries, and renders any number of requests at once. The server replaces the
deduplication of each of its message layers with a bounded ``DedupCache`` (``_BoundedDedup``; the one place that
touches aiocoap's private message-layer hooks, checked at start), gives every resource a bounded Block1 spool and
Block2 cache, and answers 5.03 + Max-Age beyond ``in_flight`` requests in progress. Refusals, aiocoap's warnings
about garbage datagrams and its decoder crashes on them are logged through ``LogSummary``: the first of each kind,
then one summary line per interval.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time

import aiocoap
import aiocoap.resource as resource
from aiocoap import error as coap_error
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import UintOption

from coap_services import codec
from coap_services.device import DeviceService
from coap_services.errors import (
    INTERNAL_SERVER_ERROR, REQUEST_ENTITY_TOO_LARGE, SERVICE_UNAVAILABLE, UNAUTHORIZED, PayloadError, ServiceError,
    code_str,
)
from coap_services.limits import DedupCache, ExpiringLru, LogSummary, ServeLimits
from coap_services.security import ServerSecurity, authenticated_peer

log = logging.getLogger("devagent.coap")

INSECURE_CLAIM = "insecure"


def error_message(e: ServiceError) -> aiocoap.Message:
    m = aiocoap.Message(code=Code(e.code), payload=codec.encode_diagnostic(e.reason, e.message),
                        content_format=codec.CF_CBOR)
    if e.max_age is not None:
        m.opt.max_age = e.max_age
    return m


def _timed(m: aiocoap.Message, seconds: float) -> aiocoap.Message:
    m.opt.add_option(UintOption(codec.TIMING_OPTION, codec.timing_us(seconds)))
    return m


# ---- bounded replacements for aiocoap's per-request state ----------------------------------------------------
def _block_key(req) -> tuple:
    """What all blocks of one Block1 upload (or one Block2 download) share (RFC 7959 §2.4: same endpoint, method
    and options apart from the block options)."""
    from aiocoap.numbers.optionnumbers import OptionNumber

    return (req.remote.blockwise_key, req.code,
            req.get_cache_key([OptionNumber.BLOCK1, OptionNumber.BLOCK2, OptionNumber.OBSERVE]))


class BoundedBlock1Spool:
    """Block1 reassembly (RFC 7959 §2.5) for at most ``uploads`` transfers per resource; the least recently
    continued one is dropped when a new one starts (its next block is answered 4.08 Request Entity Incomplete).
    An upload not continued for MAX_TRANSMIT_WAIT (93 s) is forgotten. Duck-types aiocoap's ``Block1Spool``."""

    def __init__(self, uploads: int, clock=time.monotonic):
        from aiocoap.numbers import TransportTuning

        self._assemblies = ExpiringLru(uploads, TransportTuning().MAX_TRANSMIT_WAIT, refresh=True, clock=clock)

    def __len__(self) -> int:
        return len(self._assemblies)

    def feed_and_take(self, req):
        from aiocoap.blockwise import ContinueException, IncompleteException

        b1 = req.opt.block1
        if b1 is None:
            return req
        key = _block_key(req)
        if b1.block_number == 0:
            self._assemblies.put(key, req)  # a new upload replaces an unfinished one from the same client
            assembled = req
        else:
            assembled = self._assemblies.get(key)
            if assembled is None or b1.start != len(assembled.payload):
                self._assemblies.pop(key)
                raise IncompleteException  # 4.08: unknown upload, a gap or an overlap
            if b1.more and len(req.payload) != b1.size:
                self._assemblies.pop(key)
                raise coap_error.BadRequest("Block1 payload size does not match the block size")
            assembled.payload += req.payload
            assembled.opt.block1 = b1
            assembled.token, assembled.mid = req.token, req.mid
            if not b1.more and req.opt.block2 is not None:
                assembled.opt.block2 = req.opt.block2
        if b1.more:
            raise ContinueException(b1)
        self._assemblies.pop(key)
        return assembled


def _bounded_block2_cache(answers: int, clock=time.monotonic):
    """aiocoap's Block2Cache (it slices answers into blocks) keeping at most ``answers`` answers, LRU."""
    from aiocoap.blockwise import Block2Cache
    from aiocoap.numbers import TransportTuning

    cache = Block2Cache()
    cache._completes = ExpiringLru(answers, TransportTuning().MAX_TRANSMIT_WAIT, refresh=True, clock=clock)
    return cache


class _BoundedDedup:
    """Message deduplication (RFC 7252 §4.5) of one aiocoap MessageManager in a bounded ``DedupCache``.

    aiocoap's ``_deduplicate_message`` keeps each received message's (remote, message id) and the answer message
    (which references the whole request) for EXCHANGE_LIFETIME with one timer each: about 3 KB per request, for
    247 s (aiocoap issue #183). This keeps the answer's bytes only, in a fixed number of entries, and resends them
    to a duplicate as aiocoap does.
    """

    UNSAFE = ("POST", "PUT", "DELETE", "FETCH", "PATCH", "iPATCH")

    def __init__(self, manager, limits: ServeLimits, clock=time.monotonic):
        self.manager = manager
        self.cache = DedupCache(limits.dedup_entries, limits.dedup_keep, clock=clock)

    @classmethod
    def install(cls, context, limits: ServeLimits) -> list["_BoundedDedup"]:
        """Replace the deduplication of every message layer of ``context``; returns the installed ones (none if
        this aiocoap version has other internals: then aiocoap's own unbounded deduplication stays, and a warning
        says so)."""
        from aiocoap import meta
        from aiocoap.messagemanager import MessageManager
        from aiocoap.tokenmanager import TokenManager

        hooks = ("_deduplicate_message", "_store_response_for_duplicates", "_send_via_transport")
        out = []
        for ri in context.request_interfaces:
            mm = getattr(ri, "token_interface", None) if isinstance(ri, TokenManager) else None
            if isinstance(mm, MessageManager) and all(callable(getattr(MessageManager, h, None)) for h in hooks):
                d = cls(mm, limits)
                mm._deduplicate_message = d.deduplicate
                mm._store_response_for_duplicates = d.store_response
                out.append(d)
        if not out:
            log.warning("aiocoap %s: cannot bound its message deduplication (internals changed); memory under a "
                        "request flood grows until EXCHANGE_LIFETIME (247 s) passes", meta.version)
        return out

    def deduplicate(self, message) -> bool:
        """True when ``message`` (a request) is a duplicate; its stored answer, if any, is sent again."""
        tuning = message.transport_tuning
        if message.mtype is aiocoap.CON:
            lifetime = tuning.EXCHANGE_LIFETIME
        else:  # RFC 7252 §4.8.2: NON_LIFETIME = MAX_TRANSMIT_SPAN + MAX_LATENCY (145 s)
            lifetime = tuning.MAX_TRANSMIT_SPAN + tuning.MAX_LATENCY
        dup, answer = self.cache.seen((message.remote, message.mid), lifetime)
        if not dup:
            return False
        if message.mtype is aiocoap.CON and answer is not None:
            raw, remote = answer
            resend = aiocoap.Message.decode(raw, remote)
            resend.direction = aiocoap.message.Direction.OUTGOING
            self.manager._send_via_transport(resend)
        return True

    def store_response(self, message) -> None:
        """Called for every message sent: remember it as the answer to the request with its message id."""
        if message.mtype is aiocoap.CON:
            return  # a separate response has its own message id; it is retransmitted by the message layer
        request = getattr(message, "request", None)
        unsafe = request is not None and str(request.code) in self.UNSAFE
        keep = unsafe and (message.code is Code.EMPTY or message.code.is_successful())
        self.cache.answered((message.remote, message.mid), (message.encode(), message.remote), keep=keep)


class _Guarded(resource.Resource):
    """Authentication and size bound before anything else; errors rendered as CBOR diagnostics."""

    max_bytes = 1024
    needs_auth = True
    path = ""

    def __init__(self, app: "DeviceApp"):
        super().__init__()
        self.app = app
        self._block1 = BoundedBlock1Spool(app.limits.uploads)
        self._block2 = _bounded_block2_cache(app.limits.block2_answers)

    def _peer(self, request) -> str | None:
        if not self.needs_auth:
            return None
        peer = authenticated_peer(request.remote, self.app.claims)
        if peer is None:
            if self.app.insecure:
                return INSECURE_CLAIM
            raise ServiceError(UNAUTHORIZED, "unauthenticated", "this resource needs OSCORE or DTLS-PSK with a "
                               "context provisioned at commissioning ('devagent coap provision')")
        return peer

    async def needs_blockwise_assembly(self, request):
        # Called for every Block1 block: refuse unauthenticated or oversized transfers before spooling them.
        try:
            self._peer(request)
            b1 = request.opt.block1
            if request.opt.size1 is not None and request.opt.size1 > self.max_bytes:
                raise PayloadError("too-large", f"request of {request.opt.size1} bytes exceeds {self.max_bytes}",
                                   REQUEST_ENTITY_TOO_LARGE)
            if b1 is not None and b1.start + len(request.payload) > self.max_bytes:
                raise PayloadError("too-large", f"request exceeds {self.max_bytes} bytes", REQUEST_ENTITY_TOO_LARGE)
        except ServiceError as e:
            self.app.refused(request, self.path, e)
            raise _Rendered(error_message(e)) from None
        return True

    async def render(self, request):
        app = self.app
        try:
            peer = self._peer(request)
            # The method first: POST /status is 4.05 Method Not Allowed whatever its payload, not 4.13.
            handler = getattr(self, f"render_{str(request.code).lower()}", None)
            if handler is None:
                raise coap_error.UnallowedMethod()
            if len(request.payload) > self.max_bytes:
                raise PayloadError("too-large", f"request of {len(request.payload)} bytes exceeds {self.max_bytes}",
                                   REQUEST_ENTITY_TOO_LARGE)
            if app.in_flight >= app.limits.in_flight:
                raise ServiceError(SERVICE_UNAVAILABLE, "overloaded", f"{app.in_flight} requests are in progress; "
                                   "retry shortly", max_age=1)
            app.in_flight += 1
            try:
                return await handler(request, peer)
            finally:
                app.in_flight -= 1
        except ServiceError as e:
            app.refused(request, self.path, e)
            return error_message(e)
        except coap_error.RenderableError:
            raise
        except Exception as e:
            if app.log_summary.first((self.path, "internal", type(e).__name__), logging.ERROR):
                log.exception("internal error in %s", self.path)
            return error_message(ServiceError(INTERNAL_SERVER_ERROR, "internal", "internal error; see the device log"))


class _Rendered(coap_error.RenderableError):
    def __init__(self, message):
        super().__init__()
        self._message = message

    def to_message(self):
        return self._message


class CsrResource(_Guarded):
    """POST /csr: CSR_generation_request."""

    max_bytes = codec.MAX_CSR_REQUEST_BYTES
    path = "/csr"
    ct = codec.CF_PKCS10
    rt = "devagent.csr"

    async def render_post(self, request, peer):
        req = codec.decode_csr_request(request.payload, request.opt.content_format)
        res = await self.app.service.csr(req, peer)
        return _timed(aiocoap.Message(code=Code.CHANGED, payload=res.csr_der, content_format=codec.CF_PKCS10),
                      res.elapsed_s)


class VerifyResource(_Guarded):
    """POST /verify: verify_certificate."""

    max_bytes = codec.MAX_VERIFY_BYTES
    path = "/verify"
    ct = f"{codec.CF_PKIX_CERT} {codec.CF_PKCS7_CERTS}"
    rt = "devagent.verify"

    async def render_post(self, request, peer):
        certs = codec.decode_certificates(request.payload, request.opt.content_format)
        res = await self.app.service.verify(certs, peer)
        return _timed(aiocoap.Message(code=Code.CHANGED, payload=res.to_cbor(), content_format=codec.CF_CBOR),
                      res.elapsed_s)


class StatusResource(_Guarded):
    """GET /status: credentials, not-after, operational state."""

    max_bytes = 0
    path = "/status"
    ct = codec.CF_CBOR
    rt = "devagent.status"

    async def render_get(self, request, peer):
        return aiocoap.Message(code=Code.CONTENT, payload=codec.encode_map(await self.app.service.status()),
                               content_format=codec.CF_CBOR)


class _WellKnownCore(resource.WKCResource):
    """/.well-known/core with the bounded block-wise state; a GET carries no upload to reassemble."""

    def __init__(self, app: "DeviceApp", listgenerator):
        super().__init__(listgenerator)
        self._block1 = BoundedBlock1Spool(1)
        self._block2 = _bounded_block2_cache(app.limits.block2_answers)

    async def needs_blockwise_assembly(self, request):
        return request.opt.block1 is None


@dataclasses.dataclass
class DeviceApp:
    """The device's CoAP application: its service, security layers and limits."""

    service: DeviceService
    layers: list[ServerSecurity]
    insecure: bool = False
    limits: ServeLimits = dataclasses.field(default_factory=ServeLimits)
    in_flight: int = 0  # requests being rendered now

    def __post_init__(self):
        self.resources: dict[str, resource.Resource] = {}  # path -> resource, filled by site()
        self.log_summary = LogSummary(log, "refused", "request(s)", interval_s=self.limits.log_interval_s)

    def refused(self, request, path: str, e: ServiceError) -> None:
        """Log a refusal: the first of its kind (method, path, code, reason) at once, repeats in a summary."""
        level = logging.WARNING if e.code == INTERNAL_SERVER_ERROR else logging.INFO
        self.log_summary.note((str(request.code), path, code_str(e.code), e.reason), level, "%s %s refused: %s",
                              request.code, path, e)

    @property
    def claims(self) -> set[str]:
        out: set[str] = set()
        for layer in self.layers:
            out |= layer.claims
        return out

    def site(self) -> resource.Site:
        root = resource.Site()
        self.resources = {"/.well-known/core": _WellKnownCore(self, root.get_resources_as_linkheader),
                          "/csr": CsrResource(self), "/verify": VerifyResource(self), "/status": StatusResource(self)}
        for path, r in self.resources.items():
            root.add_resource(path.strip("/").split("/"), r)
        return root


class _AiocoapLogFilter(logging.Filter):
    """aiocoap's own warnings (``coap-server`` logger, e.g. "Ignoring unparsable message" per garbage datagram):
    the first of each kind passes, repeats go into the summary."""

    def __init__(self, summary: LogSummary):
        super().__init__()
        self.summary = summary

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        return self.summary.first(("aiocoap:", repr(str(record.msg)[:80])), min(record.levelno, logging.WARNING))


def _from_datagram_decoder(exc: BaseException) -> bool:
    """True for an exception raised while aiocoap's UDP transport decoded a received datagram (aiocoap 0.4.17
    lets UnicodeDecodeError and similar escape from ``Message.decode`` on garbage options)."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "datagram_msg_received" and "aiocoap" in code.co_filename:
            return True
        tb = tb.tb_next
    return False


class DeviceServer:
    """A running device service. ``await DeviceServer.start(...)``, then ``await server.stop()``.

    ``dedup`` holds the bounded deduplication of each message layer, ``garbage`` the summary of datagrams that
    could not be parsed (both for tests and the benchmark).
    """

    def __init__(self, context, app: DeviceApp, bind: tuple[str, int], dedup: list[_BoundedDedup]):
        self.context = context
        self.app = app
        self.bind = bind
        self.dedup = dedup
        self.garbage = LogSummary(log, "ignored", "unparsable datagram(s)", interval_s=app.limits.log_interval_s)
        self._log_filter = _AiocoapLogFilter(self.garbage)
        logging.getLogger("coap-server").addFilter(self._log_filter)
        self._loop = asyncio.get_running_loop()
        self._prev_handler = self._loop.get_exception_handler()
        self._loop.set_exception_handler(self._loop_exception)
        self._ticker = self._loop.create_task(self._tick_logs(), name="devagent-coap-log-summary")

    @property
    def uri(self) -> str:
        return f"coap://{self.bind[0]}:{self.bind[1]}"

    @property
    def dtls_uri(self) -> str:
        return f"coaps://{self.bind[0]}:{self.bind[1] + 1}"

    @classmethod
    async def start(cls, service: DeviceService, layers: list[ServerSecurity], *, host: str = "127.0.0.1",
                    port: int = 5683, insecure: bool = False, limits: ServeLimits | None = None) -> "DeviceServer":
        from aiocoap.credentials import CredentialsMap

        app = DeviceApp(service, list(layers), insecure, limits or ServeLimits())
        creds = CredentialsMap()
        d = {}
        for layer in app.layers:
            d.update(layer.credentials())
        creds.load_from_dict(d)
        site = app.site()
        for layer in app.layers:
            site = layer.wrap_site(site, creds)
        transports = ["udp6"]
        for layer in app.layers:
            transports += [t for t in layer.transports if t not in transports]
        ctx = await aiocoap.Context.create_server_context(site, bind=(host, port), server_credentials=creds,
                                                          transports=transports)
        dedup = _BoundedDedup.install(ctx, app.limits)
        log.info("device service %s listening on coap://%s:%d%s; security: %s", service.config.device_id, host, port,
                 f" and coaps://{host}:{port + 1}" if "tinydtls_server" in transports else "",
                 ", ".join(layer.describe() for layer in app.layers) or "none")
        return cls(ctx, app, (host, port), dedup)

    def _loop_exception(self, loop, context) -> None:
        exc = context.get("exception")
        if exc is not None and _from_datagram_decoder(exc):
            self.garbage.note(("undecodable",), logging.WARNING, "ignored a datagram that aiocoap cannot decode "
                              "(%s: %s); further ones are counted", type(exc).__name__, exc)
            return
        if self._prev_handler is not None:
            self._prev_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    async def _tick_logs(self) -> None:
        while True:
            await asyncio.sleep(self.app.limits.log_interval_s / 4)
            self.app.log_summary.tick()
            self.garbage.tick()

    def stats(self) -> dict:
        """What the bounded state holds now (tests, benchmark)."""
        return {"dedup": sum(len(d.cache) for d in self.dedup),
                "dedup_keep": sum(len(d.cache.keep) for d in self.dedup),
                "uploads": sum(len(r._block1) for r in self.app.resources.values()),
                "dedup_evicted": sum(d.cache.evicted for d in self.dedup),
                "duplicates": sum(d.cache.duplicates for d in self.dedup),
                "in_flight": self.app.in_flight,
                "refusals_logged": self.app.log_summary.logged, "refusals_counted": self.app.log_summary.suppressed,
                "garbage_logged": self.garbage.logged, "garbage_counted": self.garbage.suppressed}

    async def stop(self) -> None:
        from coap_services.security import release_oscore_contexts

        self._ticker.cancel()
        try:
            await self.context.shutdown()
            await self.app.service.flush()  # what the last /verify deferred (the superseded key's destruction)
        finally:
            release_oscore_contexts(self.context.server_credentials)
            self.app.log_summary.tick(force=True)
            self.garbage.tick(force=True)
            logging.getLogger("coap-server").removeFilter(self._log_filter)
            if self._loop.get_exception_handler() == self._loop_exception:
                self._loop.set_exception_handler(self._prev_handler)


async def serve_forever(service: DeviceService, layers, *, host: str, port: int, insecure: bool,
                        ready=None) -> None:
    """Run until SIGTERM/SIGINT, then shut the context down cleanly (in-flight keystore writes finish)."""
    server = await DeviceServer.start(service, layers, host=host, port=port, insecure=insecure)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
        log.info("shutting down")
        await service.close()  # let a keystore write in progress complete; drop the held keys
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()
        log.info("stopped")
