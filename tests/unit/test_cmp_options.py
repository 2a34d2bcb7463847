"""CMP client options and tolerated deviations over the in-memory CA of test_cmp_client (production code end
to end): MAC choice, separate PBM/PBKDF2 bounds, NULL-DN sender, operation labels, profile location,
senderNonce reuse (switch off: refused naming the switch; on: only that deviation), an unverifiable pkiConf
after our certConf (stored, reported), errorDetails kept apart from our findings, HTTP 5xx wording."""
from __future__ import annotations

import asyncio

import pytest

from enroll_clients.base import CertRequest, ClientAuth, ProtectionError, ServerError
from enroll_clients.cmp import CallableTransport, CmpClient, HttpTransport, client_from_options
from enroll_clients.cmp import asn1 as A
from enroll_clients.cmp import messages as M
from enroll_clients.cmp import protection as P
from enroll_clients.cmp.errors import CmpServerError
from enroll_clients.base import EnrollOptions
from tests.unit.test_cmp_client import SECRET, FakeCa, client, keys, mac_auth, name, req, run  # noqa: F401

_ = keys  # the module-scoped fixture, re-exported


def _alg_of(der):
    msg = A.der_decode(der, A.PKIMessage())
    alg = msg["header"]["protectionAlg"]
    return str(alg["algorithm"]), A.der_decode(bytes(alg["parameters"]), A.PBMParameter()) \
        if str(alg["algorithm"]) == str(A.id_PasswordBasedMac) else None


def test_mac_alg_hmac_sha1_and_owf(keys):
    ca = FakeCa(keys)
    c = client(ca, keys, mac_alg="hmac-sha1", mac_owf="sha256")
    run(c.enroll(req(keys), mac_auth()))
    oid, p = _alg_of(c.transport.requests[0])
    assert oid == str(A.id_PasswordBasedMac)
    assert str(p["mac"]["algorithm"]) == str(A.id_hmac_sha1) == "1.3.6.1.5.5.8.1.2"
    assert str(p["owf"]["algorithm"]) == str(A.id_sha256)


def test_mac_alg_default_is_hmac_sha256(keys):
    ca = FakeCa(keys)
    c = client(ca, keys)
    run(c.enroll(req(keys), mac_auth()))
    _, p = _alg_of(c.transport.requests[0])
    assert str(p["mac"]["algorithm"]) == str(A.id_hmacWithSHA256)


def test_unknown_mac_alg_names_the_choices():
    with pytest.raises(ValueError, match="hmac-sha1, hmac-sha224"):
        CmpClient(CallableTransport(lambda d: d), mac_alg="md5")


def test_separate_pbm_and_pbkdf2_bounds():
    """PBM iterations are bounded at 100000 (OpenSSL's limit); PBKDF2 at 1000000, so the MockCA's 262144 passes."""
    P.compute_mac(P.new_mac_alg("pbmac1", iterations=262_144, hash_name="sha512"), SECRET, b"x")
    with pytest.raises(ProtectionError, match=r"PBM iterationCount 262144 outside 1\.\.100000;"):
        P.compute_mac(P.new_mac_alg("pbm", iterations=262_144), SECRET, b"x")
    with pytest.raises(ProtectionError, match=r"PBKDF2 iterationCount 2000000 outside 1\.\.1000000;"):
        P.compute_mac(P.new_mac_alg("pbmac1", iterations=2_000_000), SECRET, b"x")


def test_mac_sender_null_dn(keys):
    ca = FakeCa(keys)
    c = client(ca, keys, mac_sender="null-dn")
    run(c.enroll(req(keys), mac_auth()))
    h = A.der_decode(c.transport.requests[0], A.PKIMessage())["header"]
    assert M.name_der(h["sender"]["directoryName"]) == b"\x30\x00"


def test_operation_label_per_message(keys):
    ca = FakeCa(keys)
    ca.signed = True
    c = client(ca, keys)
    r = run(c.enroll(req(keys), ClientAuth(certificate=keys.idev, private_key=keys.idev_key)))
    auth = ClientAuth(certificate=r.certificate, private_key=keys.dev_key)
    run(c.request(req(keys), auth))
    run(c.renew(req(keys), auth))
    run(c.revoke(r.certificate, auth, "superseded"))
    run(c.ca_certs(auth, old_root=keys.ca))
    run(c.cert_req_template(auth))
    assert c.transport.operations == [
        "initialization", "initialization", "certification", "certification", "keyupdate", "keyupdate",
        "revocation", "getcacerts", "getrootupdate", "getcertreqtemplate"]


def test_http_url_for_labels_and_profile_in_path():
    t = HttpTransport("http://tp/.well-known/cmp/p/plant/", operation_labels=True, path_profile="tls-client")
    assert t.url_for("initialization") == "http://tp/.well-known/cmp/p/plant/tls-client/initialization"
    assert HttpTransport("http://h/pkix/").url_for("keyupdate") == "http://h/pkix/"
    assert HttpTransport("http://h/cmp", operation_labels=True).url_for("p10") == "http://h/cmp/p10"
    with pytest.raises(ValueError, match="path segment"):
        HttpTransport("http://h/", path_profile="a/b")


def test_profile_in_path_only_leaves_general_info_out(keys):
    c = client_from_options(EnrollOptions(server="http://h/cmp", profile="tls", extra={"profile_in": "path"}))
    assert c.transport.path_profile == "tls" and not c.profile_in_general_info
    c = client_from_options(EnrollOptions(server="http://h/cmp", profile="tls", extra={"profile_in": "both"}))
    assert c.transport.path_profile == "tls" and c.profile_in_general_info
    with pytest.raises(ValueError, match="needs a profile"):
        client_from_options(EnrollOptions(server="http://h/cmp", extra={"profile_in": "path"}))


class NonceReusingCa(FakeCa):
    """The pkiConf repeats the ip's senderNonce (the Siemens MockCA's behaviour)."""

    def __call__(self, der):
        self.tamper["nonce"] = b"R" * 16
        return super().__call__(der)


def test_nonce_reuse_switch_off_stores_but_reports_unconfirmed(keys):
    r = run(client(NonceReusingCa(keys), keys).enroll(req(keys), mac_auth()))
    assert r.info["confirmation"] == "unauthenticated"
    assert "--tolerate-nonce-reuse" in r.info["unconfirmed_reason"]


def test_nonce_reuse_switch_on_accepts_only_that(keys):
    r = run(client(NonceReusingCa(keys), keys, tolerate_nonce_reuse=True).enroll(req(keys), mac_auth()))
    assert r.info["confirmation"] == "pkiConf" and "senderNonce" in r.info["tolerated"][0]
    # ... but a wrong recipNonce is still refused with the switch on (the binding is what makes reuse harmless)
    ca = NonceReusingCa(keys)
    ca.tamper["recip_nonce"] = b"X" * 16
    with pytest.raises(Exception, match="recipNonce does not match"):
        run(client(ca, keys, tolerate_nonce_reuse=True).enroll(req(keys), mac_auth()))


class BadPkiConfMacCa(FakeCa):
    def respond(self, t, req):
        self.tamper.pop("secret", None)
        if t == "certConf":
            self.tamper["secret"] = b"wrong"
        return super().respond(t, req)


def test_unverifiable_pkiconf_after_certconf_is_not_orphaned(keys):
    r = run(client(BadPkiConfMacCa(keys), keys).enroll(req(keys), mac_auth()))
    assert r.certificate.public_key() == keys.dev_key.public_key()
    assert r.info["confirmation"] == "unauthenticated" and "MAC does not verify" in r.info["unconfirmed_reason"]


def test_error_details_not_mixed_with_our_findings(keys):
    ca = FakeCa(keys, secret=b"other")
    ca.error = (2, (1,), "bad MAC")
    with pytest.raises(CmpServerError) as ei:
        run(client(ca, keys).enroll(req(keys), mac_auth()))
    msg = str(ei.value)
    assert "errorDetails" not in msg
    assert "[UNAUTHENTICATED: response protection missing or invalid (response MAC does not verify" in msg
    assert ei.value.details == "" and "MAC does not verify" in ei.value.protection_problem


def test_enroll_csr_with_auth_none_sends_unprotected_p10cr(keys):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    csr = x509.CertificateSigningRequestBuilder().subject_name(name("d")).sign(keys.dev_key, hashes.SHA256())
    ca = FakeCa(keys)
    ca.error = (2, (1,), "request not protected")
    ca.unprotected_error = True
    c = client(ca, keys)
    with pytest.raises(CmpServerError, match="request not protected"):
        run(c.enroll(CertRequest(subject=csr.subject, csr=csr), None))
    sent = A.der_decode(c.transport.requests[0], A.PKIMessage())
    assert sent["body"].getName() == "p10cr" and not sent["header"]["protectionAlg"].isValue


# --- signer deviations (docs/cmp.md "Deviations"): switch off -> refused naming it; on -> only that one ---------
def _ra_without_digital_signature(keys):
    import datetime as _dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP256R1())
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=1)
    cert = (x509.CertificateBuilder().subject_name(name("RA no DS")).issuer_name(keys.ca.subject)
            .public_key(k.public_key()).serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + _dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, True, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ObjectIdentifier("1.3.6.1.5.5.7.3.28")]), critical=False)
            .sign(keys.ca_key, hashes.SHA256()))
    return k, cert


def _device_cert(keys):
    """Another device's certificate: chains to the CMP anchor, digitalSignature, but neither CA nor RA."""
    import datetime as _dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP256R1())
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=1)
    cert = (x509.CertificateBuilder().subject_name(name("other device")).issuer_name(keys.ca.subject)
            .public_key(k.public_key()).serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + _dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .sign(keys.ca_key, hashes.SHA256()))
    return k, cert


class SignerCa(FakeCa):
    """Signed answers with a chosen signer; ``bare`` = body types sent without extraCerts; ``bare_key`` signs
    those instead of the signer (another key)."""

    def __init__(self, keys, signer, *, bare=(), bare_key=None):
        super().__init__(keys, signed=True)
        self.signer = signer  # (key, cert)
        self.bare = set(bare)
        self.bare_key = bare_key

    def __call__(self, der):
        from datetime import datetime, timezone

        req = A.der_decode(der, A.PKIMessage())
        t = req["body"].getName()
        self.seen.append(t)
        h = req["header"]
        body_type, body, gi = self.respond(t, req)
        key, cert = self.signer
        if body_type in self.bare and self.bare_key is not None:
            key = self.bare_key
        pr = M.Protector(certificate=cert, private_key=key, chain=(self.k.ca,))
        return M.encode_message(pr, body_type, body, transaction_id=bytes(h["transactionID"]),
                                sender_nonce=b"S" * 15 + bytes([len(self.seen)]), recip_nonce=bytes(h["senderNonce"]),
                                general_info=gi, now=datetime.now(timezone.utc),
                                protection_certs=body_type not in self.bare)


def test_ignore_keyusage_off_refused_naming_it_on_accepts_only_that(keys):
    ra = _ra_without_digital_signature(keys)
    with pytest.raises(ProtectionError, match="keyUsage lacks digitalSignature.*--ignore-keyusage"):
        run(client(SignerCa(keys, ra), keys).request(req(keys), ClientAuth(certificate=keys.idev,
                                                                            private_key=keys.idev_key)))
    r = run(client(SignerCa(keys, ra), keys, ignore_keyusage=True).request(
        req(keys), ClientAuth(certificate=keys.idev, private_key=keys.idev_key)))
    assert r.info["response_signer"] == "CN=RA no DS"
    # another device's certificate as the signer still fails, with the switch on
    with pytest.raises(ProtectionError, match="not-authorized"):
        run(client(SignerCa(keys, _device_cert(keys)), keys, ignore_keyusage=True).request(
            req(keys), ClientAuth(certificate=keys.idev, private_key=keys.idev_key)))


def test_reuse_signer_for_pkiconf_without_extracerts(keys):
    auth = ClientAuth(certificate=keys.idev, private_key=keys.idev_key)
    signer = (keys.ra_key, keys.ra)
    r = run(client(SignerCa(keys, signer, bare={"pkiconf"}), keys).request(req(keys), auth))
    assert r.info["confirmation"] == "unauthenticated"
    assert "--reuse-signer" in r.info["unconfirmed_reason"] and "without extraCerts" in r.info["unconfirmed_reason"]
    r = run(client(SignerCa(keys, signer, bare={"pkiconf"}), keys, reuse_signer=True).request(req(keys), auth))
    assert r.info["confirmation"] == "pkiConf" and "--reuse-signer" in r.info["tolerated"][0]
    # a bare pkiConf signed by another device's key: the reused signer does not verify it
    other_key, _ = _device_cert(keys)
    r = run(client(SignerCa(keys, signer, bare={"pkiconf"}, bare_key=other_key), keys, reuse_signer=True)
            .request(req(keys), auth))
    assert r.info["confirmation"] == "unauthenticated" and "signature does not verify" in r.info["unconfirmed_reason"]
    # the switch only covers a missing signer certificate, not a reused nonce
    ca = NonceReusingCa(keys)
    r = run(client(ca, keys, reuse_signer=True).enroll(req(keys), mac_auth()))
    assert r.info["confirmation"] == "unauthenticated" and "--tolerate-nonce-reuse" in r.info["unconfirmed_reason"]


def _anchor_signed(keys):
    """The CA itself signs (as the MockCA's root does): signer = the trust anchor."""
    return keys.ca_key, keys.ca


def test_trusted_signer_fallback_for_genp_without_extracerts(keys):
    ca_signed = _anchor_signed(keys)
    with pytest.raises(ProtectionError, match="without extraCerts.*--trusted-signer-fallback"):
        run(client(SignerCa(keys, ca_signed, bare={"genp"}), keys).ca_certs(None))
    res = run(client(SignerCa(keys, ca_signed, bare={"genp"}), keys, trusted_signer_fallback=True).ca_certs(None))
    assert res.ca_certs == ()
    # a bare genp signed by another device's key, named like the anchor: no trusted certificate verifies it
    other_key, _ = _device_cert(keys)
    with pytest.raises(ProtectionError, match="verifies with no pinned certificate or CMP trust anchor"):
        run(client(SignerCa(keys, ca_signed, bare={"genp"}, bare_key=other_key), keys,
                   trusted_signer_fallback=True).ca_certs(None))
    # the fallback does not make a certificate outside the trust store a signer: with the RA's (valid) cert
    # left out, its name matches no anchor
    with pytest.raises(ProtectionError, match="verifies with no pinned certificate"):
        run(client(SignerCa(keys, (keys.ra_key, keys.ra), bare={"genp"}), keys,
                   trusted_signer_fallback=True).ca_certs(None))
