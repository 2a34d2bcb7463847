"""The one place that writes secrets and state to disk, and sets permissions.

Invariants:
- Every write goes to a temp file in the same directory, is fsynced, ``os.replace``d over the target, and the
  directory is fsynced; on any error the temp file is removed and the target is untouched.
- Files are created 0600 (or 0400), directories 0700. Nothing else in the project calls ``os.chmod`` or
  ``os.open`` for state files.
- ``check_private`` refuses secrets readable or writable by group/others, naming the fix.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from keystore.errors import KeystorePermissionError, StorageError

FILE_MODE = 0o600
DIR_MODE = 0o700

# Test hook for fault injection: a callable(stage: str, path: str) run between write steps. It lets
# tests/fault make a write fail (ENOSPC, EIO) at each step; None in production.
_FAULT_HOOK = None


def _fault(stage: str, path) -> None:
    hook = _FAULT_HOOK or _env_fault
    if hook is not None:
        hook(stage, str(path))


def _env_fault_from_environ():
    """DEVAGENT_FAULT=stage:errno (e.g. ``write:ENOSPC``) makes that write step fail. Test use only."""
    spec = os.environ.get("DEVAGENT_FAULT")
    if not spec:
        return None
    stage, _, name = spec.partition(":")
    code = getattr(errno, name or "EIO", errno.EIO)

    def hook(s, path):
        if s == stage:
            raise OSError(code, os.strerror(code), path)

    return hook


_env_fault = _env_fault_from_environ()


def ensure_dir(path: str | os.PathLike, mode: int = DIR_MODE) -> Path:
    """Create ``path`` (and parents) with ``mode``; tighten an existing directory we own to ``mode``."""
    p = Path(path)
    try:
        missing = []
        q = p
        while not q.exists():
            missing.append(q)
            q = q.parent
        for d in reversed(missing):  # parents too: mkdir(parents=True) would give them the umask's mode
            with contextlib.suppress(FileExistsError):
                d.mkdir(mode=mode)
            os.chmod(d, mode)
        st = p.stat()
        if stat.S_IMODE(st.st_mode) != mode and st.st_uid == os.geteuid():
            os.chmod(p, mode)
    except OSError as e:
        raise StorageError(f"cannot create directory {p}: {e.strerror or e}") from e
    return p


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp → fsync → replace → fsync dir).

    Raises:
        StorageError: the write failed; ``path`` still holds its previous content (or does not exist).
    """
    p = Path(path)
    fd, tmp = -1, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        os.fchmod(fd, mode)
        _fault("write", p)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        _fault("fsync", p)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        _fault("replace", p)
        os.replace(tmp, p)
        tmp = None
        try:
            _fault("fsync-dir", p)
            fsync_dir(p.parent)
        except OSError as e:
            raise StorageError(f"wrote {p} but could not sync its directory ({e.strerror or e}): the change may "
                               "not survive a power cut") from e
    except OSError as e:
        raise StorageError(f"cannot write {p}: {e.strerror or e}; nothing was changed") from e
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_symlink(target: str, path: str | os.PathLike) -> None:
    """Make ``path`` a symlink to ``target`` atomically (``ln -sfn`` without its unlink window): a new symlink under
    a temp name in the same directory, renamed over ``path`` (rename(2) replaces a file or symlink in one step),
    then the directory is fsynced. A reader opening ``path`` sees the old or the new target, never neither.

    Raises:
        StorageError: nothing was changed (or, after the rename, the directory could not be synced).
    """
    p = Path(path)
    tmp: Path | None = p.parent / f".{p.name}.{os.urandom(4).hex()}.tmp"
    try:
        os.symlink(target, tmp)
        _fault("replace", p)
        os.replace(tmp, p)
        tmp = None
        _fault("fsync-dir", p)
        fsync_dir(p.parent)
    except OSError as e:
        raise StorageError(f"cannot point {p} at {target}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def append_line(path: str | os.PathLike, line: bytes, mode: int = FILE_MODE) -> None:
    """Append one line durably (audit log). A torn last line is tolerated by readers."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
        try:
            os.write(fd, line if line.endswith(b"\n") else line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise StorageError(f"cannot append to {p}: {e.strerror or e}") from e


def check_private(path: str | os.PathLike, what: str = "secret file") -> None:
    """Refuse a secret that group or others may read or write.

    Raises:
        KeystorePermissionError: with the ``chmod`` command that fixes it.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise KeystorePermissionError(f"cannot access {what} {p}: {e.strerror or e}") from e
    bad = stat.S_IMODE(st.st_mode) & 0o077
    if bad:
        fix = "700" if stat.S_ISDIR(st.st_mode) else "600"
        raise KeystorePermissionError(
            f"{what} {p} has mode {stat.S_IMODE(st.st_mode):04o}: group/others may access it; "
            f"refusing to use it. Fix with: chmod {fix} {p}"
        )
    if st.st_uid != os.geteuid() and os.geteuid() != 0:
        raise KeystorePermissionError(f"{what} {p} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})")


def secure_delete(path: str | os.PathLike) -> None:
    """Overwrite a file with random bytes, fsync, then unlink it.

    On flash with wear levelling or on copy-on-write filesystems the old blocks may survive; this is the
    best a userspace process can do, and keys are encrypted at rest anyway.
    """
    p = Path(path)
    try:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):  # a symlink holds no secret: never follow it and overwrite what it points to
            _fault("unlink", p)
            p.unlink()
            fsync_dir(p.parent)
            return
        size = st.st_size
        if not st.st_mode & stat.S_IWUSR:  # e.g. master.key (0400): make it writable to overwrite it
            os.chmod(p, FILE_MODE)
        with open(p, "r+b", buffering=0) as f:
            f.write(os.urandom(size))
            os.fsync(f.fileno())
        _fault("unlink", p)
        p.unlink()
        fsync_dir(p.parent)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StorageError(f"cannot securely delete {p}: {e.strerror or e}") from e


def remove_tree(path: str | os.PathLike) -> None:
    """Securely delete every file below ``path``, then the directories."""
    p = Path(path)
    if not p.exists():
        return
    for root, dirs, files in os.walk(p, topdown=False):
        for f in files:
            secure_delete(Path(root) / f)
        for d in dirs:
            if os.path.islink(Path(root) / d):  # os.walk lists symlinks to directories here; remove the link only
                secure_delete(Path(root) / d)
            else:
                os.rmdir(Path(root) / d)
    os.rmdir(p)
