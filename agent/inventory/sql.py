"""The SQL both inventory backends share: schema, queries, leases. A backend supplies the dialect.

Times are epoch seconds (double precision) in both databases, so the generated ``due_at`` column and the lease
comparisons are the same expressions; "now" is the database's clock (``_NOW``), so workers on several machines
agree on lease expiry without trusting each other's clocks.
"""
from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Iterable, Sequence

from agent.inventory import (
    COLUMNS, SCHEMA_VERSION, STATES, WRITABLE, Inventory, InventoryError, decode_row, encode_fields, to_epoch,
    to_iso,
)

SELECT_COLUMNS = tuple(COLUMNS) + ("due_at",)
_DEFAULTS = {"failures": 0, "enrollments": 0, "lease_token": 0, "san": "[]", "state": "not operational"}


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class SqlInventory(Inventory):
    """Shared implementation over a DB-API connection. Subclasses set the dialect attributes and ``_connect``."""

    PH = "?"  # parameter placeholder
    GREATEST = "max"  # n-ary maximum
    NOW = ""  # SQL expression: the database's current time in epoch seconds
    TYPES = {"text": "TEXT", "time": "REAL", "real": "REAL", "int": "INTEGER", "json": "TEXT", "blob": "BLOB"}
    CLAIM_LOCK = ""  # appended to the claim subquery (PostgreSQL: FOR UPDATE SKIP LOCKED)

    def __init__(self, clm_dir):
        self.dir = Path(clm_dir)
        self._lock = threading.RLock()

    # -- dialect hooks -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self, write: bool = True):
        """A cursor inside one transaction (committed on success, rolled back on error)."""
        raise NotImplementedError

    def _merge_extra(self) -> str:
        """SQL that merges the JSON object parameter into the ``extra`` column."""
        raise NotImplementedError

    def _is_unique_violation(self, e: Exception) -> bool:
        raise NotImplementedError

    # -- schema ------------------------------------------------------------------------------------------------
    def _schema(self) -> list[str]:
        t = self.TYPES
        cols = []
        for name, kind in COLUMNS.items():
            decl = f"{name} {t[kind]}"
            if name == "id":
                decl += " PRIMARY KEY"
            elif name in ("uri", "security", "state"):
                decl += " NOT NULL"
            elif name in ("failures", "enrollments", "lease_token"):
                decl += " NOT NULL DEFAULT 0"
            cols.append(decl)
        cols.append(f"certificate {t['blob']}")
        g = self.GREATEST
        cols.append(f"due_at {t['time']} GENERATED ALWAYS AS ({g}(coalesce(next_attempt, 0), CASE WHEN state = "
                    "'operational' THEN coalesce(next_renewal, 0) ELSE 0 END)) STORED")
        return [
            f"CREATE TABLE IF NOT EXISTS devices ({', '.join(cols)})",
            "CREATE INDEX IF NOT EXISTS devices_due ON devices (due_at)",
            "CREATE INDEX IF NOT EXISTS devices_state ON devices (state)",
            "CREATE INDEX IF NOT EXISTS devices_failing ON devices (id) WHERE last_error IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS devices_leased ON devices (lease_owner) WHERE lease_owner IS NOT NULL",
            f"CREATE TABLE IF NOT EXISTS inventory_meta (key {t['text']} PRIMARY KEY, value {t['text']})",
        ]

    def _create_schema(self, cur) -> None:
        for stmt in self._schema():
            cur.execute(stmt)
        p = self.PH
        cur.execute(f"SELECT value FROM inventory_meta WHERE key = {p}", ("schema",))
        row = cur.fetchone()
        if row is None:
            cur.execute(f"INSERT INTO inventory_meta (key, value) VALUES ({p}, {p})", ("schema", str(SCHEMA_VERSION)))
        elif int(row[0]) > SCHEMA_VERSION:
            raise InventoryError(f"inventory {self.where} has schema version {row[0]}, newer than this devagent "
                                 f"understands ({SCHEMA_VERSION}); upgrade devagent on this machine")

    # -- helpers -------------------------------------------------------------------------------------------------
    def _select(self, where: str = "", params: Sequence = (), tail: str = "") -> list[dict]:
        sql = f"SELECT {', '.join(SELECT_COLUMNS)} FROM devices"
        if where:
            sql += " WHERE " + where
        with self._tx(write=False) as cur:
            cur.execute(sql + tail, tuple(params))
            rows = cur.fetchall()
        return [self._decode(r) for r in rows]

    @staticmethod
    def _decode(row) -> dict:
        d = dict(zip(SELECT_COLUMNS, row, strict=True))
        rec = decode_row(d)
        rec["due_at"] = to_iso(d["due_at"]) if d.get("due_at") else None  # None: due since it was added
        return rec

    def _set_clause(self, cols: dict) -> tuple[str, list]:
        parts, params = [], []
        for k, v in cols.items():
            if k == "extra":
                parts.append(f"extra = {self._merge_extra()}")
                params.append(json.dumps(v))
            else:
                parts.append(f"{k} = {self.PH}")
                params.append(v)
        return ", ".join(parts), params

    @staticmethod
    def _check_fields(fields: dict) -> dict:
        bad = [k for k in fields if k in ("id", "due_at", "certificate", "lease_owner", "lease_until", "lease_token")]
        if bad:
            raise InventoryError(f"cannot set {', '.join(bad)} with update (leases belong to the scheduler)")
        if "state" in fields and fields["state"] not in STATES:
            raise InventoryError(f"state {fields['state']!r}: use one of {', '.join(STATES)}")
        return encode_fields(fields)

    # -- devices ------------------------------------------------------------------------------------------------
    def add_many(self, records: Iterable[dict], *, replace: bool = False) -> int:
        records = list(records)
        if not records:
            return 0
        try:
            with self._tx() as cur:
                self._insert(cur, records, replace)
        except Exception as e:
            if self._is_unique_violation(e):
                ids = [r["id"] for r in records]
                which = ids[0] if len(ids) == 1 else f"one of {len(ids)} devices ({ids[0]}…)"
                raise InventoryError(f"device {which} is already in the inventory (use --replace)") from None
            raise
        return len(records)

    def _insert(self, cur, records: Sequence[dict], replace: bool) -> None:
        """INSERT complete records; a ``certificate`` key (PEM bytes) fills the certificate column."""
        names = ["id", *WRITABLE, "extra", "certificate"]
        values = []
        for rec in records:
            cols = encode_fields({k: v for k, v in rec.items() if k not in ("id", "certificate", "due_at",
                                                                             "lease_owner", "lease_until",
                                                                             "lease_token")})
            cols["id"] = rec["id"]
            cols["extra"] = json.dumps(cols["extra"]) if "extra" in cols else None
            cols["certificate"] = rec.get("certificate")
            values.append(tuple(cols.get(n, _DEFAULTS.get(n)) for n in names))
        p = self.PH
        sql = f"INSERT INTO devices ({', '.join(names)}) VALUES ({', '.join(p for _ in names)})"
        if replace:
            sql += " ON CONFLICT (id) DO UPDATE SET " + ", ".join(f"{n} = excluded.{n}" for n in names if n != "id")
        cur.executemany(sql, values)

    def get(self, device_id: str) -> dict:
        rows = self._select(f"id = {self.PH}", (device_id,))
        if not rows:
            raise InventoryError(f"no device {device_id!r} in the inventory at {self.where} (see 'devagent clm list')")
        return rows[0]

    def list(self, *, state=None, due_before=None, error=None, failing=False, limit=None) -> list[dict]:
        p = self.PH
        where, params = [], []
        if state is not None:
            if state not in STATES:
                raise InventoryError(f"state {state!r}: use one of {', '.join(STATES)}")
            where.append(f"state = {p}")
            params.append(state)
        if due_before is not None:
            where.append(f"due_at <= {p}")
            params.append(to_epoch(due_before, "due before"))
        if error:
            where.append(f"last_error LIKE {p} ESCAPE '\\'")
            params.append(f"%{_like_escape(error)}%")
        if failing:
            where.append("last_error IS NOT NULL")
        tail = " ORDER BY id"
        if limit is not None:
            tail += f" LIMIT {int(limit)}"
        return self._select(" AND ".join(where), params, tail)

    def update(self, device_id: str, **fields) -> dict:
        cols = self._check_fields(fields)
        if cols:
            sql, params = self._set_clause(cols)
            with self._tx() as cur:
                cur.execute(f"UPDATE devices SET {sql} WHERE id = {self.PH}", (*params, device_id))
                if cur.rowcount != 1:
                    raise InventoryError(f"no device {device_id!r} in the inventory at {self.where}")
        return self.get(device_id)

    def remove(self, device_id: str) -> bool:
        with self._tx() as cur:
            cur.execute(f"DELETE FROM devices WHERE id = {self.PH}", (device_id,))
            return cur.rowcount == 1

    def set_due(self, ids: Sequence[str] | None = None, at=None) -> int:
        p = self.PH
        when, params = (self.NOW, []) if at is None else (p, [to_epoch(at, "at")])
        sql = f"UPDATE devices SET next_renewal = {when}, next_attempt = NULL"
        if ids is not None:
            if not ids:
                return 0
            sql += f" WHERE id IN ({', '.join(p for _ in ids)})"
            params += list(ids)
        with self._tx() as cur:
            cur.execute(sql, tuple(params))
            return cur.rowcount

    def certificate(self, device_id: str) -> bytes | None:
        with self._tx(write=False) as cur:
            cur.execute(f"SELECT certificate FROM devices WHERE id = {self.PH}", (device_id,))
            row = cur.fetchone()
        if row is None:
            raise InventoryError(f"no device {device_id!r} in the inventory at {self.where}")
        return bytes(row[0]) if row[0] is not None else None

    def summary(self) -> dict:
        now = self.NOW
        with self._tx(write=False) as cur:
            cur.execute("SELECT state, count(*) FROM devices GROUP BY state")
            by_state = {s: int(n) for s, n in cur.fetchall()}
            cur.execute(f"SELECT count(*) FROM devices WHERE due_at <= {now} AND (lease_until IS NULL OR "
                        f"lease_until <= {now})")
            due_now = int(cur.fetchone()[0])
            cur.execute("SELECT count(*) FROM devices WHERE last_error IS NOT NULL")
            failing = int(cur.fetchone()[0])
            cur.execute(f"SELECT lease_owner, count(*) FROM devices WHERE lease_owner IS NOT NULL AND lease_until > "
                        f"{now} GROUP BY lease_owner")
            leased = {w: int(n) for w, n in cur.fetchall()}
            cur.execute(f"SELECT min(due_at), {now} FROM devices")
            nd, db_now = cur.fetchone()
        return {"inventory": self.where, "devices": sum(by_state.values()), "by_state": by_state, "due_now": due_now,
                "failing": failing, "leased": leased, "next_due": to_iso(nd), "database_time": to_iso(db_now)}

    # -- scheduling ---------------------------------------------------------------------------------------------
    def claim(self, worker: str, *, limit: int, lease_s: float, ids: Sequence[str] | None = None) -> list[dict]:
        if limit <= 0 or (ids is not None and not ids):
            return []
        p, now = self.PH, self.NOW
        free = f"(lease_until IS NULL OR lease_until <= {now})"
        if ids is None:
            sub = (f"SELECT id FROM devices WHERE due_at <= {now} AND {free} ORDER BY due_at LIMIT {int(limit)}"
                   f"{self.CLAIM_LOCK}")
            sub_params: tuple = ()
        else:
            sub = f"SELECT id FROM devices WHERE id IN ({', '.join(p for _ in ids)}) AND {free}{self.CLAIM_LOCK}"
            sub_params = tuple(ids)
        sql = (f"UPDATE devices SET lease_owner = {p}, lease_until = {now} + {p}, lease_token = lease_token + 1 "
               f"WHERE id IN ({sub}) RETURNING {', '.join(SELECT_COLUMNS)}")
        with self._tx() as cur:
            cur.execute(sql, (worker, float(lease_s), *sub_params))
            rows = cur.fetchall()
        recs = [self._decode(r) for r in rows]
        recs.sort(key=lambda r: r["due_at"] or "")
        return recs

    def extend(self, worker: str, leases: Sequence[tuple[str, int]], lease_s: float) -> set[str]:
        if not leases:
            return set()
        p, now = self.PH, self.NOW
        want = dict(leases)
        sql = (f"UPDATE devices SET lease_until = {now} + {p} WHERE lease_owner = {p} AND lease_until > {now} AND "
               f"id IN ({', '.join(p for _ in want)}) RETURNING id, lease_token")
        with self._tx() as cur:
            cur.execute(sql, (float(lease_s), worker, *want))
            rows = cur.fetchall()
        return {i for i, tok in rows if want.get(i) == int(tok)}

    def complete(self, device_id: str, worker: str, token: int, fields: dict,
                 certificate: bytes | None = None) -> bool:
        cols = self._check_fields(fields)
        sql, params = self._set_clause(cols)
        sets = [s for s in (sql, "lease_owner = NULL", "lease_until = NULL") if s]
        if certificate is not None:
            sets.append(f"certificate = {self.PH}")
            params.append(certificate)
        p = self.PH
        with self._tx() as cur:
            cur.execute(f"UPDATE devices SET {', '.join(sets)} WHERE id = {p} AND lease_owner = {p} AND "
                        f"lease_token = {p}", (*params, device_id, worker, int(token)))
            return cur.rowcount == 1

    def release(self, device_id: str, worker: str, token: int) -> None:
        p = self.PH
        with self._tx() as cur:
            cur.execute(f"UPDATE devices SET lease_owner = NULL, lease_until = NULL WHERE id = {p} AND "
                        f"lease_owner = {p} AND lease_token = {p}", (device_id, worker, int(token)))

    def next_due_in(self) -> float | None:
        now, g = self.NOW, self.GREATEST
        with self._tx(write=False) as cur:
            cur.execute(f"SELECT due_at - {now} FROM devices WHERE lease_owner IS NULL ORDER BY due_at LIMIT 1")
            a = cur.fetchone()
            cur.execute(f"SELECT min({g}(due_at, lease_until)) - {now} FROM devices WHERE lease_owner IS NOT NULL")
            b = cur.fetchone()
        vals = [float(r[0]) for r in (a, b) if r is not None and r[0] is not None]
        return max(0.0, min(vals)) if vals else None

    def due(self, now: float | None = None) -> list[str]:
        if now is None:
            cond, params = self.NOW, ()
        else:
            cond, params = self.PH, (to_epoch(now, "now"),)
        sql = (f"SELECT id FROM devices WHERE due_at <= {cond} AND (lease_until IS NULL OR lease_until <= {cond}) "
               "ORDER BY due_at")
        with self._tx(write=False) as cur:
            cur.execute(sql, params * 2)
            return [r[0] for r in cur.fetchall()]
