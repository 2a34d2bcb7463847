"""The parse boundary (keystore.certs) and the parser contracts hardened by the fuzz suite (tests/fuzz).

Bad bytes from a peer or a file give the package's own error naming what and where, never a foreign exception.
"""
from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from enroll_clients.base import ProtocolError
from keystore.certs import MAX_PKCS12_ITERATIONS, load_certificates, load_der_certificate, load_pkcs12
from keystore.csr import parse_san
from keystore.errors import CorruptFileError

REGRESSIONS = Path(__file__).resolve().parents[1] / "fuzz" / "regressions"


def _cert(**kw):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    return b.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def _duplicate_extension(der: bytes) -> bytes:
    """The same certificate with its one extension twice (cryptography parses that lazily and raises
    DuplicateExtension on first access to .extensions)."""
    from tests.fuzz import mutate as mut

    tree = mut.parse_der(der)
    tbs = tree[0][2][0][2]
    exts = next(n for n in tbs if n[0] == 0xA3)[2][0][2]
    exts.append(mut._copy(exts[0]))
    return mut.encode_der(tree)


def test_duplicate_extension_is_a_corrupt_file_naming_the_part():
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    der = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
           .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .sign(key, hashes.SHA256()).public_bytes(Encoding.DER))
    bad = _duplicate_extension(der)
    x509.load_der_x509_certificate(bad)  # cryptography itself accepts it at load time...
    with pytest.raises(CorruptFileError, match=r"--cert: certificate extensions does not parse: duplicate extension"):
        load_der_certificate(bad, "--cert")  # ...the boundary does not
    with pytest.raises(CorruptFileError, match=r"chain.pem: certificate 1: certificate extensions"):
        from cryptography.hazmat.primitives.serialization import pkcs7  # noqa: F401

        load_certificates(b"".join(b"-----BEGIN CERTIFICATE-----\n" + __import__("base64").encodebytes(d)
                                   + b"-----END CERTIFICATE-----\n" for d in (der, bad)), "chain.pem")


def test_signature_bit_string_with_unused_bits_is_refused():
    """Found by the fuzz suite (coap_device): cryptography ignores the unused-bits count of signatureValue, so the
    same signed certificate re-encoded with a count of 1 verified and was stored in an encoding the CA never
    issued (its fingerprint differs). The boundary refuses it."""
    from keystore.certs import _der_header

    der = _cert()
    while der[-1] & 1:  # DER: the unused bits must be zero, so take a signature whose last bit is 0
        der = _cert()

    _, i, _ = _der_header(der, 0)
    i = _der_header(der, _der_header(der, i)[2])[2]
    tag, start, _ = _der_header(der, i)
    assert tag == 0x03 and der[start] == 0
    load_der_certificate(der, "ok")
    bad = der[:start] + b"\x01" + der[start + 1:]
    assert x509.load_der_x509_certificate(bad).signature == x509.load_der_x509_certificate(der).signature
    with pytest.raises(CorruptFileError, match=r"/verify payload: certificate signature value is a BIT STRING with 1 "
                                               r"unused bit\(s\)"):
        load_der_certificate(bad, "/verify payload")


def test_a_certificate_seen_again_is_the_one_checked_before_and_a_bad_one_is_never_remembered():
    """keystore.certs remembers certificates that passed the boundary by their exact DER (a CLM sends the same CA
    certificates with every /csr and /verify): the same bytes give the same checked object, from DER or PKCS#7
    alike; a different encoding or a refused certificate is parsed and judged again every time."""
    from cryptography.hazmat.primitives.serialization import pkcs7

    from keystore import certs

    der, other = _cert(), _cert()
    first = load_der_certificate(der, "ca entry 0")
    assert load_der_certificate(bytearray(der), "ca entry 0") is first
    leaf = x509.load_der_x509_certificate(other)
    bundle = pkcs7.serialize_certificates([leaf, first], Encoding.DER)
    got = {c.public_bytes(Encoding.DER): c for c in load_certificates(bundle, "POST /verify payload")}  # a SET OF
    assert got[der] is first and load_certificates(other, "x")[0] is got[other]
    bad = _duplicate_extension(_cert_with_ext())
    for _ in range(2):  # refused both times: only certificates that passed are remembered
        with pytest.raises(CorruptFileError, match="duplicate extension"):
            load_der_certificate(bad, "--cert")
    assert bad not in certs._seen
    for _ in range(certs._SEEN_MAX + 1):  # bounded: the least recently used goes first
        load_der_certificate(_cert(), "x")
    assert der not in certs._seen and len(certs._seen) == certs._SEEN_MAX
    assert load_der_certificate(der, "ca entry 0") is not first  # parsed and checked again


def test_csrattrs_with_a_huge_length_is_a_protocol_error():
    """Found by the fuzz suite (est_csrattrs): pyasn1 raised OverflowError for a length beyond an index."""
    from enroll_clients.est.messages import decode_csrattrs

    data = (REGRESSIONS / "est_csrattrs" / "huge-length-overflow.bin").read_bytes()
    with pytest.raises(ProtocolError, match=r"/csrattrs response: not a DER CsrAttrs"):
        decode_csrattrs(data)


def test_cmp_extra_certs_name_the_index():
    from enroll_clients.cmp import asn1 as A
    from enroll_clients.cmp import messages as M

    bad = _duplicate_extension(_cert_with_ext())
    with pytest.raises(ProtocolError, match=r"extraCerts\[3\]: certificate extensions does not parse"):
        M.asn1_to_cert(A.der_decode(bad, A.CMPCertificate()), "extraCerts[3]")


def _cert_with_ext():
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()).public_bytes(Encoding.DER))


def test_pkcs12_with_a_huge_iteration_count_is_refused_at_once():
    data = (REGRESSIONS / "keystore_import" / "pkcs12-huge-iteration-count.bin").read_bytes()[1:]
    with pytest.raises(CorruptFileError, match=f"more than {MAX_PKCS12_ITERATIONS}"):
        load_pkcs12(data, "idevid.p12", b"fuzz")


@pytest.mark.parametrize("san,msg", [
    ("dns:" + "a" * 64 + ".example", "exceeds 63"),
    ("dns:" + ".".join(["a" * 60] * 5), "exceeds 253"),
    ("dns:a..example", "empty DNS label"),
    ("dns:dev_1.example", "not letters, digits and inner hyphens"),
    ("dns:bücher.example", "A-label"),
    ("dns:-dev.example", "inner hyphens"),
])
def test_san_dns_names_are_checked(san, msg):
    with pytest.raises(ValueError, match=msg):
        parse_san(san)


@pytest.mark.parametrize("ok", ["dns:dev-1.plant.example", "dns:*.plant.example", "dns:localhost",
                                "dns:xn--bcher-kva.example"])
def test_valid_dns_names_pass(ok):
    assert parse_san(ok).value == ok[4:]


def test_est_serverkeygen_non_ascii_gives_a_value_or_a_protocol_error():
    from enroll_clients.est.messages import ServerKeygenResponse, parse_serverkeygen

    refused = 0
    for p in sorted((REGRESSIONS / "est_serverkeygen").iterdir()):
        ct, _, body = p.read_bytes().partition(b"\n")
        try:
            assert isinstance(parse_serverkeygen(ct.decode("latin-1"), body), ServerKeygenResponse)
        except ProtocolError as e:
            refused += 1
            assert "/serverkeygen response" in str(e)
    assert refused >= 2


@pytest.fixture
def board():
    agent = str(Path(__file__).resolve().parents[2] / "agent")
    sys.path.insert(0, agent)
    try:
        from mpy import cbor, der

        yield der, cbor
    finally:
        sys.path.remove(agent)


@pytest.mark.parametrize("text,tag", [(b"-10101000000Z", 0x17), (b"991301000000Z", 0x17), (b"20240230000000Z", 0x18),
                                      (b"20230229000000Z", 0x18), (b"240101240000Z", 0x17), (b"2401010000+0Z", 0x17),
                                      (b"24010100000Z", 0x17), (b"20240101000060Z", 0x18)])
def test_board_to_time_rejects_out_of_range_fields(board, text, tag):
    der, _ = board
    with pytest.raises(der.DerError):
        der.to_time(text, tag, 0, len(text))


def test_board_to_time_accepts_real_times(board):
    der, _ = board
    assert der.to_time(b"240229235959Z", 0x17, 0, 13) == (2024, 2, 29, 23, 59, 59)
    assert der.to_time(b"20500101000000Z", 0x18, 0, 15) == (2050, 1, 1, 0, 0, 0)


def test_board_cbor_errors_are_cbor_errors(board):
    _, cbor = board
    for bad in (b"\x1f", b"\x62a", b"\xa1\x80\x01", b"\x00\x00", b"\x63\xff\xfe\xfd"):
        with pytest.raises(cbor.CborError):
            cbor.loads(bad)


@pytest.mark.parametrize("bad,what", [(b"\xa1\x43san\x01", "text string (major type 2"),
                                      (b"\xa2\x63san\x01\x43san\x02", "text string (major type 2"),
                                      (b"\xa1\x01\x02", "text string (major type 0"),
                                      (b"\xa2\x61a\x01\x61a\x02", "duplicate CBOR map key 'a'")])
def test_board_cbor_map_keys_are_text_and_unique(board, bad, what):
    """A byte-string key next to text keys was kept (MicroPython then compared bytes with str on every lookup,
    printing a warning, and a lookup by the text name missed it); a duplicate key silently replaced the first."""
    _, cbor = board
    with pytest.raises(cbor.CborError, match=re.escape(what)):
        cbor.loads(bad)
    assert cbor.loads(b"\xa2\x61a\x01\x61b\x42\x00\x01") == {"a": 1, "b": b"\x00\x01"}
