"""The shared inventory for several CLM workers: PostgreSQL through psycopg 3 (imported only here).

Workers claim due devices with ``UPDATE … WHERE id IN (SELECT … ORDER BY due_at LIMIT n FOR UPDATE SKIP
LOCKED)``: two workers claiming at the same instant skip each other's rows instead of waiting, and each device
is leased to one worker (``lease_owner``, ``lease_until`` by the database clock, fencing ``lease_token``).

Connection: any libpq URI, ``postgresql://USER@HOST[:PORT]/DATABASE[?PARAM=VALUE&…]``; passwords belong in
``~/.pgpass`` / ``PGPASSFILE`` (or the ``passfile`` parameter), TLS in ``sslmode=verify-full&sslrootcert=…``.
Unless the URI sets them, devagent adds ``connect_timeout=10``, TCP keepalives and ``tcp_user_timeout=30000``
(so a vanished database is noticed in about 30 s, not after TCP's 15-minute retransmission), and
``application_name=devagent-clm``. A connection lost mid-run is reopened on the next call; until then every call
raises ``InventoryUnavailableError`` and the scheduler backs off.
"""
from __future__ import annotations

import contextlib
import re

from agent.inventory import InventoryError, InventorySpecError, InventoryUnavailableError, redact
from agent.inventory.sql import SqlInventory

CONNECT_DEFAULTS = {"connect_timeout": "10", "keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5",
                    "keepalives_count": "3", "tcp_user_timeout": "30000", "application_name": "devagent-clm"}
SCHEMA_LOCK_KEY = 0x64657641  # pg_advisory_xact_lock key for schema creation ("devA")
# Connection failures that retrying will not fix: say so at once instead of backing off forever.
PERMANENT = re.compile(r"password authentication failed|no pg_hba\.conf entry|database \".*\" does not exist|"
                       r"role \".*\" does not exist|authentication|permission denied|SSL|certificate|"
                       r"invalid (?:connection option|sslmode|integer value)", re.I)
PSYCOPG_HINT = "install the PostgreSQL client: pip install 'devagent[postgres]' (psycopg 3)"


def _psycopg():
    try:
        import psycopg
    except ImportError as e:
        raise InventorySpecError(f"a postgresql:// inventory needs psycopg 3, which is not installed: "
                                 f"{PSYCOPG_HINT} ({e})") from None
    return psycopg


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class PostgresInventory(SqlInventory):
    PH = "%s"
    GREATEST = "GREATEST"
    NOW = "extract(epoch from now())::double precision"
    TYPES = {"text": "text", "time": "double precision", "real": "double precision", "int": "bigint",
             "json": "text", "blob": "bytea"}
    CLAIM_LOCK = " FOR UPDATE SKIP LOCKED"

    def __init__(self, conninfo: str, clm_dir):
        super().__init__(clm_dir)
        psycopg = _psycopg()
        self.where = redact(conninfo)
        try:
            params = psycopg.conninfo.conninfo_to_dict(conninfo)
        except psycopg.ProgrammingError as e:
            raise InventorySpecError(f"inventory {self.where}: not a valid PostgreSQL connection string: "
                                     f"{_first_line(e)}") from None
        self._conninfo = conninfo
        self._extra = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in params}
        self._conn = None
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
            self._create_schema(cur)

    def _connect(self):
        psycopg = _psycopg()
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True, **self._extra)
        except psycopg.ProgrammingError as e:
            raise InventorySpecError(f"inventory {self.where}: {_first_line(e)}") from None
        except psycopg.OperationalError as e:
            msg = _first_line(e)
            if PERMANENT.search(str(e)):
                raise InventorySpecError(f"inventory {self.where}: the database refused the connection: {msg}") \
                    from None
            raise InventoryUnavailableError(f"inventory {self.where} is unreachable: {msg}") from None
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _tx(self, write: bool = True):
        psycopg = _psycopg()
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            conn = self._conn
            try:
                with conn.transaction():
                    with conn.cursor() as cur:
                        yield cur
            except psycopg.errors.UniqueViolation:
                raise
            except psycopg.OperationalError as e:
                self._drop()
                raise InventoryUnavailableError(f"inventory {self.where}: lost the database connection: "
                                                f"{_first_line(e)}") from None
            except psycopg.Error as e:
                if conn.closed or conn.broken:
                    self._drop()
                    raise InventoryUnavailableError(f"inventory {self.where}: lost the database connection: "
                                                    f"{_first_line(e)}") from None
                raise InventoryError(f"inventory {self.where}: {_first_line(e)}") from None

    def _merge_extra(self) -> str:
        # jsonb_strip_nulls: setting a field to None removes it, as SQLite's json_patch (RFC 7396) does
        return "jsonb_strip_nulls(coalesce(extra, '{}')::jsonb || %s::jsonb)::text"

    def _is_unique_violation(self, e: Exception) -> bool:
        return isinstance(e, _psycopg().errors.UniqueViolation)

    def close(self) -> None:
        with self._lock:
            self._drop()
