"""/csrattrs: DER structure round-trip (hypothesis), RFC 7030 / RFC 9908 examples, application to a request."""
import base64

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from enroll_clients.base import CertRequest, ProtocolError
from enroll_clients.est import messages as m

# RFC 7030 §4.5.2 example response: challengePassword, ecPublicKey{secp384r1},
# extensionRequest{macAddress}, ecdsaWithSHA384.
RFC7030_EXAMPLE = (b"MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJ\r\n"
                   b"BgcrBgEBAQEWBggqhkjOPQQDAw==\r\n")


def test_rfc7030_example():
    a = m.parse_csrattrs(RFC7030_EXAMPLE)
    assert a.challenge_password is True
    assert (a.key_type, a.curve, a.signature_hash) == ("p384", "secp384r1", "sha384")
    assert a.extension_oids == ("1.3.6.1.1.1.1.22",)  # macAddress requested without value
    assert len(a.items) == 4


def _der_oid(dotted):
    from pyasn1.codec.der import encoder
    from pyasn1.type import univ
    return encoder.encode(univ.ObjectIdentifier(dotted))


def _der_int(n):
    from pyasn1.codec.der import encoder
    from pyasn1.type import univ
    return encoder.encode(univ.Integer(n))


def test_rsa_key_size_and_extension_template():
    eku = x509.Extension(x509.oid.ExtensionOID.EXTENDED_KEY_USAGE, False,
                         x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]))
    # Extensions ::= SEQUENCE OF Extension, built by hand (no cryptography encoder for a bare Extension).
    ext_value = eku.value.public_bytes()
    from pyasn1.codec.der import encoder
    from pyasn1_modules import rfc5280
    exts_asn1 = rfc5280.Extensions()
    e = rfc5280.Extension()
    e["extnID"] = rfc5280.univ.ObjectIdentifier("2.5.29.37")
    e["extnValue"] = ext_value
    exts_asn1.append(e)
    exts = encoder.encode(exts_asn1)
    der = m.encode_csrattrs([m.CsrAttrItem("1.2.840.113549.1.1.11"),
                             m.CsrAttrItem("1.2.840.113549.1.1.1", (_der_int(3072),)),
                             m.CsrAttrItem("1.2.840.113549.1.9.14", (exts,))])
    a = m.parse_csrattrs(m.encode_base64(der))
    assert (a.key_type, a.rsa_key_size, a.signature_hash) == ("rsa3072", 3072, "sha256")
    assert [e.oid.dotted_string for e in a.extensions] == ["2.5.29.37"]
    assert a.extensions[0].value.value == ext_value


def test_conflicting_key_types_is_an_error():
    der = m.encode_csrattrs([m.CsrAttrItem("1.2.840.10045.2.1", (_der_oid("1.3.132.0.34"),)),
                             m.CsrAttrItem("1.2.840.113549.1.1.1", (_der_int(2048),))])
    with pytest.raises(ProtocolError, match="conflicting key types"):
        m.parse_csrattrs(der)


def test_unsupported_curve_is_an_error():
    der = m.encode_csrattrs([m.CsrAttrItem("1.2.840.10045.2.1", (_der_oid("1.3.132.0.10"),))])
    with pytest.raises(ProtocolError, match="unsupported curve"):
        m.parse_csrattrs(der)


def test_empty_and_malformed():
    assert m.parse_csrattrs(b"") == m.CsrAttrs()
    assert m.parse_csrattrs(base64.b64encode(b"\x30\x00")).items == ()
    with pytest.raises(ProtocolError, match="malformed base64"):
        m.parse_csrattrs(b"MEEG*!")
    with pytest.raises(ProtocolError, match="CsrAttrs"):
        m.parse_csrattrs(base64.b64encode(b"\x30\x03\x02\x01\x01"))


def test_ber_is_rejected():
    # Indefinite-length SEQUENCE containing one OID: valid BER, not DER.
    ber = b"\x30\x80" + _der_oid("1.2.840.113549.1.9.7") + b"\x00\x00"
    with pytest.raises(ProtocolError):
        m.parse_csrattrs(base64.b64encode(ber))


def test_apply_to_request():
    attrs = m.parse_csrattrs(RFC7030_EXAMPLE)
    req = CertRequest(subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d")]))
    out = m.apply_csrattrs(req, attrs)
    assert out.key_type == "p384"
    with pytest.raises(ValueError, match="requires key type p384"):
        m.apply_csrattrs(CertRequest(subject=req.subject, key_type="rsa2048"), attrs)
    eku = x509.Extension(x509.oid.ExtensionOID.EXTENDED_KEY_USAGE, False, x509.UnrecognizedExtension(
        x509.oid.ExtensionOID.EXTENDED_KEY_USAGE,
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]).public_bytes()))
    out = m.apply_csrattrs(req, m.CsrAttrs(extensions=(eku,)))
    assert out.extensions == (eku,)
    # The requested extension can be put into a CSR by the keystore's builder as-is.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    k = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(req.subject)
           .add_extension(eku.value, critical=False).sign(k, hashes.SHA256()))
    assert csr.extensions[0].value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])


oids = st.builds(lambda a, b, rest: ".".join(map(str, [a, b, *rest])),
                 st.integers(0, 2), st.integers(0, 39), st.lists(st.integers(0, 2**40), max_size=6))
values = st.one_of(oids.map(_der_oid), st.integers(-2**70, 2**70).map(_der_int),
                   st.binary(max_size=60).map(lambda b: b"\x04" + bytes([len(b)]) + b))
items = st.lists(st.builds(m.CsrAttrItem, oids, st.one_of(st.none(), st.lists(values, max_size=4)
                                                          .map(lambda v: tuple(sorted(set(v), key=lambda x: (len(x), x)))))),
                 max_size=8)


@given(items)
@settings(max_examples=200)
def test_csrattrs_structure_roundtrip(its):
    der = m.encode_csrattrs(its)
    got = m.decode_csrattrs(der)
    assert m.encode_csrattrs(got) == der
    assert [i.oid for i in got] == [i.oid for i in its]


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_csrattrs_parse_roundtrips_or_clear_error(data):
    try:
        got = m.decode_csrattrs(data)
    except ProtocolError as e:
        assert "CsrAttrs" in str(e) or "trailing" in str(e)
        return
    assert m.encode_csrattrs(got) == data


# libest 3.2.0's built-in answer, byte for byte as its estserver sends it: macAddress, emailAddress, secp384r1 and
# sha384 as bare OIDs, base64, and a trailing NUL (the C string's terminator, counted in Content-Length).
LIBEST_DEFAULT = b"MCYGBysGAQEBARYGCSqGSIb3DQEJAQYFK4EEACIGCWCGSAFlAwQCAg==\x00"


def test_libest_default_answer_with_trailing_nul():
    a = m.parse_csrattrs(LIBEST_DEFAULT)
    # A bare named-curve OID asks for an EC key on that curve (RFC 7030 §4.5.2's example names curves so too).
    assert (a.key_type, a.curve, a.signature_hash) == ("p384", "secp384r1", "sha384")
    assert a.extension_oids == ("1.3.6.1.1.1.1.22", "1.2.840.113549.1.9.1")


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x00", b"\r\n\x00", b"\x00\n", b" \t"])
def test_trailing_nul_and_whitespace_tolerated(tail):
    assert m.parse_csrattrs(RFC7030_EXAMPLE + tail).key_type == "p384"


@pytest.mark.parametrize("body", [b"MEEG\x00CSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJ",
                                  RFC7030_EXAMPLE + b"\x00garbage"])
def test_nul_inside_base64_is_still_an_error(body):
    with pytest.raises(ProtocolError, match="malformed base64"):
        m.parse_csrattrs(body)


def test_raw_der_is_not_stripped():
    der = base64.b64decode(RFC7030_EXAMPLE)
    assert m.parse_csrattrs(der).key_type == "p384"
    with pytest.raises(ProtocolError, match="trailing bytes"):
        m.parse_csrattrs(der + b"\x00")  # in DER a NUL is data: never silently dropped


@pytest.mark.parametrize("curve,kt", [("1.2.840.10045.3.1.7", "p256"), ("1.3.132.0.34", "p384"),
                                      ("1.3.132.0.35", "p521")])
def test_bare_curve_oid_sets_key_type(curve, kt):
    a = m.parse_csrattrs(m.encode_base64(m.encode_csrattrs([m.CsrAttrItem(curve)])))
    assert a.key_type == kt and a.extension_oids == ()
