"""The CLM as OPC UA push server: agent.opcua.clm_push against devagent's device server (asyncua on 127.0.0.1),
with the lab CA as upstream: CSR → upstream → pre-verification → UpdateCertificate → TrustList → ApplyChanges,
the stage timings of seed 003's Table 1, renewal, and refusals before anything reaches the device."""
from __future__ import annotations

import asyncio

import pytest
from cryptography import x509

from agent.clm import LabUpstream, PreVerificationError
from agent.opcua.clm_push import desired_trustlist, enroll_once
from keystore.certs import fingerprint
from tests.peers.opcua import APP_URI, DOMAIN, device, make_world

STAGES = {"connect_s", "csr_s", "enroll_s", "pre_verify_s", "update_s", "trustlist_s", "apply_s", "total_s"}


def test_clm_push_enrollment_and_renewal(tmp_path, lab):
    w = make_world(tmp_path / "w", lab)
    up = LabUpstream(lab)

    async def scenario():
        async with device(w) as srv:
            rec = {"id": "dev1", "uri": srv.url, "key_type": "rsa", "subject": "CN=dev1,O=Plant",
                   "opcua": {"server_fingerprint": srv.endpoint_fingerprint}}
            first = await enroll_once(rec, up, w.gds.identity(), domain=DOMAIN)
            assert srv.endpoint_fingerprint == fingerprint(first["certificate"])  # re-bound
            # renewal: the device's certificate now chains to the domain; no pin needed
            rec["opcua"] = {"application_uri": APP_URI}
            second = await enroll_once(rec, up, w.gds.identity(), domain=DOMAIN, intermediates=first["chain"])
            ecc = await enroll_once(dict(rec, key_type="p256"), up, w.gds.identity(), domain=DOMAIN,
                                    intermediates=second["chain"])
            return first, second, ecc

    first, second, ecc = asyncio.run(scenario())
    for r in (first, second, ecc):
        assert set(r["stages"]) == STAGES and all(v >= 0 for v in r["stages"].values())
    assert w.ks.get("opcua").certificate == second["certificate"] and w.ks.get("opcua").version == 2
    assert w.ks.get("opcua-p256").certificate == ecc["certificate"]
    # the device's TrustList is the domain's root and issuing CA, written once (already right the second time)
    from agent.opcua.trustlist import TrustListStore

    want = desired_trustlist([lab.domain(DOMAIN).root_cert], second["chain"])
    assert TrustListStore(w.state / "opcua").load() == want


def test_clm_refuses_a_certificate_before_the_device_sees_it(tmp_path, lab):
    w = make_world(tmp_path / "w", lab)

    class WrongUri(LabUpstream):
        async def enroll(self, csr, *, domain, profile=None):
            res = await super().enroll(csr, domain=domain, profile=profile)
            cert = self.lab.issue(domain, csr.public_key(), csr.subject, [x509.UniformResourceIdentifier(
                "urn:not:the:device")], "opcua")
            return type(res)(cert, res.chain)

    async def scenario():
        async with device(w) as srv:
            rec = {"id": "dev1", "uri": srv.url, "opcua": {"server_fingerprint": srv.endpoint_fingerprint}}
            with pytest.raises(PreVerificationError) as e:
                await enroll_once(rec, WrongUri(lab), w.gds.identity(), domain=DOMAIN)
            assert e.value.reason in ("san-mismatch", "bad-application-uri")
            assert srv.service._txn is None  # nothing was staged on the device

    asyncio.run(scenario())
    assert not w.ks.exists("opcua")
