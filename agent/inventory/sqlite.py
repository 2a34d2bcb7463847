"""The embedded inventory: one SQLite file (stdlib ``sqlite3``), WAL mode, one row per device.

Durability: ``synchronous=NORMAL`` by default (``sqlite:PATH?synchronous=full`` for FULL). In WAL mode NORMAL
survives any process crash (kill -9 included): a commit is in the WAL before ``commit`` returns. Only a power cut
or kernel crash can roll back the last few commits, never corrupt the file; for the CLM that means at worst a
renewal it already made is recorded as not made, and the device is renewed once more. FULL adds one fsync per
commit (0.1–1 ms on SSD/eMMC) to rule that out.

Several processes on one machine may share the file (``clm run`` workers, ``clm list`` while it runs): writes
take SQLite's write lock (``BEGIN IMMEDIATE``, waiting up to ``BUSY_TIMEOUT_S``); leases work as on PostgreSQL.
For workers on several machines use PostgreSQL — SQLite over a network filesystem is not safe.

Migration from ``inventory.json`` (earlier versions), under the CLM directory's lock, on first open:

1. read and check the JSON (a corrupt file is an error naming it; nothing changes);
2. build ``inventory.sqlite.migrating`` completely (rollback journal, ``synchronous=FULL``), fsync it;
3. ``rename`` it to ``inventory.sqlite`` and fsync the directory — the commit point;
4. rename ``inventory.json`` to ``inventory.json.migrated`` (kept as a backup) and fsync the directory.

A kill -9 before step 3 leaves the JSON inventory complete (the half-built temp file is discarded on the next
start); after it, the SQLite inventory is complete and the next start finishes step 4. The SQLite file records
the JSON's SHA-256, so a JSON written after the migration is never mistaken for the one migrated.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
from pathlib import Path
from urllib.parse import parse_qs

from agent.inventory import (
    JSON_NAME, STATES, InventoryError, InventorySpecError, InventoryUnavailableError, check_device, encode_fields,
    to_epoch,
)
from agent.inventory.sql import SqlInventory

log = logging.getLogger("devagent.clm")

BUSY_TIMEOUT_S = 30.0
MIGRATING_SUFFIX = ".migrating"
MIGRATED_SUFFIX = ".migrated"


class SqliteInventory(SqlInventory):
    PH = "?"
    GREATEST = "max"
    NOW = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: str | os.PathLike, clm_dir: str | os.PathLike):
        from keystore import fsutil
        from keystore.errors import KeystoreError
        from keystore.storage import KeystoreLock

        super().__init__(clm_dir)
        path = str(path)
        path, _, query = path.partition("?")
        opts = {k: v[-1] for k, v in parse_qs(query).items()}
        sync = opts.pop("synchronous", "normal").lower()
        if sync not in ("normal", "full") or opts:
            raise InventorySpecError(f"sqlite:{path}?{query}: the only option is synchronous=normal|full")
        self.path = Path(path)
        self.synchronous = sync
        self.where = f"sqlite:{self.path}"
        self._con: sqlite3.Connection | None = None
        try:
            fsutil.ensure_dir(self.dir)
            fsutil.ensure_dir(self.path.parent)
            with KeystoreLock(self.dir):
                migrate_json(self.dir / JSON_NAME, self.path, self)
                if not self.path.exists():
                    fsutil.atomic_write(self.path, b"")  # 0600 before SQLite creates it with the umask's mode
                self._con = self._connect(self.path)
                with self._tx() as cur:
                    self._create_schema(cur)
        except KeystoreError as e:
            raise InventoryError(f"inventory {self.where}: {e}") from e

    def _connect(self, path: Path, *, journal: str = "wal", synchronous: str | None = None) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            con.execute(f"PRAGMA journal_mode={journal}")
            con.execute(f"PRAGMA synchronous={synchronous or self.synchronous}")
        except sqlite3.DatabaseError as e:
            raise InventoryError(f"inventory {path} cannot be opened as an SQLite database: {e}") from e
        return con

    @contextlib.contextmanager
    def _tx(self, write: bool = True, con: sqlite3.Connection | None = None):
        con = con or self._con
        with self._lock:
            try:
                cur = con.cursor()
                cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield cur
                except BaseException:
                    con.rollback()
                    raise
                cur.execute("COMMIT")
            except sqlite3.OperationalError as e:
                if "locked" in str(e) or "busy" in str(e):
                    raise InventoryUnavailableError(f"inventory {self.where} is locked by another process for "
                                                    f"more than {BUSY_TIMEOUT_S:.0f} s") from e
                raise InventoryError(f"inventory {self.where}: {e}") from e
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.IntegrityError):
                    raise
                raise InventoryError(f"inventory {self.where}: {e}") from e

    def _merge_extra(self) -> str:
        return "json_patch(coalesce(extra, '{}'), ?)"

    def _is_unique_violation(self, e: Exception) -> bool:
        return isinstance(e, sqlite3.IntegrityError) and "UNIQUE" in str(e)

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None


# ---- JSON -> SQLite migration ---------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _discard(path: Path) -> None:
    for p in (path, path.with_name(path.name + "-journal"), path.with_name(path.name + "-wal"),
              path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _json_records(json_path: Path, raw: bytes) -> list[dict]:
    """The device records of an inventory.json. Raises InventoryError naming the file and device."""
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError) as e:
        raise InventoryError(f"cannot migrate {json_path}: it is not valid JSON ({e}); nothing was changed — "
                             "restore it from a backup or remove it to start with an empty inventory") from None
    if not isinstance(data, dict):
        raise InventoryError(f"cannot migrate {json_path}: it is not an inventory (a JSON object with 'devices'); "
                             "nothing was changed")
    devices = data.get("devices")
    if devices is None:
        devices = {}
    if not isinstance(devices, dict):
        raise InventoryError(f"cannot migrate {json_path}: 'devices' is not a mapping; nothing was changed")
    out = []
    certs = json_path.parent / "certs"
    for key, rec in sorted(devices.items()):
        where = f"{json_path}: device {key!r}"
        if not isinstance(rec, dict) or rec.get("id", key) != key:
            raise InventoryError(f"cannot migrate {where}: the record is malformed; nothing was changed")
        if not isinstance(rec.get("uri"), str) or not isinstance(rec.get("security"), str):
            raise InventoryError(f"cannot migrate {where}: 'uri' and 'security' are required; nothing was changed")
        r = dict(rec, id=key)
        try:
            for k in ("not_after", "enrolled_at", "next_renewal", "next_attempt", "added"):
                r[k] = to_epoch(r.get(k), k)
            # the checks and conversions a record added today gets (id, URI scheme, security, field types)
            check_device(key, r["uri"], r["security"])
            if r.get("state", STATES[0]) not in STATES:
                raise InventoryError(f"state {r['state']!r} is not one of {', '.join(STATES)}")
            encode_fields({k: v for k, v in r.items() if k != "id"})
        except InventoryError as e:
            raise InventoryError(f"cannot migrate {where}: {e}; nothing was changed") from None
        pem = certs / f"{key}.pem"
        if pem.is_file():
            r["certificate"] = pem.read_bytes()
        out.append(r)
    return out


def migrate_json(json_path: Path, db_path: Path, inv: SqliteInventory) -> int | None:
    """Migrate ``json_path`` into ``db_path`` if that has not happened (see module docstring); the caller holds
    the CLM directory's lock. Returns the number of devices migrated, or None if there was nothing to do."""
    from keystore import fsutil

    tmp = db_path.with_name(db_path.name + MIGRATING_SUFFIX)
    done = json_path.with_name(json_path.name + MIGRATED_SUFFIX)
    if db_path.exists():
        _discard(tmp)
        if json_path.exists():
            digest = hashlib.sha256(json_path.read_bytes()).hexdigest()
            con = inv._connect(db_path)
            try:
                with inv._tx(write=False, con=con) as cur:
                    cur.execute("SELECT value FROM inventory_meta WHERE key = 'migrated_from'")
                    row = cur.fetchone()
            finally:
                con.close()
            if row is not None and row[0] == digest:
                os.replace(json_path, done)  # finish step 4 of a migration interrupted after its commit point
                fsutil.fsync_dir(json_path.parent)
                log.info("finished migrating %s to %s", json_path, db_path)
            else:
                log.warning("%s exists next to the SQLite inventory %s and was not migrated into it; it is ignored",
                            json_path, db_path)
        return None
    if not json_path.exists():
        _discard(tmp)
        return None
    raw = json_path.read_bytes()
    records = _json_records(json_path, raw)
    _discard(tmp)  # a half-built file of an interrupted attempt
    fsutil.atomic_write(tmp, b"")
    con = inv._connect(tmp, journal="delete", synchronous="full")
    try:
        with inv._tx(con=con) as cur:
            inv._create_schema(cur)
            inv._insert(cur, records, replace=False)
            cur.execute("INSERT INTO inventory_meta (key, value) VALUES ('migrated_from', ?)",
                        (hashlib.sha256(raw).hexdigest(),))
    except sqlite3.IntegrityError as e:
        con.close()
        _discard(tmp)
        raise InventoryError(f"cannot migrate {json_path}: {e}; nothing was changed") from None
    except BaseException:
        con.close()
        _discard(tmp)
        raise
    con.close()
    _fsync_file(tmp)
    os.replace(tmp, db_path)  # the commit point
    fsutil.fsync_dir(db_path.parent)
    os.replace(json_path, done)
    fsutil.fsync_dir(json_path.parent)
    log.info("migrated %d device(s) from %s to %s (the JSON file is kept as %s)", len(records), json_path, db_path,
             done.name)
    return len(records)
