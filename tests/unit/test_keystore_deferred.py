"""``store_certificate(defer_cleanup=True)`` (issue 19, stage 5): the commit and its audit line are durable when it
returns; destroying the superseded key and pruning old versions wait for ``flush`` (or the next write, ``gc``,
``delete``, ``close``). Meanwhile nothing can use the superseded key, and a crash leaves it to ``gc``
(tests/fault/test_keystore_crash.py kills a process in between).
"""
from __future__ import annotations

import errno
import os

import pytest

from keystore import fsutil
from keystore.csr import build_csr, parse_subject
from keystore.errors import KeyGoneError
from keystore.store import KEEP_VERSIONS, Keystore
from tests.conftest import DOMAIN


def _renew(ks, lab, name="dev", **kw):
    uri = ks.generate_key("p256")
    csr = build_csr(ks.private_key(uri), parse_subject(f"CN={name}"))
    cert = lab.issue(DOMAIN, csr.public_key(), csr.subject)
    return ks.store_certificate(name, cert, lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN, **kw)


def _file(ks, uri):
    return ks.root / uri.split(":", 1)[1]


def _destroying(root):
    return Keystore.open(root).meta().get("destroying") or []


def _versions_on_disk(ks, name="dev"):
    return sorted(int(p.name) for p in (ks.root / "creds" / name).iterdir())


def test_renewal_returns_committed_and_flush_destroys_the_superseded_key(ks, lab):
    v1 = _renew(ks, lab)
    uri = ks.generate_key("p256")
    csr = build_csr(ks.private_key(uri), parse_subject("CN=dev"))
    cert = lab.issue(DOMAIN, csr.public_key(), csr.subject)
    fsyncs = fsutil.fsync_count
    v2 = ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN, defer_cleanup=True)
    assert fsutil.fsync_count - fsyncs == 7  # a renewal's 8 without the old key's overwrite (docs/keystore.md)
    assert ks.deferred
    # Committed and audited: the new version is live for everyone; the old key is unrecorded, listed for gc.
    other = Keystore.open(ks.root)
    assert other.get("dev").version == 2 and other.get("dev").key_uri == v2.key_uri
    assert other.key_record(v1.key_uri) is None and _destroying(ks.root) == [v1.key_uri]
    assert other.audit_entries()[-1]["action"] == "certificate-store"
    assert _file(ks, v1.key_uri).exists()  # not destroyed yet ...
    with pytest.raises(KeyGoneError):  # ... but nobody can use it any more
        other.hold_key(v1.key_uri, credential="dev")
    fsyncs = fsutil.fsync_count
    ks.flush()
    assert fsutil.fsync_count - fsyncs == 1  # the key's overwrite
    assert not ks.deferred and not _file(ks, v1.key_uri).exists()
    assert not ks._locks.path(v1.key_uri).exists()
    ks.set_meta("dev", note="x")  # the next write forgets it
    assert _destroying(ks.root) == []
    ks.flush()  # idempotent
    assert Keystore.open(ks.root).check() == []


def test_pruning_waits_for_flush_and_every_later_operation_flushes_first(ks, lab):
    for _ in range(KEEP_VERSIONS):
        _renew(ks, lab)
    assert _versions_on_disk(ks) == [1, 2, 3]
    v4 = _renew(ks, lab, defer_cleanup=True)
    assert v4.version == 4 and _versions_on_disk(ks) == [1, 2, 3, 4]
    ks.generate_key("p256")  # any later write of this object runs the deferred work first
    assert _versions_on_disk(ks) == [2, 3, 4] and not ks.deferred

    v5 = _renew(ks, lab, defer_cleanup=True)
    ks.gc()
    assert _versions_on_disk(ks) == [3, 4, 5] and not _file(ks, v4.key_uri).exists()

    v6 = _renew(ks, lab, defer_cleanup=True)
    ks.close()
    assert _versions_on_disk(ks) == [4, 5, 6] and not _file(ks, v5.key_uri).exists()
    assert Keystore.open(ks.root).get("dev").version == v6.version


def test_deferred_prune_never_removes_a_version_of_a_credential_enrolled_anew(ks, lab):
    for _ in range(KEEP_VERSIONS):
        _renew(ks, lab)
    _renew(ks, lab, defer_cleanup=True)  # leaves "remove dev/0001" to the flush
    other = Keystore.open(ks.root)  # another process deletes dev and enrolls it anew: a new version 1
    other.delete("dev")
    fresh = _renew(other, lab)
    assert fresh.version == 1
    ks.flush()
    cred = Keystore.open(ks.root).get("dev")
    assert cred.version == 1 and cred.record["fingerprint"] == fresh.record["fingerprint"]
    assert Keystore.open(ks.root).check() == []


def test_a_failed_deferred_destroy_is_audited_not_raised_and_gc_finishes_it(ks, lab):
    v1 = _renew(ks, lab)
    v2 = _renew(ks, lab, defer_cleanup=True)
    key = str(_file(ks, v1.key_uri))

    def hook(stage, path):
        if stage == "unlink" and path == key:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)

    fsutil._FAULT_HOOK = hook
    try:
        ks.flush()  # logs and audits; the renewal it follows has succeeded and must not fail afterwards
    finally:
        fsutil._FAULT_HOOK = None
    assert not ks.deferred
    last = ks.audit_entries()[-1]
    assert last["action"] == "deferred-cleanup-failed" and last["key_uri"] == v1.key_uri
    assert os.strerror(errno.EIO) in last["error"]
    assert _destroying(ks.root) == [v1.key_uri]  # still listed: gc's work
    removed = Keystore.open(ks.root).gc()
    assert f"retired key {v1.key_uri}" in removed and not _file(ks, v1.key_uri).exists()
    assert _destroying(ks.root) == []
    opened = Keystore.open(ks.root)
    assert opened.get("dev").key_uri == v2.key_uri and opened.check() == []


def test_without_defer_cleanup_the_store_destroys_at_once(ks, lab):
    v1 = _renew(ks, lab)
    _renew(ks, lab)
    assert not ks.deferred and not _file(ks, v1.key_uri).exists()


def test_close_waits_for_a_flush_running_in_another_thread(ks, lab):
    import threading

    v1 = _renew(ks, lab)
    _renew(ks, lab, defer_cleanup=True)
    key = str(_file(ks, v1.key_uri))
    inside, release = threading.Event(), threading.Event()

    def hook(stage, path):
        if stage == "unlink" and path == key:
            inside.set()
            release.wait(30)

    fsutil._FAULT_HOOK = hook
    try:
        flusher = threading.Thread(target=ks.flush)  # e.g. the device service's flush in a worker thread
        flusher.start()
        assert inside.wait(30)
        closer = threading.Thread(target=ks.close)
        closer.start()
        closer.join(0.2)
        assert closer.is_alive(), "close() must wait for the flush in progress"
        release.set()
        flusher.join(30)
        closer.join(30)
    finally:
        release.set()
        fsutil._FAULT_HOOK = None
    assert not _file(ks, v1.key_uri).exists() and not ks.deferred
    assert Keystore.open(ks.root).check() == []


def test_what_a_crash_left_in_creds_is_cleared_for_the_new_version_and_swept_after_the_answer(ks, lab):
    """A version directory (and a stray entry) a crash before a commit left: the new version's directory starts
    clean before the commit; the other unreferenced entries of creds/<name> go with the deferred cleanup."""
    _renew(ks, lab)
    cdir = ks.root / "creds" / "dev"
    (cdir / "0002").mkdir()
    (cdir / "0002" / "cert.pem").write_bytes(b"torn")
    (cdir / "0002" / "junk").write_bytes(b"left by a crash")
    (cdir / "0007").mkdir()
    (cdir / "tmp123").write_bytes(b"stray")
    held = ks.generate_held_key("p256")
    csr = build_csr(held.private_key, parse_subject("CN=dev"))
    cert = lab.issue(DOMAIN, csr.public_key(), csr.subject)
    v2 = ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN, defer_cleanup=True)
    assert v2.version == 2 and sorted(p.name for p in (cdir / "0002").iterdir()) == ["cert.pem", "chain.pem"]
    assert Keystore.open(ks.root).get("dev").certificate == cert
    assert (cdir / "0007").exists() and (cdir / "tmp123").exists()  # swept after the answer, not before
    ks.flush()
    assert _versions_on_disk(ks) == [1, 2]
    assert ks.check() == []
