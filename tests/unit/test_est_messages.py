"""Pure EST message functions: encodings, certs-only, multipart, URLs, fingerprints, Retry-After, chains."""
import base64
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from enroll_clients.base import ProtectionError, ProtocolError, UnsupportedError
from enroll_clients.est import messages as m

NOW = datetime.datetime.now(datetime.timezone.utc)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject_key, cn, issuer_key=None, issuer_cn=None, ca=False, days=1):
    issuer_key = issuer_key or subject_key
    return (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(issuer_cn or cn))
            .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(minutes=5)).not_valid_after(NOW + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False), critical=True)
            .sign(issuer_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def pki():
    root_k, ca_k, ee_k, other_k = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    root = _cert(root_k, "root", ca=True)
    ca = _cert(ca_k, "issuing", root_k, "root", ca=True)
    ee = _cert(ee_k, "device", ca_k, "issuing")
    return dict(root=root, ca=ca, ee=ee, ee_key=ee_k, other_key=other_k, root_key=root_k, ca_key=ca_k)


# ---- URLs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("server,label,base,expected", [
    ("https://h", None, None, "https://h/.well-known/est/simpleenroll"),
    ("https://h:8443/", "plant", None, "https://h:8443/.well-known/est/plant/simpleenroll"),
    ("https://h/.well-known/est", "dom/prof", None, "https://h/.well-known/est/dom/prof/simpleenroll"),
    ("https://h/prefix", None, None, "https://h/prefix/.well-known/est/simpleenroll"),
    ("https://h", "x", "/est/v1", "https://h/est/v1/x/simpleenroll"),
    ("https://h", None, "", "https://h/simpleenroll"),
])
def test_build_url(server, label, base, expected):
    assert m.build_url(server, "simpleenroll", label, base) == expected


@pytest.mark.parametrize("server,label,op,err", [
    ("http://h", None, "cacerts", "https"),
    ("https://h", "a//b", "cacerts", "segment"),
    ("https://h", "../x", "cacerts", "segment"),
    ("https://h", "a b", "cacerts", "segment"),
    ("https://h", "simpleenroll", "cacerts", "operation"),
    ("https://h", None, "fullcmc", "unknown EST operation"),
])
def test_build_url_rejects(server, label, op, err):
    with pytest.raises(ValueError, match=err):
        m.build_url(server, op, label)


def test_same_origin():
    assert m.same_origin("https://h/a", "https://H:443/b")
    assert not m.same_origin("https://h/a", "https://h:8443/a")
    assert not m.same_origin("https://h/a", "https://g/a")
    assert not m.same_origin("https://h/a", "http://h/a")


# ---- fingerprints ---------------------------------------------------------------------------------
def test_fingerprint_roundtrip(pki):
    fp = m.fingerprint(pki["root"])
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert m.match_fingerprint([pki["ca"], pki["root"]], fp) is pki["root"]
    colons = "SHA256:" + ":".join(fp[7:][i:i + 2].upper() for i in range(0, 64, 2))
    assert m.match_fingerprint([pki["root"]], colons) is pki["root"]
    assert m.match_fingerprint([pki["ca"]], fp) is None


@pytest.mark.parametrize("bad", ["sha1:abcd", "abcdef", "sha256:xyz", "sha256:" + "a" * 63, ""])
def test_fingerprint_rejects(bad):
    with pytest.raises(ValueError, match="fingerprint"):
        m.parse_fingerprint(bad)


# ---- base64 / bodies ------------------------------------------------------------------------------
@given(st.binary(min_size=1, max_size=2000))
def test_base64_roundtrip(data):
    assert m.decode_base64(m.encode_base64(data)) == data


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_base64_parse_roundtrips_or_clear_error(data):
    try:
        out = m.decode_base64(data)
    except ProtocolError as e:
        assert "base64" in str(e) or "empty" in str(e)
        return
    assert m.decode_base64(m.encode_base64(out)) == out


def test_malformed_base64_is_an_error():
    with pytest.raises(ProtocolError, match="malformed base64.*offset"):
        m.decode_base64(b"MIIB!!notbase64")


def test_decode_body_der_pem_base64(pki):
    der = pki["root"].public_bytes(serialization.Encoding.DER)
    pem = pki["root"].public_bytes(serialization.Encoding.PEM)
    assert m.decode_body(der) == der
    assert m.decode_body(pem) == der
    assert m.decode_body(base64.encodebytes(der)) == der
    with pytest.raises(ProtocolError, match="HTML"):
        m.decode_body(b"<html><title>Oops</title></html>")
    with pytest.raises(ProtocolError, match="empty"):
        m.decode_body(b"")


# ---- certs-only -----------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["b64", "b64-crlf", "b64-noline", "der", "pem-pkcs7", "pem-certs"])
def test_parse_certs_body_encodings(pki, encoding):
    certs = [pki["ee"], pki["ca"]]
    der = m.encode_certs_only(certs)
    body = {"b64": m.encode_base64(der), "b64-crlf": m.encode_base64(der).replace(b"\n", b"\r\n"), "b64-noline": base64.b64encode(der), "der": der,
            "pem-pkcs7": b"-----BEGIN PKCS7-----\n" + base64.encodebytes(der) + b"-----END PKCS7-----\n",
            "pem-certs": b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)}[encoding]
    got = m.parse_certs_body(body, "application/pkcs7-mime; smime-type=certs-only")
    assert {c.serial_number for c in got} == {c.serial_number for c in certs}


def test_parse_certs_single_der_certificate(pki):
    assert m.parse_certs_body(pki["ee"].public_bytes(serialization.Encoding.DER))[0] == pki["ee"]


def test_pkcs7_without_certificates_is_an_error():
    empty = bytes.fromhex("3023" "06092a864886f70d010702" "a016" "3014" "020101" "3100"
                          "300b06092a864886f70d010701" "3100")
    with pytest.raises(ProtocolError, match="no certificate"):
        m.parse_certs_body(m.encode_base64(empty))


def test_html_instead_of_pkcs7_is_an_error():
    with pytest.raises(ProtocolError, match="HTML page.*Login required"):
        m.parse_certs_body(b"<html><head><title>Login required</title></head></html>", "text/html")


def test_garbage_der_is_an_error():
    with pytest.raises(ProtocolError, match="neither PKCS#7"):
        m.parse_certs_body(b"\x30\x03\x02\x01\x01")


@given(st.binary(max_size=400))
@settings(max_examples=300)
def test_parse_certs_body_never_crashes(data):
    try:
        certs = m.parse_certs_body(data)
    except ProtocolError:
        return
    assert m.parse_certs_body(m.encode_base64(m.encode_certs_only(certs))) == certs


def test_split_issued(pki):
    ee, rest = m.split_issued([pki["ca"], pki["ee"]], pki["ee_key"].public_key())
    assert ee == pki["ee"] and rest == (pki["ca"],)
    with pytest.raises(ProtocolError, match="another key"):
        m.split_issued([pki["ee"]], pki["other_key"].public_key())


# ---- chains ---------------------------------------------------------------------------------------
def test_verified_chain(pki):
    """The EST client's chain checks are the validator's (docs/trust.md); the path excludes the certificate."""
    assert m.verified_chain(pki["ee"], [pki["ca"]], [pki["root"]]) == (pki["ca"], pki["root"])
    assert m.verified_chain(pki["ee"], [], [pki["ca"]]) == (pki["ca"],)
    foreign_root_k = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ProtectionError, match="does not verify|does not chain"):
        m.verified_chain(pki["ee"], [pki["ca"]], [_cert(foreign_root_k, "root", ca=True)])
    with pytest.raises(ProtectionError, match="does not chain"):
        m.verified_chain(pki["ee"], [], [pki["root"]])  # intermediate missing
    with pytest.raises(ProtectionError, match="no trust anchor"):
        m.verified_chain(pki["ee"], [pki["ca"]], [])


def test_verified_chain_refuses_non_ca_intermediate(pki):
    fake_ca = _cert(pki["ca_key"], "issuing", pki["root_key"], "root", ca=False)
    with pytest.raises(ProtectionError, match="is not a CA"):
        m.verified_chain(pki["ee"], [fake_ca], [pki["root"]])


def test_rollover_links(pki):
    new_k = ec.generate_private_key(ec.SECP256R1())
    new_root = _cert(new_k, "root G2", ca=True)
    nwo = _cert(new_k, "root G2", pki["root_key"], "root", ca=True)
    own = _cert(pki["root_key"], "root", new_k, "root G2", ca=True)
    links = m.rollover_links([pki["ca"], pki["root"], new_root, nwo, own], [pki["root"]])
    assert (links.new_root, links.new_with_old, links.old_with_new) == (new_root, nwo, own)
    assert m.rollover_links([pki["ca"], pki["root"]], [pki["root"]]).new_root is None


# ---- multipart / serverkeygen ---------------------------------------------------------------------
def test_serverkeygen_roundtrip(pki):
    ctype, body = m.encode_serverkeygen(pki["ee_key"], [pki["ee"]])
    got = m.parse_serverkeygen(ctype, body)
    assert got.certificates == (pki["ee"],)
    assert m._spki(got.private_key) == m._spki(pki["ee_key"])


def test_serverkeygen_binary_parts_and_order(pki):
    key_der = pki["ee_key"].private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
    body = (b"--XyZ\r\nContent-Type: application/pkcs7-mime; smime-type=certs-only\r\n\r\n"
            + m.encode_base64(m.encode_certs_only([pki["ee"]]))
            + b"--XyZ\r\nContent-Type: application/pkcs8\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            + key_der + b"\r\n--XyZ--\r\n")
    got = m.parse_serverkeygen('multipart/mixed; boundary="XyZ"', body)
    assert got.certificates == (pki["ee"],)


def test_serverkeygen_without_key_part(pki):
    body = (b"--b\r\nContent-Type: application/pkcs7-mime; smime-type=certs-only\r\n\r\n"
            + m.encode_base64(m.encode_certs_only([pki["ee"]])) + b"--b--\r\n")
    with pytest.raises(ProtocolError, match="application/pkcs8 private-key part, found 0"):
        m.parse_serverkeygen("multipart/mixed; boundary=b", body)


def test_serverkeygen_encrypted_key_unsupported(pki):
    body = (b"--b\r\nContent-Type: application/pkcs7-mime; smime-type=server-generated-key\r\n\r\nMIIB\r\n"
            b"--b\r\nContent-Type: application/pkcs7-mime; smime-type=certs-only\r\n\r\n"
            + m.encode_base64(m.encode_certs_only([pki["ee"]])) + b"--b--\r\n")
    with pytest.raises(UnsupportedError, match="encrypted private key"):
        m.parse_serverkeygen("multipart/mixed; boundary=b", body)


@pytest.mark.parametrize("ctype,body,err", [
    ("application/pkcs7-mime", b"x", "expected multipart/mixed"),
    ("multipart/mixed", b"--b\r\n", "without a boundary"),
    ("multipart/mixed; boundary=zz", b"no boundary here", "does not contain"),
])
def test_multipart_errors(ctype, body, err):
    with pytest.raises(ProtocolError, match=err):
        m.parse_serverkeygen(ctype, body)


@given(st.binary(max_size=300))
@settings(max_examples=200)
def test_multipart_never_crashes(data):
    try:
        m.parse_serverkeygen("multipart/mixed; boundary=b", b"--b\r\n" + data + b"\r\n--b--")
    except (ProtocolError, UnsupportedError):
        pass


# ---- Retry-After / server text --------------------------------------------------------------------
def test_retry_after():
    assert m.parse_retry_after("5") == 5.0
    assert m.parse_retry_after(None) is None
    assert m.parse_retry_after("soon") is None
    later = NOW + datetime.timedelta(seconds=30)
    got = m.parse_retry_after(later.strftime("%a, %d %b %Y %H:%M:%S GMT"), NOW)
    assert 28 <= got <= 31


@pytest.mark.parametrize("value,expected", [
    ("1\u00b20", None),  # str.isdigit() holds for a superscript two, int() refuses it: not delta-seconds
    ("\u0661\u0662", None),  # Arabic-Indic digits: delta-seconds is ASCII DIGIT only (RFC 9110 10.2.3)
    ("9" * 5000, float(2 ** 31)),  # too large to represent: 2^31 (RFC 9111 1.2.2), not an OverflowError
    ("Wed, 21 Oct 2026 08:2877777777", None), ("Sun Nov  6 08:49:37 " + "9" * 30, None),
    ("Fri, 31 Dec 9999 23:59:59 -0100", None),  # past datetime.max once in UTC
])
def test_retry_after_never_raises(value, expected):
    """Found by the fuzz suite (tests/fuzz, target est_headers): these raised ValueError/OverflowError."""
    assert m.parse_retry_after(value, NOW) == expected
    assert m.http_date(value) is None


def test_server_text_reduces_html():
    t = m.server_text(b"<html><head><title>502 Bad Gateway</title><style>x{}</style></head>"
                      b"<body><h1>Bad Gateway</h1><script>evil()</script></body></html>", "text/html")
    assert t.startswith("502 Bad Gateway") and "evil" not in t and "<" not in t
    assert len(m.server_text(b"x" * 5000)) <= m.SERVER_TEXT_MAX_CHARS


@pytest.mark.parametrize("value,expected", [
    ("Sun, 06 Nov 1994 08:49:37 GMT", "1994-11-06T08:49:37+00:00"),   # IMF-fixdate (RFC 9110 §5.6.7)
    ("Sunday, 06-Nov-94 08:49:37 GMT", "1994-11-06T08:49:37+00:00"),  # obsolete RFC 850 form
    ("Sun Nov  6 08:49:37 1994", "1994-11-06T08:49:37+00:00"),        # obsolete asctime form: GMT by definition
    ("Sun, 06 Nov 1994 10:49:37 +0200", "1994-11-06T08:49:37+00:00"),
    (None, None), ("", None), ("yesterday", None), ("Sun, 99 Nov 1994 08:49:37 GMT", None),
])
def test_http_date(value, expected):
    t = m.http_date(value)
    assert (t.isoformat() if t else None) == expected


# ---- label and profile path (README: /.well-known/est/<label>[/<profile>]/...) ----------------------------
@pytest.mark.parametrize("label,profile,expected", [
    (None, None, "https://h/.well-known/est/simpleenroll"),
    ("plant", None, "https://h/.well-known/est/plant/simpleenroll"),
    ("plant", "tls_client", "https://h/.well-known/est/plant/tls_client/simpleenroll"),
    (None, "tls_client", "https://h/.well-known/est/tls_client/simpleenroll"),
    ("plant/tls_client", None, "https://h/.well-known/est/plant/tls_client/simpleenroll"),
])
def test_build_url_with_profile(label, profile, expected):
    assert m.build_url("https://h", "simpleenroll", label, None, profile) == expected


@pytest.mark.parametrize("label,profile,err", [
    ("plant/ldevid", "tls_client", "already names a profile; give it once"),
    ("plant", "a/b", "single path segment"),
    ("plant", "..", "not a valid label path segment"),
    ("plant", "cacerts", "not an EST operation name"),
])
def test_profile_errors(label, profile, err):
    with pytest.raises(ValueError, match=err):
        m.build_url("https://h", "simpleenroll", label, None, profile)


def test_pem_after_text_is_accepted(pki):
    """`openssl x509 -text` and `openssl pkcs7 -print_certs` write text before the PEM block."""
    pem = pki["ee"].public_bytes(serialization.Encoding.PEM)
    text = b"subject=CN = device\nissuer=CN = issuing\n\n" + pem
    assert m.parse_certs_body(text) == (pki["ee"],)
    assert m.decode_body(text) == pki["ee"].public_bytes(serialization.Encoding.DER)
