"""Device services over real aiocoap peers on loopback: the same happy path per transport (plain CoAP in
--insecure mode, OSCORE, DTLS-PSK), and every bad input answered 4.xx/5.03 with a CBOR diagnostic, nothing stored,
service still running."""
from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from coap_services import codec
from coap_services.errors import DeviceError
from tests.peers.coap import DOMAIN, DeviceThread, coap_call, device_env, raw_request

DER = serialization.Encoding.DER


def ks_snapshot(root: Path) -> dict:
    """Every keystore file with its hash, except OSCORE sequence state and the lock."""
    out = {}
    for dirpath, _, files in os.walk(root):
        if f"{os.sep}coap" in dirpath[len(str(root)):]:
            continue
        for f in files:
            if f != ".lock":
                p = Path(dirpath) / f
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _staged(dev) -> None:
    """Wait until the held key's file that the last /csr staged after its answer is written (or dropped)."""
    import asyncio

    async def wait():
        if dev.service._staging is not None:
            await asyncio.wait({dev.service._staging})

    dev.call(wait())


@pytest.fixture(scope="module")
def env(tmp_path_factory, lab):
    return device_env(tmp_path_factory.mktemp("coapdev"), lab)


@pytest.fixture(scope="module")
def device(env):
    with DeviceThread(env, csr_burst=100, csr_rate_per_min=6000, max_pending=32) as d:
        yield d


@pytest.fixture(scope="module")
def insecure_device(tmp_path_factory, lab):
    e = device_env(tmp_path_factory.mktemp("coapins"), lab, "dev-insecure")
    with DeviceThread(e, insecure=True) as d:
        yield d


def via(device, transport):
    """(uri, method, context) for the transport under test."""
    if transport == "plain":
        return device.uri, "none", None
    if transport == "oscore":
        return device.uri, "oscore", device.env.context
    return device.dtls_uri, "dtls-psk", device.env.context


def p7(certs):
    return pkcs7.serialize_certificates(list(certs), DER)


def enroll_flow(lab, uri, method, context, req=None):
    req = req or codec.CsrRequest(subject="CN=dev1")

    async def flow(dev):
        csr, der, rtt, dev_s = await dev.csr(req)
        assert csr.is_signature_valid and dev_s is not None and 0 < dev_s < rtt
        cert = lab.issue_from_csr(DOMAIN, csr)
        answer, rtt2, verify_s = await dev.verify(p7([cert, lab.domain(DOMAIN).ca_cert]), codec.CF_PKCS7_CERTS)
        status = await dev.status()
        return csr, cert, answer, verify_s, status

    return coap_call(uri, method, context)(flow)


@pytest.mark.parametrize("transport", ["plain", "oscore", "dtls-psk"])
def test_csr_verify_round_trip(lab, device, insecure_device, transport):
    d = insecure_device if transport == "plain" else device
    csr, cert, answer, verify_s, status = enroll_flow(lab, *via(d, transport))
    assert answer["stored"] == "ldevid" and answer["not_after"] == int(cert.not_valid_after_utc.timestamp())
    assert verify_s is not None and verify_s > 0
    assert status["state"] == "operational"
    ks = d.env.keystore()
    stored = ks.get("ldevid")
    assert stored.certificate == cert and not ks.pending_keys()
    # the CSR carried the key now certified; the private key never left the keystore
    assert stored.certificate.public_key() == csr.public_key()


def test_device_defaults_and_san(lab, device):
    req = codec.CsrRequest(subject="CN=pump-7,O=Plant", san=("dns:pump-7.plant", "ip:10.0.0.7"), key_type="p384",
                           name="opc", domain=DOMAIN)
    csr, cert, answer, _, _ = enroll_flow(lab, *via(device, "oscore"), req=req)
    assert csr.subject == x509.Name.from_rfc4514_string("CN=pump-7,O=Plant")
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey) and csr.public_key().curve.name == "secp384r1"
    assert answer["stored"] == "opc"


def test_well_known_core_lists_resources(device):
    text = coap_call(device.uri)(lambda d: d.well_known_core())
    for r in ("</csr>", "</verify>", "</status>"):
        assert r in text


def test_long_chain_block_wise(lab, device):
    """A 281 payload of ~3 kB (cert + intermediate + root + padding cert) crosses Block1 and is accepted."""
    async def flow(dev):
        csr, *_ = await dev.csr(codec.CsrRequest(name="blocky"))
        cert = lab.issue_from_csr(DOMAIN, csr)
        dom = lab.domain(DOMAIN)
        payload = p7([cert, dom.ca_cert, dom.root_cert, lab.domain("other").ca_cert])
        assert len(payload) > 1800  # > 1 kB: Block1 (and Block2-free answer)
        return await dev.verify(payload, codec.CF_PKCS7_CERTS)

    answer, _, _ = coap_call(*via(device, "oscore"))(flow)
    assert answer["stored"] == "blocky"


# ---- bad input: each answered with 4.xx + diagnostic, nothing stored, service keeps running ---------------------
def _diag(resp):
    assert resp.opt.content_format == codec.CF_CBOR
    return cbor2.loads(resp.payload)


def _still_alive(device):
    st = coap_call(*via(device, "oscore"))(lambda d: d.status())
    assert st["device"] == device.env.device_id


@pytest.mark.parametrize("payload,cf,code,reason", [
    (b"\xff\xfe\xfd", codec.CF_CBOR, "4.00", "malformed-cbor"),
    (cbor2.dumps({"key_type": "dsa1024"}), codec.CF_CBOR, "4.00", "unknown-key-type"),
    (cbor2.dumps({"key_type": "rsa1024"}), codec.CF_CBOR, "4.00", "unknown-key-type"),
    (cbor2.dumps({"subject": "CN=x", "evil": 1}), codec.CF_CBOR, "4.00", "schema"),
    (cbor2.dumps({"subject": "=,=,="}), codec.CF_CBOR, "4.00", "bad-subject"),
    (cbor2.dumps({"san": ["ftp:x"]}), codec.CF_CBOR, "4.00", "bad-san"),
    (cbor2.dumps({"name": "../etc"}), codec.CF_CBOR, "4.00", "bad-name"),
    (cbor2.dumps({"ca": [b"garbage"]}), codec.CF_CBOR, "4.00", "malformed-ca"),
    (cbor2.dumps({"domain": "nowhere"}), codec.CF_CBOR, "4.03", "forbidden-domain"),  # not this context's
    (cbor2.dumps({"subject": "CN=" + "x" * 9000}), codec.CF_CBOR, "4.13", "too-large"),
    (b"\xa0", 0, "4.15", "unsupported-content-format"),
])
def test_bad_csr_requests(device, payload, cf, code, reason):
    _staged(device)  # an earlier test's /csr: its held key's file is written after that answer
    before = ks_snapshot(device.env.state)
    resp = raw_request(device.uri + "/csr", "POST", payload, cf, method="oscore", context=device.env.context)
    assert resp.code.dotted == code
    assert _diag(resp)["error"] == reason
    assert ks_snapshot(device.env.state) == before
    _still_alive(device)


@pytest.mark.parametrize("path,code", [("/csr", "POST"), ("/verify", "POST"), ("/status", "GET")])
def test_unauthenticated_requests_refused(device, path, code):
    _staged(device)
    before = ks_snapshot(device.env.state)
    resp = raw_request(device.uri + path, code, cbor2.dumps({}) if code == "POST" else b"",
                       codec.CF_CBOR if path == "/csr" else (codec.CF_PKIX_CERT if path == "/verify" else None))
    assert resp.code.dotted == "4.01" and _diag(resp)["error"] == "unauthenticated"
    assert ks_snapshot(device.env.state) == before
    _still_alive(device)


def test_unauthenticated_block_wise_refused_at_first_block(device):
    resp = raw_request(device.uri + "/verify", "POST", os.urandom(5000), codec.CF_PKIX_CERT)
    assert resp.code.dotted == "4.01"


def test_oversized_verify_refused(device):
    resp = raw_request(device.uri + "/verify", "POST", os.urandom(codec.MAX_VERIFY_BYTES + 2000),
                       codec.CF_PKCS7_CERTS, method="oscore", context=device.env.context)
    assert resp.code.dotted == "4.13" and _diag(resp)["error"] == "too-large"
    _still_alive(device)


def test_verify_without_pending_key(tmp_path, lab):
    env = device_env(tmp_path, lab, "fresh")
    with DeviceThread(env) as dev:
        k = ec.generate_private_key(ec.SECP256R1())
        cert = lab.issue(DOMAIN, k.public_key(), x509.Name.from_rfc4514_string("CN=fresh"))
        resp = raw_request(dev.uri + "/verify", "POST", cert.public_bytes(DER), codec.CF_PKIX_CERT,
                           method="oscore", context=env.context)
        assert resp.code.dotted == "4.09" and _diag(resp)["error"] == "no-pending-key"
        assert env.keystore().list() == []


def _pending_csr(device, name):
    csr, *_ = coap_call(*via(device, "oscore"))(lambda d: d.csr(codec.CsrRequest(name=name, subject=f"CN={name}")))
    return csr


def _bad_certs(lab, csr):
    dom = lab.domain(DOMAIN)
    other = lab.domain("other")
    now = datetime.datetime.now(datetime.timezone.utc)
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    return {
        "another-key": (p7([lab.issue(DOMAIN, stranger, csr.subject), dom.ca_cert]), "4.03", "key-mismatch"),
        "wrong-issuer": (p7([lab.issue_from_csr("other", csr), other.ca_cert]), "4.03", "untrusted"),
        "expired": (p7([lab.issue(DOMAIN, csr.public_key(), csr.subject, lifetime_s=60,
                                  not_before=now - datetime.timedelta(days=2)), dom.ca_cert]), "4.03", "expired"),
        "ca-profile": (p7([lab.issue(DOMAIN, csr.public_key(), csr.subject, profile="ca"), dom.ca_cert]), "4.03",
                       "is-ca"),
        "other-subject": (p7([lab.issue(DOMAIN, csr.public_key(), x509.Name.from_rfc4514_string("CN=evil")),
                              dom.ca_cert]), "4.03", "subject-mismatch"),
        "no-chain": (lab.issue_from_csr(DOMAIN, csr).public_bytes(DER), "4.03", "untrusted"),
        "garbage": (b"\x30\x82\x01\x00" + os.urandom(200), "4.00", "malformed-certificate"),
        "empty": (b"", "4.00", "malformed-certificate"),
    }


@pytest.mark.parametrize("case", ["another-key", "wrong-issuer", "expired", "ca-profile", "other-subject", "no-chain",
                                  "garbage", "empty"])
def test_bad_certificates_refused(lab, device, case):
    csr = _pending_csr(device, f"bad-{case}")
    payload, code, reason = _bad_certs(lab, csr)[case]
    cf = codec.CF_PKIX_CERT if case in ("no-chain", "garbage", "empty") else codec.CF_PKCS7_CERTS
    _staged(device)
    before = ks_snapshot(device.env.state)
    resp = raw_request(device.uri + "/verify", "POST", payload, cf, method="oscore", context=device.env.context)
    assert (resp.code.dotted, _diag(resp)["error"]) == (code, reason)
    assert _diag(resp)["message"]
    assert ks_snapshot(device.env.state) == before
    ks = device.env.keystore()
    assert not ks.exists(f"bad-{case}")
    # the pending key is still there: the right certificate is still accepted afterwards
    good = p7([lab.issue_from_csr(DOMAIN, csr), lab.domain(DOMAIN).ca_cert])
    answer, _, _ = coap_call(*via(device, "oscore"))(lambda d: d.verify(good, codec.CF_PKCS7_CERTS))
    assert answer["stored"] == f"bad-{case}"


def test_csr_flood_rate_limited(tmp_path, lab):
    env = device_env(tmp_path, lab, "flooded")
    with DeviceThread(env, csr_burst=2, csr_rate_per_min=1.0, max_pending=3) as dev:
        async def flood(d):
            import asyncio

            results = await asyncio.gather(*(d.csr(codec.CsrRequest(name=f"n{i}")) for i in range(8)),
                                           return_exceptions=True)
            return results

        results = coap_call(*via(dev, "oscore"))(flood)
        ok = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, DeviceError)]
        assert len(ok) <= 2 and len(ok) + len(refused) == 8
        assert all(r.code == "5.03" and r.reason in ("rate-limited", "busy") and r.max_age for r in refused)
        assert len(dev.service._pending()) <= 3
        st = coap_call(*via(dev, "oscore"))(lambda d: d.status())
        assert st["pending"] == len(dev.service._pending()) == len(ok)


def test_pending_keys_bounded_and_superseded(tmp_path, lab):
    env = device_env(tmp_path, lab, "bounded")
    with DeviceThread(env, csr_burst=20, csr_rate_per_min=600, max_pending=2) as dev:
        async def many(d):
            for name in ("a", "a", "b", "c", "d"):
                await d.csr(codec.CsrRequest(name=name))

        before = ks_snapshot(env.state)
        coap_call(*via(dev, "oscore"))(many)
        _staged(dev)
        pend = dev.service._pending()
        assert sorted(p["pending_for"]["name"] for p in pend) == ["c", "d"]
        # Software keys are held in memory; each /csr answer is followed by its key's file (keys/, with its lock
        # file), and a key the bound or a second /csr for its name pushed out is deleted with its file: what is
        # left is the two pending keys' files, and no index or audit change.
        after = ks_snapshot(env.state)
        added = sorted(k for k in after if k not in before)
        held = sorted("keys/" + p["uri"].split("/", 1)[1] for p in pend)
        assert [k for k in added if k.startswith("keys/")] == held
        assert all(k.startswith(("keys/", "locks/")) for k in added) and len(added) == 4
        assert {k: v for k, v in after.items() if k in before} == before
        st = coap_call(*via(dev, "oscore"))(lambda d: d.status())
        assert st["pending"] == 2


def test_wrong_dtls_psk_fails(tmp_path, lab, device):
    import json

    from coap_services.errors import DeviceUnreachableError
    from keystore import fsutil

    ctx = tmp_path / "wrongctx"
    fsutil.ensure_dir(ctx)
    good = json.loads((device.env.context / "dtls.json").read_text())
    fsutil.atomic_write(ctx / "dtls.json", json.dumps(dict(good, psk_ascii="0123456789abcdef")).encode())
    with pytest.raises(DeviceUnreachableError):
        coap_call(device.dtls_uri, "dtls-psk", ctx, timeout=3)(lambda d: d.status())
    _still_alive(device)


def test_accept_ca_from_clm(tmp_path, lab):
    """A device commissioned without trust anchor adopts the root the authenticated CLM sent, once it verifies."""
    env = device_env(tmp_path, lab, "tofu", trust=False)
    root = lab.domain(DOMAIN).root_cert
    req = codec.CsrRequest(ca=(root.public_bytes(DER),))
    with DeviceThread(env) as dev:
        resp = raw_request(dev.uri + "/csr", "POST", codec.encode_csr_request(req), codec.CF_CBOR,
                           method="oscore", context=env.context)
        assert resp.code.dotted == "4.09" and _diag(resp)["error"] == "no-trust-anchor"
    with DeviceThread(env, accept_ca_from_clm=True) as dev:
        csr, cert, answer, _, _ = enroll_flow(lab, dev.uri, "oscore", env.context, req=req)
        assert answer["stored"] == "ldevid"
        assert env.keystore().trust_anchors(DOMAIN) == [root]


def test_accept_ca_from_clm_refuses_foreign_chain(tmp_path, lab):
    env = device_env(tmp_path, lab, "tofu2", trust=False)
    root = lab.domain(DOMAIN).root_cert
    with DeviceThread(env, accept_ca_from_clm=True) as dev:
        async def flow(d):
            csr, *_ = await d.csr(codec.CsrRequest(ca=(root.public_bytes(DER),)))
            return await d.verify(p7([lab.issue_from_csr("other", csr), lab.domain("other").ca_cert]),
                                  codec.CF_PKCS7_CERTS)

        with pytest.raises(DeviceError) as ei:
            coap_call(dev.uri, "oscore", env.context)(flow)
        assert ei.value.code == "4.03" and ei.value.reason == "untrusted"
        assert env.keystore().trust_anchors(DOMAIN) == []


def test_a_certificate_not_through_the_announced_ca_is_refused_and_nothing_stored(lab, device):
    """The device has its domain anchor; the CSR request announced another CA: a certificate that chains to the
    anchor but not through the announced CA is refused by the store's path check before anything is written."""
    other_root = lab.domain("other").root_cert
    req = codec.CsrRequest(name="picky", subject="CN=picky", ca=(other_root.public_bytes(DER),))
    csr, *_ = coap_call(*via(device, "oscore"))(lambda d: d.csr(req))
    _staged(device)
    before = ks_snapshot(device.env.state)
    good_chain = p7([lab.issue_from_csr(DOMAIN, csr), lab.domain(DOMAIN).ca_cert])
    resp = raw_request(device.uri + "/verify", "POST", good_chain, codec.CF_PKCS7_CERTS, method="oscore",
                       context=device.env.context)
    assert (resp.code.dotted, _diag(resp)["error"]) == ("4.03", "unexpected-ca")
    assert "announced in the CSR request" in _diag(resp)["message"]
    assert ks_snapshot(device.env.state) == before and not device.env.keystore().exists("picky")


def test_verify_validates_the_certificate_once(lab, device, monkeypatch):
    """The common case (the domain has anchors, nothing to adopt): the keystore's validation is the only one."""
    import keystore.store
    import keystore.validator

    real = keystore.validator.validate
    calls = []

    def counting(leaf, *a, **kw):
        calls.append(kw.get("what"))
        return real(leaf, *a, **kw)

    monkeypatch.setattr(keystore.validator, "validate", counting)
    monkeypatch.setattr(keystore.store, "validate", counting)
    root = lab.domain(DOMAIN).root_cert
    req = codec.CsrRequest(name="once", subject="CN=once", ca=(root.public_bytes(DER),))  # ca_fps to check
    csr, *_ = coap_call(*via(device, "oscore"))(lambda d: d.csr(req))
    answer, _, _ = coap_call(*via(device, "oscore"))(
        lambda d: d.verify(p7([lab.issue_from_csr(DOMAIN, csr), lab.domain(DOMAIN).ca_cert]), codec.CF_PKCS7_CERTS))
    assert answer["stored"] == "once"
    assert calls == ["certificate for once"]


def test_an_rsa1024_pending_key_is_refused_once_weak_keys_are_off(tmp_path, lab):
    """The store accepts RSA-1024 for an rsa1024 key; a device whose rule is stricter (weak keys not allowed, e.g.
    a second service on the keystore) still judges the chain itself: 4.03 weak-key, nothing stored."""
    import dataclasses

    env = device_env(tmp_path, lab, "weak")
    with DeviceThread(env, allow_weak_keys=True) as dev:
        req = codec.CsrRequest(name="weak", subject="CN=weak", key_type="rsa1024")
        csr, *_ = coap_call(*via(dev, "oscore"))(lambda d: d.csr(req))
        dev.service.config = dataclasses.replace(dev.service.config, allow_weak_keys=False)
        _staged(dev)
        before = ks_snapshot(env.state)
        resp = raw_request(dev.uri + "/verify", "POST", p7([lab.issue_from_csr(DOMAIN, csr),
                                                            lab.domain(DOMAIN).ca_cert]),
                           codec.CF_PKCS7_CERTS, method="oscore", context=env.context)
        assert (resp.code.dotted, _diag(resp)["error"]) == ("4.03", "weak-key")
        assert ks_snapshot(env.state) == before and not env.keystore().exists("weak")
