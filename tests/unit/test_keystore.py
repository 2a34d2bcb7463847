"""Keystore round trips and verify-before-store (issue 2)."""
from __future__ import annotations

import datetime
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keystore.csr import build_csr, parse_san, parse_subject
from keystore.errors import (
    KeystorePermissionError,
    NotFoundError,
    ReadOnlyError,
    UnsupportedKeyTypeError,
    VerificationError,
)
from keystore.keytypes import KEY_TYPES
from keystore.store import Keystore
from tests.conftest import DOMAIN, snapshot


def _enroll(ks, lab, name, key_type="p256", **issue_kw):
    uri = ks.generate_key(key_type)
    csr = build_csr(ks.private_key(uri), parse_subject(f"CN={name}"), [parse_san("dns:dev.example")])
    cert = lab.issue(DOMAIN, csr.public_key(), csr.subject, **issue_kw)
    return uri, cert


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_round_trip_every_key_type(ks, lab, key_type):
    uri, cert = _enroll(ks, lab, f"dev-{key_type}", key_type)
    cred = ks.store_certificate(f"dev-{key_type}", cert, lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN)
    reopened = Keystore.open(ks.root)
    got = reopened.get(f"dev-{key_type}")
    assert got.certificate == cert and got.key_type == key_type and got.version == 1
    assert [c.subject for c in got.chain] == [lab.domain(DOMAIN).ca_cert.subject, lab.domain(DOMAIN).root_cert.subject]
    # The key still signs a CSR after reopening, i.e. it decrypts with the master key.
    csr = build_csr(reopened.private_key(uri), cred.certificate.subject)
    assert csr.is_signature_valid
    assert "BEGIN ENCRYPTED PRIVATE KEY" in (ks.root / uri.split(":", 1)[1]).read_text()


def test_weak_rsa1024_needs_flag(ks):
    with pytest.raises(UnsupportedKeyTypeError, match="benchmarks only"):
        ks.generate_key("rsa1024")
    assert ks.generate_key("rsa1024", allow_weak=True).startswith("file:")


def test_unknown_key_type(ks):
    with pytest.raises(UnsupportedKeyTypeError, match="unknown key type 'dsa'"):
        ks.generate_key("dsa")


def test_renewal_keeps_old_until_new_verified_and_destroys_old_key(ks, lab):
    uri, cert = _enroll(ks, lab, "dev")
    ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN)
    uri2, cert2 = _enroll(ks, lab, "dev")
    bad_uri, _ = _enroll(ks, lab, "dev")
    with pytest.raises(VerificationError):  # a certificate for another key does not replace the live one
        ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key_uri=bad_uri, domain=DOMAIN)
    assert ks.get("dev").certificate == cert
    cred = ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key_uri=uri2, domain=DOMAIN)
    assert cred.version == 2 and cred.certificate == cert2
    assert not (ks.root / uri.split(":", 1)[1]).exists(), "superseded key must be destroyed"


def _mk_cert(lab, public_key, *, issuer_domain=DOMAIN, not_before=None, lifetime=3600, ku=None, eku=None, ca=False):
    dom = lab.domain(issuer_domain)
    now = not_before or datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")]))
         .issuer_name(dom.ca_cert.subject).public_key(public_key).serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + datetime.timedelta(seconds=lifetime))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ku is not None:
        b = b.add_extension(ku, critical=True)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    from cryptography.hazmat.primitives import hashes

    return b.sign(dom.ca_key, hashes.SHA256())


KU_SIGN = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
KU_ENC_ONLY = x509.KeyUsage(False, False, True, False, False, False, False, False, False)
HOUR = datetime.timedelta(hours=1)


@pytest.mark.parametrize("case,reason", [
    ("wrong-key", "key-mismatch"),
    ("wrong-issuer", "untrusted"),
    ("expired", "expired"),
    ("not-yet-valid", "not-yet-valid"),
    ("wrong-ku", "bad-key-usage"),
    ("wrong-eku", "bad-eku"),
    ("ca-cert", "is-ca"),
])
def test_verify_before_store_rejects(ks, lab, case, reason):
    uri = ks.generate_key("p256")
    pub = ks.public_key(uri)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = {
        "wrong-key": lambda: _mk_cert(lab, ec.generate_private_key(ec.SECP256R1()).public_key()),
        "wrong-issuer": lambda: _mk_cert(lab, pub, issuer_domain="other"),
        "expired": lambda: _mk_cert(lab, pub, not_before=now - 3 * HOUR, lifetime=3600),
        "not-yet-valid": lambda: _mk_cert(lab, pub, not_before=now + 2 * HOUR),
        "wrong-ku": lambda: _mk_cert(lab, pub, ku=KU_ENC_ONLY),
        "wrong-eku": lambda: _mk_cert(lab, pub, ku=KU_SIGN, eku=[x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
        "ca-cert": lambda: _mk_cert(lab, pub, ca=True),
    }[case]()
    chain = lab.domain("other" if case == "wrong-issuer" else DOMAIN).chain
    before = snapshot(ks.root)
    with pytest.raises(VerificationError) as ei:
        ks.store_certificate("dev", cert, chain, key_uri=uri, domain=DOMAIN, purpose="clientAuth")
    assert ei.value.reason == reason
    assert "CN=t" in str(ei.value) or reason == "untrusted"
    assert snapshot(ks.root) == before, "a rejected certificate must not change the keystore"


def test_chain_planted_certificates_are_not_stored(ks, lab):
    uri, cert = _enroll(ks, lab, "dev")
    extra = lab.domain("other").root_cert
    cred = ks.store_certificate("dev", cert, [extra, *lab.domain(DOMAIN).chain], key_uri=uri, domain=DOMAIN)
    assert extra not in cred.chain


def test_idevid_is_read_only(ks, lab, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = lab.issue("other", key.public_key(), parse_subject("CN=idevid,serialNumber=SN1"))
    cred = ks.import_idevid("idevid", cert, lab.domain("other").chain, private_key=key)
    assert cred.readonly and cred.kind == "idevid"
    assert ks.trust_anchors("idevid-idevid") == [lab.domain("other").root_cert]
    with pytest.raises(ReadOnlyError, match="--force"):
        ks.delete("idevid")
    with pytest.raises(ReadOnlyError):
        ks.store_certificate("idevid", cert, key_uri=cred.key_uri, domain=DOMAIN)
    ks.delete("idevid", force=True)
    with pytest.raises(NotFoundError):
        ks.get("idevid")


def test_idevid_import_needs_no_index_migration_at_next_open(ks, lab):
    """Found by the fuzz suite (tests/fuzz, target cli_import): the IDevID record lacked chain_subjects, so the next
    command's Keystore.open rewrote keystore.json -- a refused command changed what is stored."""
    from keystore.store import Keystore

    key = ec.generate_private_key(ec.SECP256R1())
    cert = lab.issue("other", key.public_key(), parse_subject("CN=idevid,serialNumber=SN1"))
    ks.import_idevid("idevid", cert, lab.domain("other").chain, private_key=key)
    before = snapshot(ks.root)
    Keystore.open(ks.root).close()
    assert snapshot(ks.root) == before


def test_idevid_key_mismatch(ks, lab):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = lab.issue("other", ec.generate_private_key(ec.SECP256R1()).public_key(), parse_subject("CN=x"))
    before = snapshot(ks.root)
    with pytest.raises(VerificationError, match="public key mismatch"):
        ks.import_idevid("idevid", cert, private_key=key)
    assert snapshot(ks.root) == before


def test_delete_overwrites_and_unlinks(ks, lab):
    uri, cert = _enroll(ks, lab, "dev")
    ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN)
    ks.delete("dev")
    assert not (ks.root / uri.split(":", 1)[1]).exists()
    assert not (ks.root / "creds" / "dev").exists()
    assert [e["action"] for e in ks.audit_entries()][-1] == "credential-delete"


def test_purge_expired(ks, lab):
    uri, cert = _enroll(ks, lab, "short", lifetime_s=2)
    ks.store_certificate("short", cert, lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN)
    uri2, cert2 = _enroll(ks, lab, "long")
    ks.store_certificate("long", cert2, lab.domain(DOMAIN).chain, key_uri=uri2, domain=DOMAIN)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=120)
    assert ks.purge_expired(now=later) == ["short"]
    assert [c.name for c in ks.list()] == ["long"]


def test_audit_log_has_no_secrets(ks, lab):
    uri, cert = _enroll(ks, lab, "dev")
    ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN)
    ks.export("dev", "p12", password=b"s3cret-pw")
    log = (ks.root / "audit.log").read_text()
    master = (ks.root / "master.key").read_text().strip()
    assert master not in log and "s3cret-pw" not in log and "PRIVATE KEY" not in log
    for e in ks.audit_entries():
        assert {"ts", "user", "uid", "action"} <= set(e)


def test_index_holds_no_key_bytes(ks, lab):
    uri, cert = _enroll(ks, lab, "dev")
    ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN)
    index = (ks.root / "keystore.json").read_text()
    assert "PRIVATE KEY" not in index and (ks.root / "master.key").read_text().strip() not in index
    assert uri in index


def test_permissions(ks, lab):
    uri, cert = _enroll(ks, lab, "dev")
    ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN)
    keyfile = ks.root / uri.split(":", 1)[1]
    for p in [ks.root, ks.root / "keys", ks.root / "creds", ks.root / "creds" / "dev"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    for p in [keyfile, ks.root / "keystore.json", ks.root / "audit.log", ks.root / "creds/dev/0001/cert.pem"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE((ks.root / "master.key").stat().st_mode) == 0o400
    os.chmod(keyfile, 0o644)
    with pytest.raises(KeystorePermissionError, match=f"chmod 600 {keyfile}"):
        Keystore.open(ks.root).private_key(uri)
    os.chmod(keyfile, 0o600)
    os.chmod(ks.root, 0o755)
    with pytest.raises(KeystorePermissionError, match="chmod 700"):
        Keystore.open(ks.root)
    os.chmod(ks.root, 0o700)
    os.chmod(ks.root / "master.key", 0o444)
    with pytest.raises(KeystorePermissionError, match="master key"):
        Keystore.open(ks.root).private_key(uri)
