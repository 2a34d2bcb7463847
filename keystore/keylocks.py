"""Who may still be using a key: one lock file per key, shared-locked by every process that uses it.

``<keystore>/locks/<id>`` exists from a key's creation until it is destroyed (``id`` is derived from the key's
URI; a held software key's is made when its file is staged, ``Keystore.stage_held_key``, or else just after the
commit that stores it, ``Keystore.store_certificate``). A
process that uses a key (to sign, or to hand its file to a TLS stack) holds a shared ``flock`` on that file; a
process that wants to destroy a key the index no longer needs takes an exclusive ``flock`` without waiting. If it
gets it, nobody can be using the key: it destroys the key, then unlinks the lock file. If not, the key is *retired*
(recorded in the index) and destroyed later by whichever process finds it free (``Keystore.gc`` and every commit
look). The kernel drops a killed process's locks, so a crash never pins a key.

A holder that opened the lock file just before its key was destroyed notices on acquiring the lock: the path no
longer names the file it locked (unlinked), and it gives up (``hold`` returns False). A missing lock file means the
key was destroyed, a held key was just stored, a power cut lost the file, or the keystore predates lock files (the
caller decides, under the keystore lock).

A staged held key (its file written before any index record names it) is held by its staging process: ``gc``
skips an unnamed ``keys/*`` file, and a lock file the index does not name, while some process holds its lock; once
that process is gone (killed: the kernel drops its locks) ``gc`` securely deletes the file as any other leftover.

Lock files carry no data and need no fsync: after a power cut no process holds anything.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from pathlib import Path

from keystore import fsutil

LOCK_DIR = "locks"
_FLAGS = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def lock_name(uri: str) -> str:
    import hashlib  # not at import: `devagent status` never needs it

    return hashlib.sha256(uri.encode()).hexdigest()[:32]


def _lock_exclusive_or_close(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting. False: some process holds a lock on the file, and
    ``fd`` is closed; any other error is raised (``fd`` closed too)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class KeyLocks:
    """The lock files of one keystore, and the shared locks this object holds (one descriptor per key)."""

    def __init__(self, root: str | os.PathLike):
        self.dir = Path(root) / LOCK_DIR
        self._held: dict[str, list] = {}  # uri -> [fd, explicit uses]
        self._mutex = threading.Lock()  # threads of one process (asyncio.to_thread) share this object

    def path(self, uri: str) -> Path:
        return self.dir / lock_name(uri)

    # ---- creation and destruction (under the keystore lock) ---------------------------------------------
    def create(self, uri: str) -> None:
        """Make the lock file of a new key (idempotent)."""
        try:
            fd = os.open(self.path(uri), _FLAGS | os.O_CREAT, fsutil.FILE_MODE)
        except FileNotFoundError:  # no locks/ yet (or it was removed): make it, then the file
            fsutil.ensure_dir(self.dir)
            fd = os.open(self.path(uri), _FLAGS | os.O_CREAT, fsutil.FILE_MODE)
        os.close(fd)

    def exists(self, uri: str) -> bool:
        return self.path(uri).exists()

    def try_exclusive(self, uri: str) -> int | None:
        """An exclusive lock on the key's lock file if nobody holds it (creating the file if it is missing), as a
        descriptor for ``remove``; None if some process (this object included) holds it."""
        if self.held(uri):
            return None
        if not self.dir.is_dir():
            fsutil.ensure_dir(self.dir)
        fd = os.open(self.path(uri), _FLAGS | os.O_CREAT, fsutil.FILE_MODE)
        return fd if _lock_exclusive_or_close(fd) else None

    def remove(self, uri: str, fd: int) -> None:
        """After the key is destroyed: unlink its lock file (still locked, so nobody can take it meanwhile)."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(uri))
        finally:
            os.close(fd)

    def release_exclusive(self, fd: int) -> None:
        os.close(fd)

    def remove_if_free(self, path: Path) -> bool:
        """Unlink the lock file ``path`` of a key the index does not name, unless some process (this object
        included: flock locks belong to open file descriptions) holds it: a held key staged before its commit
        (``Keystore.stage_held_key``). Under the keystore lock. True: removed (or already gone)."""
        try:
            fd = os.open(path, _FLAGS)
        except FileNotFoundError:
            return True
        if not _lock_exclusive_or_close(fd):
            return False
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        finally:
            os.close(fd)
        return True

    # ---- holding ----------------------------------------------------------------------------------------
    def hold(self, uri: str, *, explicit: bool) -> bool:
        """Take (or count) a shared lock on ``uri``. False: its lock file is missing or being removed (the key was
        destroyed, is being destroyed, or predates lock files)."""
        with self._mutex:
            h = self._held.get(uri)
            if h is not None:
                h[1] += int(explicit)
                return True
            try:
                fd = os.open(self.path(uri), _FLAGS)
            except OSError:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                st, now = os.fstat(fd), os.stat(self.path(uri))
                if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                    raise FileNotFoundError(self.path(uri))
            except OSError:
                os.close(fd)
                return False
            self._held[uri] = [fd, int(explicit)]
            return True

    def held(self, uri: str) -> bool:
        with self._mutex:
            return uri in self._held

    def in_use(self, uri: str) -> bool:
        """Held explicitly by this object (a flow of this process is using the key right now)."""
        with self._mutex:
            h = self._held.get(uri)
            return h is not None and h[1] > 0

    def release(self, uri: str, *, explicit: bool, everything: bool = False) -> bool:
        """Undo one ``hold``; the lock is dropped when no explicit use is left (``explicit=False``: drop it unless
        a flow still uses it; ``everything``: drop it whatever uses it). Returns True when the lock was dropped."""
        with self._mutex:
            h = self._held.get(uri)
            if h is None:
                return False
            if explicit and h[1] > 0:
                h[1] -= 1
            if h[1] > 0 and not everything:
                return False
            del self._held[uri]
            os.close(h[0])
            return True

    def release_all(self) -> None:
        with self._mutex:
            for uri in list(self._held):
                os.close(self._held.pop(uri)[0])

    def __del__(self):  # a Keystore dropped without close(): its holds end with it, as with a process's exit
        try:
            self.release_all()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def files(self) -> list[Path]:
        """The keys' lock files (not ``.lock``, the devices' TurnLock)."""
        return [p for p in self.dir.iterdir() if not p.name.startswith(".")] if self.dir.is_dir() else []


class TurnLock:
    """Processes of one keystore taking turns at a key device (TPM, PKCS#11 token): an exclusive ``flock`` on
    ``locks/.lock``, re-entrant within a thread, taken for the length of one device operation. A keystore that
    cannot create it (read-only) goes on without turns."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._local = threading.local()

    def __enter__(self):
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        if depth == 0:
            fd = -1
            try:
                self.path.parent.mkdir(mode=0o700, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), fsutil.FILE_MODE)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                if fd >= 0:
                    os.close(fd)
                fd = -1
            self._local.fd = fd
        return self

    def __exit__(self, *exc):
        self._local.depth -= 1
        if self._local.depth == 0 and self._local.fd >= 0:
            os.close(self._local.fd)
            self._local.fd = -1
        return False
