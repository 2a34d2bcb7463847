"""P-256/ECDSA under MicroPython and CPython; signatures cross-verified with cryptography."""
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tests.mpy.helpers import run_case


def test_ec_cases(runtime, vectors, out_dir):
    run_case(runtime, "case_ec", vectors, out_dir)
    # the board's signature verifies under cryptography, with the key it was made from
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), (out_dir / "pub.bin").read_bytes())
    assert pub == vectors.keys["dev"].public_key()
    pub.verify((out_dir / "sig.der").read_bytes(), (vectors / "msg.bin").read_bytes(), ec.ECDSA(hashes.SHA256()))


def test_x509_cases(runtime, vectors, out_dir):
    """Certificates from cryptography CAs (P-256 and RSA-2048) verify on the runtime; its CSRs verify here."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_der_private_key
    from cryptography.x509.oid import ExtensionOID, NameOID

    run_case(runtime, "case_x509", vectors, out_dir)
    req = x509.load_der_x509_csr((out_dir / "csr_dev.der").read_bytes())
    assert req.is_signature_valid
    assert req.public_key() == vectors.keys["dev"].public_key()
    assert req.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    assert req.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-0001"
    san = req.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert san.get_values_for_type(x509.DNSName) == ["dev-1.plant.example"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:dev:sn:0001"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    ku = req.extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    fresh = x509.load_der_x509_csr((out_dir / "csr_fresh.der").read_bytes())
    assert fresh.is_signature_valid
    key = load_der_private_key((out_dir / "fresh.key").read_bytes(), None)
    assert key.public_key() == fresh.public_key()
