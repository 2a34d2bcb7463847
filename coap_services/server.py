"""The device's CoAP server: resources /csr, /verify, /status and /.well-known/core on aiocoap.

Thin adapters around ``coap_services.device.DeviceService``: authenticate, bound the request size (also
per block, before aiocoap reassembles Block1), decode with ``codec``, call the service, render the answer or the
``ServiceError`` as code + CBOR diagnostic. aiocoap is imported only here and in ``coap_services.client``.

Transports: plain CoAP (udp6) on ``port``; DTLS-PSK (aiocoap's tinydtls server) on ``port + 1``; OSCORE inside
plain CoAP. Plain-CoAP requests carry no authenticated claims, so /csr, /verify and /status answer 4.01 to them
unless the service runs with ``insecure=True``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal

import aiocoap
import aiocoap.resource as resource
from aiocoap import error as coap_error
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import UintOption

from coap_services import codec
from coap_services.device import DeviceService
from coap_services.errors import (
    INTERNAL_SERVER_ERROR, REQUEST_ENTITY_TOO_LARGE, UNAUTHORIZED, PayloadError, ServiceError,
)
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


class _Guarded(resource.Resource):
    """Authentication and size bound before anything else; errors rendered as CBOR diagnostics."""

    max_bytes = 1024
    needs_auth = True
    path = ""

    def __init__(self, app: "DeviceApp"):
        super().__init__()
        self.app = app

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
            raise _Rendered(error_message(e)) from None
        return True

    async def render(self, request):
        try:
            peer = self._peer(request)
            if len(request.payload) > self.max_bytes:
                raise PayloadError("too-large", f"request of {len(request.payload)} bytes exceeds {self.max_bytes}",
                                   REQUEST_ENTITY_TOO_LARGE)
            handler = getattr(self, f"render_{str(request.code).lower()}", None)
            if handler is None:
                raise coap_error.UnallowedMethod()
            return await handler(request, peer)
        except ServiceError as e:
            (log.warning if e.code == INTERNAL_SERVER_ERROR else log.info)("%s %s refused: %s", request.code,
                                                                             self.path, e)
            return error_message(e)
        except coap_error.RenderableError:
            raise
        except Exception:
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


@dataclasses.dataclass
class DeviceApp:
    service: DeviceService
    layers: list[ServerSecurity]
    insecure: bool = False

    @property
    def claims(self) -> set[str]:
        out: set[str] = set()
        for layer in self.layers:
            out |= layer.claims
        return out

    def site(self) -> resource.Site:
        root = resource.Site()
        root.add_resource([".well-known", "core"], resource.WKCResource(root.get_resources_as_linkheader))
        root.add_resource(["csr"], CsrResource(self))
        root.add_resource(["verify"], VerifyResource(self))
        root.add_resource(["status"], StatusResource(self))
        return root


class DeviceServer:
    """A running device service. ``await DeviceServer.start(...)``, then ``await server.stop()``."""

    def __init__(self, context, app: DeviceApp, bind: tuple[str, int]):
        self.context = context
        self.app = app
        self.bind = bind

    @property
    def uri(self) -> str:
        return f"coap://{self.bind[0]}:{self.bind[1]}"

    @property
    def dtls_uri(self) -> str:
        return f"coaps://{self.bind[0]}:{self.bind[1] + 1}"

    @classmethod
    async def start(cls, service: DeviceService, layers: list[ServerSecurity], *, host: str = "127.0.0.1",
                    port: int = 5683, insecure: bool = False) -> "DeviceServer":
        from aiocoap.credentials import CredentialsMap

        app = DeviceApp(service, list(layers), insecure)
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
        log.info("device service %s listening on coap://%s:%d%s; security: %s", service.config.device_id, host, port,
                 f" and coaps://{host}:{port + 1}" if "tinydtls_server" in transports else "",
                 ", ".join(layer.describe() for layer in app.layers) or "none")
        return cls(ctx, app, (host, port))

    async def stop(self) -> None:
        from coap_services.security import release_oscore_contexts

        try:
            await self.context.shutdown()
        finally:
            release_oscore_contexts(self.context.server_credentials)


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
        await service.drain()  # let a keystore write in progress complete
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()
        log.info("stopped")
