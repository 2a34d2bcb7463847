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
    assert sorted(p.name for p in d.iterdir()) == ["a", "b"]  # under their final names, not yet synced
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


def test_new_files_are_created_under_their_final_names(tmp_path):
    """No temp file and no rename: each file is created (0600 first, then its mode) under its own name."""
    steps = []
    fsutil._FAULT_HOOK = lambda stage, path: steps.append((stage, os.path.basename(path)))
    try:
        files = fsutil.write_new_files([(tmp_path / "a", b"A"), (tmp_path / "b", b"B")], mode=0o400)
    finally:
        fsutil._FAULT_HOOK = None
        files.close()
    assert steps == [("write", "a"), ("write", "b")]  # no "replace": nothing is renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in "ab"] == [0o400, 0o400]


def test_a_failing_write_of_new_files_removes_only_its_own_file(tmp_path):
    def hook(stage, path):
        if stage == "write" and path.endswith("/b"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    fsutil._FAULT_HOOK = hook
    try:
        with pytest.raises(StorageError, match=f"cannot write {tmp_path}/b: {os.strerror(errno.ENOSPC)}"):
            fsutil.write_new_files([(tmp_path / "a", b"A"), (tmp_path / "b", b"B")])
    finally:
        fsutil._FAULT_HOOK = None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # written before the failure: the caller's to remove


def _short_writes(limit: int):
    """Make this process's writes past ``limit`` bytes of a file fail (RLIMIT_FSIZE: a real short write, then
    EFBIG, as a disk filling up mid-file gives a short write, then ENOSPC). Returns the undo."""
    import resource
    import signal

    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))

    def undo():
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
    return undo


def test_a_file_torn_by_a_failing_write_is_overwritten_before_its_unlink(tmp_path):
    """The disk fills up in the middle of a new file (it may hold part of an encrypted key): what was written of it
    is overwritten with random bytes and the file unlinked; the file written before it stays."""
    secret = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" + b"k" * 4000
    seen = {}

    def hook(stage, path):
        if stage == "write" and path.endswith("/b"):
            seen["undo"] = _short_writes(100)
        if stage == "unlink" and path.endswith("/b"):
            seen["undo"]()
            seen["at_unlink"] = open(path, "rb").read()

    fsutil._FAULT_HOOK = hook
    try:
        with pytest.raises(StorageError, match=f"cannot write {tmp_path}/b: .*nothing was changed"):
            fsutil.write_new_files([(tmp_path / "a", b"A"), (tmp_path / "b", secret)])
    finally:
        fsutil._FAULT_HOOK = None
        if "at_unlink" not in seen and "undo" in seen:
            seen["undo"]()
    assert len(seen["at_unlink"]) == 100 and seen["at_unlink"] != secret[:100], "not overwritten before the unlink"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_name_left_by_an_earlier_attempt_is_securely_cleared_then_created_afresh(tmp_path):
    """A leftover under a final name (a failed attempt whose removal failed too) is overwritten and unlinked, then
    the file is created anew (O_EXCL): nothing is written through it or renamed over it. A symlink there is
    removed, never followed."""
    old = b"-----BEGIN ENCRYPTED PRIVATE KEY----- old"
    (tmp_path / "a").write_bytes(old)
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    (tmp_path / "b").symlink_to(target)
    seen = {}

    def hook(stage, path):
        if stage == "unlink" and path.endswith("/a"):
            seen["at_unlink"] = open(path, "rb").read()

    fsutil._FAULT_HOOK = hook
    try:
        files = fsutil.write_new_files([(tmp_path / "a", b"A"), (tmp_path / "b", b"B")])
    finally:
        fsutil._FAULT_HOOK = None
    files.close()
    assert len(seen["at_unlink"]) == len(old) and seen["at_unlink"] != old
    assert (tmp_path / "a").read_bytes() == b"A" and not (tmp_path / "b").is_symlink()
    assert (tmp_path / "b").read_bytes() == b"B" and target.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "precious"]


def test_a_name_that_cannot_be_cleared_is_an_error_naming_it_and_is_left_alone(tmp_path):
    (tmp_path / "a").mkdir()  # not a file: it cannot be overwritten and unlinked
    (tmp_path / "a" / "x").write_bytes(b"x")
    with pytest.raises(StorageError, match=f"cannot write {tmp_path}/a: .*nothing was changed"):
        fsutil.write_new_files([(tmp_path / "a", b"A")])
    assert (tmp_path / "a" / "x").read_bytes() == b"x"


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
