"""TPM key backend against a real TPM 2.0 simulator (swtpm on loopback).

The keystore's enrollment path runs once per key type: generate in the TPM -> CSR -> lab CA -> store ->
renew with rekey -> delete. Bad input (TPM unreachable, wrong TCTI, missing handle) must fail with a
KeyBackendError naming the TCTI/handle and leave the keystore's files untouched.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from agent.lab.ca import LabCA
from keystore.csr import build_csr, default_key_usage, parse_san, parse_subject
from keystore.errors import ExportRefusedError, KeyBackendError, NotFoundError, UnsupportedKeyTypeError
from keystore.backends import tpm as tpm_backend
from keystore.store import Keystore
from tests.peers.tpm import swtpm, tpm_options  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.peer

IDEVID_HANDLE = 0x81020000


def snapshot(root: Path) -> dict:
    """Every file under the keystore with its content hash: 'nothing stored' means this is unchanged."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != ".lock":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def transient_handles(server) -> list[int]:
    from tpm2_pytss.constants import TPM2_CAP, TPM2_HR

    ectx = server.esapi()
    try:
        _, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HR.TRANSIENT, 64)
        return [int(h) for h in data.data.handles if (int(h) >> 24) == 0x80]
    finally:
        ectx.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return LabCA.create(tmp_path_factory.mktemp("lab"), domains=("plant", "mfg"))


@pytest.fixture
def keystore(tmp_path, tpm_options, lab):  # noqa: F811
    ks = Keystore.init(tmp_path / "ks", backend_options={"tpm": tpm_options})
    ks.add_trust_anchors("plant", [lab.domain("plant").root_cert], source="lab", verified_by="test")
    yield ks
    ks.close()


def enroll(ks: Keystore, lab: LabCA, key_uri: str, name: str = "plant", kt: str = "p256"):
    key = ks.private_key(key_uri)
    csr = build_csr(key, parse_subject(f"CN=dev1-{kt},O=Plant"), [parse_san("dns:dev1.plant.example")],
                    key_usage=default_key_usage(kt))
    assert csr.is_signature_valid
    cert = lab.issue_from_csr("plant", csr)
    return ks.store_certificate(name, cert, [lab.domain("plant").ca_cert], key_uri=key_uri, domain="plant",
                                protocol="test")


# ---- the enrollment path, once per key type ------------------------------------------------------------
@pytest.mark.parametrize("kt", ["p256", "p384", "rsa2048", "rsa3072"])
def test_enroll_renew_rekey_delete(keystore, lab, swtpm, kt):  # noqa: F811
    root = keystore.root
    uri = keystore.generate_key(kt, backend="tpm", label="plant")
    assert uri.startswith("tpm:blob/")
    blob = root / "tpm" / f"{uri.split('/')[1]}.tss"
    assert stat.S_IMODE(blob.stat().st_mode) == 0o600
    assert blob.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    cred = enroll(keystore, lab, uri, kt=kt)
    assert cred.key_uri == uri and cred.key_type == kt and cred.version == 1

    # Renewal with rekey: a new TPM key, the old one is forgotten once the new certificate is live.
    uri2 = keystore.generate_key(kt, backend="tpm", label="plant")
    cred2 = enroll(keystore, lab, uri2, kt=kt)
    assert cred2.version == 2 and cred2.key_uri == uri2
    assert not blob.exists(), "the superseded key's blob must be destroyed after the rekey"
    assert keystore.key_record(uri) is None
    assert keystore.check() == []

    keystore.delete("plant")
    assert not (root / "tpm" / f"{uri2.split('/')[1]}.tss").exists()
    assert keystore.key_record(uri2) is None
    assert transient_handles(swtpm) == [], "every loaded object must be flushed after use"


def test_signatures_verify_for_every_scheme(keystore):
    ec_key = keystore.private_key(keystore.generate_key("p384", backend="tpm"))
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey) and ec_key.curve.name == "secp384r1"
    sig = ec_key.sign(b"msg", ec.ECDSA(hashes.SHA384()))
    ec_key.public_key().verify(sig, b"msg", ec.ECDSA(hashes.SHA384()))
    rsa_key = keystore.private_key(keystore.generate_key("rsa2048", backend="tpm"))
    assert isinstance(rsa_key, rsa.RSAPrivateKey) and rsa_key.key_size == 2048
    for pad in (padding.PKCS1v15(), padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)):
        sig = rsa_key.sign(b"msg", pad, hashes.SHA256())
        rsa_key.public_key().verify(sig, b"msg", pad, hashes.SHA256())


def test_persistent_handle_mode_evicts_on_delete(tmp_path, swtpm, lab):  # noqa: F811
    swtpm.flush_all()
    opts = dict(swtpm.options, persist="handle", handle_base="0x81100000")
    ks = Keystore.init(tmp_path / "ks", backend_options={"tpm": opts})
    ks.add_trust_anchors("plant", [lab.domain("plant").root_cert], source="lab", verified_by="test")
    try:
        uri = ks.generate_key("p256", backend="tpm")
        assert uri == "tpm:handle/0x81100000"
        assert 0x81100000 in swtpm.persistent_handles()
        enroll(ks, lab, uri)
        assert not (tmp_path / "ks" / "tpm").exists(), "handle mode keeps no blob"
        ks.delete("plant")
        assert 0x81100000 not in swtpm.persistent_handles()
    finally:
        ks.close()
        swtpm.evict_persistent(0x81100000)


def test_private_key_is_not_exportable(keystore, lab):
    uri = keystore.generate_key("p256", backend="tpm")
    enroll(keystore, lab, uri)
    key = keystore.private_key(uri)
    with pytest.raises(ExportRefusedError, match="non-exportable"):
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    with pytest.raises(ExportRefusedError, match="TPM"):
        keystore.export("plant", "pem", with_key=True, password=b"secret-pass")
    with pytest.raises(ExportRefusedError):
        keystore.export("plant", "p12", password=b"secret-pass")
    assert keystore.key_file(uri) is None  # TLS with a TPM key: documented limitation


def test_idevid_at_persistent_handle(keystore, lab, swtpm):  # noqa: F811
    """A manufacturer put the IDevID key at a persistent handle and issued its certificate; we import it."""
    swtpm.make_persistent_key(IDEVID_HANDLE, "p256")
    try:
        uri = tpm_backend.handle_uri(IDEVID_HANDLE)
        pub = keystore.public_key(uri)
        mfg = lab.domain("mfg")
        cert = lab.issue("mfg", pub, parse_subject("CN=dev1,serialNumber=SN-0001,O=Maker"), profile="ldevid")
        cred = keystore.import_idevid("idevid", cert, [mfg.ca_cert, mfg.root_cert], key_uri=uri, source="factory")
        assert cred.readonly and cred.key_uri == uri
        # Zero-touch onboarding signs with it (CMP signature protection is a plain signature over bytes).
        key = keystore.private_key(uri)
        sig = key.sign(b"PKIHeader||PKIBody", ec.ECDSA(hashes.SHA256()))
        cert.public_key().verify(sig, b"PKIHeader||PKIBody", ec.ECDSA(hashes.SHA256()))
        # A CSR signed by the IDevID key (e.g. for EST /simpleenroll re-enrollment) verifies as well.
        assert build_csr(key, parse_subject("CN=dev1")).is_signature_valid
        # Deleting the credential forgets the key but never evicts a handle devagent did not create.
        keystore.delete("idevid", force=True)
        assert IDEVID_HANDLE in swtpm.persistent_handles()
    finally:
        swtpm.evict_persistent(IDEVID_HANDLE)
    assert transient_handles(swtpm) == []


def test_master_key_sealed_to_tpm(tmp_path, swtpm, lab):  # noqa: F811
    swtpm.flush_all()
    root = tmp_path / "ks"
    opts = {"tpm": dict(swtpm.options)}
    ks = Keystore.init(root, backend_options=opts)
    soft_uri = ks.import_key(ec.generate_private_key(ec.SECP256R1()), label="app")
    before = ks.public_key(soft_uri)
    tpm_backend.move_master_key_to_tpm(ks)
    ks.close()
    assert not (root / "master.key").exists()
    assert stat.S_IMODE((root / "master.tss").stat().st_mode) == 0o600
    assert Keystore.open(root, opts).meta()["master_key"] == "tpm"
    ks2 = Keystore.open(root, backend_options=opts)
    try:
        key = ks2.private_key(soft_uri)  # decrypting the software key needs the unsealed master key
        assert key.public_key().public_numbers() == before.public_numbers()
    finally:
        ks2.close()
    # Another (cleared) TPM cannot unseal it.
    with pytest.raises(KeyBackendError, match="TCTI"):
        tpm_backend.unseal_master_key(root, {"master_key": "tpm"}, {"tcti": "swtpm:host=127.0.0.1,port=9"})


# ---- bad input ----------------------------------------------------------------------------------------
def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("tcti,expect", [
    (None, "not reachable"),                          # nothing listens at the port
    ("nosuchtcti:foo", "unknown TCTI name"),          # wrong TCTI
    ("device:/dev/nonexistent-tpm", "not reachable"),  # no TPM device
])
def test_unreachable_tpm_fails_clearly_and_stores_nothing(tmp_path, tcti, expect):
    tcti = tcti or f"swtpm:host=127.0.0.1,port={_closed_port()}"
    ks = Keystore.init(tmp_path / "ks", backend_options={"tpm": {"tcti": tcti}})
    before = snapshot(ks.root)
    with pytest.raises(tpm_backend.TpmUnavailableError) as ei:
        ks.generate_key("p256", backend="tpm")
    assert tcti in str(ei.value) and expect in str(ei.value)
    assert isinstance(ei.value, KeyBackendError)
    assert snapshot(ks.root) == before
    ks.close()


def test_missing_handle_fails_clearly_and_stores_nothing(keystore, lab):
    before = snapshot(keystore.root)
    uri = "tpm:handle/0x81020099"
    mfg = lab.domain("mfg")
    dummy = lab.issue("mfg", ec.generate_private_key(ec.SECP256R1()).public_key(), parse_subject("CN=x"))
    with pytest.raises(tpm_backend.TpmKeyNotFoundError) as ei:
        keystore.import_idevid("idevid", dummy, [mfg.ca_cert, mfg.root_cert], key_uri=uri)
    assert "0x81020099" in str(ei.value) and "TCTI" in str(ei.value)
    assert isinstance(ei.value, (KeyBackendError, NotFoundError))
    with pytest.raises(tpm_backend.TpmKeyNotFoundError):
        keystore.register_key(uri)
    assert snapshot(keystore.root) == before


def test_bad_uris_and_key_types(keystore):
    before = snapshot(keystore.root)
    for bad in ("tpm:blob/../../etc/passwd", "tpm:handle/0x01000000", "tpm:whatever"):
        with pytest.raises(KeyBackendError, match="malformed TPM key URI"):
            keystore.private_key(bad)
    with pytest.raises(UnsupportedKeyTypeError, match="not supported in the TPM"):
        keystore.generate_key("ed25519", backend="tpm")
    with pytest.raises(tpm_backend.TpmKeyNotFoundError, match="does not exist"):
        keystore.private_key("tpm:blob/0123456789abcdef")
    assert snapshot(keystore.root) == before


def test_blob_from_another_tpm_is_refused(tmp_path, keystore, swtpm):  # noqa: F811
    """A TSS2 blob wrapped by another TPM (here: a second simulator) cannot be loaded: clear error."""
    from tests.peers.tpm import swtpm_server

    with swtpm_server() as other:
        ks_other = Keystore.init(tmp_path / "other", backend_options={"tpm": other.options})
        uri = ks_other.generate_key("p256", backend="tpm")
        ks_other.close()
        blob = (tmp_path / "other" / "tpm" / f"{uri.split('/')[1]}.tss").read_bytes()
    dest = keystore.root / "tpm"
    dest.mkdir(mode=0o700, exist_ok=True)
    p = dest / f"{uri.split('/')[1]}.tss"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, blob)
    os.close(fd)
    key = keystore.private_key(uri)  # the public part is in the blob
    with pytest.raises(tpm_backend.TpmError, match="another TPM"):
        key.sign(b"x", ec.ECDSA(hashes.SHA256()))
    assert transient_handles(swtpm) == []


def test_csr_carries_tpm_public_key(keystore):
    uri = keystore.generate_key("p256", backend="tpm")
    key = keystore.private_key(uri)
    csr = build_csr(key, parse_subject("CN=dev1"))
    assert csr.public_key().public_numbers() == keystore.public_key(uri).public_numbers()
    assert isinstance(csr, x509.CertificateSigningRequest)
