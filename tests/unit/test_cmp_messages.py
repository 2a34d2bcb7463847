"""CMP message encoding/decoding (pure): request structure per RFC 9483, parser robustness, error words,
and the import cost promise of ``enroll_clients.cmp``."""
from __future__ import annotations

import datetime
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enroll_clients.base import ProtectionError, ProtocolError
from enroll_clients.cmp import asn1 as A
from enroll_clients.cmp import messages as M
from enroll_clients.cmp import protection as P
from enroll_clients.cmp.errors import CmpServerError, describe_status, fail_info_names

NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev")])


SHA256 = hashes.SHA256()


def cert(key, issuer_key=None, subject=NAME, hash_=SHA256, ski=True):
    issuer_key = issuer_key or key
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
         .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    if ski:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    return b.sign(issuer_key, None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hash_)


@pytest.fixture(scope="module")
def key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def sample_ir(key):
    t = M.Transaction(M.Protector(reference=b"ref", secret=b"pw"), sender=NAME)
    body = M.cert_req_messages(M.cert_template(NAME, key.public_key(), (x509.DNSName("a.example"),)), key)
    return t.request("ir", body, general_info=[(A.id_it_implicitConfirm, A.Null(""))])


def test_mac_request_header(sample_ir):
    m = M.decode_message(sample_ir)
    h = m["header"]
    assert int(h["pvno"]) == 2
    assert bytes(h["senderKID"]) == b"ref"
    assert M.name_der(h["sender"]["directoryName"]) == NAME.public_bytes()
    assert M.name_der(h["recipient"]["directoryName"]) == x509.Name([]).public_bytes()  # NULL-DN
    assert len(bytes(h["transactionID"])) == 16 and len(bytes(h["senderNonce"])) == 16
    assert not h["recipNonce"].isValue
    assert str(h["generalInfo"][0]["infoType"]) == str(A.id_it_implicitConfirm)
    assert str(h["protectionAlg"]["algorithm"]) == str(A.id_PasswordBasedMac)
    assert not m["extraCerts"].isValue
    assert P.compute_mac(h["protectionAlg"], b"pw", M._protected_part(m)) == m["protection"].asOctets()


def test_pop_signature_verifies(sample_ir, key):
    m = M.decode_message(sample_ir)
    crm = m["body"]["ir"][0]
    sig = crm["pop"]["signature"]
    assert str(sig["algorithmIdentifier"]["algorithm"]) == "1.2.840.10045.4.3.2"
    key.public_key().verify(sig["signature"].asOctets(), A.der_encode(crm["certReq"]), ec.ECDSA(hashes.SHA256()))


def test_signature_request_sender_and_extra_certs(key):
    c = cert(key)
    ca = cert(ec.generate_private_key(ec.SECP256R1()))
    t = M.Transaction(M.Protector(certificate=c, private_key=key, chain=(ca,)), sender=x509.Name([]))
    m = M.decode_message(t.request("genm", M.genm_body([(A.id_it_caCerts, None)])))
    h = m["header"]
    assert M.name_der(h["sender"]["directoryName"]) == c.subject.public_bytes()  # sender = protection cert subject
    assert bytes(h["senderKID"]) == c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert [M.asn1_to_cert(x) for x in m["extraCerts"]] == [c, ca]  # protection cert first
    P.verify_signature(key.public_key(), h["protectionAlg"], m["protection"].asOctets(), M._protected_part(m))


def test_protector_rejects_mismatched_cert_and_key(key):
    with pytest.raises(ValueError, match="do not match"):
        M.Transaction(M.Protector(certificate=cert(key), private_key=ec.generate_private_key(ec.SECP256R1())))


@pytest.mark.parametrize("hash_,expect_alg", [(hashes.SHA256(), False), (hashes.SHA384(), False), (None, True)])
def test_cert_conf_hash_follows_certificate_signature(hash_, expect_alg):
    k = ed25519.Ed25519PrivateKey.generate() if hash_ is None else ec.generate_private_key(ec.SECP384R1())
    c = cert(k, hash_=hash_)
    body, pvno = M.cert_conf_body(c, 0)
    cs = body[0]
    h = hashes.Hash(hashes.SHA512() if hash_ is None else type(hash_)())
    h.update(c.public_bytes(__import__("cryptography.hazmat.primitives.serialization", fromlist=["x"]).Encoding.DER))
    assert bytes(cs["certHash"]) == h.finalize()
    assert cs["hashAlg"].isValue is expect_alg and pvno == (3 if expect_alg else 2)


def test_negative_cert_conf_carries_status():
    c = cert(ec.generate_private_key(ec.SECP256R1()))
    body, _ = M.cert_conf_body(c, 0, accept=False, reason="public key mismatch", fail_bits=(7,))
    si = body[0]["statusInfo"]
    assert M.status_of(si) == (2, ("incorrectData",), "public key mismatch")


def test_rr_body_issuer_serial_reason():
    c = cert(ec.generate_private_key(ec.SECP256R1()))
    rd = M.rr_body(c, "keyCompromise")[0]
    assert int(rd["certDetails"]["serialNumber"]) == 7
    assert M.name_der(rd["certDetails"]["issuer"]) == c.issuer.public_bytes()
    assert int(A.der_decode(bytes(rd["crlEntryDetails"][0]["extnValue"]), A.ReasonFlags())) == 1
    with pytest.raises(ValueError, match="unknown revocation reason"):
        M.rr_body(c, "bored")


def test_request_type_checked():
    t = M.Transaction(M.Protector(reference=b"r", secret=b"s"))
    with pytest.raises(ValueError, match="not a CMP request type"):
        t.request("ip", A.CertRepMessage())


@pytest.mark.parametrize("kind", ["pbm", "pbmac1"])
def test_mac_roundtrip_and_wrong_secret(kind):
    alg = P.new_mac_alg(kind, iterations=1000)
    mac = P.compute_mac(alg, b"secret", b"data")
    assert P.mac_equal(mac, P.compute_mac(alg, b"secret", b"data"))
    assert not P.mac_equal(mac, P.compute_mac(alg, b"Secret", b"data"))


def test_unknown_protection_alg():
    with pytest.raises(ProtectionError, match="not a MAC"):
        P.compute_mac(P.alg_id("1.2.3.4"), b"s", b"d")


# --- parser robustness ------------------------------------------------------------------------------
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=400))
def test_garbage_parses_or_fails_clearly(data):
    try:
        msg = M.decode_message(data)
    except ProtocolError as e:
        assert "CMP" in str(e)
    else:
        assert A.der_encode(msg) == data  # if it parses, it round-trips


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          deadline=None)
@given(pos=st.integers(min_value=0, max_value=10_000), val=st.integers(min_value=0, max_value=255),
       cut=st.booleans())
def test_mutated_messages(sample_ir, pos, val, cut):
    pos %= len(sample_ir)
    data = sample_ir[:pos] if cut else sample_ir[:pos] + bytes([val]) + sample_ir[pos + 1:]
    try:
        msg = M.decode_message(data)
    except ProtocolError:
        return
    assert A.der_encode(msg) == data


def test_accept_checks_before_trust(sample_ir):
    """A request replayed at us as a 'response' is refused (wrong binding, unexpected type)."""
    t = M.Transaction(M.Protector(reference=b"ref", secret=b"pw"))
    t.request("genm", M.genm_body([(A.id_it_caCerts, None)]))
    with pytest.raises(ProtocolError):
        t.accept(sample_ir, ["genp"])


# --- error words ------------------------------------------------------------------------------------
def test_fail_info_names_and_description():
    assert fail_info_names((0, 1, 0, 1)) == ("badMessageCheck", "badTime")
    s = describe_status(2, ("badTime",), "clock off")
    assert s == ("status rejection; failInfo badTime (messageTime too far from the server's time (check the "
                 "device clock)); server text: 'clock off'")
    e = CmpServerError("ir refused", status=2, fail_info=("badTime",), text="clock off", protected=False)
    assert "UNAUTHENTICATED" in str(e) and "set the device clock" in str(e) and e.status == "rejection"


# --- start-up cost -----------------------------------------------------------------------------------
def test_package_import_is_cheap():
    """``import enroll_clients.cmp`` and building a client must not load pyasn1 or httpx."""
    code = ("import sys; from enroll_clients.base import EnrollOptions; import enroll_clients.cmp as c; "
            "c.client_from_options(EnrollOptions(server='http://127.0.0.1:1/')); "
            "bad=[m for m in sys.modules if m.startswith(('pyasn1', 'httpx'))]; print(bad); assert not bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- messageTime: parsed as pyasn1's asDateTime parses it, without datetime.strptime ------------------
_GT_PARTS = st.tuples(
    st.sampled_from(["2026", "1999", "0001", "9999"]), st.sampled_from(["12", "01", "13", "00"]),
    st.sampled_from(["03", "31", "29", "00"]), st.sampled_from(["16", "00", "23", "24"]),
    st.sampled_from(["", "40", "59", "60"]), st.sampled_from(["", "00", "59", "61"]),
    st.sampled_from(["", ".5", ".123456789", ",25", ".", ".05"]),
    st.sampled_from(["Z", "", "+0100", "-0530", "+01", "-2359", "+2400"]))


@settings(max_examples=500, deadline=None)
@given(_GT_PARTS)
def test_generalized_time_matches_pyasn1(parts):
    """Every form pyasn1 reads, read to the same instant (or refused by both: month 13, hour 24, ...)."""
    if not parts[4] and parts[5]:
        parts = parts[:5] + ("",) + parts[6:]  # seconds need minutes
    value = A.GeneralizedTime("".join(parts))
    try:
        want = value.asDateTime.astimezone(datetime.timezone.utc)
    except Exception:
        want = None
    assert M.parse_generalized_time(value) == want


@pytest.mark.parametrize("text", ["20261031600Z", "2026120316.123Zx", "20261203164000.1x2Z", "20261203164000+1",
                                  "20261203164000+01x0", "2026120316400Z", "2026-12-03T16:40:00Z", "", "Z"])
def test_generalized_time_malformed_is_none(text):
    """Malformed times are None (no skew check on them), including what strptime's lenient widths would take."""
    assert M.parse_generalized_time(A.GeneralizedTime(text)) is None


def test_generalized_time_does_not_load_strptime():
    code = ("import sys; from enroll_clients.cmp import asn1 as A, messages as M; "
            "t = M.parse_generalized_time(A.GeneralizedTime('20261203164000.25Z')); "
            "assert t.isoformat() == '2026-12-03T16:40:00.250000+00:00', t; assert '_strptime' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("owf", [hashes.SHA1, hashes.SHA224, hashes.SHA256, hashes.SHA384, hashes.SHA512,
                                 hashes.SHA3_256])
def test_pbm_key_is_the_iterated_owf(owf):
    """RFC 4210 5.1.3.1 BASEKEY = OWF^n(secret || salt), stepped with cryptography's Hash as the reference (hashlib
    runs the steps; SHA3-256 has no hashlib attribute of its name and takes the cryptography path)."""
    k = b"secret" + b"salt0123456789ab"
    for _ in range(7):
        h = hashes.Hash(owf())
        h.update(k)
        k = h.finalize()
    assert P.pbm_key(b"secret", b"salt0123456789ab", owf, 7) == k
    assert P.pbm_key(b"secret", b"salt0123456789ab", owf, 6) != k
