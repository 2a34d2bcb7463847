"""CMP client scenarios over an in-memory CA (``CallableTransport``): the production client code end to end,
with every response the CA sends open to tampering (MAC, signer, transactionID, nonces, time, content).

The in-memory CA issues real certificates for the key in the request, so positive runs also check POP and
the public-key match; the independent peer (OpenSSL) is exercised in tests/interop/test_cmp_openssl.py.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from enroll_clients.base import (
    CertRequest,
    ClientAuth,
    EnrollError,
    ProtectionError,
    ProtocolError,
    UnsupportedError,
)
from enroll_clients.cmp import CallableTransport, CmpClient
from enroll_clients.cmp import asn1 as A
from enroll_clients.cmp import messages as M
from enroll_clients.cmp import protection as P
from enroll_clients.cmp.client import PollingTimeoutError
from enroll_clients.cmp.errors import CmpServerError, KeyMismatchError
from enroll_clients.cmp.template import TemplateMismatchError

REF, SECRET = b"ref-1", b"s3cret"
CMC_RA = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.28")
NOW = lambda: datetime.datetime.now(datetime.timezone.utc)  # noqa: E731


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(subject, pub, issuer_name, issuer_key, *, ca=False, days=30, ku_sign=True, eku=None):
    now = NOW() - datetime.timedelta(minutes=1)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(pub)
         .serial_number(x509.random_serial_number()).not_valid_before(now)
         .not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False))
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if ca:  # RFC 5280 §4.2.1.3: a CA MUST carry keyUsage (the validator, like pyca and -x509_strict, requires it)
        b = b.add_extension(x509.KeyUsage(ku_sign, False, False, False, False, True, True, False, False),
                            critical=True)
    h = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(issuer_key, h)


@dataclasses.dataclass
class Keys:
    ca_key: object
    ca: x509.Certificate
    ra_key: object
    ra: x509.Certificate
    rogue_key: object
    rogue_ra: x509.Certificate
    dev_key: object
    idev_key: object
    idev: x509.Certificate


@pytest.fixture(scope="module")
def keys():
    k = lambda: ec.generate_private_key(ec.SECP256R1())  # noqa: E731
    ca_key = k()
    ca = make_cert(name("Root"), ca_key.public_key(), name("Root"), ca_key, ca=True)
    ra_key = k()
    ra = make_cert(name("RA"), ra_key.public_key(), ca.subject, ca_key, eku=[CMC_RA])  # RFC 9483 §3.1 RA
    rogue_key = k()
    rogue_ra = make_cert(name("RA"), rogue_key.public_key(), name("Root"), rogue_key)  # same names, other key
    idev_key = k()
    idev = make_cert(name("dev IDevID"), idev_key.public_key(), ca.subject, ca_key)
    return Keys(ca_key, ca, ra_key, ra, rogue_key, rogue_ra, k(), idev_key, idev)


class FakeCa:
    """A minimal CMP server over ``encode_message``; attributes select the misbehaviour to test."""

    def __init__(self, keys: Keys, *, signed=False, secret=SECRET):
        self.k = keys
        self.signed = signed
        self.secret = secret
        self.waiting = 0  # number of 'waiting' answers before the certificate
        self.check_after = 0
        self.grant_implicit = False
        self.tamper = {}  # field -> value or callable
        self.error = None  # (status, fail bits, text) -> error message instead of the normal response
        self.unprotected_error = False
        self.reject = None  # (fail bits, text) -> negative ip
        self.issue_for = None  # issue for this public key instead of the requested one
        self.root_update = None  # (nwn, nwo, own)
        self.template = None  # CertReqTemplateContent
        self.ca_certs = ()
        self.seen = []
        self.pending = None

    def protector(self):
        if self.tamper.get("unprotected") or (self.error and self.unprotected_error):
            return M.Protector(unprotected=True)
        if self.signed:
            key, cert = (self.k.rogue_key, self.k.rogue_ra) if self.tamper.get("rogue") else (self.k.ra_key, self.k.ra)
            return M.Protector(certificate=cert, private_key=key, chain=(self.k.ca,))
        return M.Protector(reference=b"ca", secret=self.tamper.get("secret", self.secret))

    def __call__(self, der: bytes) -> bytes:
        req = A.der_decode(der, A.PKIMessage())
        t = req["body"].getName()
        self.seen.append(t)
        h = req["header"]
        tid = bytes(h["transactionID"])
        nonce = bytes(h["senderNonce"])
        body_type, body, gi = self.respond(t, req)
        tm = self.tamper
        out = M.encode_message(
            self.protector(), body_type, body, pvno=tm.get("pvno", 2), recipient=None,
            transaction_id=tm.get("tid", tid), sender_nonce=tm.get("nonce", b"N" * 15 + bytes([len(self.seen)])),
            recip_nonce=tm.get("recip_nonce", nonce), general_info=gi,
            now=NOW() + datetime.timedelta(seconds=tm.get("time_offset_s", 0)))
        if "mangle" in tm:
            out = tm["mangle"](out)
        return out

    def _error(self, status, bits, text):
        e = A.ErrorMsgContent()
        si = e["pKIStatusInfo"]
        si["status"] = status
        si["failInfo"] = si["failInfo"].clone(tuple(1 if i in bits else 0 for i in range(max(bits) + 1)))
        si["statusString"].setComponentByPosition(0, text)
        return "error", e, ()

    def respond(self, t, req):
        if self.error:
            return self._error(*self.error)
        if t in ("ir", "cr", "kur", "p10cr"):
            rep = {"ir": "ip", "cr": "cp", "kur": "kup", "p10cr": "cp"}[t]
            if t == "p10cr":
                csr = x509.load_der_x509_csr(A.der_encode(M._fill(A.CertificationRequest(), req["body"]["p10cr"])))
                pub, subj = csr.public_key(), csr.subject
            else:
                tpl = req["body"][t][0]["certReq"]["certTemplate"]
                spki = A.der_encode(M._fill(A.SubjectPublicKeyInfo(), tpl["publicKey"]))
                pub = serialization.load_der_public_key(spki)
                subj = name("device")
            cert = make_cert(subj, (self.issue_for or pub), self.k.ca.subject, self.k.ca_key)
            self.pending = (rep, cert)
            if self.waiting:
                self.waiting -= 1
                return rep, self._rep(None, status=3), ()
            return self._final(req)
        if t == "pollReq":
            rep, cert = self.pending
            if self.waiting:
                self.waiting -= 1
                pr = A.PollRepContent()
                item = pr.componentType.clone()
                item["certReqId"] = 0
                item["checkAfter"] = self.check_after
                pr.setComponentByPosition(0, item)
                return "pollRep", pr, ()
            return self._final(req)
        if t == "certConf":
            return "pkiconf", A.Null(""), ()
        if t == "rr":
            rp = A.RevRepContent()
            si = rp["status"].componentType.clone()
            si["status"] = 0
            rp["status"].setComponentByPosition(0, si)
            return "rp", rp, ()
        if t == "genm":
            g = A.GenRepContent()
            asked = [str(x["infoType"]) for x in req["body"]["genm"]]
            i = 0
            for oid in asked:
                itav = A.InfoTypeAndValue()
                if oid == str(A.id_it_caCerts):
                    itav["infoType"] = A.id_it_caCerts
                    if self.ca_certs:
                        itav["infoValue"] = A.Any(A.der_encode(M.encode_ca_certs(self.ca_certs)))
                elif oid == str(A.id_it_rootCaCert):
                    itav["infoType"] = A.id_it_rootCaKeyUpdate
                    if self.root_update:
                        itav["infoValue"] = A.Any(A.der_encode(M.encode_root_ca_key_update(*self.root_update)))
                elif oid == str(A.id_it_certReqTemplate):
                    itav["infoType"] = A.id_it_certReqTemplate
                    if self.template is not None:
                        itav["infoValue"] = A.Any(A.der_encode(self.template))
                else:
                    continue
                g.setComponentByPosition(i, itav)
                i += 1
            return "genp", g, ()
        raise AssertionError(t)

    def _final(self, req):
        rep, cert = self.pending
        gi = ()
        if self.grant_implicit and str(A.id_it_implicitConfirm) in M._general_info(req["header"]):
            gi = ((A.id_it_implicitConfirm, A.Null("")),)
        if self.reject:
            return rep, self._rep(None, status=2, fail=self.reject[0], text=self.reject[1]), gi
        return rep, self._rep(cert), gi

    def _rep(self, cert, status=0, fail=(), text=""):
        crm = A.CertRepMessage()
        cr = crm["response"].componentType.clone()
        cr["certReqId"] = 0
        cr["status"]["status"] = status
        if fail:
            cr["status"]["failInfo"] = cr["status"]["failInfo"].clone(
                tuple(1 if i in fail else 0 for i in range(max(fail) + 1)))
        if text:
            cr["status"]["statusString"].setComponentByPosition(0, text)
        if cert is not None:
            coe = cr["certifiedKeyPair"]["certOrEncCert"]
            target = coe.setComponentByName("certificate").getComponentByName("certificate")
            M._fill(target, M.cert_to_asn1(cert))
            cps = crm["caPubs"]
            cps.setComponentByPosition(0, M.cert_to_asn1(self.k.ca))
        crm["response"].setComponentByPosition(0, cr)
        return crm


def run(coro):
    return asyncio.run(coro)


def mac_auth():
    return ClientAuth(reference=REF, secret=SECRET)


def client(ca, keys, **kw):
    kw.setdefault("trust_anchors", (keys.ca,))
    return CmpClient(CallableTransport(ca), sleep=lambda s: asyncio.sleep(0), **kw)


def req(keys, key=None):
    return CertRequest(subject=name("device"), private_key=key or keys.dev_key, sans=(x509.DNSName("dev.local"),))


# --- positive flows -----------------------------------------------------------------------------
@pytest.mark.parametrize("mac", ["pbm", "pbmac1"])
def test_ir_mac_certconf(keys, mac):
    ca = FakeCa(keys)
    r = run(client(ca, keys, mac=mac).enroll(req(keys), mac_auth()))
    assert ca.seen == ["ir", "certConf"]
    assert r.certificate.public_key() == keys.dev_key.public_key()
    assert r.ca_certs == (keys.ca,) and r.chain == (keys.ca,)
    assert r.info["implicit_confirm"] is False and r.info["protection"] == "mac"


@pytest.mark.parametrize("keytype", ["p256", "p384", "rsa2048", "ed25519"])
def test_ir_signed_by_idevid_signed_response(keys, keytype):
    key = {"p256": lambda: ec.generate_private_key(ec.SECP256R1()),
           "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
           "rsa2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
           "ed25519": ed25519.Ed25519PrivateKey.generate}[keytype]()
    ca = FakeCa(keys, signed=True)
    auth = ClientAuth(certificate=keys.idev, private_key=keys.idev_key, chain=(keys.ca,))
    r = run(client(ca, keys).enroll(req(keys, key), auth))
    assert r.info["response_signer"] == "CN=RA" and r.certificate.public_key() == key.public_key()


def test_implicit_confirm_granted_skips_certconf(keys):
    ca = FakeCa(keys)
    ca.grant_implicit = True
    r = run(client(ca, keys, implicit_confirm=True).enroll(req(keys), mac_auth()))
    assert ca.seen == ["ir"] and r.info["implicit_confirm"] is True


def test_implicit_confirm_not_granted_sends_certconf(keys):
    ca = FakeCa(keys)
    run(client(ca, keys, implicit_confirm=True).enroll(req(keys), mac_auth()))
    assert ca.seen == ["ir", "certConf"]


def test_polling_until_certificate(keys):
    ca = FakeCa(keys)
    ca.waiting, ca.check_after = 3, 1
    r = run(client(ca, keys).enroll(req(keys), mac_auth()))
    assert ca.seen == ["ir", "pollReq", "pollReq", "pollReq", "certConf"] and r.info["polls"] == 3


def test_polling_gives_up_after_max_wait(keys):
    ca = FakeCa(keys)
    ca.waiting, ca.check_after = 1000, 1
    c = CmpClient(CallableTransport(ca), trust_anchors=(keys.ca,), max_wait_s=0.05)
    with pytest.raises(PollingTimeoutError, match="still 'waiting'"):
        run(c.enroll(req(keys), mac_auth()))


def test_p10cr_from_csr(keys):
    csr = (x509.CertificateSigningRequestBuilder().subject_name(name("device"))
           .sign(keys.dev_key, hashes.SHA256()))
    ca = FakeCa(keys)
    r = run(client(ca, keys).enroll(CertRequest(subject=name("device"), csr=csr), mac_auth()))
    assert ca.seen == ["p10cr", "certConf"] and r.certificate.public_key() == keys.dev_key.public_key()


def test_cr_kur_rr_signed(keys):
    ca = FakeCa(keys, signed=True)
    c = client(ca, keys)
    ldev = make_cert(name("device"), keys.dev_key.public_key(), keys.ca.subject, keys.ca_key)
    auth = ClientAuth(certificate=ldev, private_key=keys.dev_key, chain=(keys.ca,))
    run(c.request(req(keys), auth))
    new_key = ec.generate_private_key(ec.SECP256R1())
    r = run(c.renew(req(keys, new_key), auth))
    assert r.certificate.public_key() == new_key.public_key()
    run(c.revoke(ldev, auth, "superseded"))
    assert ca.seen == ["cr", "certConf", "kur", "certConf", "rr"]


def test_kur_request_has_old_cert_id_and_pop_by_new_key(keys):
    ca = FakeCa(keys, signed=True)
    t = CallableTransport(ca)
    c = CmpClient(t, trust_anchors=(keys.ca,))
    ldev = make_cert(name("device"), keys.dev_key.public_key(), keys.ca.subject, keys.ca_key)
    new_key = ec.generate_private_key(ec.SECP256R1())
    run(c.renew(req(keys, new_key), ClientAuth(certificate=ldev, private_key=keys.dev_key)))
    kur = A.der_decode(t.requests[0], A.PKIMessage())
    crm = kur["body"]["kur"][0]
    ctl = crm["certReq"]["controls"][0]
    assert str(ctl["type"]) == str(A.id_regCtrl_oldCertID)
    cid = A.der_decode(bytes(ctl["value"]), A.CertId())
    assert int(cid["serialNumber"]) == ldev.serial_number
    sig = crm["pop"]["signature"]
    new_key.public_key().verify(sig["signature"].asOctets(), A.der_encode(crm["certReq"]),
                                ec.ECDSA(hashes.SHA256()))
    # protection by the old key, sender = old cert subject, extraCerts[0] = old cert
    assert M.asn1_to_cert(kur["extraCerts"][0]) == ldev


# --- bad input: each a clear error ------------------------------------------------------------------
def test_wrong_response_mac(keys):
    ca = FakeCa(keys)
    ca.tamper["secret"] = b"not-our-secret"
    with pytest.raises(ProtectionError, match="MAC does not verify"):
        run(client(ca, keys).enroll(req(keys), mac_auth()))


def test_wrong_shared_secret_error_is_reported_untrusted(keys):
    ca = FakeCa(keys, secret=b"server-secret")
    ca.error = (2, (1,), "bad message check")
    with pytest.raises(CmpServerError) as ei:
        run(client(ca, keys).enroll(req(keys), mac_auth()))
    assert ei.value.protected is False
    assert "badMessageCheck" in str(ei.value) and "UNAUTHENTICATED" in str(ei.value)


def test_response_signed_by_untrusted_key(keys):
    ca = FakeCa(keys, signed=True)
    ca.tamper["rogue"] = True
    auth = ClientAuth(certificate=keys.idev, private_key=keys.idev_key)
    with pytest.raises(ProtectionError, match="untrusted signer"):
        run(client(ca, keys).enroll(req(keys), auth))


def test_signed_response_without_trust_anchor(keys):
    ca = FakeCa(keys, signed=True)
    with pytest.raises(ProtectionError, match="no CMP trust anchor"):
        run(client(ca, keys, trust_anchors=()).enroll(req(keys), mac_auth()))


@pytest.mark.parametrize("field,value,msg", [
    ("tid", b"T" * 16, "transactionID does not match"),
    ("recip_nonce", b"R" * 16, "recipNonce does not match"),
    ("nonce", b"short", "senderNonce missing or shorter"),
    ("pvno", 1, "pvno 1 is not supported"),
])
def test_binding_violations(keys, field, value, msg):
    ca = FakeCa(keys)
    ca.tamper[field] = value
    with pytest.raises(ProtocolError, match=msg):
        run(client(ca, keys).enroll(req(keys), mac_auth()))


def test_replayed_response_is_rejected(keys):
    """A response captured from one transaction, replayed into the next."""
    ca = FakeCa(keys)
    ca.grant_implicit = True
    captured = []

    def recorder(der):
        out = ca(der)
        captured.append(out)
        return out

    c = CmpClient(CallableTransport(recorder), trust_anchors=(keys.ca,), implicit_confirm=True)
    run(c.enroll(req(keys), mac_auth()))
    replay = CmpClient(CallableTransport(lambda der: captured[0]), trust_anchors=(keys.ca,))
    with pytest.raises(ProtocolError, match="transactionID does not match"):
        run(replay.enroll(req(keys), mac_auth()))


def test_unprotected_positive_response_rejected(keys):
    ca = FakeCa(keys)
    ca.tamper["unprotected"] = True
    with pytest.raises(ProtectionError, match="not protected"):
        run(client(ca, keys).enroll(req(keys), mac_auth()))


def test_unprotected_error_reported_not_trusted(keys):
    ca = FakeCa(keys)
    ca.error = (2, (24,), "maintenance")
    ca.unprotected_error = True
    with pytest.raises(CmpServerError) as ei:
        run(client(ca, keys).enroll(req(keys), mac_auth()))
    e = ei.value
    assert e.protected is False and e.fail_info == ("systemUnavail",)
    assert "systemUnavail (the request cannot be handled because the system is unavailable)" in str(e)
    assert "maintenance" in str(e) and "retry later" in str(e)


def test_protected_rejection_names_failinfo(keys):
    ca = FakeCa(keys)
    ca.reject = ((9, 19), "POP failed")
    with pytest.raises(CmpServerError) as ei:
        run(client(ca, keys).enroll(req(keys), mac_auth()))
    assert ei.value.protected is True and ei.value.fail_info == ("badPOP", "badCertTemplate")
    assert "status rejection" in str(ei.value) and "'POP failed'" in str(ei.value)


@pytest.mark.parametrize("mangle,msg", [
    (lambda b: b[: len(b) // 2], "truncated or garbage"),
    (lambda b: b"\x00" * 10, "truncated or garbage"),
    (lambda b: b"<html>oops</html>", "truncated or garbage"),
    (lambda b: b + b"\x00", "trailing byte"),
    (lambda b: b"", "empty CMP response"),
])
def test_garbage_der(keys, mangle, msg):
    ca = FakeCa(keys)
    ca.tamper["mangle"] = mangle
    with pytest.raises(ProtocolError, match=msg):
        run(client(ca, keys).enroll(req(keys), mac_auth()))


def test_certificate_for_another_key(keys):
    ca = FakeCa(keys)
    ca.issue_for = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(KeyMismatchError, match="public key mismatch"):
        run(client(ca, keys).enroll(req(keys), mac_auth()))
    assert ca.seen == ["ir", "certConf"]  # the negative certConf


def test_message_time_checked_only_when_clock_trusted(keys):
    ca = FakeCa(keys)
    ca.tamper["time_offset_s"] = 3600
    run(client(ca, keys, clock_trusted=False).enroll(req(keys), mac_auth()))  # not trusted: accepted, reported
    ca = FakeCa(keys)
    ca.tamper["time_offset_s"] = 3600
    with pytest.raises(ProtocolError, match="messageTime .* from our clock"):
        run(client(ca, keys).enroll(req(keys), mac_auth()))  # trusted by default, 5 minutes tolerance
    ca = FakeCa(keys)
    ca.tamper["time_offset_s"] = 200
    run(client(ca, keys).enroll(req(keys), mac_auth()))
    ca = FakeCa(keys)
    ca.tamper["time_offset_s"] = 200
    with pytest.raises(ProtocolError, match="tolerance 60 s"):
        run(client(ca, keys, max_clock_skew_s=60).enroll(req(keys), mac_auth()))


def test_server_keygen_refused_clearly(keys):
    with pytest.raises(UnsupportedError, match="central key generation"):
        run(client(FakeCa(keys), keys).enroll(CertRequest(subject=name("d"), server_keygen=True), mac_auth()))


def test_no_credentials_is_value_error(keys):
    with pytest.raises(ValueError, match="no CMP credentials"):
        run(client(FakeCa(keys), keys).enroll(req(keys), ClientAuth()))


@pytest.mark.parametrize("kind", ["pbm", "pbmac1"])
def test_excessive_iteration_count_refused(kind):
    """A response may not make the device iterate a hash 10^7 times."""
    alg = P.new_mac_alg(kind, iterations=10_000_000)
    with pytest.raises(ProtectionError, match="outside 1..100000"):
        P.compute_mac(alg, SECRET, b"data")


# --- genm: caCerts, rootCaCert, certReqTemplate ------------------------------------------------
def _root_update(keys, *, bad_link=False):
    new_key = ec.generate_private_key(ec.SECP256R1())
    nwn = make_cert(keys.ca.subject, new_key.public_key(), keys.ca.subject, new_key, ca=True)
    signer = ec.generate_private_key(ec.SECP256R1()) if bad_link else keys.ca_key
    nwo = make_cert(keys.ca.subject, new_key.public_key(), keys.ca.subject, signer, ca=True)
    own = make_cert(keys.ca.subject, keys.ca.public_key(), keys.ca.subject, new_key, ca=True)
    return nwn, nwo, own


def test_ca_certs_and_root_update(keys):
    ca = FakeCa(keys, signed=True)
    ca.ca_certs = (keys.ca,)
    ca.root_update = _root_update(keys)
    r = run(client(ca, keys, old_root=keys.ca).ca_certs(mac_auth()))
    assert r.ca_certs == (keys.ca,) and r.new_root == ca.root_update[0]
    assert r.new_with_old == ca.root_update[1] and r.old_with_new == ca.root_update[2]


def test_ca_certs_unprotected_request_needs_protected_answer(keys):
    ca = FakeCa(keys, signed=True)
    ca.ca_certs = (keys.ca,)
    r = run(client(ca, keys).ca_certs(None))
    assert r.ca_certs == (keys.ca,) and r.new_root is None


def test_root_update_new_with_old_not_verifying(keys):
    ca = FakeCa(keys, signed=True)
    ca.root_update = _root_update(keys, bad_link=True)
    with pytest.raises(ProtocolError, match="newWithOld does not verify with the old root"):
        run(client(ca, keys, old_root=keys.ca).ca_certs(mac_auth()))


def test_root_update_without_new_with_old(keys):
    ca = FakeCa(keys, signed=True)
    nwn, _, own = _root_update(keys)
    ca.root_update = (nwn, None, own)
    with pytest.raises(ProtocolError, match="newWithOld is missing"):
        run(client(ca, keys, old_root=keys.ca).ca_certs(mac_auth()))


def _template(subject_attrs, exts=(), alg=None, rsa_len=None):
    c = A.CertReqTemplateContent()
    t = c["certTemplate"]
    if subject_attrs is not None:
        rdns = t["subject"].setComponentByPosition(0).getComponentByPosition(0)
        for i, (oid, value) in enumerate(subject_attrs):
            rdn = rdns.componentType.clone()
            atv = rdn.componentType.clone()
            atv["type"] = A.ObjectIdentifier(oid)
            atv["value"] = A.Any(A.der_encode(A.UTF8String(value)))
            rdn.setComponentByPosition(0, atv)
            rdns.setComponentByPosition(i, rdn)
    for i, (oid, crit, value) in enumerate(exts):
        e = A.Extension()
        e["extnID"] = A.ObjectIdentifier(oid)
        if crit:
            e["critical"] = True
        e["extnValue"] = value
        t["extensions"].setComponentByPosition(i, e)
    ks = []
    if alg is not None:
        atv = A.AttributeTypeAndValue()
        atv["type"] = A.id_regCtrl_algId
        atv["value"] = A.Any(A.der_encode(alg))
        ks.append(atv)
    if rsa_len is not None:
        atv = A.AttributeTypeAndValue()
        atv["type"] = A.id_regCtrl_rsaKeyLen
        atv["value"] = A.Any(A.der_encode(A.Integer(rsa_len)))
        ks.append(atv)
    for i, atv in enumerate(ks):
        c["keySpec"].setComponentByPosition(i, atv)
    return c


def test_cert_req_template_applied(keys):
    ca = FakeCa(keys)
    ku = x509.KeyUsage(True, False, False, False, False, False, False, False, False).public_bytes()
    ca.template = _template([("2.5.4.10", "ACME Plant 7"), ("2.5.4.3", "")],
                            exts=[("2.5.29.15", True, ku), ("2.5.29.17", False, b"")],
                            alg=P.alg_id("1.2.840.10045.2.1", A.ObjectIdentifier("1.2.840.10045.3.1.7")))
    t = CallableTransport(ca)
    c = CmpClient(t, trust_anchors=(keys.ca,), use_cert_template=True)
    run(c.enroll(req(keys), mac_auth()))
    assert ca.seen == ["genm", "ir", "certConf"]
    ir = A.der_decode(t.requests[1], A.PKIMessage())
    tpl = ir["body"]["ir"][0]["certReq"]["certTemplate"]
    subj = [(str(a["type"]), A.der_decode(bytes(a["value"]), A.UTF8String()).asOctets().decode())
            for rdn in tpl["subject"].getComponent() for a in rdn]
    assert subj == [("2.5.4.10", "ACME Plant 7"), ("2.5.4.3", "device")]
    exts = {str(e["extnID"]): (bool(e["critical"]), bytes(e["extnValue"])) for e in tpl["extensions"]}
    assert exts["2.5.29.15"] == (True, ku) and "2.5.29.17" in exts


def test_cert_req_template_key_mismatch(keys):
    ca = FakeCa(keys)
    ca.template = _template(None, rsa_len=3072)
    c = CmpClient(CallableTransport(ca), trust_anchors=(keys.ca,), use_cert_template=True)
    with pytest.raises(TemplateMismatchError, match="RSA-3072"):
        run(c.enroll(req(keys), mac_auth()))


def test_cert_req_template_absent(keys):
    ca = FakeCa(keys)
    assert run(client(ca, keys).cert_req_template(mac_auth())) is None


def test_every_error_is_an_enroll_error():
    for cls in (CmpServerError, KeyMismatchError, TemplateMismatchError, PollingTimeoutError):
        assert issubclass(cls, EnrollError)
