"""The scheduler's lease discipline with the real Clm, inventory and CoAP client: a long renewal keeps its lease
alive (no other worker can claim the device meanwhile), and a renewal whose lease can no longer be confirmed
(PostgreSQL stopped) is abandoned before the lease runs out, so a device is never renewed by two workers at once.

The device is an address where nothing answers (CoAP retransmits until the client's timeout), which makes a
renewal take as long as the test needs without touching the CLM's code."""
from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import time
import uuid

import pytest

from agent.clm import Clm, LabUpstream
from agent.inventory import open_inventory
from coap_services.client import CoapClient


def silent_uri() -> str:
    """coap:// of a bound UDP port that never answers (held open by the test, so nothing else gets it)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    silent_uri.sockets.append(s)
    return f"coap://127.0.0.1:{s.getsockname()[1]}"


silent_uri.sockets = []


@pytest.fixture(params=["sqlite", "postgresql"])
def spec(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'inv.sqlite'}"
    return request.getfixturevalue("postgres").create_database(f"lease_{uuid.uuid4().hex[:10]}")


def test_long_renewal_keeps_its_lease(spec, tmp_path, lab):
    inv = open_inventory(spec, tmp_path / "clm")
    other = open_inventory(spec, tmp_path / "clm")
    inv.add("slow", silent_uri(), security="none", domain="plant")
    claims_by_b = []

    async def main():
        async with CoapClient(timeout_s=4.0) as c:
            a = Clm(inv, LabUpstream(lab), c, retries=1, worker_id="A", lease_s=1.5)
            task = asyncio.create_task(a.run(once=True))
            while not (await asyncio.to_thread(other.summary))["leased"].get("A"):
                await asyncio.sleep(0.02)
            deadline = time.monotonic() + 30
            while not task.done() and time.monotonic() < deadline:  # worker B keeps trying while A works
                claims_by_b.extend(await asyncio.to_thread(other.claim, "B", limit=5, lease_s=1.5))
                await asyncio.sleep(0.1)
            res = await task
            a.close()
            return res

    results = asyncio.run(main())
    assert claims_by_b == []  # the lease outlived its 1.5 s thanks to the heartbeat
    assert "no answer within 4 s" in results["slow"]
    rec = inv.get("slow")
    assert rec["failures"] == 1 and rec["lease_owner"] is None and "no answer" in rec["last_error"]
    inv.close()
    other.close()


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.seen: list[tuple[float, str]] = []

    def emit(self, record):
        self.seen.append((time.time(), record.getMessage()))


def test_renewal_abandoned_when_lease_cannot_be_confirmed(postgres, tmp_path, lab):
    spec = postgres.create_database(f"abandon_{uuid.uuid4().hex[:10]}")
    inv = open_inventory(spec, tmp_path / "clm")
    inv.add("slow", silent_uri(), security="none", domain="plant")
    log = Records()
    logging.getLogger("devagent.clm").addHandler(log)

    async def main():
        async with CoapClient(timeout_s=120.0) as c:  # the device would keep the renewal busy for 2 minutes
            a = Clm(inv, LabUpstream(lab), c, retries=1, worker_id="A", lease_s=2.0)
            stop = asyncio.Event()
            task = asyncio.create_task(a.run(stop=stop, interval_s=0.2))
            while not (await asyncio.to_thread(inv.summary))["leased"]:
                await asyncio.sleep(0.05)
            postgres.stop()  # from this (the main) thread: the server's life is bound to it
            try:
                deadline = time.monotonic() + 60
                while not any("renewal abandoned" in m for _, m in log.seen) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                stop.set()
            finally:
                postgres.start()
            res = await asyncio.wait_for(task, 60)
            a.close()
            # the worker stopped before the database came back, so this is the last lease it ever held
            return res, (await asyncio.to_thread(inv.get, "slow"))["lease_until"]

    try:
        results, lease_until = asyncio.run(main())
    finally:
        logging.getLogger("devagent.clm").removeHandler(log)
    abandoned = [t for t, m in log.seen if "renewal abandoned" in m]
    assert abandoned, log.seen
    # it let go of the device before its last confirmed lease ran out: no other worker could have had it yet
    assert abandoned[0] < datetime.datetime.fromisoformat(lease_until).timestamp()
    assert results["slow"].startswith("abandoned"), results
    assert any("backing off" in m for _, m in log.seen)
    inv.close()
