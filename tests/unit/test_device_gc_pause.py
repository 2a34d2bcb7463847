"""The cyclic collector is paused across /verify's verify-and-store and resumed after the answer (issue 19, stage 5;
``coap_services.device._GcPause``): observed from inside the real store path (``keystore.fsutil._FAULT_HOOK`` runs
in the worker thread at each write and fsync of the commit), after the answer (the after-answer task has not run
yet) and after the flush, on every path: stored, refused, store failed, cancelled, drained; and a process whose
owner disabled the collector keeps it disabled.
"""
from __future__ import annotations

import asyncio
import errno
import gc
import os
import threading

import pytest
from cryptography import x509

from coap_services import codec
from coap_services.device import DeviceConfig, DeviceService, _GcPause, gc_pause
from coap_services.errors import CONFLICT, FORBIDDEN, INTERNAL_SERVER_ERROR, ServiceError
from keystore import fsutil
from tests.conftest import DOMAIN


@pytest.fixture(autouse=True)
def _collector():
    assert gc.isenabled() and gc_pause.active == 0
    yield
    fsutil._FAULT_HOOK = None
    left = gc_pause.active
    gc.enable()
    assert left == 0, "a pause was left open"


def _svc(ks):
    return DeviceService(ks, DeviceConfig(device_id="dev1", default_domain=DOMAIN, csr_rate_per_min=600,
                                          csr_burst=10))


def _record(seen, fail_at=None):
    def hook(stage, path):
        seen.append((stage, gc.isenabled()))
        if stage == fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return hook


async def _csr_cert(svc, lab, domain=DOMAIN):
    res = await svc.csr(codec.CsrRequest(name="ldevid", domain=DOMAIN))
    return [lab.issue_from_csr(domain, x509.load_der_x509_csr(res.csr_der)), lab.domain(domain).ca_cert]


def test_paused_during_the_store_resumed_after_the_answer_and_flush(ks, lab):
    svc = _svc(ks)
    seen = []

    async def scenario():
        for _ in range(2):  # the second /verify supersedes the first: its answer leaves a deferred flush
            certs = await _csr_cert(svc, lab)
            fsutil._FAULT_HOOK = _record(seen)
            await svc.verify(certs)
            fsutil._FAULT_HOOK = None
            assert not gc.isenabled()  # the answer is back; the after-answer task has not run yet
        assert ks.deferred
        await svc.flush()
        assert gc.isenabled() and not ks.deferred

    asyncio.run(scenario())
    assert seen and {s for s, _ in seen} >= {"write", "fsync"}
    assert [on for _, on in seen] == [False] * len(seen)


def test_resumed_after_the_tasks_yields_without_waiting_for_drain(ks, lab):
    svc = _svc(ks)

    async def scenario():
        await svc.verify(await _csr_cert(svc, lab))  # first credential: nothing deferred
        assert not gc.isenabled()
        for _ in range(10):
            await asyncio.sleep(0)
        assert gc.isenabled()

    asyncio.run(scenario())


@pytest.mark.parametrize("case", ["untrusted", "no-pending-key"])
def test_resumed_after_a_refused_verify(ks, lab, case):
    svc = _svc(ks)

    async def scenario():
        certs = await _csr_cert(svc, lab, domain="other" if case == "untrusted" else DOMAIN)
        if case == "no-pending-key":
            svc._held.clear()
        with pytest.raises(ServiceError) as e:
            await svc.verify(certs)
        assert (e.value.code, e.value.reason) == ((FORBIDDEN, "untrusted") if case == "untrusted"
                                                  else (CONFLICT, "no-pending-key"))
        assert not gc.isenabled()
        await svc.drain()
        assert gc.isenabled()

    asyncio.run(scenario())


def test_resumed_after_a_failed_store(ks, lab):
    svc = _svc(ks)
    seen = []

    async def scenario():
        certs = await _csr_cert(svc, lab)
        fsutil._FAULT_HOOK = _record(seen, fail_at="fsync")
        with pytest.raises(ServiceError) as e:
            await svc.verify(certs)
        fsutil._FAULT_HOOK = None
        assert (e.value.code, e.value.reason) == (INTERNAL_SERVER_ERROR, "store-failed")
        await svc.drain()
        assert gc.isenabled()

    asyncio.run(scenario())
    assert ("fsync", False) in seen
    assert ks.list() == []


def test_resumed_when_the_request_or_its_after_answer_task_is_cancelled(ks, lab):
    svc = _svc(ks)
    entered, release = threading.Event(), threading.Event()

    def hook(stage, path):
        entered.set()
        release.wait(10)

    async def scenario():
        certs = await _csr_cert(svc, lab)
        await svc.drain()  # the held key's file is written after the /csr answer: the hook below is the store's
        fsutil._FAULT_HOOK = hook
        req = asyncio.ensure_future(svc.verify(certs))
        await asyncio.to_thread(entered.wait, 10)
        assert not gc.isenabled()
        req.cancel()  # a shutdown cancelling the request while its store runs in the worker thread
        await asyncio.sleep(0)
        svc._cleanup.cancel()  # and the after-answer task before its first step
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await req
        fsutil._FAULT_HOOK = None
        for _ in range(3):  # the cancelled task ends at its first step; its done callbacks run in the next one
            await asyncio.sleep(0)
        assert svc._cleanup.cancelled() and gc.isenabled()
        await svc.drain()
        assert gc.isenabled()

    asyncio.run(scenario())


def test_a_collector_its_owner_disabled_stays_disabled(ks, lab):
    svc = _svc(ks)

    async def scenario():
        for _ in range(2):
            await svc.verify(await _csr_cert(svc, lab))
        await svc.drain()

    gc.disable()
    try:
        asyncio.run(scenario())
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_pause_is_counted_across_services_and_threads():
    p = _GcPause()
    a = p.begin()
    b = p.begin()
    assert not gc.isenabled()
    a.end()
    a.end()  # a second end of the same pause does not end another
    assert not gc.isenabled() and p.active == 1
    b.end()
    assert gc.isenabled() and p.active == 0

    barrier = threading.Barrier(8)

    def worker():
        for i in range(200):
            t = p.begin()
            if i == 0:
                barrier.wait()  # all 8 paused at once
            assert not gc.isenabled()
            t.end()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.active == 0 and gc.isenabled()
