"""The CLM role against real device services on loopback: enrollment with stage timings, retries and the
notification hook, renewal, the CLI, and the private-key invariant (the CLM never sees key material)."""
from __future__ import annotations

import asyncio
import datetime
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.cli import App
from agent.clm import Clm, ClmError, LabUpstream, UpstreamResult, open_inventory
from coap_services.client import CoapClient
from tests.peers.coap import DOMAIN, DeviceThread, device_env

STAGES = {"coap_csr_s", "keygen_csr_s", "enroll_s", "pre_verify_s", "coap_verify_s", "cert_verify_s", "total_s"}


def private_key_fingerprints(keystore) -> list[bytes]:
    """Byte strings that would betray a device private key: PKCS#8 DER, and the raw scalar for EC keys."""
    out = []
    for rec in keystore._table("keys").all():
        k = keystore.private_key(rec["uri"])
        out.append(k.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
        if hasattr(k, "private_numbers") and hasattr(k.private_numbers(), "private_value"):
            v = k.private_numbers().private_value
            out.append(v.to_bytes((v.bit_length() + 7) // 8, "big"))
    return out


def assert_no_private_material(clm_dir: Path, messages: list[bytes], keystores) -> None:
    secrets = [s for ks in keystores for s in private_key_fingerprints(ks)]
    assert secrets
    blobs = list(messages)
    for dirpath, _, files in os.walk(clm_dir):
        for f in files:
            blobs.append((Path(dirpath) / f).read_bytes())
    for b in blobs:
        assert b"PRIVATE KEY" not in b
        for s in secrets:
            assert s not in b and s.hex().encode() not in b


def run_clm(inv, upstream, fn, **kw):
    async def main():
        async with CoapClient(timeout_s=10) as c:
            return await fn(Clm(inv, upstream, c, retry_delay_s=0.01, **kw))

    return asyncio.run(main())


@pytest.fixture
def one_device(tmp_path, lab):
    env = device_env(tmp_path, lab, "dev1")
    with DeviceThread(env, csr_burst=50, csr_rate_per_min=6000) as dev:
        yield env, dev


def test_enroll_returns_stages_and_keeps_keys_on_device(lab, one_device):
    env, dev = one_device
    inv = open_inventory(None, env.clm_dir)
    inv.add("dev1", dev.uri, security="oscore", context=str(env.context), domain=DOMAIN,
            san=["dns:dev1.plant"], subject="CN=dev1,O=Plant")
    messages = []
    stages = run_clm(inv, LabUpstream(lab), lambda m: m.enroll("dev1"),
                     on_message=lambda d, p: messages.append(p))
    assert STAGES <= set(stages) and stages["attempts"] == 1
    assert all(stages[k] >= 0 for k in STAGES)
    assert stages["total_s"] >= stages["keygen_csr_s"] + stages["cert_verify_s"]
    rec = inv.get("dev1")
    assert rec["state"] == "operational" and rec["last_error"] is None and rec["next_renewal"] < rec["not_after"]
    ks = env.keystore()
    cred = ks.get("ldevid")
    assert format(cred.certificate.serial_number, "x") == rec["serial"]
    chain = x509.load_pem_x509_certificates(inv.certificate("dev1"))
    assert chain[0] == cred.certificate and len(chain) == 3  # leaf, issuing CA, root as the upstream returned
    assert_no_private_material(env.clm_dir, messages, [ks])


class WrongDomainUpstream(LabUpstream):
    async def enroll(self, csr, *, domain, profile=None):
        return await super().enroll(csr, domain="other", profile=profile)


def test_pre_verification_failure_retries_then_notifies(tmp_path, lab, one_device):
    env, dev = one_device
    inv = open_inventory(None, env.clm_dir)
    inv.add("dev1", dev.uri, security="oscore", context=str(env.context), domain=DOMAIN)
    flag = tmp_path / "notified"
    hook = f"sh -c 'echo \"$DEVAGENT_DEVICE $DEVAGENT_ERROR\" > {flag}'"
    with pytest.raises(ClmError) as ei:
        run_clm(inv, WrongDomainUpstream(lab), lambda m: m.enroll("dev1"), retries=2, notify=hook)
    assert "2 attempt" in str(ei.value)
    rec = inv.get("dev1")
    assert rec["state"] == "not operational" and "untrusted" in rec["last_error"] and rec["failures"] == 1
    assert flag.read_text().startswith("dev1 ")
    assert env.keystore().list() == []  # nothing reached the device's store
    assert Clm(inv, None, None).due() == []  # backing off


def test_device_refusal_retries(tmp_path, lab):
    """The CLM's pre-verification passes, the device (trusting another root) refuses: retried, then reported."""
    env = device_env(tmp_path, lab, "picky", trust=False)
    ks = env.keystore()
    ks.add_trust_anchors(DOMAIN, [lab.domain("other").root_cert], source="test")
    with DeviceThread(env) as dev:
        inv = open_inventory(None, env.clm_dir)
        inv.add("picky", dev.uri, security="dtls-psk", context=str(env.context), domain=DOMAIN)
        inv.update("picky", uri=dev.dtls_uri)
        with pytest.raises(ClmError) as ei:
            run_clm(inv, LabUpstream(lab), lambda m: m.enroll("picky"), retries=2)
        assert "4.03" in str(ei.value) or "4.09" in str(ei.value)
        assert "unexpected-ca" in inv.get("picky")["last_error"] or "untrusted" in inv.get("picky")["last_error"]
        assert ks.list() == []


def test_run_renews_before_expiry(lab, one_device):
    env, dev = one_device
    inv = open_inventory(None, env.clm_dir)
    inv.add("dev1", dev.uri, security="oscore", context=str(env.context), domain=DOMAIN)
    up = LabUpstream(lab, lifetime_s=3600)
    assert run_clm(inv, up, lambda m: m.run(once=True)) == {"dev1": "ok"}
    first = inv.get("dev1")
    assert run_clm(inv, up, lambda m: m.run(once=True)) == {}  # not due yet
    past = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)).isoformat()
    inv.update("dev1", next_renewal=past)
    assert run_clm(inv, up, lambda m: m.run(once=True)) == {"dev1": "ok"}
    second = inv.get("dev1")
    assert second["serial"] != first["serial"]
    cred = env.keystore().get("ldevid")
    assert cred.version == 2 and format(cred.certificate.serial_number, "x") == second["serial"]


def test_run_stops_on_event(lab, one_device):
    env, dev = one_device
    inv = open_inventory(None, env.clm_dir)

    async def main():
        stop = asyncio.Event()
        async with CoapClient(timeout_s=5) as c:
            task = asyncio.create_task(Clm(inv, LabUpstream(lab), c).run(interval_s=60, stop=stop))
            await asyncio.sleep(0.2)
            stop.set()
            return await asyncio.wait_for(task, 5)

    assert asyncio.run(main()) == {}


def test_cli_add_list_enroll(tmp_path, lab, one_device):
    from agent.cli_clm import clm

    env, dev = one_device
    obj = App(state_dir_option=tmp_path / "edge", json=False)
    r = CliRunner()
    base = ["--clm-dir", str(env.clm_dir)]
    res = r.invoke(clm, base + ["add-device", "dev1", "--uri", dev.uri, "--domain", DOMAIN], obj=obj)
    assert res.exit_code == 0, res.output
    assert "oscore" in res.output
    res = r.invoke(clm, base + ["add-device", "dev1", "--uri", dev.uri], obj=obj)
    assert res.exit_code == 2 and "already" in res.output
    res = r.invoke(clm, base + ["enroll", "dev1", "--upstream", f"lab:{lab.dir}", "--timeout", "5"], obj=obj)
    assert res.exit_code == 0, res.output
    for stage in ("1 CoAP CSR request", "2 key + CSR creation", "3 delegated enrollment", "4 CoAP verify",
                  "5 certificate verification", "total"):
        assert stage in res.output
    res = r.invoke(clm, base + ["list", "--json"], obj=obj)
    rows = json.loads(res.output)
    assert rows[0]["id"] == "dev1" and rows[0]["state"] == "operational" and rows[0]["not_after"]
    res = r.invoke(clm, base + ["list"], obj=obj)
    assert "dev1" in res.output and "operational" in res.output
    res = r.invoke(clm, base + ["enroll", "nope", "--upstream", f"lab:{lab.dir}"], obj=obj)
    assert res.exit_code == 2 and "no device" in res.output
    res = r.invoke(clm, base + ["enroll", "dev1", "--upstream", "ftp:x"], obj=obj)
    assert res.exit_code == 2


def test_cli_provision_writes_private_files(tmp_path):
    from agent.cli_coap import coap

    obj = App(state_dir_option=tmp_path / "dev", json=True)
    res = CliRunner().invoke(coap, ["provision", "devX", "--clm-dir", str(tmp_path / "clm")], obj=obj)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert len(out["files"]) == 5  # oscore + dtls halves on both sides, and the device's authorization grant
    for root in (tmp_path / "dev" / "coap", tmp_path / "clm" / "contexts"):
        for dirpath, _dirs, files in os.walk(root):
            assert os.stat(dirpath).st_mode & 0o077 == 0
            for f in files:
                assert os.stat(Path(dirpath) / f).st_mode & 0o077 == 0
    res = CliRunner().invoke(coap, ["provision", "devX", "--clm-dir", str(tmp_path / "clm")], obj=obj)
    assert res.exit_code == 7 and "--force" in res.output
    # a group-readable secret is refused when loading
    from coap_services.errors import SecurityConfigError
    from coap_services.security import load_server_security

    secret = tmp_path / "dev" / "coap" / "oscore" / "clm" / "secret.json"
    os.chmod(secret, 0o640)
    with pytest.raises(SecurityConfigError, match="chmod 600"):
        load_server_security(tmp_path / "dev" / "coap")


def test_serve_refuses_without_contexts(tmp_path):
    from agent.cli_coap import serve
    from keystore.store import Keystore

    Keystore.init(tmp_path / "dev")
    obj = App(state_dir_option=tmp_path / "dev", json=False)
    res = CliRunner().invoke(serve, ["--port", "5999"], obj=obj)
    assert res.exit_code == 7 and "coap provision" in res.output
    res = CliRunner().invoke(serve, ["--bind", "0.0.0.0"], obj=obj)
    assert res.exit_code == 2


def test_enroll_via_est_upstream(lab, one_device, tmp_path):
    """The production upstream: EST simpleenroll over TLS (lab EST server) with the CLM's HTTP Basic credential,
    driven through the CLI options (--upstream est:URL --trust --username --password env:VAR)."""
    from agent.cli_clm import clm
    from agent.lab.est_server import start_est_server
    from keystore.certs import pem

    env, dev = one_device
    root = tmp_path / "root.pem"
    root.write_bytes(pem([lab.domain(DOMAIN).root_cert]))
    obj = App(state_dir_option=tmp_path / "edge", json=True)
    with start_est_server(lab, DOMAIN, users={"clm-edge": b"edge-password"}) as est:
        r = CliRunner()
        base = ["--clm-dir", str(env.clm_dir)]
        assert r.invoke(clm, base + ["add-device", "dev1", "--uri", dev.uri, "--domain", DOMAIN],
                        obj=obj).exit_code == 0
        res = r.invoke(clm, base + ["enroll", "dev1", "--upstream", f"est:{est.url}", "--trust", str(root),
                                    "--username", "clm-edge", "--password", "env:CLM_EST_PW", "--timeout", "10"],
                       obj=obj, env={"CLM_EST_PW": "edge-password"})
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert set(out["enrolled"]["dev1"]) >= STAGES
        bad = r.invoke(clm, base + ["enroll", "dev1", "--upstream", f"est:{est.url}", "--trust", str(root),
                                    "--username", "clm-edge", "--password", "pass:wrong", "--retries", "1"],
                       obj=obj)
        assert bad.exit_code == 5 and "est enrollment" in bad.output
    assert env.keystore().get("ldevid").version == 1


def test_enroll_via_cmp_upstream(lab, one_device, tmp_path):
    """The CMP upstream: p10cr with PBM protection to the lab CMP server, driven through the CLI options
    (--upstream cmp:URL --reference --secret env:VAR); a wrong secret is refused upstream and nothing reaches
    the device."""
    from agent.cli_clm import clm
    from agent.lab.cmp_server import start_cmp_server
    from keystore.certs import pem

    env, dev = one_device
    root = tmp_path / "root.pem"
    root.write_bytes(pem([lab.domain(DOMAIN).root_cert]))
    obj = App(state_dir_option=tmp_path / "edge", json=True)
    with start_cmp_server(lab, DOMAIN, secrets={b"clm-edge": b"edge-secret"}) as ca:
        r = CliRunner()
        base = ["--clm-dir", str(env.clm_dir)]
        assert r.invoke(clm, base + ["add-device", "dev1", "--uri", dev.uri, "--domain", DOMAIN],
                        obj=obj).exit_code == 0
        bad = r.invoke(clm, base + ["enroll", "dev1", "--upstream", f"cmp:{ca.url}", "--trust", str(root),
                                    "--reference", "clm-edge", "--secret", "pass:wrong", "--retries", "1"], obj=obj)
        assert bad.exit_code == 5 and "cmp enrollment" in bad.output, bad.output
        assert env.keystore().list() == []  # the device stored nothing
        res = r.invoke(clm, base + ["enroll", "dev1", "--upstream", f"cmp:{ca.url}", "--trust", str(root),
                                    "--reference", "clm-edge", "--secret", "env:CLM_CMP_SECRET", "--timeout", "10"],
                       obj=obj, env={"CLM_CMP_SECRET": "edge-secret"})
        assert res.exit_code == 0, res.output
        assert set(json.loads(res.output)["enrolled"]["dev1"]) >= STAGES
    cred = env.keystore().get("ldevid")
    assert cred.version == 1
    cred.certificate.verify_directly_issued_by(lab.domain(DOMAIN).ca_cert)
    assert cred.certificate.public_key() == env.keystore().public_key(cred.key_uri)


def test_cmp_upstream_mac_alg_implicit_confirm_recipient(lab, one_device, tmp_path):
    """The CLM's CMP upstream takes --mac-alg (a server that accepts PBM only with HMAC-SHA1), --implicit-confirm
    (no certConf round trip when granted) and --recipient; without --mac-alg that server refuses, naming the MAC."""
    from agent.cli_clm import clm
    from agent.lab.cmp_server import start_cmp_server
    from keystore.certs import pem

    env, dev = one_device
    root = tmp_path / "root.pem"
    root.write_bytes(pem([lab.domain(DOMAIN).root_cert]))
    obj = App(state_dir_option=tmp_path / "edge", json=True)
    with start_cmp_server(lab, DOMAIN, secrets={b"clm-edge": b"edge-secret"}, pbm_macs={"sha1"}) as ca:
        r = CliRunner()
        base = ["--clm-dir", str(env.clm_dir)]
        assert r.invoke(clm, base + ["add-device", "dev1", "--uri", dev.uri, "--domain", DOMAIN],
                        obj=obj).exit_code == 0
        up = ["--upstream", f"cmp:{ca.url}", "--trust", str(root), "--reference", "clm-edge", "--secret",
              "pass:edge-secret", "--timeout", "10"]
        bad = r.invoke(clm, base + ["enroll", "dev1", *up, "--retries", "1"], obj=obj)
        assert bad.exit_code == 5 and "PBM MAC sha256 not supported" in bad.output, bad.output
        res = r.invoke(clm, base + ["enroll", "dev1", *up, "--mac-alg", "hmac-sha1", "--implicit-confirm",
                                    "--recipient", "/CN=Lab CA"], obj=obj)
        assert res.exit_code == 0, res.output
        assert ca.core.requests[-1] == "p10cr"  # implicitConfirm granted: no certConf
    assert env.keystore().get("ldevid").version == 1


def test_run_once_renews_each_device_once_even_if_due_again(lab, one_device):
    """A certificate so short-lived that the device is due again the moment it is renewed: one pass (--once) still
    renews it once and ends, with the lease given back."""
    env, dev = one_device
    inv = open_inventory(None, env.clm_dir)
    inv.add("dev1", dev.uri, security="oscore", context=str(env.context), domain=DOMAIN)
    up = LabUpstream(lab, lifetime_s=1)  # backdated 60 s: its renewal time is already past
    assert run_clm(inv, up, lambda m: m.run(once=True, parallel=1)) == {"dev1": "ok"}
    rec = inv.get("dev1")
    assert rec["enrollments"] == 1 and rec["lease_owner"] is None and inv.due() == ["dev1"]


class LosingUpstream(LabUpstream):
    """The lab CA; while it certifies the first CSR the device loses that pending key (as a crash of the device
    between /csr and /verify does: the restarted service has no pending key for it)."""

    def __init__(self, lab, device):
        super().__init__(lab)
        self.device, self.lost = device, []

    async def enroll(self, csr, **kw):
        if not self.lost:
            [rec] = self.device.service._pending()
            self.device.service._discard(rec)
            self.lost.append(rec["uri"])
        return await super().enroll(csr, **kw)


def test_enroll_starts_again_at_csr_when_verify_finds_no_pending_key(lab, one_device):
    env, dev = one_device
    inv = open_inventory(None, env.clm_dir)
    inv.add("dev1", dev.uri, security="oscore", context=str(env.context), domain=DOMAIN,
            san=["dns:dev1.plant"], subject="CN=dev1,O=Plant")
    up = LosingUpstream(lab, dev)
    stages = run_clm(inv, up, lambda m: m.enroll("dev1"), retries=3)
    assert stages["attempts"] == 2 and len(up.lost) == 1
    cred = env.keystore().get("ldevid")
    assert cred.key_uri != up.lost[0]
    assert format(cred.certificate.serial_number, "x") == inv.get("dev1")["serial"]
