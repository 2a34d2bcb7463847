"""Regression tests for the trust holes of issue #13 (each failed on main before the validator was used).

2. an expired certificate was accepted as the CMP response signer (validity only checked with max_clock_skew_s);
3. any end-entity certificate chaining to the CMP anchor (another device's LDevID) was accepted as the signer;
4. critical name constraints were "known" but not enforced: a certificate outside a sub-CA's names was stored.
Hole 1 (CoAP authorization) is in tests/component/test_coap_authz.py.
"""
from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from enroll_clients.base import ClientAuth, EnrollError
from keystore.errors import VerificationError
from tests.certfactory import DAY, NOW, Spec, build, chain, key, name
from tests.conftest import snapshot
from tests.unit.test_cmp_client import FakeCa, Keys, client, keys, req, run  # noqa: F401  (fixture)

OTHER_DEVICE = ExtendedKeyUsageOID.CLIENT_AUTH


def _signed_by(keys: Keys, cert: x509.Certificate, key_) -> FakeCa:
    ca = FakeCa(keys, signed=True)
    ca.k = Keys(keys.ca_key, keys.ca, key_, cert, keys.rogue_key, keys.rogue_ra, keys.dev_key, keys.idev_key,
                keys.idev)
    return ca


def test_hole2_expired_cmp_signer_is_refused(keys):
    k = key("p256", 21)
    expired, _ = build(Spec(subject=name("RA"), key=k, eku=[x509.ObjectIdentifier("1.3.6.1.5.5.7.3.28")],
                            not_before=NOW - 30 * DAY, not_after=NOW - DAY), keys.ca.subject, keys.ca_key, "leaf",
                       "p256", 21)
    auth = ClientAuth(certificate=keys.idev, private_key=keys.idev_key)
    with pytest.raises(EnrollError, match="expired"):
        run(client(_signed_by(keys, expired, k), keys).enroll(req(keys), auth))


def test_hole3_another_devices_certificate_cannot_sign_cmp_responses(keys):
    k = key("p256", 22)
    ldevid, _ = build(Spec(subject=name("device 7"), key=k, eku=[OTHER_DEVICE]), keys.ca.subject, keys.ca_key,
                      "leaf", "p256", 22)
    auth = ClientAuth(certificate=keys.idev, private_key=keys.idev_key)
    with pytest.raises(EnrollError, match="neither a CA certificate nor an RA"):
        run(client(_signed_by(keys, ldevid, k), keys).enroll(req(keys), auth))


def test_hole4_name_constraints_are_enforced_before_store(tmp_path):
    from keystore.store import Keystore

    nc = x509.NameConstraints([x509.DNSName("line2.plant.example")], None)
    ch = chain(inters=[Spec(extra=[(nc, True)])], leaf=Spec(san=[x509.DNSName("evil.example")]))
    ks = Keystore.init(tmp_path / "state")
    ks.add_trust_anchors("plant", [ch.root], source="test")
    uri = ks.import_key(ch.leaf_key, label="x")
    before = snapshot(ks.root)
    with pytest.raises(VerificationError) as e:
        ks.store_certificate("ldevid", ch.leaf, ch.untrusted, key_uri=uri, domain="plant")
    assert e.value.reason == "name-constraints"
    assert snapshot(ks.root) == before
    ok = chain(inters=[Spec(extra=[(nc, True)])], leaf=Spec(san=[x509.DNSName("dev1.line2.plant.example")],
                                                           key=key("p256", 23)))
    uri2 = ks.import_key(ok.leaf_key, label="y")
    ks2 = ks
    ks2.add_trust_anchors("plant", [ok.root], source="test")
    assert ks2.store_certificate("ldevid", ok.leaf, ok.untrusted, key_uri=uri2, domain="plant").version == 1




def test_pinned_server_certificate_signs_responses(keys):
    """--cmp-server-cert: a server signing with a plain EE certificate is accepted only when pinned."""
    k = key("p256", 24)
    srv, _ = build(Spec(subject=name("CMP server"), key=k), keys.ca.subject, keys.ca_key, "leaf", "p256", 24)
    auth = ClientAuth(certificate=keys.idev, private_key=keys.idev_key)
    with pytest.raises(EnrollError, match="not-authorized"):
        run(client(_signed_by(keys, srv, k), keys).enroll(req(keys), auth))
    res = run(client(_signed_by(keys, srv, k), keys, trust_anchors=(), server_certs=(srv,)).enroll(req(keys), auth))
    assert res.info["response_signer"] == srv.subject.rfc4514_string()


def test_cmp_signer_is_checked_at_the_daemons_estimate_with_its_uncertainty(keys):
    """The daemon hands CmpClient its CA-time estimate (a ClockReading): the response signer is validated at it,
    widened by its uncertainty only (an RA certificate that expired 10 s before the estimate passes with +- 30 s
    and is refused with +- 3 s, the error naming the estimate); messageTime is not held against an estimate."""
    from keystore.validator import ClockReading

    k = key("p256", 23)
    now = datetime.datetime.now(datetime.timezone.utc)
    ra, _ = build(Spec(subject=name("RA"), key=k, eku=[x509.ObjectIdentifier("1.3.6.1.5.5.7.3.28")],
                       not_before=NOW - 30 * DAY, not_after=now - datetime.timedelta(seconds=10)),
                  keys.ca.subject, keys.ca_key, "leaf", "p256", 23)
    auth = ClientAuth(certificate=keys.idev, private_key=keys.idev_key)
    src = "the CA's time (cmp response time) seen 3 s ago"

    def estimate(u):
        return lambda: ClockReading(datetime.datetime.now(datetime.timezone.utc), "estimate", u, src)
    ca = _signed_by(keys, ra, k)
    ca.tamper["time_offset_s"] = 3600  # an estimate is not compared with messageTime (it is made from it)
    res = run(client(ca, keys, clock_trusted=False, now=estimate(30.0)).enroll(req(keys), auth))
    assert res.certificate is not None
    with pytest.raises(EnrollError) as e:
        run(client(_signed_by(keys, ra, k), keys, clock_trusted=False, now=estimate(3.0)).enroll(req(keys), auth))
    assert "expired" in str(e.value) and "estimated time" in str(e.value) and src in str(e.value)
    with pytest.raises(EnrollError, match="expired"):  # a trusted clock stays strict
        run(client(_signed_by(keys, ra, k), keys, now=lambda: ClockReading(
            datetime.datetime.now(datetime.timezone.utc))).enroll(req(keys), auth))
