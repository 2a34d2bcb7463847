"""The CLM as OPC UA push server: agent.opcua.clm_push against devagent's device server (asyncua on 127.0.0.1),
with the lab CA as upstream: CSR → upstream → pre-verification → UpdateCertificate → TrustList → ApplyChanges,
the stage timings of seed 003's Table 1, renewal, and refusals before anything reaches the device."""
from __future__ import annotations

import asyncio

import pytest
from cryptography import x509

import json

from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.cli import App
from agent.clm import LabUpstream, PreVerificationError
from agent.opcua.clm_push import desired_trustlist, enroll_once
from keystore.certs import fingerprint, pem
from keystore.store import Keystore
from tests.peers.opcua import APP_URI, DOMAIN, GDS_DN, CliDevice, device, make_world

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


def _clm_keystore(base, lab) -> Keystore:
    """The CLM's own keystore with its OPC UA client credential 'gds' (key generated there, lab-issued)."""
    ks = Keystore.init(base)
    ks.add_trust_anchors(DOMAIN, [lab.domain(DOMAIN).root_cert], source="test")
    uri = ks.generate_key("rsa2048", label="gds")
    cert = lab.issue(DOMAIN, ks.public_key(uri), x509.Name.from_rfc4514_string(GDS_DN),
                     [x509.UniformResourceIdentifier("urn:plant:clm")], "opcua")
    ks.store_certificate("gds", cert, [lab.domain(DOMAIN).ca_cert], key_uri=uri, kind="app", domain=DOMAIN)
    assert isinstance(ks.private_key(uri), rsa.RSAPrivateKey)
    return ks


def test_cli_clm_enrolls_and_renews_an_opcua_device(tmp_path, lab):
    from agent.cli_clm import clm

    w = make_world(tmp_path / "w", lab)
    _clm_keystore(tmp_path / "edge", lab)
    (tmp_path / "root.pem").write_bytes(pem([lab.domain(DOMAIN).root_cert]))
    dev = CliDevice(w).start()
    try:
        obj = App(state_dir_option=tmp_path / "edge", json=False)
        r = CliRunner()
        base = ["--clm-dir", str(tmp_path / "edge" / "clm")]
        res = r.invoke(clm, base + ["add-device", "dev1", "--uri", dev.url, "--opcua", "--server-fingerprint",
                                    "sha256:" + "0" * 63, "--domain", DOMAIN], obj=obj)
        assert res.exit_code == 2 and "64 hex" in res.output  # bad input, nothing stored
        res = r.invoke(clm, base + ["add-device", "dev1", "--uri", "coap://x", "--opcua"], obj=obj)
        assert res.exit_code == 2 and "opc.tcp" in res.output
        res = r.invoke(clm, base + ["add-device", "dev1", "--uri", dev.url, "--opcua", "--server-fingerprint",
                                    dev.endpoint_fingerprint, "--domain", DOMAIN, "--subject", "CN=dev1,O=Plant"],
                       obj=obj)
        assert res.exit_code == 0, res.output
        up = ["--upstream", f"lab:{lab.dir}", "--trust", str(tmp_path / "root.pem"), "--timeout", "20"]
        res = r.invoke(clm, base + ["enroll", "dev1", *up], obj=obj)
        assert res.exit_code == 5 and "--opcua-credential" in res.output  # the CLM's OPC UA identity is needed
        res = r.invoke(clm, base + ["enroll", "dev1", *up, "--opcua-credential", "gds"], obj=obj)
        assert res.exit_code == 0, res.output
        for stage in ("CreateSigningRequest", "UpdateCertificate", "TrustList", "ApplyChanges", "total"):
            assert stage in res.output
        first = Keystore.open(w.state).get("opcua").certificate
        res = r.invoke(clm, base + ["list", "--json"], obj=obj)
        row = json.loads(res.output)[0]
        assert row["state"] == "operational" and row["security"] == "opcua"
        # clm run renews it on schedule: made due now, one pass
        res = r.invoke(clm, base + ["renew", "dev1"], obj=obj)
        assert res.exit_code == 0, res.output
        res = r.invoke(clm, base + ["run", "--once", *up, "--opcua-credential", "gds"], obj=obj)
        assert res.exit_code == 0 and "dev1: ok" in res.output, res.output
        second = Keystore.open(w.state).get("opcua")
        assert second.version == 2 and second.certificate != first
        assert dev.proc.poll() is None
    finally:
        assert dev.stop() == 0
