"""The device writes a held key's file after its /csr answer (issue 19, stage (5)): a task queued on the service's
store lock stages it (Keystore.stage_held_key) while the CLM talks to the CA, so /verify's commit leaves it out of its
fsync batch. A staging failure only costs /verify the write; a dropped key's staged file is securely deleted."""
from __future__ import annotations

import asyncio
import errno

import pytest
from cryptography import x509

from coap_services import codec
from coap_services.device import DeviceConfig, DeviceService
from coap_services.errors import ServiceError
from keystore.store import Keystore
from tests.conftest import DOMAIN
from tests.fault.test_keystore_sync import Fault


def _svc(ks):
    return DeviceService(ks, DeviceConfig(device_id="dev1", default_domain=DOMAIN, csr_rate_per_min=600,
                                          csr_burst=10))


def _observe(ks):
    """What the device asked of the keystore: staged keys, and whether /verify's store found its key staged."""
    seen = {"staged": [], "store_found_staged": []}
    stage, store = ks.stage_held_key, ks.store_certificate

    def stage_held_key(key):
        stage(key)
        seen["staged"].append(key.uri)

    def store_certificate(*a, **kw):
        seen["store_found_staged"].append(ks.staged(kw["key"]) if "key" in kw else None)
        return store(*a, **kw)

    ks.stage_held_key, ks.store_certificate = stage_held_key, store_certificate
    return seen


async def _csr(svc, name="ldevid"):
    return await svc.csr(codec.CsrRequest(name=name, domain=DOMAIN))


async def _verify(svc, lab, res):
    cert = lab.issue_from_csr(DOMAIN, x509.load_der_x509_csr(res.csr_der))
    return await svc.verify([cert, lab.domain(DOMAIN).ca_cert])


def _file(ks, uri):
    return ks.root / uri.split(":", 1)[1]


def test_the_key_file_is_written_after_the_csr_answer_and_verify_does_not_write_it_again(ks, lab):
    svc = _svc(ks)
    seen = _observe(ks)

    async def scenario():
        res = await _csr(svc)
        assert not _file(ks, res.key_uri).exists()  # not before the answer
        await asyncio.sleep(0)  # the answer is sent: the staging task takes the store lock
        # A /verify arriving now waits for the staging, then stores without writing the key file.
        await _verify(svc, lab, res)
        assert seen == {"staged": [res.key_uri], "store_found_staged": [True]}
        await svc.drain()
        return res

    res = asyncio.run(scenario())
    opened = Keystore.open(ks.root)
    assert opened.get("ldevid").key_uri == res.key_uri and opened.check() == []
    assert _file(ks, res.key_uri).exists() and ks._locks.path(res.key_uri).exists()


def test_enospc_while_staging_verify_writes_the_key_itself(ks, lab):
    svc = _svc(ks)
    seen = _observe(ks)

    async def scenario():
        with Fault("write", ".key", errno.ENOSPC, times=1) as fault:
            res = await _csr(svc)
            await svc.drain()  # the staging task ran and failed (logged)
            assert fault.hits == 1 and seen["staged"] == [] and not _file(ks, res.key_uri).exists()
        out = await _verify(svc, lab, res)
        assert seen["store_found_staged"] == [False] and out.version == 1
        await svc.drain()

    asyncio.run(scenario())
    assert Keystore.open(ks.root).check() == []


def test_a_superseded_or_shut_down_held_key_loses_its_staged_file(ks, lab):
    svc = _svc(ks)

    async def scenario():
        first = await _csr(svc)
        await svc.drain()
        assert _file(ks, first.key_uri).exists()
        second = await _csr(svc)  # same name: supersedes the first
        await svc.drain()
        assert not _file(ks, first.key_uri).exists() and not ks._locks.path(first.key_uri).exists()
        assert _file(ks, second.key_uri).exists()
        await svc.close()  # shutdown: no /verify will come
        assert not _file(ks, second.key_uri).exists() and not ks._locks.path(second.key_uri).exists()

    asyncio.run(scenario())
    assert not list((ks.root / "keys").iterdir()) and Keystore.open(ks.root).gc() == []


def test_a_rejected_verify_after_staging_keeps_the_key_for_a_retry(ks, lab):
    svc = _svc(ks)

    async def scenario():
        res = await _csr(svc)
        await svc.drain()
        # The right key, from another domain's CA: refused, nothing stored, the staged file stays.
        wrong = lab.issue_from_csr("other", x509.load_der_x509_csr(res.csr_der))
        with pytest.raises(ServiceError):
            await svc.verify([wrong, lab.domain("other").ca_cert])
        assert ks.lookup("ldevid") is None and ks.staged(svc._held[res.key_uri]["held"])
        assert _file(ks, res.key_uri).exists()
        out = await _verify(svc, lab, res)
        assert out.version == 1
        await svc.drain()

    asyncio.run(scenario())
    assert Keystore.open(ks.root).check() == []


def test_a_verify_before_the_staging_started_writes_the_key_and_the_staging_is_dropped(ks, lab):
    """A /verify that takes the store lock before the staging task (a direct call in the same loop step; over the
    network the staging is queued first) stores the key file itself; the staging does not run after it."""
    svc = _svc(ks)
    seen = _observe(ks)

    async def scenario():
        res = await _csr(svc)
        await _verify(svc, lab, res)
        await svc.drain()
        assert seen == {"staged": [], "store_found_staged": [False]} and svc._staging.cancelled()

    asyncio.run(scenario())
    assert Keystore.open(ks.root).check() == []
