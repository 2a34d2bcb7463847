"""keystore.validator: the chain matrix of issue #13, both engines, and OpenSSL's verdict on the same chains.

Every case is judged three ways where possible: pyca's path validator (``engine="pyca"``), the hand-written
fallback (``engine="fallback"``), and ``openssl verify -x509_strict -purpose ...``; they must agree. Ed25519
chains (which pyca refuses) are judged by the fallback and OpenSSL.
"""
from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU
from cryptography.x509.oid import NameOID

from keystore.errors import VerificationError
from keystore.validator import OID_CMC_CA, OID_CMC_RA, ClockReading, Policy, _anchor_set, _pyca_form, check_root_update, validate
from tests.certfactory import DAY, NOW, Spec, chain, key, ku, name, openssl_verify

PAST = dict(not_before=NOW - 30 * DAY, not_after=NOW - DAY)
FUTURE = dict(not_before=NOW + DAY, not_after=NOW + 30 * DAY)
UNKNOWN = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")


def _pyca_can_judge(leaf, untrusted, anchors, policy: Policy) -> bool:
    """The routing rule stated certificate by certificate (the reference ``validator._route`` must agree with):
    pyca judges when the anchors are in its form, every certificate is valid at an estimated time, and the leaf and
    every offered certificate are in pyca's form."""
    if not _anchor_set(anchors).pyca_ok:
        return False
    if not policy.clock_trusted:
        at = policy.at
        if any(not c.not_valid_before_utc <= at <= c.not_valid_after_utc for c in [leaf, *untrusted, *anchors]):
            return False
    return all(_pyca_form(c, c is leaf, any(c is a for a in anchors)) for c in [leaf, *untrusted])


def nc(permitted=None, excluded=None):
    return [(x509.NameConstraints(permitted, excluded), True)]


DN_PLANT = x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Plant")]))
URI_PLANT = x509.UniformResourceIdentifier(".plant.example")
DNS_PLANT = x509.DNSName("plant.example")
NET10 = x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))


def san(*names):
    return list(names)


# (id, chain kwargs, policy purpose + overrides, expected reason or None, OpenSSL purpose or None = not comparable)
MATRIX = [
    ("valid", {}, ("credential", {}), None, "sslclient"),
    ("valid-depth2", dict(depth=2), ("credential", {}), None, "sslclient"),
    ("expired-leaf", dict(leaf=Spec(**PAST)), ("credential", {}), "expired", "sslclient"),
    ("expired-inter", dict(inters=[Spec(**PAST)]), ("credential", {}), "expired", "sslclient"),
    ("expired-root", dict(root=Spec(**PAST)), ("credential", {}), "expired", "sslclient"),
    ("notyet-leaf", dict(leaf=Spec(**FUTURE)), ("credential", {}), "not-yet-valid", "sslclient"),
    ("notyet-inter", dict(inters=[Spec(**FUTURE)]), ("credential", {}), "not-yet-valid", "sslclient"),
    ("notyet-root", dict(root=Spec(**FUTURE)), ("credential", {}), "not-yet-valid", "sslclient"),
    ("inter-not-ca", dict(inters=[Spec(ca=False, key_usage=ku(key_cert_sign=True))]), ("credential", {}),
     "not-a-ca", "sslclient"),
    ("inter-no-bc", dict(inters=[Spec(bc=False, ca=True)]), ("credential", {}), "not-a-ca", "sslclient"),
    ("root-not-ca", dict(root=Spec(ca=False, key_usage=ku(key_cert_sign=True))), ("credential", {}),
     "not-a-ca", "sslclient"),
    ("pathlen-exceeded", dict(root=Spec(path_length=0)), ("credential", {}), "path-length", "sslclient"),
    ("pathlen-exceeded-inter", dict(depth=4, inters=[Spec(path_length=0), Spec()]), ("credential", {}),
     "path-length", "sslclient"),
    ("pathlen-ok", dict(depth=4, inters=[Spec(path_length=1), Spec(path_length=0)]), ("credential", {}), None,
     "sslclient"),
    ("inter-no-keycertsign", dict(inters=[Spec(key_usage=ku(crl_sign=True))]), ("credential", {}),
     "bad-key-usage", "sslclient"),
    ("root-no-keycertsign", dict(root=Spec(key_usage=ku(crl_sign=True, digital_signature=True))),
     ("credential", {}), "bad-key-usage", "sslclient"),
    ("leaf-no-digitalsignature", dict(leaf=Spec(key_usage=ku(key_encipherment=True))), ("credential", {}),
     "bad-key-usage", "sslclient"),
    ("leaf-is-ca", dict(leaf=Spec(ca=True)), ("credential", {}), "is-ca", None),
    ("nc-dns-ok", dict(inters=[Spec(extra=nc([DNS_PLANT]))], leaf=Spec(san=san(x509.DNSName("a.plant.example")))),
     ("credential", {}), None, "sslclient"),
    ("nc-dns-violated", dict(inters=[Spec(extra=nc([DNS_PLANT]))], leaf=Spec(san=san(x509.DNSName("evil.example")))),
     ("credential", {}), "name-constraints", "sslclient"),
    ("nc-dns-excluded", dict(inters=[Spec(extra=nc(None, [DNS_PLANT]))],
                             leaf=Spec(san=san(x509.DNSName("x.plant.example")))),
     ("credential", {}), "name-constraints", "sslclient"),
    ("nc-dns-on-root", dict(root=Spec(extra=nc([DNS_PLANT])), leaf=Spec(san=san(x509.DNSName("evil.example")))),
     ("credential", {}), "name-constraints", "sslclient"),
    ("nc-ip-ok", dict(inters=[Spec(extra=nc([NET10]))],
                      leaf=Spec(san=san(x509.IPAddress(ipaddress.ip_address("10.1.2.3"))))),
     ("credential", {}), None, "sslclient"),
    ("nc-ip-violated", dict(inters=[Spec(extra=nc([NET10]))],
                            leaf=Spec(san=san(x509.IPAddress(ipaddress.ip_address("192.0.2.7"))))),
     ("credential", {}), "name-constraints", "sslclient"),
    ("nc-uri-ok", dict(inters=[Spec(extra=nc([URI_PLANT]))],
                       leaf=Spec(san=san(x509.UniformResourceIdentifier("https://dev1.plant.example/x")))),
     ("credential", {}), None, "sslclient"),
    ("nc-uri-violated", dict(inters=[Spec(extra=nc([URI_PLANT]))],
                             leaf=Spec(san=san(x509.UniformResourceIdentifier("https://evil.example/x")))),
     ("credential", {}), "name-constraints", "sslclient"),
    ("nc-dn-ok", dict(inters=[Spec(subject=name("Test CA 1", "Plant"), extra=nc([DN_PLANT]))],
                      leaf=Spec(subject=name("device 1", "Plant"))), ("credential", {}), None, "sslclient"),
    ("nc-dn-violated", dict(inters=[Spec(subject=name("Test CA 1", "Plant"), extra=nc([DN_PLANT]))],
                            leaf=Spec(subject=name("device 1", "Evil"))), ("credential", {}), "name-constraints",
     "sslclient"),
    ("unknown-critical-leaf", dict(leaf=Spec(extra=[(UNKNOWN, True)])), ("credential", {}),
     "unknown-critical-extension", "sslclient"),
    ("unknown-critical-inter", dict(inters=[Spec(extra=[(UNKNOWN, True)])]), ("credential", {}),
     "unknown-critical-extension", "sslclient"),
    ("unknown-noncritical-inter", dict(inters=[Spec(extra=[(UNKNOWN, False)])]), ("credential", {}), None,
     "sslclient"),
    ("eku-client-ok", dict(leaf=Spec(eku=[EKU.CLIENT_AUTH])), ("credential", dict(eku={"clientAuth"})), None,
     "sslclient"),
    ("eku-client-missing", dict(leaf=Spec(eku=[EKU.SERVER_AUTH])), ("credential", dict(eku={"clientAuth"})),
     "bad-eku", "sslclient"),
    ("eku-absent-ok", {}, ("credential", dict(eku={"clientAuth"})), None, "sslclient"),
    ("eku-ca-restricts", dict(inters=[Spec(eku=[EKU.SERVER_AUTH])], leaf=Spec(eku=[EKU.CLIENT_AUTH])),
     ("credential", dict(eku={"clientAuth"})), "bad-eku", "sslclient"),
    ("eku-ca-allows", dict(inters=[Spec(eku=[EKU.CLIENT_AUTH, EKU.SERVER_AUTH])], leaf=Spec(eku=[EKU.CLIENT_AUTH])),
     ("credential", dict(eku={"clientAuth"})), None, "sslclient"),
    ("tls-server-ok", dict(leaf=Spec(eku=[EKU.SERVER_AUTH], key_usage=ku(digital_signature=True))),
     ("est-tls-server", {}), None, "sslserver"),
    ("tls-server-client-cert", dict(leaf=Spec(eku=[EKU.CLIENT_AUTH])), ("est-tls-server", {}), "bad-eku",
     "sslserver"),
    ("policy-required-missing", dict(inters=[Spec(extra=[(x509.PolicyConstraints(0, None), True)])]),
     ("credential", {}), "policy", "sslclient"),
    ("policy-required-present", dict(
        inters=[Spec(extra=[(x509.PolicyConstraints(0, None), True), (_cp := x509.CertificatePolicies(
            [x509.PolicyInformation(x509.ObjectIdentifier("1.3.6.1.4.1.55555.2.1"), None)]), False)])],
        leaf=Spec(extra=[(_cp, False)])), ("credential", {}), None, "sslclient"),
    ("policy-required-other", dict(
        inters=[Spec(extra=[(x509.PolicyConstraints(0, None), True), (_cp, False)])],
        leaf=Spec(extra=[(x509.CertificatePolicies([x509.PolicyInformation(
            x509.ObjectIdentifier("1.3.6.1.4.1.55555.2.9"), None)]), False)])), ("credential", {}), "policy",
     "sslclient"),
    ("inhibit-any-policy", dict(
        inters=[Spec(extra=[(x509.PolicyConstraints(0, None), True), (x509.InhibitAnyPolicy(0), True),
                            (x509.CertificatePolicies([x509.PolicyInformation(
                                x509.ObjectIdentifier("2.5.29.32.0"), None)]), False)])],
        leaf=Spec(extra=[(x509.CertificatePolicies([x509.PolicyInformation(
            x509.ObjectIdentifier("2.5.29.32.0"), None)]), False)])), ("credential", {}), "policy", "sslclient"),
    ("cmp-signer-other-device", dict(leaf=Spec(eku=[EKU.CLIENT_AUTH])), ("cmp-signer", {}), "not-authorized", None),
    ("cmp-signer-no-eku", {}, ("cmp-signer", {}), "not-authorized", None),
    ("cmp-signer-ra", dict(leaf=Spec(eku=[OID_CMC_RA])), ("cmp-signer", {}), None, None),
    ("cmp-signer-cmcca", dict(leaf=Spec(eku=[OID_CMC_CA])), ("cmp-signer", {}), None, None),
    ("cmp-signer-ca", dict(leaf=Spec(ca=True, key_usage=ku(digital_signature=True, key_cert_sign=True))),
     ("cmp-signer", {}), None, None),
    ("cmp-signer-ca-no-digitalsignature", dict(leaf=Spec(ca=True)), ("cmp-signer", {}), "bad-key-usage", None),
    ("cmp-signer-ca-ignore-keyusage", dict(leaf=Spec(ca=True)), ("cmp-signer", dict(ignore_key_usage=True)), None,
     None),
    ("cmp-signer-expired-ra", dict(leaf=Spec(eku=[OID_CMC_RA], **PAST)), ("cmp-signer", {}), "expired", None),
    # Tolerated as OpenSSL (without -x509_strict) and curl do; pyca's WebPKI profile refuses them, so the
    # fallback judges (the verdict is compared with plain `openssl verify`).
    ("tolerated-anchor-bc-noncritical", dict(root=Spec(bc_critical=False)), ("credential", {}), None,
     ("sslclient", False)),
    ("tolerated-inter-bc-noncritical", dict(inters=[Spec(bc_critical=False)]), ("credential", {}), None,
     ("sslclient", False)),
    ("tolerated-inter-no-keyusage", dict(inters=[Spec(key_usage=False)]), ("credential", {}), None,
     ("sslclient", False)),
    ("inter-bc-noncritical-not-ca", dict(inters=[Spec(ca=False, bc_critical=False, key_usage=ku(key_cert_sign=True))]),
     ("credential", {}), "not-a-ca", ("sslclient", False)),
    ("ca-cert", dict(leaf=Spec(ca=True)), ("ca-cert", {}), None, None),
    ("ca-cert-ee", {}, ("ca-cert", {}), "not-a-ca", None),
]
KINDS = ["p256", "rsa2048", "ed25519"]


def _policy(purpose_overrides, **more):
    purpose, over = purpose_overrides
    return Policy.for_purpose(purpose, NOW, **{**over, **more})


def _verdict(ch, policy, engine):
    try:
        path = validate(ch.leaf, ch.untrusted, [ch.root], policy, engine=engine)
        return None, path
    except VerificationError as e:
        return e.reason, str(e)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", MATRIX, ids=[m[0] for m in MATRIX])
def test_matrix(case, kind, tmp_path):
    cid, kw, purpose, expected, ossl_purpose = case
    ch = chain(kind, **kw)
    policy = _policy(purpose)
    pyca_can = _pyca_can_judge(ch.leaf, ch.untrusted, [ch.root], policy)
    assert pyca_can == (kind != "ed25519" and not cid.startswith(("nc-uri-", "nc-dn-", "tolerated-",
                                                                   "inter-bc-noncritical")))
    engines = ["pyca", "fallback"] if pyca_can else ["fallback"]
    for engine in [*engines, "auto"]:
        reason, detail = _verdict(ch, policy, engine)
        assert reason == expected, f"{engine}: {detail}"
        if expected is None:
            assert detail[0] == ch.leaf and detail[-1] == ch.root
        else:
            assert detail  # a message for a person
    if ossl_purpose is not None:
        ossl_purpose, strict = ossl_purpose if isinstance(ossl_purpose, tuple) else (ossl_purpose, True)
        ok, out = openssl_verify(ch, tmp_path, ossl_purpose, strict=strict)
        assert ok == (expected is None), f"OpenSSL disagrees (validator: {expected}): {out}"


def test_messages_name_certificate_and_check():
    ch = chain(inters=[Spec(**PAST)])
    with pytest.raises(VerificationError) as e:
        validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose("credential", NOW))
    assert "Test CA 1" in str(e.value) and "expired at" in str(e.value) and "checked at" in str(e.value)


def test_key_mismatch():
    ch = chain()
    with pytest.raises(VerificationError) as e:
        validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose("credential", NOW),
                 public_key=key("p256", 7).public_key())
    assert e.value.reason == "key-mismatch"
    assert validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose("credential", NOW),
                    public_key=ch.leaf_key.public_key())


@pytest.mark.parametrize("engine", ["pyca", "fallback"])
def test_untrusted_and_bad_signature(engine):
    ch = chain()
    other = chain(root=Spec(key=key("p256", 5)))
    with pytest.raises(VerificationError) as e:
        validate(ch.leaf, ch.untrusted, [other.root], Policy.for_purpose("credential", NOW), engine=engine)
    assert e.value.reason in ("untrusted", "bad-signature")
    forged = chain(leaf=Spec(sign_with=key("p256", 6)))
    with pytest.raises(VerificationError) as e:
        validate(forged.leaf, forged.untrusted, [forged.root], Policy.for_purpose("credential", NOW), engine=engine)
    assert e.value.reason == "bad-signature"
    with pytest.raises(VerificationError) as e:
        validate(ch.leaf, [], [ch.root], Policy.for_purpose("credential", NOW), engine=engine)
    assert e.value.reason == "untrusted"  # intermediate missing


def test_no_anchor():
    ch = chain()
    with pytest.raises(VerificationError) as e:
        validate(ch.leaf, ch.untrusted, [], Policy.for_purpose("credential", NOW))
    assert e.value.reason == "untrusted" and "no trust anchor" in str(e.value)


def test_pinned_server_certificate():
    """--cmp-server-cert: an EE without cmcRA from an unknown PKI is accepted when it is the pinned one."""
    srv = chain(leaf=Spec(eku=[EKU.SERVER_AUTH])).leaf
    policy = Policy.for_purpose("cmp-signer", NOW, pinned=(srv,))
    assert validate(srv, [], [], policy) == (srv,)
    other = chain(leaf=Spec(key=key("p256", 8))).leaf
    with pytest.raises(VerificationError) as e:
        validate(other, [], [], policy)
    assert e.value.reason == "not-authorized"
    expired = chain(leaf=Spec(**PAST)).leaf
    with pytest.raises(VerificationError) as e:
        validate(expired, [], [], Policy.for_purpose("cmp-signer", NOW, pinned=(expired,)))
    assert e.value.reason == "expired"


def test_estimated_clock_window():
    """A board without a real-time clock: each certificate need only be valid within at +- uncertainty."""
    ch = chain(leaf=Spec(not_before=NOW + 2 * DAY, not_after=NOW + 30 * DAY))
    strict = Policy.for_purpose("credential", NOW)
    with pytest.raises(VerificationError):
        validate(ch.leaf, ch.untrusted, [ch.root], strict)
    loose = Policy.for_purpose("credential", NOW, clock="estimate", uncertainty_s=3 * 86400)
    assert validate(ch.leaf, ch.untrusted, [ch.root], loose)
    assert not loose.clock_trusted and strict.clock_trusted


SEC = datetime.timedelta(seconds=1)


@pytest.mark.parametrize("where", ["leaf", "inter"])
@pytest.mark.parametrize("engine", ["auto", "fallback"])
def test_estimated_clock_reading_widens_validity_by_its_uncertainty(where, engine):
    """The daemon's CA-time estimate (a ClockReading with clock="estimate"): a certificate whose notBefore is a few
    seconds ahead of the estimate, or whose notAfter just passed, is accepted within the uncertainty and refused
    outside it, with an error naming the estimate, its uncertainty and its source; a trusted clock stays strict."""
    ahead = Spec(not_before=NOW + 5 * SEC, not_after=NOW + 30 * DAY)
    behind = Spec(not_before=NOW - 30 * DAY, not_after=NOW - 5 * SEC)
    for spec, reason in ((ahead, "not-yet-valid"), (behind, "expired")):
        ch = chain(**({"leaf": spec} if where == "leaf" else {"inters": [spec]}))
        inside = ClockReading(NOW, "estimate", 7, "CA time from CMP messageTime, seen 3 s ago")
        path = validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose("credential", inside), engine=engine)
        assert path[0] == ch.leaf and path[-1] == ch.root
        for reading in (ClockReading(NOW, "estimate", 3, "CA time from CMP messageTime, seen 3 s ago"),
                        ClockReading(NOW, source="system clock")):
            with pytest.raises(VerificationError) as e:
                validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose("credential", reading), engine=engine)
            assert e.value.reason == reason
            if not reading.trusted:
                assert "estimated time" in str(e.value) and "+- 3 s" in str(e.value)
                assert "CA time from CMP messageTime" in str(e.value)
        # an estimate is not a licence: far outside the uncertainty stays refused
        far = ClockReading(NOW + (-1 if reason == "not-yet-valid" else 1) * DAY, "estimate", 60, "estimate")
        with pytest.raises(VerificationError) as e:
            validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose("credential", far), engine=engine)
        assert e.value.reason == reason


def test_clock_reading_is_checked_and_carried_by_the_policy():
    r = ClockReading(NOW, "estimate", 2.5, "newest notBefore + uptime")
    p = Policy.for_purpose("cmp-signer", r, ignore_key_usage=True)
    assert (p.at, p.clock, p.uncertainty_s, p.clock_source, p.ignore_key_usage) == (
        NOW, "estimate", 2.5, "newest notBefore + uptime", True)
    assert not p.clock_trusted and p.reading == r
    assert Policy.for_purpose("cmp-signer", ClockReading(NOW)).clock_trusted
    assert r.record() == {"at": NOW.strftime("%Y-%m-%dT%H:%M:%SZ"), "clock": "estimate", "uncertainty_s": 2.5,
                          "source": "newest notBefore + uptime"}
    with pytest.raises(ValueError):
        ClockReading(NOW, "trusted", 1.0)  # a trusted clock has no uncertainty
    with pytest.raises(ValueError):
        ClockReading(NOW, "estimate", -1.0)
    with pytest.raises(ValueError):
        ClockReading(datetime.datetime(2026, 1, 1))
    with pytest.raises(TypeError):
        ClockReading(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Policy.for_purpose("credential", r, uncertainty_s=1)  # one way to give the clock, not two
    assert not Policy.for_unknown_clock("credential").clock_trusted


def test_weak_rsa_only_when_allowed():
    ch = chain("rsa1024")
    with pytest.raises(VerificationError) as e:
        validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose("credential", NOW))
    assert e.value.reason == "weak-key"
    assert validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose("credential", NOW, min_rsa_bits=1024))


def test_extra_intermediates_are_ignored_and_loops_end():
    ch = chain()
    unrelated = chain(root=Spec(key=key("p256", 4)))
    path = validate(ch.leaf, [*unrelated.inters, unrelated.root, *ch.untrusted, ch.leaf], [ch.root],
                    Policy.for_purpose("credential", NOW), engine="fallback")
    assert path == (ch.leaf, ch.inters[0], ch.root)


def test_max_intermediates():
    ch = chain(depth=5)
    with pytest.raises(VerificationError) as e:
        validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose("credential", NOW, max_intermediates=2),
                 engine="fallback")
    assert e.value.reason == "path-length"
    with pytest.raises(VerificationError):
        validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose("credential", NOW, max_intermediates=2),
                 engine="pyca")


def test_policy_is_frozen_and_checked():
    p = Policy.for_purpose("credential", NOW)
    with pytest.raises(AttributeError):
        p.at = NOW  # type: ignore[misc]
    with pytest.raises(ValueError):
        Policy.for_purpose("nonsense", NOW)
    with pytest.raises(ValueError):
        Policy.for_purpose("credential", datetime.datetime(2024, 1, 1))
    with pytest.raises(TypeError):
        Policy.for_purpose("credential", None)
    with pytest.raises(ValueError):
        Policy.for_purpose("credential", NOW, uncertainty_s=10)  # a trusted clock has no uncertainty
    with pytest.raises(ValueError):
        Policy.for_purpose("credential", NOW, eku={"bogus"})


def test_preset_copies_share_the_leaf_rule():
    """Policy.for_purpose works out a preset's leaf rule (keyUsage bits, EKU OIDs, texts) once: the copies it returns
    at other times and clocks share it, and it is the rule the fields give."""
    from keystore import validator as V

    a = Policy.for_purpose("est-tls-server", NOW)
    b = Policy.for_purpose("est-tls-server", ClockReading(NOW + DAY, "estimate", 5.0, "test"))
    assert a.__dict__["_leaf_rule"] is b.__dict__["_leaf_rule"]
    assert a.__dict__["_leaf_rule"] == V._leaf_rule(Policy("est-tls-server", NOW, **V.PURPOSES["est-tls-server"]))
    c = Policy.for_purpose("credential", NOW, eku={"clientAuth"})
    assert c.__dict__["_leaf_rule"][3] == "clientAuth" and a.__dict__["_leaf_rule"][3] == "serverAuth"

def test_root_update_link():
    old = chain(root=Spec(key=key("p256", 1))).root
    new = chain(root=Spec(key=key("p256", 2), subject=name("Test Root G2"))).root
    from tests.certfactory import build

    nwo, _ = build(Spec(key=key("p256", 2), subject=name("Test Root G2")), old.subject, key("p256", 1), "inter",
                   "p256", 2)
    own, _ = build(Spec(key=key("p256", 1), subject=old.subject), new.subject, key("p256", 2), "inter", "p256", 1)
    assert check_root_update([old], new, nwo, own) is old
    with pytest.raises(VerificationError) as e:
        check_root_update([old], new, None)
    assert e.value.reason == "root-update"
    stranger = chain(root=Spec(key=key("p256", 3))).root
    with pytest.raises(VerificationError):
        check_root_update([stranger], new, nwo)
    with pytest.raises(VerificationError):
        check_root_update([old], new, nwo, nwo)  # oldWithNew must carry the old key


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", MATRIX, ids=[m[0] for m in MATRIX])
def test_routing_pass_agrees_with_pyca_can_judge(case, kind):
    """validate's one-pass routing (_route, fed by the leaf pass) sends a chain to pyca exactly when
    _pyca_can_judge says pyca can judge it (the EC curve check it leaves to after pyca is moot on these curves)."""
    from keystore import validator as V

    cid, kw, purpose, expected, ossl_purpose = case
    ch = chain(kind, **kw)
    policy = _policy(purpose)
    try:
        leaf_form = V._check_leaf(ch.leaf, policy, None, "certificate")
    except VerificationError:
        return  # refused before any routing
    aset = V._anchor_set([ch.root])
    route = V._route(ch.leaf, leaf_form, ch.untrusted, [ch.root], policy, aset)
    assert (route is not None) == _pyca_can_judge(ch.leaf, ch.untrusted, [ch.root], policy)


def test_ca_key_on_a_curve_pyca_refuses_is_judged_by_the_fallback():
    """An intermediate on secp256k1 (pyca's WebPKI profile refuses the curve): on the path, or only offered
    alongside a good path, the verdict and path are the fallback's, as _pyca_can_judge routes them."""
    from cryptography.hazmat.primitives.asymmetric import ec

    k1 = ec.generate_private_key(ec.SECP256K1())
    odd = chain(inters=[Spec(key=k1)])
    policy = Policy.for_purpose("credential", NOW)
    assert not _pyca_can_judge(odd.leaf, odd.untrusted, [odd.root], policy)
    assert validate(odd.leaf, odd.untrusted, [odd.root], policy) == (odd.leaf, odd.inters[0], odd.root)
    good = chain()
    stray = chain(inters=[Spec(key=k1, subject=name("Stray CA"))]).inters[0]  # same root, not on the path
    bag = [stray, *good.untrusted]
    assert not _pyca_can_judge(good.leaf, bag, [good.root], policy)
    assert validate(good.leaf, bag, [good.root], policy) == \
        validate(good.leaf, bag, [good.root], policy, engine="fallback") == (good.leaf, good.inters[0], good.root)


def test_weak_rsa_ca_key_is_judged_by_the_fallback():
    """An RSA-1024 intermediate (pyca refuses RSA CA keys below 2048 bits; its size is checked after pyca, as the
    curve above): on the path, or only offered alongside a good path, the verdict, text and path are the
    fallback's, as _pyca_can_judge routes them."""
    weak = key("rsa1024", 3)
    odd = chain("rsa2048", inters=[Spec(key=weak)])
    strict, lax = Policy.for_purpose("credential", NOW), Policy.for_purpose("credential", NOW, min_rsa_bits=1024)
    assert not _pyca_can_judge(odd.leaf, odd.untrusted, [odd.root], lax)
    with pytest.raises(VerificationError) as auto:
        validate(odd.leaf, odd.untrusted, [odd.root], strict)
    with pytest.raises(VerificationError) as fallback:
        validate(odd.leaf, odd.untrusted, [odd.root], strict, engine="fallback")
    assert auto.value.reason == fallback.value.reason == "weak-key" and str(auto.value) == str(fallback.value)
    assert validate(odd.leaf, odd.untrusted, [odd.root], lax) == (odd.leaf, odd.inters[0], odd.root)
    good = chain("rsa2048")
    stray = chain("rsa2048", inters=[Spec(key=weak, subject=name("Stray CA"))]).inters[0]  # not on the path
    bag = [stray, *good.untrusted]
    assert not _pyca_can_judge(good.leaf, bag, [good.root], strict)
    assert validate(good.leaf, bag, [good.root], strict) == \
        validate(good.leaf, bag, [good.root], strict, engine="fallback") == (good.leaf, good.inters[0], good.root)

def _with_signature_of(cert: x509.Certificate, donor: x509.Certificate) -> x509.Certificate:
    """``cert`` with ``donor``'s signature value (RSA-2048: the last 256 bytes of the DER): another certificate
    whose signature bytes equal the donor's."""
    from cryptography.hazmat.primitives.serialization import Encoding

    der, sig = cert.public_bytes(Encoding.DER), donor.signature
    assert len(sig) == 256 and der.endswith(cert.signature)
    forged = x509.load_der_x509_certificate(der[:-256] + sig)
    assert forged.signature == donor.signature and forged != donor
    return forged


def test_memo_and_anchor_sets_only_ever_match_the_same_certificates():
    """The path memo and the anchor sets are looked up by signature values: a certificate carrying another's
    signature bytes lands in the same bucket but never matches it."""
    ch = chain("rsa2048")
    policy = Policy.for_purpose("credential", NOW)
    assert validate(ch.leaf, ch.untrusted, [ch.root], policy)  # remembered
    other = chain("rsa2048", leaf=Spec(subject=name("device 2"), key=key("rsa2048", 7)))
    forged_leaf = _with_signature_of(other.leaf, ch.leaf)
    with pytest.raises(VerificationError) as e:
        validate(forged_leaf, ch.untrusted, [ch.root], policy)
    assert e.value.reason in ("bad-signature", "untrusted")
    stranger = chain("rsa2048", root=Spec(key=key("rsa2048", 5))).root
    forged_root = _with_signature_of(stranger, ch.root)
    with pytest.raises(VerificationError):
        validate(ch.leaf, ch.untrusted, [forged_root], policy)
    assert validate(ch.leaf, ch.untrusted, [ch.root], policy)[-1] == ch.root


def test_weak_rsa_leaf_key_is_ours_to_refuse():
    """Why the leaf's RSA size check stays on the accepted path (issue #13, docs/trust.md "Cost"): pyca checks the
    key size of an issuer only, so it accepts an RSA-1024 leaf under RSA-2048 CAs; the validator refuses it with
    its own text on both engines, and accepts it only when the policy allows weak keys."""
    from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store

    ch = chain("rsa2048", leaf=Spec(key=key("rsa1024", 9)))
    pyca = (PolicyBuilder().store(Store([ch.root])).time(NOW)
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all())
            .build_client_verifier())
    assert pyca.verify(ch.leaf, ch.untrusted).chain[0] == ch.leaf
    strict, lax = Policy.for_purpose("credential", NOW), Policy.for_purpose("credential", NOW, min_rsa_bits=1024)
    errors = []
    for engine in ("auto", "fallback"):
        with pytest.raises(VerificationError) as e:
            validate(ch.leaf, ch.untrusted, [ch.root], strict, engine=engine)
        errors.append(e.value)
    assert [e.reason for e in errors] == ["weak-key"] * 2 and str(errors[0]) == str(errors[1])
    assert "RSA-1024 key; at least 2048 bits are required" in str(errors[0])
    assert validate(ch.leaf, ch.untrusted, [ch.root], lax) == (ch.leaf, *ch.inters, ch.root)


def test_pyca_verifier_is_reused_within_its_second_only():
    """The anchor set keeps pyca's verifier for the last second it was asked for (pyca checks validity at whole
    seconds): a later second gets its own, so an intermediate that expired in between is refused."""
    from tests.certfactory import build

    end = NOW + DAY  # the intermediate's notAfter (a whole second)
    ch = chain("p256", inters=[Spec(not_after=end)])
    other, _ = build(Spec(subject=name("device 2")), ch.inters[0].subject, key("p256", 1), "leaf", "p256", 8)

    def at(s: float) -> Policy:
        return Policy.for_purpose("credential", end + datetime.timedelta(seconds=s))

    assert validate(ch.leaf, ch.untrusted, [ch.root], at(-0.9))[1] == ch.inters[0]
    assert validate(other, ch.untrusted, [ch.root], at(-0.1))[1] == ch.inters[0]  # the same second's verifier
    with pytest.raises(VerificationError) as e:
        validate(other, ch.untrusted, [ch.root], at(1.5))
    assert e.value.reason == "expired" and "Test CA 1" in str(e.value)
    with pytest.raises(VerificationError) as e:
        validate(ch.leaf, ch.untrusted, [ch.root], at(3600))
    assert e.value.reason == "expired"


@pytest.mark.parametrize("where", ["leaf", "inter"])
@pytest.mark.parametrize("engine", ["auto", "pyca", "fallback"])
def test_validity_is_judged_at_the_second_notafter_inclusive(where, engine):
    """RFC 5280 times are whole seconds and notAfter is inclusive: both engines judge validity at the check time
    truncated to the second (pyca's rule), for the leaf and an intermediate, so a certificate is valid during the
    whole second of its notAfter, refused from the next second, and not valid before its notBefore's second;
    a path remembered from an earlier validation is re-checked by the same rule."""
    start, end = NOW - DAY, NOW + DAY  # whole seconds
    spec = Spec(not_before=start, not_after=end)

    def fresh():
        wide = Spec(not_before=NOW - 30 * DAY, not_after=NOW + 30 * DAY)
        return chain("p256", **({"leaf": spec} if where == "leaf" else {"leaf": wide, "inters": [spec]}))

    def check(ch, at: datetime.datetime):
        return validate(ch.leaf, ch.untrusted, [ch.root], Policy.for_purpose("credential", at), engine=engine)

    for at in (end, end + 0.999 * SEC, start, start + 0.5 * SEC):
        ch = fresh()
        assert check(ch, at)[0] == ch.leaf, at
    for at, reason in ((end + SEC, "expired"), (end + 1.5 * SEC, "expired"), (start - 0.001 * SEC, "not-yet-valid")):
        ch = fresh()
        with pytest.raises(VerificationError) as e:
            check(ch, at)
        assert e.value.reason == reason, at
        assert ("CN=device 1" if where == "leaf" else "Test CA 1") in str(e.value) and \
            (f"expired at {end:%Y-%m-%dT%H:%M:%SZ}" if reason == "expired" else "is not valid before") in str(e.value)
    ch = fresh()  # the same objects again: a remembered path (auto) is re-checked at the second too
    assert check(ch, end - DAY)[0] == ch.leaf
    assert check(ch, end + 0.5 * SEC)[0] == ch.leaf
    with pytest.raises(VerificationError) as e:
        check(ch, end + SEC)
    assert e.value.reason == "expired"


def test_pinned_leaf_validity_is_judged_at_the_second():
    end = NOW + DAY
    srv = chain(leaf=Spec(not_before=NOW - DAY, not_after=end, eku=[EKU.SERVER_AUTH])).leaf
    for at, ok in ((end + 0.5 * SEC, True), (end + SEC, False)):
        policy = Policy.for_purpose("cmp-signer", at, pinned=(srv,))
        if ok:
            assert validate(srv, [], [], policy) == (srv,)
        else:
            with pytest.raises(VerificationError) as e:
                validate(srv, [], [], policy)
            assert e.value.reason == "expired"


def test_expired_leaf_is_named_before_a_missing_anchor_or_path():
    """The leaf's validity is judged with the path now, but its error still comes first: an expired leaf with no
    anchor configured, or offered without its intermediate, is refused as expired (not as untrusted)."""
    ch = chain(leaf=Spec(**PAST))
    for untrusted, anchors in (([], [ch.root]), (ch.untrusted, []), (ch.untrusted, [ch.root])):
        for engine in ("auto", "pyca", "fallback"):
            with pytest.raises(VerificationError) as e:
                validate(ch.leaf, untrusted, anchors, Policy.for_purpose("credential", NOW), engine=engine)
            assert e.value.reason == "expired", (len(untrusted), len(anchors), engine)
