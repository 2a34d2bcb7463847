"""Pure CoAP payload codecs, rate limiter, renewal schedule and CLM pre-verification."""
from __future__ import annotations

import datetime
import random

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from hypothesis import given, settings, strategies as st

from coap_services import codec
from coap_services.errors import PayloadError, ServiceError, code_str
from coap_services.ratelimit import TokenBucket

text = st.text(min_size=1, max_size=40)
requests = st.builds(
    codec.CsrRequest,
    subject=st.none() | text, san=st.lists(text, max_size=4).map(tuple), key_type=st.none() | text,
    name=st.none() | text, domain=st.none() | text, profile=st.none() | text,
    ca=st.lists(st.binary(min_size=1, max_size=64), max_size=3).map(tuple))


@given(requests)
def test_csr_request_round_trips(req):
    assert codec.decode_csr_request(codec.encode_csr_request(req), codec.CF_CBOR) == req


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_and_round_trip_or_fail_clearly(data):
    try:
        req = codec.decode_csr_request(data, codec.CF_CBOR)
    except PayloadError as e:
        assert e.reason in ("malformed-cbor", "schema") and str(e)
        return
    assert codec.decode_csr_request(codec.encode_csr_request(req)) == req


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=10))
def test_any_cbor_value_is_accepted_or_refused_with_schema_error(value):
    try:
        codec.decode_csr_request(cbor2.dumps(value))
    except PayloadError as e:
        assert e.reason in ("schema", "malformed-cbor")


def test_empty_payload_means_device_defaults():
    assert codec.decode_csr_request(b"") == codec.CsrRequest()


@pytest.mark.parametrize("payload,reason", [
    (b"\xff\x00", "malformed-cbor"),
    (cbor2.dumps({}) + b"\x00", "malformed-cbor"),  # trailing bytes
    (cbor2.dumps([1, 2]), "schema"),
    (cbor2.dumps({"subject": 5}), "schema"),
    (cbor2.dumps({"subject": ""}), "schema"),
    (cbor2.dumps({"san": "dns:x"}), "schema"),
    (cbor2.dumps({"ca": ["not bytes"]}), "schema"),
    (cbor2.dumps({"ca": [b"x"] * 5}), "schema"),
    (cbor2.dumps({"colour": "blue"}), "schema"),
    (cbor2.dumps(cbor2.CBORTag(1, 0)), "malformed-cbor"),  # a tag, even one cbor2 decodes itself
    (cbor2.dumps({"subject": cbor2.CBORTag(99999, "x")}), "malformed-cbor"),
    (b"\x9f" * 5000, "malformed-cbor"),  # deep indefinite nesting
])
def test_bad_csr_requests(payload, reason):
    with pytest.raises(PayloadError) as ei:
        codec.decode_csr_request(payload, codec.CF_CBOR)
    assert ei.value.reason == reason and code_str(ei.value.code) == "4.00"


@pytest.mark.parametrize("payload,tag", [
    (cbor2.dumps(cbor2.CBORTag(1, 0)), 1),
    (bytes.fromhex("a1646e616d65c16474657374"), 1),  # {"name": 1("test")}: cbor2 itself fails on it
    (cbor2.dumps({"ca": [cbor2.CBORTag(2, b"\x01")]}), 2),  # a bignum inside an array
    (cbor2.dumps({"subject": cbor2.CBORTag(99999, "x")}), 99999),
])
def test_a_cbor_tag_is_named(payload, tag):
    with pytest.raises(PayloadError) as ei:
        codec.decode_csr_request(payload, codec.CF_CBOR)
    assert ei.value.reason == "malformed-cbor" and f"CBOR tag {tag} not allowed" in ei.value.message


def test_content_format_named_by_number_and_media_type():
    with pytest.raises(PayloadError) as ei:
        codec.decode_csr_request(b"x", 0)
    assert code_str(ei.value.code) == "4.15"
    assert "content-format 0 (text/plain;charset=utf-8) is not accepted; use 60 (application/cbor)" in ei.value.message
    with pytest.raises(PayloadError) as ei:
        codec.decode_certificates(b"x", 4711)
    assert "4711 (not a content-format this device knows)" in ei.value.message
    assert "287 (application/pkix-cert) or 281 (application/pkcs7-mime;smime-type=certs-only)" in ei.value.message


def test_oversized_and_wrong_content_format():
    with pytest.raises(PayloadError) as ei:
        codec.decode_csr_request(b"\xa0" * (codec.MAX_CSR_REQUEST_BYTES + 1))
    assert code_str(ei.value.code) == "4.13"
    with pytest.raises(PayloadError) as ei:
        codec.decode_csr_request(b"\xa0", content_format=0)
    assert code_str(ei.value.code) == "4.15"


def _cert(ca=False):
    k = ec.generate_private_key(ec.SECP256R1())
    n = x509.Name.from_rfc4514_string("CN=x")
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(n).issuer_name(n).public_key(k.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca, None), critical=True).sign(k, hashes.SHA256()))


def test_decode_certificates_der_and_pkcs7():
    a, b = _cert(), _cert(True)
    der = a.public_bytes(serialization.Encoding.DER)
    assert codec.decode_certificates(der, codec.CF_PKIX_CERT) == [a]
    p7 = pkcs7.serialize_certificates([a, b], serialization.Encoding.DER)
    assert codec.decode_certificates(p7, codec.CF_PKCS7_CERTS) == [a, b]
    with pytest.raises(PayloadError) as ei:
        codec.decode_certificates(p7, codec.CF_PKIX_CERT)
    assert ei.value.reason == "malformed-certificate"


@given(st.binary(max_size=200))
def test_garbage_is_not_a_certificate(data):
    with pytest.raises(PayloadError) as ei:
        codec.decode_certificates(data, codec.CF_PKIX_CERT)
    assert code_str(ei.value.code) in ("4.00", "4.13")


def test_pem_and_wrong_cf_refused():
    pem = _cert().public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PayloadError):
        codec.decode_certificates(pem, codec.CF_PKIX_CERT)
    with pytest.raises(PayloadError) as ei:
        codec.decode_certificates(b"x", codec.CF_CBOR)
    assert code_str(ei.value.code) == "4.15"


@given(st.text(max_size=30), st.text(max_size=100))
def test_diagnostic_round_trips(reason, message):
    d = codec.decode_diagnostic(codec.encode_diagnostic(reason, message))
    assert d == {"error": reason, "message": message}


@given(st.binary(max_size=100))
def test_diagnostic_decoder_never_raises(data):
    d = codec.decode_diagnostic(data)
    assert set(d) == {"error", "message"}


def test_service_error_renders_code():
    e = ServiceError(0x83, "key-mismatch", "for another key")
    assert str(e) == "4.03 key-mismatch: for another key"


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_timing_us_is_bounded(x):
    assert 0 <= codec.timing_us(x) <= 0xFFFFFFFF


def test_token_bucket():
    now = [0.0]
    b = TokenBucket(rate_per_s=0.5, burst=2, clock=lambda: now[0])
    assert b.take() == 0 and b.take() == 0
    wait = b.take()
    assert wait == pytest.approx(2.0) and TokenBucket.max_age(wait) == 2
    now[0] += 2.0
    assert b.take() == 0
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_renewal_time_within_lifetime():
    from agent.clm import renewal_time

    c = _cert()
    rng = random.Random(1)
    for _ in range(100):
        t = renewal_time(c, 0.66, 0.1, rng)
        assert c.not_valid_before_utc < t < c.not_valid_after_utc


def test_pre_verify(lab):
    from agent.clm import PreVerificationError, pre_verify
    from keystore.csr import build_csr, parse_san

    dom = lab.domain("plant")
    k = ec.generate_private_key(ec.SECP256R1())
    csr = build_csr(k, x509.Name.from_rfc4514_string("CN=dev9"), [parse_san("dns:dev9.plant")])
    cert = lab.issue_from_csr("plant", csr)
    assert pre_verify(csr, cert, [dom.ca_cert], [dom.root_cert])[0] == cert
    other = build_csr(ec.generate_private_key(ec.SECP256R1()), csr.subject, [parse_san("dns:dev9.plant")])
    cases = [
        (other, cert, [dom.ca_cert], [dom.root_cert], "key-mismatch"),
        (csr, cert, [dom.ca_cert], [lab.domain("other").root_cert], "untrusted"),
        (csr, lab.issue("plant", k.public_key(), x509.Name.from_rfc4514_string("CN=evil"),
                        [parse_san("dns:dev9.plant")]), [dom.ca_cert], [dom.root_cert], "subject-mismatch"),
        (csr, lab.issue("plant", k.public_key(), csr.subject, []), [dom.ca_cert], [dom.root_cert], "san-mismatch"),
        (csr, cert, [dom.ca_cert], [], "untrusted"),
    ]
    for c, crt, chain, anchors, reason in cases:
        with pytest.raises(PreVerificationError) as ei:
            pre_verify(c, crt, chain, anchors)
        assert ei.value.reason == reason
