"""A bounded CoAP request flood against a device service on loopback, and the server's memory while it runs.

The load generator speaks raw CoAP over UDP (messages built and parsed with aiocoap's ``Message``, one socket per
simulated peer), so it is not limited by a client library's congestion control (NSTART = 1 per endpoint) and can
send what a well-behaved client never would: garbage datagrams, malformed options, block-wise uploads abandoned
halfway. ``in_flight`` workers each keep one confirmable request outstanding; a worker moves to a fresh socket (a
new source port: a new peer as far as the server can tell) every ``requests_per_peer`` requests, so per-peer state
on the server is exercised as well as per-request state.

Mix (round robin per worker, so every kind is present in any window of the run):
  csr          POST /csr, CBOR {} (with ``--insecure``: a key generation or, mostly, 5.03 rate-limited + Max-Age)
  status       GET /status
  bad-cbor     POST /csr with a payload that is not CBOR (4.00 malformed-cbor)
  not-found    GET /nope (4.04)
  garbage      a datagram that is not CoAP at all (no answer expected; the server must not break)
  block        POST /verify in 64-byte Block1 blocks (~600 bytes of garbage, answered 4.00 after the last block)
  block-abandon the first three blocks of such an upload, then silence (the server's Block1 spool keeps it)

``flood(...)`` returns a ``FloodResult`` with counts per response code and kind. ``rss_kib(pid)`` reads VmRSS.
Test and benchmark helper only.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import socket
import time
from collections import Counter

import cbor2

KINDS = ("csr", "status", "bad-cbor", "not-found", "garbage", "block", "block-abandon")
BLOCK_SZX = 2  # 64-byte blocks
BLOCK_PAYLOAD = bytes(range(256)) * 2 + b"\x30" * 88  # 600 bytes, not DER
ANSWER_TIMEOUT_S = 2.0


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclasses.dataclass
class FloodResult:
    seconds: float = 0.0
    sent: int = 0
    answers: Counter = dataclasses.field(default_factory=Counter)  # response code ("2.05", "5.03", ...) -> n
    by_kind: Counter = dataclasses.field(default_factory=Counter)  # kind -> requests made
    timeouts: int = 0
    peers: int = 0
    max_age_seen: bool = False  # a 5.03 carried Max-Age

    @property
    def answered(self) -> int:
        return sum(self.answers.values())

    @property
    def rate_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0


class _Peer(asyncio.DatagramProtocol):
    """One UDP socket (one peer): sends CON requests and matches answers by token, acknowledging a separate
    (CON) response the way a client must, so the server does not retransmit it."""

    def __init__(self):
        self.transport = None
        self.waiting: dict[bytes, asyncio.Future] = {}  # token -> future of the response

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        from aiocoap import ACK, CON, EMPTY, Message

        try:
            msg = Message.decode(data)
        except Exception:
            return
        if msg.mtype is CON:  # a separate response: acknowledge it
            ack = Message(code=EMPTY)
            ack.mtype, ack.mid = ACK, msg.mid
            self.transport.sendto(ack.encode(), addr)
        if msg.code is EMPTY:
            return  # the empty ACK of a request whose answer follows separately
        fut = self.waiting.pop(msg.token, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def error_received(self, exc):
        pass


class _Worker:
    def __init__(self, host: str, port: int, result: FloodResult, rng: random.Random, requests_per_peer: int):
        self.addr = (host, port)
        self.result = result
        self.rng = rng
        self.per_peer = requests_per_peer
        self.peer: _Peer | None = None
        self.used = 0
        self.mid = rng.randrange(0x10000)

    async def _socket(self) -> _Peer:
        if self.peer is None or self.used >= self.per_peer:
            if self.peer is not None:
                self.peer.transport.close()
            loop = asyncio.get_running_loop()
            _, self.peer = await loop.create_datagram_endpoint(_Peer, local_addr=("127.0.0.1", 0),
                                                               family=socket.AF_INET)
            self.used = 0
            self.result.peers += 1
        self.used += 1
        return self.peer

    async def _exchange(self, msg, expect_answer: bool = True):
        """Send one CON message; return the response Message or None (timeout / none expected)."""
        peer = await self._socket()
        self.mid = (self.mid + 1) & 0xFFFF
        msg.mid = self.mid
        msg.token = self.rng.randbytes(4)
        from aiocoap import CON

        msg.mtype = CON
        fut = asyncio.get_running_loop().create_future()
        peer.waiting[msg.token] = fut
        peer.transport.sendto(msg.encode(), self.addr)
        self.result.sent += 1
        try:
            resp = await asyncio.wait_for(fut, ANSWER_TIMEOUT_S)
        except asyncio.TimeoutError:
            peer.waiting.pop(msg.token, None)
            if expect_answer:
                self.result.timeouts += 1
            return None
        self.result.answers[resp.code.dotted] += 1
        if resp.code.dotted == "5.03" and resp.opt.max_age is not None:
            self.result.max_age_seen = True
        return resp

    async def _blockwise(self, abandon: bool) -> None:
        from aiocoap import Message
        from aiocoap.numbers.codes import Code
        from aiocoap.optiontypes import BlockOption

        size = 2 ** (BLOCK_SZX + 4)
        blocks = [BLOCK_PAYLOAD[i:i + size] for i in range(0, len(BLOCK_PAYLOAD), size)]
        last = 3 if abandon else len(blocks)
        self.used = min(self.used, self.per_peer - last)  # all blocks of one upload from the same peer
        for n, chunk in enumerate(blocks[:last]):
            more = n < len(blocks) - 1
            m = Message(code=Code.POST, uri_path=("verify",), payload=chunk)
            m.opt.content_format = 287
            m.opt.block1 = BlockOption.BlockwiseTuple(n, more, BLOCK_SZX)
            resp = await self._exchange(m)
            if resp is None or resp.code.dotted != "2.31":
                return

    async def one(self, kind: str) -> None:
        from aiocoap import Message
        from aiocoap.numbers.codes import Code

        self.result.by_kind[kind] += 1
        if kind == "csr":
            m = Message(code=Code.POST, uri_path=("csr",), payload=cbor2.dumps({}))
            m.opt.content_format = 60
            await self._exchange(m)
        elif kind == "status":
            await self._exchange(Message(code=Code.GET, uri_path=("status",)))
        elif kind == "bad-cbor":
            m = Message(code=Code.POST, uri_path=("csr",), payload=b"\xff\xfe\xfd")
            m.opt.content_format = 60
            await self._exchange(m)
        elif kind == "not-found":
            await self._exchange(Message(code=Code.GET, uri_path=("nope",)))
        elif kind == "garbage":
            peer = await self._socket()
            peer.transport.sendto(self.rng.randbytes(self.rng.randrange(1, 40)), self.addr)
            self.result.sent += 1
            await asyncio.sleep(0.001)
        elif kind in ("block", "block-abandon"):
            await self._blockwise(kind == "block-abandon")
        else:
            raise ValueError(f"unknown kind {kind!r}")

    async def run(self, kinds, deadline: float, offset: int, stop_after: int | None) -> None:
        i = offset
        while time.monotonic() < deadline and (stop_after is None or self.result.answered < stop_after):
            await self.one(kinds[i % len(kinds)])
            i += 1
        if self.peer is not None:
            self.peer.transport.close()


async def flood_async(host: str, port: int, *, seconds: float, in_flight: int = 50, kinds=KINDS,
                      requests_per_peer: int = 100, seed: int = 1, stop_after: int | None = None, on_tick=None,
                      tick_s: float = 1.0) -> FloodResult:
    """Run the flood for ``seconds`` (or until ``stop_after`` answers); ``on_tick()`` is called every ``tick_s``
    (e.g. to sample RSS)."""
    result = FloodResult()
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()
    workers = [_Worker(host, port, result, random.Random(rng.random()), requests_per_peer) for _ in range(in_flight)]
    tasks = [asyncio.create_task(w.run(tuple(kinds), deadline, i, stop_after)) for i, w in enumerate(workers)]
    while not all(t.done() for t in tasks):
        await asyncio.wait(tasks, timeout=tick_s)
        if on_tick is not None:
            on_tick()
    for t in tasks:
        t.result()  # re-raise a worker's bug
    result.seconds = time.monotonic() - t0
    return result


def flood(host: str, port: int, **kw) -> FloodResult:
    return asyncio.run(flood_async(host, port, **kw))

