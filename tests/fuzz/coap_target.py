"""Fuzz target ``coap_device``: raw CoAP datagrams against a real ``devagent serve`` site on 127.0.0.1.

The site (``coap_services.server.DeviceServer``, aiocoap's UDP transport, block-wise reassembly included) runs
on a keystore copied from ``corpus/coap_device.context/keystore`` (one pending key, the domain ``fuzz`` anchored
at the lab root there). An input is up to 8 datagrams, each framed as a 2-byte length + the datagram; the
datagrams go out one by one from a fresh UDP socket (so no reassembly or deduplication state crosses inputs),
with fresh message IDs, and each well-formed request must be answered within ``engine.HANG_WALL_S`` (the engine
counts an input whose server and client side together take more than ``engine.HANG_S`` of CPU as a hang too).

Properties: no 5.00 and no exception logged by the service (a foreign exception is re-raised with its
traceback); a request answered with an error changes nothing stored; a 2.04 to /verify stored exactly the
recorded certificate (a mutant changing signed content is never stored). After a 2.04 the keystore is reset
from the pristine copy so the recorded /verify stays meaningful.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket

from tests.fuzz.engine import CORPUS, HANG_WALL_S, AcceptedMutant, StateChanged

CONTEXT = CORPUS / "coap_device.context"
_S: dict = {}


class CoapRefused(Exception):
    """Every answer was a 4.xx (or a reset, or nothing for a datagram that is no request): the contract."""


def allowed():
    return (CoapRefused,)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _fresh_keystore():
    from tests.fuzz.targets import tmpdir

    live = tmpdir() / "coap-keystore"
    if live.exists():
        shutil.rmtree(live)
    shutil.copytree(CONTEXT / "keystore", live)
    os.chmod(live, 0o700)
    for dirpath, dirs, files in os.walk(live):
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), 0o700)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o600)
    return live


async def _start():
    from coap_services.device import DeviceConfig, DeviceService
    from coap_services.server import DeviceServer
    from keystore.store import Keystore

    root = _fresh_keystore()
    ks = Keystore.open(root)
    svc = DeviceService(ks, DeviceConfig(device_id="fuzz-device", default_domain="fuzz", check_validity=False))
    server = await DeviceServer.start(svc, [], host="127.0.0.1", port=0 if False else _free_port(), insecure=True)
    _S.update(root=root, ks=ks, svc=svc, server=server)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup():
    if "loop" in _S:
        return
    loop = asyncio.new_event_loop()
    _S["loop"] = loop
    cap = _Capture()
    for name in ("devagent.coap", "coap-server", "coap"):
        logging.getLogger(name).addHandler(cap)
    logging.getLogger("devagent.coap").setLevel(logging.ERROR)  # per-request INFO lines are noise here
    _S["cap"] = cap
    _S["mid"] = 1
    loop.run_until_complete(_start())
    from cryptography import x509

    _S["leaf"] = x509.load_pem_x509_certificate((CONTEXT / "leaf.pem").read_bytes())


def teardown():
    loop = _S.get("loop")
    if loop is None:
        return
    loop.run_until_complete(_S["server"].stop())
    loop.close()
    _S.clear()


async def _restart():
    await _S["svc"].drain()  # as `devagent serve` does on SIGTERM: a keystore write in progress completes
    await _S["server"].stop()
    await _start()


def _frames(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i + 2 <= len(data) and len(out) < 8:
        n = int.from_bytes(data[i:i + 2], "big")
        out.append(data[i + 2:i + 2 + n])
        i += 2 + n
    return out


def _request_ids(dgram: bytes) -> tuple[int, bytes] | None:
    """(message ID, token) of a datagram the server must answer (a CON or NON request), else None."""
    import aiocoap

    try:
        m = aiocoap.Message.decode(dgram)
    except Exception:  # noqa: BLE001 - not a CoAP message: the server may ignore it
        return None
    return (m.mid, m.token) if m.code.is_request() and int(m.mtype) in (0, 1) else None


def _answers(m, ids: tuple[int, bytes]) -> bool:
    """Whether message ``m`` from the server answers the request ``ids``: an ACK or RST carries its message ID
    (RFC 7252 §4.2), a separate response (CON/NON) its token (§5.3.2)."""
    mid, token = ids
    if int(m.mtype) in (2, 3):
        return m.mid == mid
    return m.code.is_response() and m.token == token


async def _exchange(frames: list[bytes]) -> list[tuple[int, bytes]]:
    """Send the datagrams one by one, each request waiting for *its* answer (matched by message ID or token:
    an answer to something else, e.g. the RST to a CoAP ping or to a stray response, is kept aside and never
    taken for the request's), then settle. Returns the requests' answers, then the stray ones."""
    import aiocoap

    loop = asyncio.get_running_loop()
    host, port = _S["server"].bind
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    answers, stray = [], []

    async def receive(ids, size):
        """Wait (at most HANG_WALL_S) for the answer to the request ``ids`` of ``size`` bytes; with ``ids``
        None, only collect the datagrams already queued."""
        deadline = loop.time() + HANG_WALL_S
        while True:
            if ids is None:
                try:
                    raw = sock.recv(65536)
                except BlockingIOError:
                    return None
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise _NoAnswer(size)
                try:
                    raw = await asyncio.wait_for(loop.sock_recv(sock, 65536), remaining)
                except asyncio.TimeoutError:
                    continue
            try:
                m = aiocoap.Message.decode(raw)
            except Exception:  # noqa: BLE001
                continue
            if int(m.mtype) == 0:  # a separate response arrives as CON: acknowledge it
                await loop.sock_sendto(sock, bytes([0x60, 0, raw[2], raw[3]]), (host, port))
            if ids is None or not _answers(m, ids):
                if int(m.code) != 0 or int(m.mtype) == 3:  # (not an empty ACK)
                    stray.append((int(m.code), m.payload))
                continue
            if int(m.code) == 0 and int(m.mtype) == 2:
                continue  # empty ACK: the separate response follows
            return (int(m.code), m.payload) if int(m.mtype) != 3 else (0, b"")

    try:
        for dgram in frames:
            if len(dgram) >= 4:
                dgram = dgram[:2] + _next_mid().to_bytes(2, "big") + dgram[4:]
            ids = _request_ids(dgram)
            await loop.sock_sendto(sock, dgram, (host, port))
            if ids is not None:
                answers.append(await receive(ids, len(dgram)))
        await _settle(sock, receive)
    finally:
        sock.close()
    return answers + stray


def _next_mid() -> int:
    _S["mid"] = (_S["mid"] % 0xFFFF) + 1
    return _S["mid"]


async def _settle(sock, receive) -> None:
    """Return once nothing this input started is still running on the site, so the snapshot after it (and the
    next input's snapshot before) sees a keystore at rest: a CoAP ping (CON, empty) is answered with a RST only
    after the server has read every datagram sent before it; then wait until no request is being rendered and no
    keystore operation of the service holds its lock; answers still queued are collected as stray ones."""
    loop = asyncio.get_running_loop()
    host, port = _S["server"].bind
    mid = _next_mid()
    await loop.sock_sendto(sock, bytes([0x40, 0, mid >> 8, mid & 0xFF]), (host, port))
    await receive((mid, b""), 4)
    deadline = loop.time() + HANG_WALL_S
    app, svc, quiet = _S["server"].app, _S["svc"], 0
    while quiet < 3:  # three consecutive loop iterations at rest (a dispatched request starts rendering)
        await asyncio.sleep(0)
        busy = app.in_flight or svc._store.locked() or svc._keygen.locked()
        quiet = 0 if busy else quiet + 1
        if busy and loop.time() > deadline:
            raise _NoAnswer(0)
        if busy:
            await asyncio.sleep(0.001)
    await receive(None, 0)


class _NoAnswer(Exception):
    def __init__(self, size: int):
        super().__init__(f"no answer within {HANG_WALL_S:g} s to a well-formed request ({size} bytes)" if size else
                         f"the site still busy {HANG_WALL_S:g} s after the last answer")


def run(data: bytes) -> None:
    from tests.fuzz.targets import _diff, snapshot

    setup()
    loop, cap = _S["loop"], _S["cap"]
    cap.records.clear()
    before = snapshot(_S["root"])
    try:
        answers = loop.run_until_complete(_exchange(_frames(data)))
    except _NoAnswer as e:
        from tests.fuzz.engine import _Abort  # counted as a hang

        raise _Abort() from e
    for rec in cap.records:
        if rec.exc_info and rec.exc_info[1] is not None:
            raise rec.exc_info[1]
        raise RuntimeError(f"service logged an error: {rec.getMessage()[:200]}")
    codes = [c for c, _ in answers]
    if any(c == 0xA0 for c in codes):
        raise RuntimeError("the device answered 5.00 (internal error) to a request")
    after = snapshot(_S["root"])
    changed = any(c == 0x44 for c in codes)  # 2.04 Changed: a CSR (pending key) or a stored certificate
    if not changed and after != before:
        raise StateChanged(f"a refused request changed {_diff(before, after)}")
    if changed:
        try:
            cred = _S["ks"].get("ldevid")
        except Exception:  # noqa: BLE001 - no credential stored: a /csr 2.04
            cred = None
        if cred is not None and cred.certificate != _S["leaf"]:
            raise AcceptedMutant("POST /verify stored a certificate that is not the recorded one")
        loop.run_until_complete(_restart())
        return
    if not codes or all(c >= 0x80 or c == 0 for c in codes):
        raise CoapRefused()
