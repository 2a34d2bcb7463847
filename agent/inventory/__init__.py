"""The CLM's device inventory: one small interface, two databases.

``open_inventory(spec, clm_dir)`` returns an ``Inventory``:

- ``sqlite:PATH`` (default ``CLM_DIR/inventory.sqlite``): stdlib ``sqlite3`` in WAL mode, one row per device. An
  ``inventory.json`` of earlier versions in the CLM directory is migrated on first open, crash-safely
  (``agent.inventory.sqlite``).
- ``postgresql://USER@HOST[:PORT]/DB[?…]``: PostgreSQL through psycopg 3, for a CLM that runs as several workers
  on one or more machines (``agent.inventory.postgres``).

A record is a plain ``dict`` (``FIELDS`` plus any extension field, kept in the ``extra`` column): times are ISO
8601 UTC strings, ``san`` a list. Certificates are stored with the record (``certificate()``), never keys.

Scheduling is in the database: ``claim`` hands a worker up to ``limit`` due devices under a **lease** (worker id,
expiry, and a fencing ``lease_token`` that grows with every claim). While a lease holds, no other worker can
claim the device; ``extend`` keeps it alive, ``complete`` records the result and ends it — but only if the token is
still the worker's, so a worker whose lease expired (killed, partitioned, stalled) can never overwrite the result
of the worker that took the device over. A device is due when ``due_at <= now``: ``due_at`` is a generated column,
the later of ``next_attempt`` (back-off after a failure) and, for an operational device, ``next_renewal``.

Invariants:
- Every method is one database transaction: a crash at any instant leaves the previous or the new state.
- Bad input (unknown security method, malformed URI or name, unknown device) raises ``InventoryError`` naming
  what and where, with nothing stored. A database that cannot be reached raises ``InventoryUnavailableError``
  (transient: the scheduler backs off and retries); a malformed or refused connection string raises
  ``InventorySpecError`` naming it (the password redacted).
- Nothing here holds key material: the CLM never sees device private keys.
"""
from __future__ import annotations

import abc
import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

STATES = ("not operational", "operational")
SQLITE_NAME = "inventory.sqlite"
JSON_NAME = "inventory.json"  # the inventory of earlier versions, migrated on first open
SCHEMA_VERSION = 1

# column -> kind. "time" columns are stored as epoch seconds and shown as ISO 8601 UTC strings.
COLUMNS: dict[str, str] = {
    "id": "text", "uri": "text", "security": "text", "context": "text", "state": "text", "subject": "text",
    "san": "json", "key_type": "text", "name": "text", "domain": "text", "profile": "text",
    "not_after": "time", "serial": "text", "last_error": "text", "failures": "int", "enrolled_at": "time",
    "next_renewal": "time", "next_attempt": "time", "added": "time", "enrollments": "int", "enrolled_by": "text",
    "last_duration_s": "real", "lease_owner": "text", "lease_until": "time", "lease_token": "int",
    "extra": "json",
}
FIELDS = tuple(c for c in COLUMNS if c != "extra")
LEASE_FIELDS = ("lease_owner", "lease_until", "lease_token")
WRITABLE = tuple(c for c in FIELDS if c not in ("id", *LEASE_FIELDS))
# Security method -> URI schemes it is reached over (``add`` refuses other combinations).
SECURITY_SCHEMES: dict[str, tuple[str, ...]] = {
    "oscore": ("coap", "coaps"), "dtls-psk": ("coap", "coaps"), "hmac": ("coap",), "none": ("coap", "coaps"),
    "opcua": ("opc.tcp",),  # OPC UA push management (agent/opcua/clm_push.py, docs/opcua.md)
}


class InventoryError(Exception):
    """Bad input to the inventory or an unknown device; nothing was stored."""


class InventorySpecError(InventoryError):
    """The inventory location (``--inventory`` / ``[clm] inventory``) is malformed or refused."""


class InventoryUnavailableError(InventoryError):
    """The database cannot be reached right now (down, restarting, network); retry later."""


# ---- value conversion (shared by the backends) -------------------------------------------------------------------
MIN_EPOCH = -62135596800.0  # 0001-01-01T00:00:00Z
MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z
INT64 = 2 ** 63


def to_epoch(value: Any, field: str) -> float | None:
    """ISO 8601 string / aware datetime / number -> epoch seconds. Raises InventoryError naming the field."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InventoryError(f"{field}: {value!r} is not a time")
    if isinstance(value, (int, float)):
        v = float(value) if abs(value) < 1e300 else float("inf")
        if not MIN_EPOCH <= v <= MAX_EPOCH:  # also NaN and infinity: no time a datetime can show
            raise InventoryError(f"{field}: {value!r} is not a time between the years 1 and 9999")
        return v
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InventoryError(f"{field}: {value!r} is not an ISO 8601 time (e.g. 2026-05-01T12:00:00+00:00)") \
                from None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise InventoryError(f"{field}: {value.isoformat()} has no time zone (add +00:00 or Z)")
        return value.timestamp()
    raise InventoryError(f"{field}: {value!r} is not a time")


def to_iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat()


def encode_fields(fields: dict) -> dict:
    """Record fields -> column values (times to epoch, json to text, unknown names into ``extra``)."""
    out: dict = {}
    extra: dict = {}
    for k, v in fields.items():
        kind = COLUMNS.get(k)
        if kind is None or k == "extra":
            if k == "extra":
                if not isinstance(v, dict):
                    raise InventoryError(f"extra: {v!r} must be a mapping")
                extra.update(v)
            else:
                extra[k] = v
            continue
        if kind == "time":
            out[k] = to_epoch(v, k)
        elif kind == "json":
            if v is not None and (not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v)):
                raise InventoryError(f"{k}: {v!r} must be a list of strings")
            out[k] = json.dumps(list(v) if v is not None else [])
        elif kind == "int":
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not -INT64 <= v < INT64):
                raise InventoryError(f"{k}: {v!r} must be an integer (64 bits)")
            out[k] = v or 0
        elif kind == "real":
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(float(v) if abs(v) < 1e300 else math.inf)):
                raise InventoryError(f"{k}: {v!r} must be a finite number")
            out[k] = None if v is None else float(v)
        else:
            if v is not None and not isinstance(v, str):
                raise InventoryError(f"{k}: {v!r} must be text")
            out[k] = v
    if extra:
        for k in extra:
            if not isinstance(k, str) or not k or len(k) > 64:
                raise InventoryError(f"extension field name {k!r} must be 1-64 characters")
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise InventoryError(f"extension fields must be JSON values: {e}") from None
        out["extra"] = extra  # merged with the stored extra by the backend
    return out


def decode_row(row: dict) -> dict:
    """Column values -> a record dict."""
    rec: dict = {}
    for k, kind in COLUMNS.items():
        if k not in row:
            continue
        v = row[k]
        if kind == "time":
            rec[k] = to_iso(v)
        elif k == "san":
            rec[k] = json.loads(v) if v else []
        elif k == "extra":
            continue
        elif kind == "int":
            rec[k] = int(v or 0)
        else:
            rec[k] = v
    if row.get("extra"):
        for k, v in json.loads(row["extra"]).items():
            rec.setdefault(k, v)
    return rec


def check_device(device_id: str, uri: str, security: str) -> None:
    """The checks ``add`` makes before anything is stored. Raises InventoryError."""
    from keystore.store import check_name

    try:
        check_name(device_id, "device id")
    except ValueError as e:
        raise InventoryError(str(e)) from None
    if security not in SECURITY_SCHEMES:
        raise InventoryError(f"unknown security method {security!r}; use oscore, dtls-psk, hmac (MicroPython "
                             "boards), opcua (OPC UA push management) or none")
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme not in ("coap", "coaps", "opc.tcp"):
        raise InventoryError(f"device URI {uri!r} must start with coap:// or coaps:// (opc.tcp:// for an OPC UA "
                             "device)")
    if (scheme == "opc.tcp") != (security == "opcua"):
        raise InventoryError(f"device URI {uri!r}: an OPC UA device is added with --opcua and reached over "
                             "opc.tcp://; CoAP devices over coap:// or coaps://")
    if scheme not in SECURITY_SCHEMES[security]:
        raise InventoryError(f"device URI {uri!r}: an HMAC-protected board (agent/mpy) is reached over coap://")


def new_record(device_id: str, uri: str, *, security: str = "none", context: str | None = None,
               subject: str | None = None, san: Sequence[str] = (), key_type: str | None = None,
               name: str | None = None, domain: str | None = None, profile: str | None = None,
               **extra) -> dict:
    check_device(device_id, uri, security)
    rec = {"id": device_id, "uri": uri.rstrip("/"), "security": security, "context": context,
           "state": "not operational", "not_after": None, "last_error": None, "subject": subject,
           "san": list(san), "key_type": key_type, "name": name, "domain": domain, "profile": profile,
           "failures": 0, "enrolled_at": None, "next_renewal": None, "next_attempt": None, "serial": None,
           "added": time.time(), "enrollments": 0, "enrolled_by": None, "last_duration_s": None}
    rec.update(extra)
    return rec


# ---- the interface -------------------------------------------------------------------------------------------------
class Inventory(abc.ABC):
    """Devices the CLM manages. Use ``open_inventory``; every method is one transaction."""

    dir: Path  # the CLM directory (device contexts live below it)
    where: str  # where the inventory is, for messages (a PostgreSQL password is never shown)

    # -- devices ------------------------------------------------------------------------------------------------
    def add(self, device_id: str, uri: str, *, replace: bool = False, **fields) -> dict:
        """Register a device (state "not operational"). Fields: security, context, subject, san, key_type, name,
        domain, profile, and extension fields. Raises InventoryError (bad value, exists and not ``replace``)."""
        rec = new_record(device_id, uri, **fields)
        self.add_many([rec], replace=replace)
        return self.get(device_id)

    @abc.abstractmethod
    def add_many(self, records: Iterable[dict], *, replace: bool = False) -> int:
        """Insert complete records (``new_record``) in one transaction; all or nothing. Returns the count."""

    @abc.abstractmethod
    def get(self, device_id: str) -> dict:
        """Raises InventoryError for an unknown device."""

    @abc.abstractmethod
    def list(self, *, state: str | None = None, due_before: Any = None, error: str | None = None,
             failing: bool = False, limit: int | None = None) -> list[dict]:
        """Records ordered by id. ``due_before``: due at or before that time (ISO/datetime/epoch; due now:
        ``time.time()``); ``error``: last error contains this text; ``failing``: has a last error."""

    @abc.abstractmethod
    def update(self, device_id: str, **fields) -> dict:
        """Set fields of one device (not its lease). Raises InventoryError for an unknown device or bad value."""

    @abc.abstractmethod
    def remove(self, device_id: str) -> bool:
        """Delete a device; False if it was not there."""

    @abc.abstractmethod
    def set_due(self, ids: Sequence[str] | None = None, at: Any = None) -> int:
        """Make devices (``ids``, or all) due at ``at`` (default: now) by setting ``next_renewal`` and clearing
        back-off; running workers pick them up. Returns how many rows changed."""

    @abc.abstractmethod
    def certificate(self, device_id: str) -> bytes | None:
        """The PEM chain (leaf first) last issued to the device, or None."""

    @abc.abstractmethod
    def summary(self) -> dict:
        """Counts for ``clm status``: devices, by_state, due_now, failing, leased (by worker), next_due."""

    # -- scheduling ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def claim(self, worker: str, *, limit: int, lease_s: float, ids: Sequence[str] | None = None) -> list[dict]:
        """Lease up to ``limit`` due devices (earliest ``due_at`` first) that no live lease holds; with ``ids``,
        those devices whether due or not. Returns their records with ``lease_token``."""

    @abc.abstractmethod
    def extend(self, worker: str, leases: Sequence[tuple[str, int]], lease_s: float) -> set[str]:
        """Push the expiry of ``worker``'s leases (device id, token) ``lease_s`` ahead; returns the ids still
        held (a lease that expired and was claimed by another worker is not)."""

    @abc.abstractmethod
    def complete(self, device_id: str, worker: str, token: int, fields: dict,
                 certificate: bytes | None = None) -> bool:
        """Record a renewal result and end the lease, if ``(worker, token)`` still holds it; else change nothing
        and return False (the device was taken over)."""

    @abc.abstractmethod
    def release(self, device_id: str, worker: str, token: int) -> None:
        """End a lease without recording anything (worker stopping)."""

    @abc.abstractmethod
    def next_due_in(self) -> float | None:
        """Seconds until the earliest unleased device falls due (0 if one is due now), None if there is none."""

    @abc.abstractmethod
    def due(self, now: Any = None) -> list[str]:
        """Ids of the devices due at ``now`` (default: the database's clock) and not leased, earliest first."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the database connection (the object is unusable afterwards)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parse_spec(spec: str | None, clm_dir: str | os.PathLike) -> tuple[str, str]:
    """(kind, location) for an inventory spec; kind is ``sqlite`` or ``postgresql``. Raises InventorySpecError."""
    if not spec:
        return "sqlite", str(Path(clm_dir) / SQLITE_NAME)
    if spec.startswith("sqlite:"):
        path = spec[len("sqlite:"):]
        if path.startswith("//"):
            path = path[2:]  # sqlite:///abs/path as well as sqlite:/abs/path and sqlite:rel/path
        if not path:
            raise InventorySpecError("inventory sqlite: needs a path (sqlite:/var/lib/devagent/clm/inventory.sqlite)")
        return "sqlite", os.path.abspath(path)
    if spec.startswith(("postgresql://", "postgres://")):
        return "postgresql", spec
    raise InventorySpecError(f"inventory {redact(spec)!r}: use sqlite:PATH or postgresql://USER@HOST[:PORT]/DATABASE")


def redact(spec: str) -> str:
    """A connection string without its password (URI userinfo or password= parameter)."""
    import re

    spec = re.sub(r"(://[^:/@?]*):[^@/?]*@", r"\1:***@", spec)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", spec)


def open_inventory(spec: str | None, clm_dir: str | os.PathLike) -> Inventory:
    """The inventory for ``spec`` (see module docstring); ``clm_dir`` holds device contexts and the default
    SQLite file. Raises InventorySpecError, InventoryUnavailableError, InventoryError."""
    kind, where = parse_spec(spec, clm_dir)
    if kind == "sqlite":
        from agent.inventory.sqlite import SqliteInventory

        return SqliteInventory(where, clm_dir)
    from agent.inventory.postgres import PostgresInventory

    return PostgresInventory(where, clm_dir)
