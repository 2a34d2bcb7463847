"""Held software keys (Keystore.generate_held_key): generated in memory, written only in the certificate's commit
(store_certificate(key=HeldKey)). Nothing is written before; a failed or killed commit leaves the keystore as it
was (an unnamed keys/*.key a crash leaves is securely deleted by gc); the commit records the key active."""
from __future__ import annotations

import errno
import os
import signal

import pytest

from keystore import fsutil
from keystore.csr import build_csr, parse_subject
from keystore.errors import StorageError, VerificationError
from keystore.store import Keystore
from tests.conftest import DOMAIN, snapshot
from tests.fault.test_keystore_sync import ERRNOS, check_store_fault, store_matrix
from tests.unit.test_keystore_pending import _kill_at


def _issue(ks, lab, held=None):
    if held is None:
        uri = ks.generate_key("p256")
        key = ks.private_key(uri)
    else:
        uri, key = held.uri, held.private_key
    csr = build_csr(key, parse_subject("CN=dev"))
    return uri, lab.issue(DOMAIN, csr.public_key(), csr.subject)


def _first_version(ks, lab):
    uri1, cert1 = _issue(ks, lab)
    ks.store_certificate("dev", cert1, lab.domain(DOMAIN).chain, key_uri=uri1, domain=DOMAIN)
    return uri1


def _key_files(root):
    d = root / "keys"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_a_held_key_writes_nothing_until_its_certificate_is_stored(ks, lab):
    before = snapshot(ks.root)
    held = ks.generate_held_key("p256", label="dev")
    assert snapshot(ks.root) == before and ks.key_record(held.uri) is None and ks.pending_keys() == []
    _, cert = _issue(ks, lab, held)
    cred = ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN)
    assert cred.key_uri == held.uri and ks.key_record(held.uri)["state"] == "active"
    opened = Keystore.open(ks.root)  # from disk: the key file decrypts to the same key
    assert opened.private_key(held.uri).private_numbers() == held.private_key.private_numbers()
    assert opened.check() == [] and opened.gc() == []
    assert os.stat(ks.root / held.uri.removeprefix("file:")).st_mode & 0o777 == 0o600
    assert [e["action"] for e in ks.audit_entries()][-2:] == ["key-generate", "certificate-store"]
    with pytest.raises(ValueError, match="already stored"):
        ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN)


def test_a_rejected_certificate_for_a_held_key_changes_nothing_and_the_key_stays_usable(ks, lab):
    _first_version(ks, lab)
    held = ks.generate_held_key("p256")
    other = ks.generate_held_key("p256")
    _, cert_for_other = _issue(ks, lab, other)
    before = snapshot(ks.root)
    with pytest.raises(VerificationError):
        ks.store_certificate("dev", cert_for_other, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN)
    assert snapshot(ks.root) == before
    _, cert = _issue(ks, lab, held)  # the caller still holds the key: it may try again
    assert ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN).version == 2


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize(("target", "stage"), store_matrix(["cert.pem", "chain.pem", ".key", "keystore.json"]))
def test_store_with_a_held_key_fault_matrix(ks, lab, stage, target, err):
    """A renewal with a held key, one write step failing: before the index replace nothing changes (the key file
    written for it is gone, its lock file too) and the held key can be stored on a retry; after it (fsync-dir of
    the index) the new version and its key are live. Every outcome opens and checks clean."""
    uri1 = _first_version(ks, lab)
    held = ks.generate_held_key("p256")
    _, cert2 = _issue(ks, lab, held)
    committed = check_store_fault(
        ks, stage, target, err, uri1, held.uri,
        lambda: ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN))
    if not committed:  # the caller still holds the key: it may try again
        assert ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN).version == 2


def test_the_held_key_file_joins_the_commit_batch(ks, lab):
    """The key file is created under its final name in keys/ (no temp file, no rename) before its fsync, and the
    index replace comes after every fsync: the key's data and keys/ are fsynced in the same batch as the version
    files (no serial wait of their own)."""
    _first_version(ks, lab)
    held = ks.generate_held_key("p256")
    _, cert = _issue(ks, lab, held)
    steps = []
    fsutil._FAULT_HOOK = lambda stage, path: steps.append((stage, os.path.basename(path)))
    try:
        ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN)
    finally:
        fsutil._FAULT_HOOK = None
    name = held.uri.rsplit("/", 1)[1]
    index_replace = steps.index(("replace", "keystore.json"))
    assert steps.index(("write", name)) < steps.index(("fsync", name)) < index_replace
    assert ("replace", name) not in steps and not [n for n in _key_files(ks.root) if n.endswith(".tmp")]
    assert steps.index(("fsync-dir", name)) < index_replace
    assert steps.count(("fsync", name)) == 1


def test_a_held_key_renewal_waits_twice(ks, lab, monkeypatch):
    """/verify's store waits for two batches and nothing else: [the version's two files, the key file, their
    directories and keys/, the index temp file], then [the index's directory, the audit file] (the audit lines are
    written after the replace and fsynced with the commit); no fsync on its own."""
    _first_version(ks, lab)
    held = ks.generate_held_key("p256")
    _, cert = _issue(ks, lab, held)
    batches, singles = [], []
    real_all, real_one = fsutil.fsync_all, fsutil._fsync
    monkeypatch.setattr(fsutil, "fsync_all", lambda fds: batches.append(len(fds)) or real_all(fds))
    monkeypatch.setattr(fsutil, "_fsync", lambda fd: singles.append(fd) or real_one(fd))
    ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN, defer_cleanup=True)
    assert batches == [7, 2] and singles == []
    monkeypatch.undo()
    assert [e["action"] for e in Keystore.open(ks.root).audit_entries()][-2:] == ["key-generate",
                                                                                  "certificate-store"]
    ks.flush()


def test_a_held_key_gets_its_lock_file_after_the_answer_and_is_usable_before(ks, lab):
    """The lock file of a stored held key is made by the deferred work after /verify's answer, not before it.
    Meanwhile another process that uses the key makes the file itself (under the keystore lock) and holds it; the
    flush leaves that alone."""
    chain = lab.domain(DOMAIN).chain
    _first_version(ks, lab)
    held = ks.generate_held_key("p256")
    _, cert = _issue(ks, lab, held)
    ks.store_certificate("dev", cert, chain, key=held, domain=DOMAIN, defer_cleanup=True)
    lock = ks._locks.path(held.uri)
    assert not lock.exists() and ks.deferred
    other = Keystore.open(ks.root)  # another process: its own flocks
    assert other.private_key(held.uri).private_numbers() == held.private_key.private_numbers()
    assert lock.exists()
    ks.flush()
    assert lock.exists() and not ks.deferred
    other.close()
    assert Keystore.open(ks.root).check() == []


def test_a_held_key_destroyed_before_the_flush_gets_no_lock_file(ks, lab):
    """Another process renews the credential between the answer and the flush and destroys the stored held key
    (nobody held it): the flush makes no lock file for a key that is gone."""
    chain = lab.domain(DOMAIN).chain
    _first_version(ks, lab)
    held = ks.generate_held_key("p256")
    _, cert = _issue(ks, lab, held)
    ks.store_certificate("dev", cert, chain, key=held, domain=DOMAIN, defer_cleanup=True)
    other = Keystore.open(ks.root)
    uri3, cert3 = _issue(other, lab)
    other.store_certificate("dev", cert3, chain, key_uri=uri3, domain=DOMAIN)
    assert not (ks.root / held.uri.removeprefix("file:")).exists()
    ks.flush()
    assert not ks._locks.path(held.uri).exists()
    other.close()
    ks.close()
    assert Keystore.open(ks.root).check() == [] and Keystore.open(ks.root).get("dev").key_uri == uri3


def test_killed_after_the_key_file_before_the_index_replace_gc_securely_deletes_it(ks, lab):
    uri1 = _first_version(ks, lab)
    held = ks.generate_held_key("p256")
    _, cert = _issue(ks, lab, held)
    name = held.uri.rsplit("/", 1)[1]
    # killed at the index replace: the key file has its name and is fsynced, the index does not name it yet
    _kill_at(ks, lambda stage, path: stage == "replace" and path.endswith("keystore.json"),
             run=lambda: ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN))
    path = ks.root / "keys" / name
    assert name in _key_files(ks.root)
    written = path.read_bytes()
    at_unlink = []

    def hook(stage, p):
        if stage == "unlink" and p == str(path):
            at_unlink.append(path.read_bytes())

    opened = Keystore.open(ks.root)
    assert opened.get("dev").version == 1 and opened.get("dev").key_uri == uri1  # the previous version loads
    fsutil._FAULT_HOOK = hook
    try:
        removed = opened.gc()
    finally:
        fsutil._FAULT_HOOK = None
    assert str(path) in removed
    assert len(at_unlink) == 1 and len(at_unlink[0]) == len(written) and at_unlink[0] != written
    assert name not in _key_files(ks.root) and Keystore.open(ks.root).check() == []
    assert Keystore.open(ks.root).get("dev").key_uri == uri1



@pytest.mark.parametrize("torn", [False, True], ids=["before-data", "mid-file"])
def test_a_failed_key_file_write_overwrites_the_file_before_the_unlink(ks, lab, torn):
    """The held key's file fails at its write: before any data (EIO), or in the middle of the file (a real short
    write, then EFBIG: RLIMIT_FSIZE, as a disk filling up mid-file): the file, created under its final name and
    holding part of the encrypted key, is overwritten before it is unlinked, as stage_file does for its temp file,
    nothing stored changes, and the held key can be stored on a retry."""
    from tests.unit.test_fsutil_sync import _short_writes

    _first_version(ks, lab)
    held = ks.generate_held_key("p256")
    _, cert2 = _issue(ks, lab, held)
    key_file = str(ks.root / held.uri.partition(":")[2])
    before = snapshot(ks.root)
    seen = {}

    def hook(step, path):
        if step == "write" and path == key_file:
            if not torn:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            seen["undo"] = _short_writes(40)
        if step == "unlink" and path == key_file:
            if "undo" in seen:
                seen.pop("undo")()
            seen["at_unlink"] = open(path, "rb").read()

    fsutil._FAULT_HOOK = hook
    try:
        with pytest.raises(StorageError, match=os.strerror(errno.EFBIG if torn else errno.EIO)):
            ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN)
    finally:
        fsutil._FAULT_HOOK = None
        if "undo" in seen:
            seen.pop("undo")()
    assert "at_unlink" in seen, "the key file was removed without the secure delete"
    if torn:
        assert held.encrypted.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") and len(held.encrypted) > 40
        assert len(seen["at_unlink"]) == 40 and seen["at_unlink"] != held.encrypted[:40], "not overwritten"
    assert snapshot(ks.root) == before and held.uri.rsplit("/", 1)[1] not in _key_files(ks.root)
    assert ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN).version == 2


def test_a_retry_clears_a_key_file_a_failed_try_could_not_delete(ks, lab):
    """The one way a held key's final name can be taken when its store writes it: an earlier try of the same key
    failed and could not delete the file it had written (its unlink failing too). No record names that file; the
    retry securely deletes it and creates the key file afresh under the same name, and stores."""
    uri1 = _first_version(ks, lab)
    held = ks.generate_held_key("p256")
    _, cert2 = _issue(ks, lab, held)
    key_file = str(ks.root / held.uri.partition(":")[2])

    def hook(step, path):
        if path == key_file and step in ("fsync", "unlink"):  # the commit's fsync fails, and so does the cleanup
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    fsutil._FAULT_HOOK = hook
    try:
        with pytest.raises(StorageError, match=os.strerror(errno.EIO)):
            ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN)
    finally:
        fsutil._FAULT_HOOK = None
    leftover = open(key_file, "rb").read()  # overwritten (the secure delete got that far), not unlinked
    assert len(leftover) == len(held.encrypted) and leftover != held.encrypted and ks.key_record(held.uri) is None
    assert Keystore.open(ks.root).get("dev").key_uri == uri1
    seen = {}

    def at_unlink(step, path):
        if step == "unlink" and path == key_file:
            seen.setdefault("at_unlink", open(path, "rb").read())

    fsutil._FAULT_HOOK = at_unlink
    try:
        cred = ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN)
    finally:
        fsutil._FAULT_HOOK = None
    assert cred.version == 2 and cred.key_uri == held.uri
    assert len(seen["at_unlink"]) == len(leftover) and seen["at_unlink"] != leftover, "cleared without overwriting"
    opened = Keystore.open(ks.root)
    assert opened.private_key(held.uri).private_numbers() == held.private_key.private_numbers()
    assert opened.check() == [] and not [n for n in _key_files(ks.root) if n.endswith(".tmp")]


def test_a_path_check_refusal_changes_nothing_stored_and_sees_the_verified_path(ks, lab):
    _first_version(ks, lab)
    held = ks.generate_held_key("p256")
    _, cert = _issue(ks, lab, held)
    chain = lab.domain(DOMAIN).chain
    seen = []

    def wrong_ca(path):
        seen.append(path)
        raise PermissionError("not the announced CA")

    before = snapshot(ks.root)
    with pytest.raises(PermissionError, match="not the announced CA"):
        ks.store_certificate("dev", cert, chain, key=held, domain=DOMAIN, path_check=wrong_ca)
    assert snapshot(ks.root) == before and ks.get("dev").version == 1 and ks.key_record(held.uri) is None
    (path,) = seen
    assert path[0] == cert and path[-1] in ks.trust_anchors(DOMAIN)
    cred = ks.store_certificate("dev", cert, chain, key=held, domain=DOMAIN, path_check=seen.append)
    assert cred.version == 2 and seen[1] == path
