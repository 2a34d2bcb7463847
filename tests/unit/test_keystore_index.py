"""The cached keystore index (issue 19): what the cache may and may not assume, checked against real files.

The index is parsed once and re-validated on every read by the file's identity (device, inode, size, mtime_ns,
ctime_ns); a change re-encodes only the records it touched and must write exactly what a full encoding writes.
"""
from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import time

import pytest

from keystore import fsutil
from keystore.csr import build_csr, parse_subject
from keystore.errors import KeystoreError, NotFoundError
from keystore.storage import IndexStorage, ReadOnlyDict, encode_index
from keystore.store import KEEP_VERSIONS, Keystore
from tests.conftest import DOMAIN


def _store(ks, lab, name, key_uri=None):
    uri = key_uri or ks.generate_key("p256")
    csr = build_csr(ks.private_key(uri), parse_subject(f"CN={name}"))
    cert = lab.issue(DOMAIN, csr.public_key(), csr.subject)
    return ks.store_certificate(name, cert, lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN)


def test_lookups_do_not_reparse_and_see_other_processes_changes(ks, lab):
    _store(ks, lab, "a")
    other = Keystore.open(ks.root)
    other.get("a")
    parses = other._storage.parses
    for _ in range(20):
        other.get("a")
        other.list()
        other.pending_keys()
    assert other._storage.parses == parses, "an unchanged index is never read again"
    _store(ks, lab, "b")  # another Keystore object: a different open file, as another process would be
    assert [c.name for c in other.list()] == ["a", "b"]
    assert other._storage.parses == parses + 1


def test_an_in_place_edit_of_the_same_size_is_noticed(ks, lab):
    """Every devagent write replaces the file (a new inode); an editor may rewrite it in place instead."""
    _store(ks, lab, "dev")
    other = Keystore.open(ks.root)
    assert other.get("dev").record["meta"] == {}
    path = ks.root / "keystore.json"
    raw = path.read_bytes()
    edited = raw.replace(b'"subject": "CN=dev"', b'"subject": "CN=dex"', 1)
    assert len(edited) == len(raw) and edited != raw
    ino = path.stat().st_ino
    # A hand edit happens at human time scales; the file clock (a timer tick, several ms) must have moved on
    # since devagent's write, or no stat field could show the edit. Wait for that, with a deadline.
    probe = ks.root / "probe"
    deadline = time.monotonic() + 10
    while True:
        probe.write_bytes(b"")
        if probe.stat().st_mtime_ns > path.stat().st_mtime_ns or time.monotonic() > deadline:
            break
    probe.unlink()
    with open(path, "r+b") as f:  # same inode, same size
        f.write(edited)
    assert path.stat().st_ino == ino
    assert other.list()[0].record["subject"] == "CN=dex"


def test_cached_records_are_read_only(ks, lab):
    cred = _store(ks, lab, "dev")
    doc = ks._storage.read()
    rec = doc["credentials"]["1"]
    assert isinstance(rec, ReadOnlyDict)
    for mutate in (lambda: rec.__setitem__("name", "x"), lambda: rec.update(name="x"), lambda: rec.pop("name"),
                   lambda: rec["meta"].setdefault("k", 1), lambda: doc["credentials"].clear()):
        with pytest.raises(TypeError, match="read-only"):
            mutate()
    assert ks.get("dev").record == cred.record and ks.get("dev").name == "dev"
    copy = dict(rec)
    copy["name"] = "changed"  # a copy is an ordinary dict
    assert ks.get("dev").name == "dev"


def test_incremental_encoding_writes_exactly_the_full_encoding(tmp_path):
    rnd = random.Random(7)
    st = IndexStorage(tmp_path / "index.json")
    # tables other than the keystore's own: their records are free-form (check_document checks only known tables)
    plain: dict = {"meta": {"1": {"format": 1}}, "table_a": {}, "table_b": {}}
    st.write(IndexStorage.mutable(plain))
    for step in range(300):
        data = IndexStorage.mutable(st.read())
        table = rnd.choice(["table_a", "table_b"])
        op = rnd.random()
        if op < 0.5 or not data[table]:
            k = str(rnd.randrange(1, 60))
            data[table][k] = {"n": step, "nested": {"v": [step, str(step)]}, "s": "x" * rnd.randrange(5)}
        elif op < 0.8:
            del data[table][rnd.choice(list(data[table]))]
        else:
            k = rnd.choice(list(data[table]))
            data[table][k] = dict(data[table][k], n=-step)
        expected = encode_index(json.loads(json.dumps(data)))
        st.write(data)
        assert (tmp_path / "index.json").read_bytes() == expected, f"step {step}"
        assert IndexStorage(tmp_path / "index.json").read() == json.loads(expected)


def test_a_failed_write_leaves_cache_and_file_as_they_were(ks, lab):
    _store(ks, lab, "dev")
    before = (ks.root / "keystore.json").read_bytes()

    def hook(stage, path):
        if stage == "fsync" and path.endswith("keystore.json"):
            raise OSError(5, "Input/output error", path)

    fsutil._FAULT_HOOK = hook
    try:
        with pytest.raises(KeystoreError):
            ks.set_meta("dev", note="lost")
    finally:
        fsutil._FAULT_HOOK = None
    assert (ks.root / "keystore.json").read_bytes() == before
    assert "note" not in ks.get("dev").record["meta"]
    ks.set_meta("dev", note="kept")
    assert Keystore.open(ks.root).get("dev").record["meta"]["note"] == "kept"


def test_listed_credential_renewed_away_meanwhile_is_a_clear_error(ks, lab):
    """list() reads certificates when first used; a version another process pruned meanwhile is NotFoundError
    naming what happened, never a FileNotFoundError."""
    _store(ks, lab, "dev")
    listed = Keystore.open(ks.root).list()
    for _ in range(KEEP_VERSIONS):
        _store(ks, lab, "dev")
    with pytest.raises(NotFoundError, match="renewed .* while it was being read"):
        _ = listed[0].certificate
    assert Keystore.open(ks.root).get("dev").version == KEEP_VERSIONS + 1
    # Dates and names come from the record: scheduling a listed credential needs no file.
    assert listed[0].not_after > listed[0].not_before


def test_public_keys_without_decrypting_anything(ks, lab):
    """A pending key's public half is in its index record, an active key's in its certificate: with the master key
    gone (nothing can be decrypted) both are still known."""
    active = _store(ks, lab, "dev")
    pending = ks.generate_key("p256")
    expected_pending = ks.public_key(pending)
    master = ks.root / "master.key"
    saved = master.read_bytes()
    fsutil.secure_delete(master)
    try:
        other = Keystore.open(ks.root)
        assert other.public_key(active.key_uri) == active.certificate.public_key()
        assert other.public_key(pending) == expected_pending
        with pytest.raises(KeystoreError, match="master key"):
            other.private_key(pending)
    finally:
        fsutil.atomic_write(master, saved, mode=0o400)
    assert "public_key" not in ks.key_record(active.key_uri), "an active key's record does not repeat it"


def test_software_key_files_are_standard_pkcs8_that_openssl_reads(ks):
    """One PBKDF2 iteration (the password is the 256-bit master key): still PKCS#8 PBES2, readable by OpenSSL."""
    uri = ks.generate_key("p256")
    key_file = ks.root / uri.split(":", 1)[1]
    out = subprocess.run(["openssl", "asn1parse", "-in", str(key_file)], capture_output=True, text=True, check=True)
    assert "PBES2" in out.stdout and "PBKDF2" in out.stdout and "aes-256-cbc" in out.stdout
    pub = subprocess.run(["openssl", "pkey", "-in", str(key_file), "-passin", f"file:{ks.root / 'master.key'}",
                          "-pubout"], capture_output=True, text=True, check=True).stdout
    from cryptography.hazmat.primitives import serialization

    assert serialization.load_pem_public_key(pub.encode()) == ks.public_key(uri)
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(["openssl", "pkey", "-in", str(key_file), "-passin", "pass:wrong", "-noout"],
                       capture_output=True, check=True)


def test_keys_of_earlier_versions_still_load(ks, lab):
    """Key files written with OpenSSL's default PBKDF2 count (as before) load and sign unchanged."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    uri = ks.import_key(key)
    path = ks.root / uri.split(":", 1)[1]
    old = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption((ks.root / "master.key").read_bytes().strip()))
    fsutil.atomic_write(path, old)
    other = Keystore.open(ks.root)
    assert build_csr(other.private_key(uri), parse_subject("CN=old")).is_signature_valid


def test_renewal_costs_a_bounded_number_of_fsyncs(ks, lab):
    """The fsyncs crash safety needs, documented in docs/keystore.md: 8 for a renewal with a software key, 4 for a
    pending key (5 for a key in use without a credential)."""
    _store(ks, lab, "dev")
    uri = ks.generate_key("p256")
    csr = build_csr(ks.private_key(uri), parse_subject("CN=dev"))
    cert = lab.issue(DOMAIN, csr.public_key(), csr.subject)
    n = fsutil.fsync_count
    ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN)
    assert fsutil.fsync_count - n == 8
    n = fsutil.fsync_count
    pending = ks.generate_key("p256")
    assert fsutil.fsync_count - n == 4  # the pending key's audit line is made durable by the next durable line
    n = fsutil.fsync_count
    ks.generate_key("p256", pending=False)
    assert fsutil.fsync_count - n == 5
    ks.discard_key(pending)
    assert [e["action"] for e in ks.audit_entries()][-3:] == ["key-generate", "key-generate", "key-discard"]
    assert os.path.exists(ks.root / "keystore.json")


def test_status_imports_no_cryptography_httpx_pyasn1_or_aiocoap(ks, lab, tmp_path):
    """`devagent status` reads the index only (issue 19): its process never imports the heavy packages."""
    import sys

    _store(ks, lab, "dev")
    config = tmp_path / "agent.toml"
    config.write_text("")
    code = ("import sys\nfrom agent.cli import main\nsys.argv = ['devagent', 'status']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = ('cryptography', 'httpx', 'pyasn1', 'aiocoap', 'tpm2_pytss', 'pkcs11')\n"
            "print('HEAVY', [m for m in heavy if m in sys.modules])")
    env = dict(os.environ, DEVAGENT_STATE_DIR=str(ks.root), DEVAGENT_CONFIG=str(config))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                         check=True).stdout
    assert "CN=dev" in out and "HEAVY []" in out, out


def test_records_of_earlier_versions_are_completed_on_open(ks, lab):
    """Credential records written before chain_subjects existed get it on the next open, in one atomic write."""
    cred = _store(ks, lab, "dev")
    with ks._txn() as data:
        doc_id, rec = ks._find_cred(data, "dev")
        data["credentials"][doc_id] = {k: v for k, v in rec.items() if k != "chain_subjects"}
    assert "chain_subjects" not in Keystore(ks.root).get("dev").record
    opened = Keystore.open(ks.root)
    assert opened.get("dev").record["chain_subjects"] == [c.subject.rfc4514_string() for c in cred.chain]
    assert opened.list()[0].summary()["chain"] == opened.get("dev").summary()["chain"]


def test_lookup_gives_the_record_without_reading_files(ks, lab):
    """Keystore.lookup (authorization checks of /csr and /verify): the record's facts, no certificate file read."""
    from keystore.errors import CorruptFileError

    assert ks.lookup("dev") is None
    stored = _store(ks, lab, "dev")
    vdir = ks.root / "creds" / "dev" / f"{stored.version:04d}"
    (vdir / "cert.pem").rename(vdir / "cert.pem.away")  # a lookup must not need it
    cred = ks.lookup("dev")
    assert (cred.name, cred.kind, cred.domain, cred.key_uri, cred.version) == \
        ("dev", "ldevid", DOMAIN, stored.key_uri, stored.version)
    assert cred.not_after == stored.certificate.not_valid_after_utc
    with pytest.raises(CorruptFileError, match="file missing"):
        cred.certificate  # noqa: B018 - read when first used
    (vdir / "cert.pem.away").rename(vdir / "cert.pem")
    assert ks.lookup("dev").certificate == stored.certificate


def test_a_discarded_pending_key_is_named_by_a_durable_audit_line(ks):
    """The key-generate line of a pending key is not fsynced on its own (docs/keystore.md): gc's fsynced discard line
    names the key, its type and label, its owner and when it was made."""
    uri = ks.generate_key("p256", label="ldevid", pending_for={"name": "ldevid"})
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=25)  # older than any CSR's wait
    assert ks.discard_orphaned_pending(now=later) == [uri]
    line = ks.audit_entries()[-1]
    assert (line["action"], line["key_uri"], line["key_type"], line["label"]) == \
        ("pending-key-discard", uri, "p256", "ldevid")
    assert line["created"] and line["owner"]["pid"] == os.getpid()
