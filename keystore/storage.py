"""Crash-safe, multi-process-safe storage for the tinydb index.

tinydb's JSONStorage rewrites its file in place, so a crash mid-write loses the index. ``AtomicJSONStorage``
writes the whole document to a temp file, fsyncs, ``os.replace``s and fsyncs the directory: a reader sees
either the old or the new index, never a torn one. ``KeystoreLock`` (flock on ``.lock``) serialises
read-modify-write cycles across processes so two ``devagent`` processes never lose an update.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
from pathlib import Path

from tinydb.storages import Storage

from keystore import fsutil
from keystore.errors import CorruptFileError, KeystoreLockError

LOCK_TIMEOUT_S = 30.0


def encode_index(data: dict) -> bytes:
    """The index as JSON with one record per line (readable, diffable), encoded by the C encoder.

    ``json.dumps(..., indent=N)`` falls back to the pure-Python encoder, which made every keystore change cost
    ~0.3 ms per stored credential; per-record ``dumps`` without indent is about three times faster."""
    tables = []
    for name in sorted(data):
        table = data[name]
        if not isinstance(table, dict):
            tables.append(f"{json.dumps(name)}: {json.dumps(table, sort_keys=True)}")
            continue
        rows = ",\n  ".join(f"{json.dumps(str(k))}: {json.dumps(v, sort_keys=True)}" for k, v in
                            sorted(table.items(), key=lambda kv: (len(str(kv[0])), str(kv[0]))))
        tables.append(f"{json.dumps(name)}: {{\n  {rows}\n }}" if rows else f"{json.dumps(name)}: {{}}")
    return ("{\n " + ",\n ".join(tables) + "\n}\n").encode()


class AtomicJSONStorage(Storage):
    def __init__(self, path: str | os.PathLike, **_):
        self.path = Path(path)

    def read(self):
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise CorruptFileError(f"keystore index {self.path} is corrupt: {e}") from e

    def write(self, data) -> None:
        fsutil.atomic_write(self.path, encode_index(data))

    def close(self) -> None:
        pass


class KeystoreLock:
    """Exclusive advisory lock on ``<dir>/.lock``; re-entrant within one object."""

    def __init__(self, directory: str | os.PathLike, timeout_s: float = LOCK_TIMEOUT_S):
        self.path = Path(directory) / ".lock"
        self.timeout_s = timeout_s
        self._fd = -1
        self._depth = 0
        self._tlock = threading.RLock()

    def __enter__(self):
        # Threads of one process (asyncio.to_thread around key generation and signing) exclude each other
        # here; flock alone would not, and the depth counter makes the lock re-entrant per thread only.
        self._tlock.acquire()
        try:
            return self._enter()
        except BaseException:
            self._tlock.release()
            raise

    def _enter(self):
        if self._depth:
            self._depth += 1
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, fsutil.FILE_MODE)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise KeystoreLockError(f"keystore {self.path.parent} is locked by another devagent process "
                                            f"for more than {self.timeout_s:.0f} s") from None
                time.sleep(0.01)
        self._fd = fd
        self._depth = 1
        return self

    def __exit__(self, *exc):
        try:
            self._depth -= 1
            if self._depth == 0:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = -1
        finally:
            self._tlock.release()
        return False
