"""keystore.csr: subjects in RFC 4514 and OpenSSL `-subj` form (errors say why), and the CSR signature hash."""
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from keystore.certs import load_certificates
from keystore.csr import build_csr, parse_subject


@pytest.mark.parametrize("text,rfc4514", [
    ("CN=dev1,O=Plant", "CN=dev1,O=Plant"),
    ("/CN=dev1/O=Plant", "O=Plant,CN=dev1"),           # OpenSSL lists the most significant RDN first
    ("/C=DE/O=Plant/CN=dev1", "CN=dev1,O=Plant,C=DE"),
    ("/O=Plant/CN=dev1/", "CN=dev1,O=Plant"),            # a trailing slash is harmless
    ("/CN=a\\/b", "CN=a/b"),                             # escaped slash inside a value
    ("/O=Plant/OU=x+UID=7", "OU=x+UID=7,O=Plant"),       # multi-valued RDN
    ("/commonName=dev1/organizationName=Plant", "O=Plant,CN=dev1"),
    ("/CN=dev1/serialNumber=42", "serialNumber=42,CN=dev1"),
    ("dev1", "CN=dev1"),
])
def test_subject_forms(text, rfc4514):
    assert parse_subject(text).rfc4514_string({NameOID.SERIAL_NUMBER: "serialNumber"}) == rfc4514


def test_both_forms_give_the_same_name():
    assert parse_subject("/C=DE/O=Plant/CN=dev1") == parse_subject("CN=dev1,O=Plant,C=DE")


@pytest.mark.parametrize("text,why", [
    ("/CN=x/Q=y", "unknown attribute type 'Q'"),
    ("CN=x,Q=y", "unknown attribute type 'Q'"),
    ("CN=x,,O=y", "empty component between commas"),
    ("CN=x,O", "'O' is not TYPE=value"),
    ("/CN=x//O=y", "empty component between '/'"),
    ("/CN=", "empty value for CN"),
    ("/", "no attribute after '/'"),
    ("C=DEU", "length must be"),
    ("", "empty subject"),
])
def test_subject_errors_say_why(text, why):
    with pytest.raises(ValueError, match="subject") as ei:
        parse_subject(text)
    assert why in str(ei.value)


@given(st.text(max_size=40))
def test_parse_subject_gives_a_name_or_a_value_error(text):
    try:
        assert isinstance(parse_subject(text), x509.Name)
    except ValueError as e:
        assert str(e)


@pytest.mark.parametrize("key,hash_name,expected", [
    (ec.generate_private_key(ec.SECP256R1()), None, hashes.SHA256),
    (ec.generate_private_key(ec.SECP256R1()), "sha384", hashes.SHA384),
    (ec.generate_private_key(ec.SECP384R1()), None, hashes.SHA384),
    (rsa.generate_private_key(65537, 2048), "sha512", hashes.SHA512),
])
def test_csr_signature_hash(key, hash_name, expected):
    csr = build_csr(key, parse_subject("CN=x"), hash_name=hash_name)
    assert isinstance(csr.signature_hash_algorithm, expected) and csr.is_signature_valid


def test_csr_hash_ignored_for_ed25519_and_unknown_refused():
    csr = build_csr(ed25519.Ed25519PrivateKey.generate(), parse_subject("CN=x"), hash_name="sha384")
    assert csr.signature_hash_algorithm is None and csr.is_signature_valid
    with pytest.raises(ValueError, match="unsupported signature hash 'md5'"):
        build_csr(ec.generate_private_key(ec.SECP256R1()), parse_subject("CN=x"), hash_name="md5")


def test_certificate_file_with_text_before_pem():
    key = ec.generate_private_key(ec.SECP256R1())
    import datetime
    now = datetime.datetime.now(datetime.timezone.utc)
    name = parse_subject("CN=ca")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    from cryptography.hazmat.primitives import serialization
    pem = cert.public_bytes(serialization.Encoding.PEM)
    # What `openssl pkcs7 -print_certs` and `openssl x509 -text` write.
    for text in (b"subject=CN = ca\nissuer=CN = ca\n\n" + pem, b"Certificate:\n    Data:\n        Version: 3\n" + pem):
        assert load_certificates(text, "ca.pem") == [cert]
