"""Concurrent fsyncs (``fsutil.fsync_all``, ``write_new_files`` + ``atomic_write(sync_first=..., fsync_files=...)``):
every fsync is
still made, each failure is reported for its own descriptor or path, nothing is replaced before all of them are done,
and a forked child gets its own threads."""
from __future__ import annotations

import errno
import os

import pytest

from keystore import fsutil
from keystore.errors import StorageError


def test_fsync_all_syncs_each_descriptor_and_reports_each_failure(tmp_path):
    fds = [os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(3)]
    bad = os.open(tmp_path / "closed", os.O_RDWR | os.O_CREAT, 0o600)
    os.close(bad)  # EBADF: a descriptor whose fsync fails
    try:
        before = fsutil.fsync_count
        errs = fsutil.fsync_all([fds[0], bad, fds[1], fds[2]])
        assert fsutil.fsync_count - before == 4
        assert [e is None for e in errs] == [True, False, True, True]
        assert errs[1].errno == errno.EBADF
        assert fsutil.fsync_all([]) == [] and fsutil.fsync_all([fds[0]]) == [None]
    finally:
        for fd in fds:
            os.close(fd)


def test_fsync_all_in_a_forked_child(tmp_path):
    fds = [os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(2)]
    fsutil.fsync_all(fds)  # the parent's threads exist now
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if fsutil.fsync_all(fds) == [None, None] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's fsync_all must not wait on the parent's threads"
    for fd in fds:
        os.close(fd)


def test_new_files_are_fsynced_with_the_write_that_refers_to_them(tmp_path):
    """A version directory's files are fsynced in the index write's batch; one failing fsync there leaves the index
    as it was (the caller then removes the unreferenced directory)."""
    d = tmp_path / "v"
    d.mkdir()
    (tmp_path / "index").write_bytes(b"old")

    def hook(stage, path):
        if stage == "fsync" and path.endswith("/b"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)

    files = fsutil.write_new_files([(d / "a", b"A"), (d / "b", b"B")])
    assert sorted(p.name for p in d.iterdir()) == ["a", "b"]  # renamed, not yet synced
    fsutil._FAULT_HOOK = hook
    try:
        with pytest.raises(StorageError, match=rf"cannot write {d}/b: .*nothing was changed"):
            fsutil.atomic_write(tmp_path / "index", b"new", sync_first=[d / "a", d / "b"], fsync_files=files)
    finally:
        fsutil._FAULT_HOOK = None
        files.close()
    assert (tmp_path / "index").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["index", "v"]
    files = fsutil.write_new_files([(d / "a", b"A2"), (d / "b", b"B2")])
    before = fsutil.fsync_count
    try:
        fsutil.atomic_write(tmp_path / "index", b"new", sync_first=[d / "a", d / "b"], fsync_files=files)
    finally:
        files.close()
    assert fsutil.fsync_count - before == 5  # a, b, v/ and the index's temp file together; then the directory
    assert (tmp_path / "index").read_bytes() == b"new" and (d / "b").read_bytes() == b"B2"
    assert sorted(p.name for p in d.iterdir()) == ["a", "b"]  # no temp file left
    files.close()  # idempotent


def test_a_failing_write_of_new_files_leaves_no_temp_file(tmp_path):
    def hook(stage, path):
        if stage == "replace" and path.endswith("/b"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    fsutil._FAULT_HOOK = hook
    try:
        with pytest.raises(StorageError, match="/b: "):
            fsutil.write_new_files([(tmp_path / "a", b"A"), (tmp_path / "b", b"B")])
    finally:
        fsutil._FAULT_HOOK = None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # renamed before the failure: the caller's to remove


def test_a_failing_directory_sync_first_leaves_the_target_unchanged(tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    (d / "cert.pem").write_bytes(b"x")
    (tmp_path / "index").write_bytes(b"old")
    stages = []

    def hook(stage, path):
        stages.append((stage, os.path.basename(path)))
        if stage == "fsync-dir" and path.endswith("cert.pem"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    fsutil._FAULT_HOOK = hook
    try:
        with pytest.raises(StorageError, match="cert.pem"):
            fsutil.atomic_write(tmp_path / "index", b"new", sync_first=[d / "cert.pem"])
    finally:
        fsutil._FAULT_HOOK = None
    assert (tmp_path / "index").read_bytes() == b"old" and ("replace", "index") not in stages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "v"]  # no temp file left
    before = fsutil.fsync_count
    fsutil.atomic_write(tmp_path / "index", b"new", sync_first=[d / "cert.pem"])
    assert (tmp_path / "index").read_bytes() == b"new"
    assert fsutil.fsync_count - before == 3  # the temp file and v/ together, then the index's directory
