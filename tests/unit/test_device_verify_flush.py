"""/verify answers before the superseded key is destroyed (issue 19, stage 5): ``DeviceService.verify`` returns once
the new version's commit and audit line are durable; the destroy and the pruning run as the next keystore operation
(a task queued on the service's store lock), and ``flush`` / ``drain`` wait for it. A kill in between is
tests/fault/test_keystore_crash.py's deferred-destroy test.
"""
from __future__ import annotations

import asyncio

from cryptography import x509

from coap_services import codec
from coap_services.device import DeviceConfig, DeviceService
from keystore.store import KEEP_VERSIONS, Keystore
from tests.conftest import DOMAIN


async def _enroll(svc, lab):
    res = await svc.csr(codec.CsrRequest(name="ldevid", domain=DOMAIN))
    cert = lab.issue_from_csr(DOMAIN, x509.load_der_x509_csr(res.csr_der))
    return await svc.verify([cert, lab.domain(DOMAIN).ca_cert])


def _key_file(ks, uri):
    return ks.root / uri.split(":", 1)[1]


def test_verify_answers_first_then_destroys_the_superseded_key_and_prunes(ks, lab):
    svc = DeviceService(ks, DeviceConfig(device_id="dev1", default_domain=DOMAIN, csr_rate_per_min=600, csr_burst=10))

    async def scenario():
        keys = []
        for _ in range(KEEP_VERSIONS + 1):
            await _enroll(svc, lab)
            keys.append(ks.get("ldevid").key_uri)
        # The answer of the last /verify is back: committed and audited, the old key not destroyed yet.
        assert ks.deferred and _key_file(ks, keys[-2]).exists()
        assert ks.get("ldevid").version == KEEP_VERSIONS + 1
        assert ks.audit_entries()[-1]["action"] == "certificate-store"
        assert Keystore.open(ks.root).key_record(keys[-2]) is None  # unrecorded for every other reader
        await svc.flush()
        assert not ks.deferred
        assert [_key_file(ks, u).exists() for u in keys] == [False] * KEEP_VERSIONS + [True]
        assert sorted(int(p.name) for p in (ks.root / "creds" / "ldevid").iterdir()) == [2, 3, 4]
        # The next request runs after the queued flush (one keystore operation at a time).
        await _enroll(svc, lab)
        await svc.drain()
        assert not _key_file(ks, keys[-1]).exists() and not ks.deferred

    asyncio.run(scenario())
    assert Keystore.open(ks.root).check() == []
