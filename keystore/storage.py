"""Crash-safe, multi-process-safe storage for the tinydb index.

tinydb's JSONStorage rewrites its file in place, so a crash mid-write loses the index. ``AtomicJSONStorage``
writes the whole document to a temp file, fsyncs, ``os.replace``s and fsyncs the directory: a reader sees
either the old or the new index, never a torn one. ``KeystoreLock`` (flock on ``.lock``) serialises
read-modify-write cycles across processes so two ``devagent`` processes never lose an update.

``IndexStorage`` (the keystore's index) adds an in-memory cache on top, so that a lookup neither re-reads nor
re-parses the whole index and a change re-encodes only the records it touched:

- The parsed document is kept together with an open descriptor of the file it came from. It is valid while
  ``stat(path)`` still shows that file: same device and inode (which cannot be reused while we hold the file open,
  and every write replaces the file, so another process's write always changes the inode), same size, mtime_ns and
  ctime_ns (an in-place edit by hand). Every read re-validates; ``Keystore._txn`` reads under the lock.
  When the cache moves to a new file, the previous file's descriptor goes to ``fsutil.close_later``: that close
  frees the replaced file's inode (~1 ms on ext4 with ``discard``), and holding it a little longer only keeps an
  inode nobody names pinned for longer; the inode the cache relies on is the new one, held from its parse on.
- The cached document is shared and read-only: its mappings are ``ReadOnlyDict`` (mutation raises ``TypeError``).
  A transaction gets fresh top-level and table dicts (``mutable``) and replaces a record by a new dict to change it.
- On write, a record that is the very object already encoded reuses its encoded line (records are immutable, and
  the cache keeps a reference, so the object identity cannot be reused); only new or replaced records are encoded.
  The bytes written are exactly what ``encode_index`` produces for the document.
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
from keystore.errors import CorruptFileError, KeystoreLockError, NotDurableError

LOCK_TIMEOUT_S = 30.0


_ENCODER = json.JSONEncoder(sort_keys=True)  # one instance: json.dumps(sort_keys=True) builds one per call


def _row_key(k) -> tuple:
    return len(str(k)), str(k)


def _row_order(table: dict) -> list:
    return sorted(table, key=_row_key)


def _encode_row(key, value) -> bytes:
    return f"{_ENCODER.encode(str(key))}: {_ENCODER.encode(value)}".encode()


def _join(name: str, rows: list[bytes]) -> list[bytes]:
    """The pieces of one table (joined once, with everything else, by ``_assemble``)."""
    head = _ENCODER.encode(name).encode()
    if not rows:
        return [head + b": {}"]
    out = [head + b": {\n  "]
    for r in rows:
        out.append(r)
        out.append(b",\n  ")
    out[-1] = b"\n }"
    return out


def _assemble(tables: list[list[bytes]]) -> bytes:
    parts = [b"{\n "]
    for t in tables:
        parts.extend(t)
        parts.append(b",\n ")
    if tables:
        parts[-1] = b"\n}\n"
    else:
        parts.append(b"\n}\n")
    return b"".join(parts)


def encode_index(data: dict) -> bytes:
    """The index as JSON with one record per line (readable, diffable), encoded by the C encoder.

    ``json.dumps(..., indent=N)`` falls back to the pure-Python encoder, which made every keystore change cost
    ~0.3 ms per stored credential; per-record encoding without indent is about three times faster, and
    ``IndexStorage`` re-encodes only the records a change touched."""
    tables = []
    for name in sorted(data):
        table = data[name]
        if not isinstance(table, dict):
            tables.append([f"{_ENCODER.encode(name)}: {_ENCODER.encode(table)}".encode()])
            continue
        tables.append(_join(name, [_encode_row(k, table[k]) for k in _row_order(table)]))
    return _assemble(tables)


# The record fields readers rely on, by table: field -> (accepted types, required). A field not named here is read
# with a default where it is read. Times (TIME_FIELDS) must also be ISO 8601 text.
_T, _N = (str,), (str, type(None))
FIELDS = {
    "credentials": {"name": (_T, True), "kind": (_T, True), "version": ((int,), True), "versions": ((list,), True),
                    "key_uri": (_T, True), "domain": (_N, False), "subject": (_N, False), "issuer": (_N, False),
                    "fingerprint": (_N, False), "serial": (_N, False), "not_before": (_N, False),
                    "not_after": (_N, False), "key_type": (_T, True), "profile": (_N, False),
                    "purpose": (_N, False), "protocol": (_N, False), "server": (_N, False), "source": (_N, False),
                    "created": (_N, False), "updated": (_N, False), "meta": ((dict,), False),
                    "chain_subjects": ((list,), False)},
    "keys": {"uri": (_T, True), "state": (_N, False), "key_type": (_N, False), "label": (_N, False),
             "backend": (_N, False), "created": (_N, False), "credential": (_N, False),
             "pending_for": ((dict, type(None)), False), "owner": ((dict, type(None)), False)},
    "trust": {"file": (_T, True), "domain": (_T, True), "fingerprint": (_T, True), "subject": (_N, False),
              "role": (_N, False), "purpose": (_N, False), "not_after": (_N, False), "added": (_N, False),
              "source": (_N, False), "verified_by": (_N, False)},
    "meta": {"format": ((int,), False), "created": (_N, False), "master_key": (_N, False),
             "destroying": ((list,), False)},
}
TIME_FIELDS = ("created", "updated", "not_before", "not_after", "added")


def check_document(doc) -> None:
    """The index's shape: an object of tables, each an object of records (objects), each field ``FIELDS`` names of
    its type (required ones present; ``versions`` a list of integers, ``chain_subjects`` of text, times ISO 8601
    with a UTC offset, trust files inside ``trust/``; record ids are numbers).
    Raises ValueError naming the table, record and field, so a damaged index is one clear error
    (``CorruptFileError``) instead of a KeyError or TypeError wherever a record happens to be read."""
    import datetime

    if doc is None:
        return
    if not isinstance(doc, dict):
        raise ValueError(f"the document is a {type(doc).__name__}, not an object of tables")
    for table, records in doc.items():
        if not isinstance(records, dict):
            raise ValueError(f"table {table!r} is a {type(records).__name__}, not an object of records")
        spec = FIELDS.get(table, {})
        for rid, rec in records.items():
            if not (rid.isascii() and rid.isdigit()):
                raise ValueError(f"{table} record id {rid[:40]!r} is not a number")
            if not isinstance(rec, dict):
                raise ValueError(f"{table} record {rid} is a {type(rec).__name__}, not an object")
            for field, (kinds, required) in spec.items():
                if field not in rec:
                    if required:
                        raise ValueError(f"{table} record {rid}: {field!r} is missing")
                    continue
                v = rec[field]
                if isinstance(v, bool) or not isinstance(v, kinds):
                    raise ValueError(f"{table} record {rid}: {field!r} is a {type(v).__name__}, not "
                                     f"{' or '.join(k.__name__ for k in kinds)}")
                if field in TIME_FIELDS and isinstance(v, str):
                    try:
                        t = datetime.datetime.fromisoformat(v)
                    except ValueError:
                        t = None
                    if t is None or t.utcoffset() is None:  # devagent writes UTC times; a naive one is not comparable
                        raise ValueError(f"{table} record {rid}: {field!r} {v[:40]!r} is not an ISO 8601 time with "
                                         "a UTC offset") from None
            if table == "trust":  # read as root / file: it must name a file inside the keystore's trust/
                parts = rec["file"].split("/")
                if parts[0] != "trust" or len(parts) < 2 or any(x in ("", ".", "..") for x in parts):
                    raise ValueError(f"trust record {rid}: 'file' {rec['file'][:60]!r} is not a path inside trust/")
            for field, kind in (("versions", int), ("chain_subjects", str), ("destroying", str)):
                items = rec.get(field) if field in spec else None
                if items is not None and any(isinstance(x, bool) or not isinstance(x, kind) for x in items):
                    raise ValueError(f"{table} record {rid}: {field!r} holds something other than {kind.__name__}s")


class ReadOnlyDict(dict):
    """A mapping of the cached index: shared by every reader, so it must not change. Copy it (``dict(rec)``) and
    store the copy to change a record."""

    __slots__ = ()

    def _refuse(self, *_a, **_k):
        raise TypeError("keystore index records are read-only (shared cache): copy with dict(rec), change the copy "
                        "and store it in the transaction's table")

    __setitem__ = __delitem__ = __ior__ = _refuse
    update = pop = popitem = setdefault = clear = _refuse

    def __reduce__(self):  # copy/pickle as a plain dict
        return dict, (dict(self),)


def freeze(obj):
    """A read-only deep copy of a JSON value (dicts become ``ReadOnlyDict``; lists stay lists and, like every value
    of the cache, are never changed in place)."""
    if isinstance(obj, ReadOnlyDict):
        return obj
    if isinstance(obj, dict):
        return ReadOnlyDict((k, freeze(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return [freeze(v) for v in obj]
    return obj


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


class IndexStorage(AtomicJSONStorage):
    """``AtomicJSONStorage`` with the parsed document cached (see the module docstring). Not for documents whose
    callers change what ``read`` returns in place (``AtomicJSONStorage`` hands out a fresh copy every time)."""

    def __init__(self, path: str | os.PathLike, **_):
        super().__init__(path)
        self._doc: dict | None = None
        self._fd = -1
        self._ident: tuple | None = None
        self._lines: dict[str, dict] = {}  # table -> {key: (record object, encoded line)}
        self._order: dict[str, list] = {}  # table -> keys in file order
        self.generation = 0  # changes whenever the cached document does (for views derived from it)
        self.parses = 0  # how often the file was actually read and parsed (benchmarks, tests)
        # Threads of one process (the daemon's asyncio.to_thread calls) share one Keystore: the cache changes under
        # this lock. Writers hold the keystore's flock as well; readers take only this.
        self._mutex = threading.RLock()

    @staticmethod
    def _identity(st: os.stat_result) -> tuple:
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _set(self, doc, fd: int, st: os.stat_result | None, *, defer: bool = True) -> None:
        if self._fd >= 0:
            # The descriptor only pinned the previous file's inode while the cache described it; from here on
            # the cache holds the new file's. The previous file is usually replaced already, so this close frees
            # its inode (~1 ms on ext4 with discard): deferred to the closer thread (fsutil.close_later).
            if defer:
                fsutil.close_later(self._fd)
            else:
                os.close(self._fd)
        self._doc, self._fd = doc, fd
        self._ident = self._identity(st) if st is not None else None
        self.generation += 1

    def invalidate(self) -> None:
        """Forget the cache (the next read parses the file again)."""
        with self._mutex:
            self._set(None, -1, None)
            self._lines.clear()
            self._order.clear()

    def read(self):
        with self._mutex:
            return self._read()

    def cached(self):
        """The cached document as it is, not re-validated against the file (None: nothing cached)."""
        return self._doc

    def _read(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._doc is not None:
                self.invalidate()
            return None
        if self._doc is not None and self._identity(st) == self._ident:
            return self._doc
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            self.invalidate()
            return None
        try:
            st = os.fstat(fd)  # the identity of what is parsed, not of whatever the path names a moment later
            chunks = []
            while chunk := os.read(fd, max(st.st_size, 65536)):
                chunks.append(chunk)
            raw = b"".join(chunks)
            doc = json.loads(raw, object_hook=ReadOnlyDict) if raw.strip() else None
            check_document(doc)
        except (ValueError, RecursionError) as e:  # RecursionError: JSON nested too deeply
            os.close(fd)
            raise CorruptFileError(f"keystore index {self.path} is corrupt: {e}") from e
        except BaseException:
            os.close(fd)
            raise
        self.parses += 1
        self._lines.clear()
        self._order.clear()
        if doc is None:
            os.close(fd)
            self._set(None, -1, None)
            return None
        self._set(doc, fd, st)
        return doc

    @staticmethod
    def mutable(doc) -> dict:
        """A document a transaction may change: fresh top-level and table dicts; the records are the cached
        (read-only) ones, replaced — never changed in place — by the transaction."""
        return {k: dict(v) if isinstance(v, dict) else v for k, v in (doc or {}).items()}

    def _encode(self, data: dict) -> tuple[bytes, dict, dict, dict]:
        """(bytes, encoded lines, row order, the rows that were not cached: table -> keys)."""
        tables, lines, order, changed = [], {}, {}, {}
        for name in sorted(data):
            table = data[name]
            if not isinstance(table, dict):
                tables.append([f"{_ENCODER.encode(name)}: {_ENCODER.encode(table)}".encode()])
                continue
            cached = self._lines.get(name, {})
            tlines = dict(cached) if cached else {}
            fresh = []
            for k, v in table.items():
                hit = cached.get(k)
                if hit is None or hit[0] is not v:
                    tlines[k] = (v, _encode_row(k, v))
                    fresh.append(k)
            if len(tlines) != len(table):  # rows removed
                tlines = {k: tlines[k] for k in table}
            keys = self._keys_in_order(self._order.get(name), table)
            tables.append(_join(name, [tlines[k][1] for k in keys]))
            lines[name], order[name], changed[name] = tlines, keys, fresh
        return _assemble(tables), lines, order, changed

    @staticmethod
    def _keys_in_order(prev: list | None, table: dict) -> list:
        """``_row_order(table)``, reusing the previous order: rows removed drop out, rows added that sort after
        every kept row (new ids are max + 1) are appended; anything else sorts again."""
        if prev is None:
            return _row_order(table)
        kept = [k for k in prev if k in table]
        if len(kept) == len(table):
            return kept
        added = sorted(set(table).difference(kept), key=_row_key)
        if kept and _row_key(added[0]) <= _row_key(kept[-1]):
            return _row_order(table)
        return kept + added

    def write(self, data, sync_first=(), sync_dir: bool = True, fsync_files=None) -> None:
        """Write ``data`` (the document of a transaction) atomically; afterwards it is the cached document.
        ``sync_first``, ``sync_dir``, ``fsync_files``: see ``fsutil.atomic_write`` (``sync_dir=False``: the caller
        makes the replace durable before anything depends on it).

        Raises:
            StorageError: nothing was changed (the cache is dropped).
            NotDurableError: written and live, not synced (the cache is dropped: the next read parses it).
        """
        with self._mutex:
            self._write(data, sync_first, sync_dir, fsync_files)

    def _write(self, data, sync_first=(), sync_dir: bool = True, fsync_files=None) -> None:
        raw, lines, order, changed = self._encode(data)
        kept: list[int] = []
        try:
            # The descriptor the file was written through is the one the cache keeps (it names the replaced-in
            # inode, which is what the path names now: we hold the keystore lock), not a second open of the path.
            fsutil.atomic_write(self.path, raw, sync_first=sync_first, sync_dir=sync_dir, fsync_files=fsync_files,
                                keep_open=kept)
        except NotDurableError:
            self.invalidate()  # live on disk; parse it again rather than guess
            raise
        except BaseException:
            for fd in kept:
                os.close(fd)
            self.invalidate()
            raise
        [fd] = kept
        cur = os.fstat(fd)  # after the replace: a rename changes the inode's ctime, which the cache's identity holds
        frozen = {}
        for name, table in data.items():
            if not isinstance(table, dict):
                frozen[name] = freeze(table)
                continue
            ft = dict(table)
            tl = lines[name]
            for k in changed.get(name, ()):  # only these can be plain (new or replaced) records
                v = ft[k]
                if not isinstance(v, ReadOnlyDict):
                    ft[k] = fv = freeze(v)
                    tl[k] = (fv, tl[k][1])
            frozen[name] = ReadOnlyDict(ft)
        self._lines, self._order = lines, order
        self._set(ReadOnlyDict(frozen), fd, cur)

    def close(self) -> None:
        with self._mutex:
            self._set(None, -1, None, defer=False)
        fsutil.drain_closes()

    def __del__(self):  # the cached file's descriptor must not outlive the object
        try:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class KeystoreLock:
    """Exclusive advisory lock on ``<dir>/.lock``; re-entrant within one object."""

    def __init__(self, directory: str | os.PathLike, timeout_s: float = LOCK_TIMEOUT_S):
        self.path = Path(directory) / ".lock"
        self.timeout_s = timeout_s
        self._fd = -1
        self._depth = 0
        self._tlock = threading.RLock()
        self._owner: int | None = None  # the thread holding it (while _depth > 0)
        self.epoch = 0  # counts outermost acquisitions: "since I took the lock" is (owned_by_me(), epoch)

    def owned_by_me(self) -> bool:
        """This thread holds the lock (flock and thread lock): no other process or thread writes meanwhile."""
        return self._depth > 0 and self._owner == threading.get_ident()

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
        self._owner = threading.get_ident()
        self.epoch += 1
        return self

    def __exit__(self, *exc):
        try:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = -1
        finally:
            self._tlock.release()
        return False
