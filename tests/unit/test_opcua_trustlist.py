"""Pure parts of OPC UA push management: the TrustListDataType stream, masks, checks, subject names, Part 6 checks."""
from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.opcua import trustlist as tl
from agent.opcua.errors import PushError
from agent.opcua.push import _split_der, parse_subject_name
from keystore.errors import VerificationError
from keystore.purpose_opcua import check_application_certificate, validate_application

DER = Encoding.DER


def test_encode_decode_masks_and_merge(lab):
    d = lab.domain("plant")
    full = tl.TrustList(trusted_certificates=(d.root_cert.public_bytes(DER),),
                        issuer_certificates=(d.ca_cert.public_bytes(DER),),
                        trusted_crls=(lab.crl("plant").public_bytes(DER),))
    mask, back = tl.decode(tl.encode(full))
    assert mask == tl.ALL and back == full
    mask, part = tl.decode(tl.encode(full, tl.ISSUER_CERTIFICATES))
    assert mask == 4 and part.trusted_certificates == () and part.issuer_certificates == full.issuer_certificates
    merged = tl.merge(full, tl.ISSUER_CERTIFICATES, tl.TrustList())
    assert merged.issuer_certificates == () and merged.trusted_certificates == full.trusted_certificates
    tl.check(full)  # the CRL is signed by the issuing CA listed as issuer
    assert tl.thumbprint(b"abc") == "A9993E364706816ABA3E25717850C26C9CD0D89D"


@pytest.mark.parametrize("blob, what", [
    (b"", "not a UA Binary"), (b"\x0f\x00\x00\x00\x01", "not a UA Binary"),
    (tl.encode(tl.TrustList()) + b"\x00", "after the TrustListDataType"),
    (b"\x10\x00\x00\x00" + b"\x00" * 16, "bits outside"),
    (b"\x02\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00x" + b"\x00" * 12, "does not include"),
])
def test_decode_refuses_garbage(blob, what):
    with pytest.raises(PushError) as e:
        tl.decode(blob)
    assert e.value.status == "BadDecodingError" and what in str(e.value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_decode_arbitrary_bytes_is_a_value_or_a_decoding_error(blob):
    try:
        mask, v = tl.decode(blob)
    except PushError as e:
        assert e.status == "BadDecodingError"
        return
    assert tl.decode(tl.encode(v, mask)) == (mask, v)


def test_check_refuses_wrong_entries(lab):
    d = lab.domain("plant")
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = lab.issue("plant", leaf_key.public_key(), x509.Name.from_rfc4514_string("CN=peer"), profile="opcua")
    cases = [
        (tl.TrustList(trusted_certificates=(b"\x30\x03\x02\x01\x01",)), "BadCertificateInvalid", "not a DER"),
        (tl.TrustList(issuer_certificates=(leaf.public_bytes(DER),)), "BadCertificateInvalid", "not a CA"),
        (tl.TrustList(trusted_certificates=(d.root_cert.public_bytes(DER),) * 2), "BadCertificateInvalid", "twice"),
        (tl.TrustList(trusted_certificates=(d.root_cert.public_bytes(DER),),
                      trusted_crls=(lab.crl("other").public_bytes(DER),)), "BadCertificateInvalid", "not signed"),
    ]
    for value, status, text in cases:
        with pytest.raises(PushError) as e:
            tl.check(value)
        assert e.value.status == status and text in str(e.value), e.value
    tl.check(tl.TrustList(trusted_certificates=(leaf.public_bytes(DER),)))  # a pinned peer is fine
    with pytest.raises(PushError) as e:
        tl.check(tl.TrustList(trusted_certificates=(leaf.public_bytes(DER),)),
                 now=datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc))
    assert e.value.status == "BadCertificateTimeInvalid"


@pytest.mark.parametrize("part,value", [(0, (0x02, b"\x00")),  # version 0: cryptography's InvalidVersion
                                        (2, (0x0E, b"\x00"))])  # issuer not a Name: ValueError on first access
def test_check_refuses_crls_whose_parts_do_not_parse(lab, part, value):
    """Found by the fuzz suite (tests/fuzz, target opcua_trustlist): cryptography parses a CRL's parts lazily,
    so these escaped check() as InvalidVersion/ValueError; now BadCertificateInvalid naming the list entry."""
    from tests.fuzz.mutate import encode_der, parse_der

    d = lab.domain("plant")
    tree = parse_der(lab.crl("plant").public_bytes(DER))
    tbs = tree[0][2][0][2]
    tbs[part] = [value[0], "p", value[1]]
    bad = tl.TrustList(trusted_certificates=(d.root_cert.public_bytes(DER),), trusted_crls=(encode_der(tree),))
    with pytest.raises(PushError) as e:
        tl.check(bad)
    assert e.value.status == "BadCertificateInvalid" and "TrustedCrls[0] is not a DER CRL" in str(e.value)


def test_split_der_and_subject_names(lab):
    a, b = lab.domain("plant").root_cert.public_bytes(DER), lab.domain("plant").ca_cert.public_bytes(DER)
    assert _split_der(a + b) == [a, b]
    for bad in (a[:-1], b"\x31\x00", a + b"\x30"):
        with pytest.raises(ValueError):
            _split_der(bad)
    assert parse_subject_name("CN=App/O=Org").rfc4514_string() == "CN=App,O=Org"
    assert parse_subject_name("CN=App,O=Org").rfc4514_string() == "CN=App,O=Org"


def test_application_certificate_checks(lab):
    d = lab.domain("plant")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name.from_rfc4514_string("CN=dev,O=Plant")
    good = lab.issue("plant", key.public_key(), name, [x509.UniformResourceIdentifier("urn:dev")], "opcua")
    path = validate_application(good, [d.ca_cert], [d.root_cert], application_uri="urn:dev", role="server",
                                public_key=key.public_key())
    assert path[-1] == d.root_cert
    for cert, uri, role, reason in [
        (good, "urn:other", "server", "bad-application-uri"),
        (lab.issue("plant", key.public_key(), name, [x509.UniformResourceIdentifier("urn:dev")], "ldevid"),
         "urn:dev", "server", "bad-eku"),
        (lab.issue("plant", key.public_key(), name, [x509.UniformResourceIdentifier("urn:dev")], "tls-server"),
         "urn:dev", "server", None),
    ]:
        if reason is None:
            validate_application(cert, [d.ca_cert], [d.root_cert], application_uri=uri, role=role)
            continue
        with pytest.raises(VerificationError) as e:
            validate_application(cert, [d.ca_cert], [d.root_cert], application_uri=uri, role=role)
        assert e.value.reason == reason, e.value
    ku_no_encipher = lab.issue("plant", key.public_key(), name, [x509.UniformResourceIdentifier("urn:dev")],
                               "tls-client")
    with pytest.raises(VerificationError) as e:
        check_application_certificate(ku_no_encipher, "urn:dev", "client")
    assert e.value.reason == "bad-key-usage"
