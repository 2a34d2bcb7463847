"""A held key's file staged before its certificate arrives (Keystore.stage_held_key, issue 19 stage (5)): written and
fsynced under its final name keys/<id>.key while nothing names it, held (shared flock on its lock file) by the
staging object so that gc -- of any object or process -- leaves it; stored later by store_certificate(key=...)
without writing it again; securely deleted by discard_held_key, or by gc once the staging process is killed."""
from __future__ import annotations

import errno
import os
import signal

import pytest

from keystore import fsutil
from keystore.errors import StorageError, VerificationError
from keystore.store import Keystore
from tests.conftest import DOMAIN, snapshot
from tests.unit.test_keystore_held import _first_version, _issue


def _path(ks, held):
    return ks.root / held.uri.removeprefix("file:")


def _steps_during(fn):
    steps = []
    fsutil._FAULT_HOOK = lambda stage, path: steps.append((stage, os.path.basename(path)))
    try:
        out = fn()
    finally:
        fsutil._FAULT_HOOK = None
    return out, steps


def test_a_staged_key_is_stored_without_writing_its_file_again(ks, lab):
    _first_version(ks, lab)
    held = ks.generate_held_key("p256", label="dev")
    name = held.uri.rsplit("/", 1)[1]
    _, staging = _steps_during(lambda: ks.stage_held_key(held))
    assert ("write", name) in staging and ("fsync", name) in staging and ("fsync-dir", name) in staging
    assert _path(ks, held).read_bytes() == held.encrypted and ks.key_record(held.uri) is None
    assert ks._locks.path(held.uri).exists() and ks.staged(held)
    _, cert = _issue(ks, lab, held)
    cred, storing = _steps_during(
        lambda: ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN))
    assert not [s for s in storing if s[1] == name], storing  # not written, not fsynced a second time
    assert cred.key_uri == held.uri and ks.key_record(held.uri)["state"] == "active" and not ks.staged(held)
    assert not ks._locks.held(held.uri)  # the staging hold went with the commit
    opened = Keystore.open(ks.root)  # from disk: the staged file decrypts to the key
    assert opened.private_key(held.uri).private_numbers() == held.private_key.private_numbers()
    assert opened.check() == [] and held.uri not in " ".join(opened.gc())  # (the first version's key is reaped)
    assert _path(ks, held).exists() and ks._locks.path(held.uri).exists()
    assert [e["action"] for e in ks.audit_entries()][-2:] == ["key-generate", "certificate-store"]


def test_a_staged_store_waits_for_fewer_fsyncs(ks, lab, monkeypatch):
    """The commit batch loses the key file and keys/ (two descriptors): [two version files, their directories, the
    index temp file], then [the index's directory, the audit file] (test_keystore_held: 7 and 2 unstaged)."""
    _first_version(ks, lab)
    held = ks.generate_held_key("p256")
    ks.stage_held_key(held)
    _, cert = _issue(ks, lab, held)
    batches = []
    real_all = fsutil.fsync_all
    monkeypatch.setattr(fsutil, "fsync_all", lambda fds: batches.append(len(fds)) or real_all(fds))
    ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN, defer_cleanup=True)
    assert batches == [5, 2]
    ks.flush()


def test_gc_of_another_object_and_process_keeps_a_staged_file(ks, lab):
    held = ks.generate_held_key("p256")
    ks.stage_held_key(held)
    other = Keystore.open(ks.root)
    assert other.gc() == [] and _path(ks, held).exists() and ks._locks.path(held.uri).exists()
    other.close()
    pid = os.fork()
    if pid == 0:  # another process's gc
        code = 1
        try:
            code = 0 if Keystore.open(ks.root).gc() == [] else 2
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    assert ks.gc() == [] and _path(ks, held).read_bytes() == held.encrypted  # our own gc too
    _, cert = _issue(ks, lab, held)
    ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN)
    assert Keystore.open(ks.root).check() == []


def test_staging_process_killed_gc_securely_deletes_the_file(ks, lab):
    _first_version(ks, lab)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            child = Keystore.open(ks.root)
            held = child.generate_held_key("p256")
            child.stage_held_key(held)
            os.write(w, held.uri.encode())
            signal.pause()  # killed here, holding the staged key
        finally:
            os._exit(3)
    os.close(w)
    uri = os.read(r, 200).decode()
    os.close(r)
    path = ks.root / uri.removeprefix("file:")
    assert Keystore.open(ks.root).gc() == [] and path.exists()  # alive: kept
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    written = path.read_bytes()
    at_unlink = []
    fsutil._FAULT_HOOK = lambda stage, p: at_unlink.append(path.read_bytes()) if (stage, p) == ("unlink",
                                                                                              str(path)) else None
    try:
        removed = ks.gc()
    finally:
        fsutil._FAULT_HOOK = None
    assert str(path) in removed and not path.exists() and not ks._locks.path(uri).exists()
    assert len(at_unlink) == 1 and len(at_unlink[0]) == len(written) and at_unlink[0] != written  # overwritten
    assert Keystore.open(ks.root).check() == []


def test_discard_securely_deletes_a_staged_file_and_its_lock(ks, lab):
    _first_version(ks, lab)
    before = snapshot(ks.root)
    held = ks.generate_held_key("p256")
    ks.discard_held_key(held)  # never staged: nothing to do
    ks.stage_held_key(held)
    path = _path(ks, held)
    written = path.read_bytes()
    at_unlink = []
    fsutil._FAULT_HOOK = lambda stage, p: at_unlink.append(path.read_bytes()) if (stage, p) == ("unlink",
                                                                                              str(path)) else None
    try:
        ks.discard_held_key(held)
    finally:
        fsutil._FAULT_HOOK = None
    assert len(at_unlink) == 1 and at_unlink[0] != written and len(at_unlink[0]) == len(written)
    assert snapshot(ks.root) == before and not ks._locks.held(held.uri) and not ks.staged(held)


def test_a_wrong_certificate_after_staging_keeps_the_staged_file_for_a_retry(ks, lab):
    _first_version(ks, lab)
    held = ks.generate_held_key("p256")
    other = ks.generate_held_key("p256")
    ks.stage_held_key(held)
    _, cert_for_other = _issue(ks, lab, other)
    before = snapshot(ks.root)
    with pytest.raises(VerificationError):
        ks.store_certificate("dev", cert_for_other, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN)
    assert snapshot(ks.root) == before and ks.staged(held) and ks._locks.held(held.uri)
    _, cert = _issue(ks, lab, held)
    assert ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN).version == 2
    assert Keystore.open(ks.root).private_key(held.uri).private_numbers() == held.private_key.private_numbers()


def test_a_failed_commit_after_staging_keeps_the_staged_file(ks, lab):
    _first_version(ks, lab)
    held = ks.generate_held_key("p256")
    ks.stage_held_key(held)
    _, cert = _issue(ks, lab, held)

    def enospc(stage, path):
        if stage == "replace" and path.endswith("keystore.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    fsutil._FAULT_HOOK = enospc
    try:
        with pytest.raises(StorageError):
            ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN)
    finally:
        fsutil._FAULT_HOOK = None
    assert _path(ks, held).read_bytes() == held.encrypted and ks.staged(held) and ks.get("dev").version == 1
    assert ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN).version == 2


@pytest.mark.parametrize("stage", ["write", "fsync", "fsync-dir"])
def test_enospc_while_staging_leaves_nothing_and_the_store_writes_the_file(ks, lab, stage):
    _first_version(ks, lab)
    before = snapshot(ks.root)
    held = ks.generate_held_key("p256")
    name = held.uri.rsplit("/", 1)[1]

    def enospc(s, path):
        if s == stage and path.endswith(name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    fsutil._FAULT_HOOK = enospc
    try:
        with pytest.raises(StorageError, match=name):
            ks.stage_held_key(held)
    finally:
        fsutil._FAULT_HOOK = None
    assert snapshot(ks.root) == before and not ks.staged(held) and not ks._locks.held(held.uri)
    _, cert = _issue(ks, lab, held)
    _, steps = _steps_during(
        lambda: ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN))
    assert ("fsync", name) in steps  # written in the commit, as for a key never staged
    assert Keystore.open(ks.root).private_key(held.uri).private_numbers() == held.private_key.private_numbers()


def test_a_staged_file_removed_meanwhile_is_written_by_the_store(ks, lab):
    held = ks.generate_held_key("p256")
    ks.stage_held_key(held)
    _path(ks, held).unlink()
    _, cert = _issue(ks, lab, held)
    ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key=held, domain=DOMAIN)
    assert Keystore.open(ks.root).private_key(held.uri).private_numbers() == held.private_key.private_numbers()
    assert Keystore.open(ks.root).check() == []
