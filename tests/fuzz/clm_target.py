"""The CLM inventory's file inputs as fuzz targets, through the ``devagent`` CLI in-process (click's entry point).

- ``clm_import``: ``devagent clm --clm-dir D import FILE [--format auto|csv|jsonl] [--replace]`` into an inventory
  that already holds devices. ``data[0]`` picks the format (``% 3``) and ``--replace`` (``// 3 % 2``); the rest is
  FILE.
- ``clm_migrate``: a CLM directory holding only ``inventory.json`` (the inventory of earlier versions), opened by
  ``devagent clm --clm-dir D list``, which migrates it to SQLite (``agent/inventory/sqlite.py``).

Properties: bad input never ends in exit 1 ("internal error", a foreign exception) and a refusal changes nothing
stored -- the inventory's rows (every table, compared as data: SQLite's -wal/-shm files come and go with each
connection) and every other file under D. An accepted migration leaves ``inventory.sqlite`` and
``inventory.json.migrated``, and no ``inventory.json``.
"""
from __future__ import annotations

import functools
import hashlib
import shutil
import sqlite3
from pathlib import Path

from tests.fuzz.engine import StateChanged

FORMATS = ("auto", "csv", "jsonl")
MAX_DEVICES = 200  # accepted imports fill the inventory: start afresh beyond this
SQLITE_SUFFIXES = ("inventory.sqlite", "inventory.sqlite-wal", "inventory.sqlite-shm", "inventory.sqlite-journal")


class Refused(Exception):
    """The CLI refused the input with a documented exit code (2 usage, 7 configuration...)."""


def _rows(db: Path) -> str:
    """A digest of every row of every table of the inventory (its stored content), "" without a database."""
    if not db.exists():
        return ""
    con = sqlite3.connect(db)
    try:
        h = hashlib.sha256()
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        for t in tables:
            h.update(t.encode())
            for row in sorted(repr(r) for r in con.execute(f'SELECT * FROM "{t}"')):
                h.update(row.encode())
        return h.hexdigest()
    finally:
        con.close()


def state(d: Path) -> dict:
    from tests.fuzz.targets import snapshot

    files = {k: v for k, v in snapshot(d).items() if k not in SQLITE_SUFFIXES}
    return {"rows": _rows(d / "inventory.sqlite"), "files": files}


def _cli(args: list[str]):
    from tests.fuzz.targets import invoke_cli, tmpdir

    r = invoke_cli(["--state-dir", str(tmpdir() / "clm-state"), *args])
    if r.exit_code == 1 or "internal error" in r.output:
        exc = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
        raise exc or RuntimeError(f"CLI internal error: {r.output.strip()[-200:]}")
    return r


@functools.lru_cache(maxsize=1)
def _seed_devices() -> tuple:
    from agent.inventory import new_record

    return tuple(new_record(f"plc-{i}", f"coap://10.0.0.{i + 1}:5683", subject=f"CN=plc-{i}", san=(f"dns:plc-{i}",))
                 for i in range(3))


def _import_dir() -> Path:
    from agent.inventory import open_inventory
    from tests.fuzz.targets import tmpdir

    d = tmpdir() / "clm-import"
    if d.exists():
        inv = open_inventory(None, d)
        try:
            full = len(inv.list()) > MAX_DEVICES
        finally:
            inv.close()
        if not full:
            return d
        shutil.rmtree(d)
    d.mkdir(parents=True)
    inv = open_inventory(None, d)
    try:
        inv.add_many(list(_seed_devices()))
    finally:
        inv.close()
    return d


def clm_import(data: bytes) -> None:
    if not data:
        return
    d = _import_dir()
    src = d.parent / "clm-import-input"
    src.write_bytes(data[1:])
    args = ["clm", "--clm-dir", str(d), "import", str(src), "--format", FORMATS[data[0] % 3]]
    if data[0] // 3 % 2:
        args.append("--replace")
    before = state(d)
    r = _cli(args)
    if r.exit_code != 0:
        after = state(d)
        if after != before:
            raise StateChanged(f"refused clm import (exit {r.exit_code}) changed the inventory")
        raise Refused(r.exit_code)


def clm_migrate(data: bytes) -> None:
    from tests.fuzz.targets import tmpdir

    d = tmpdir() / "clm-migrate"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    (d / "inventory.json").write_bytes(data)
    before = state(d)
    r = _cli(["clm", "--clm-dir", str(d), "list"])
    if r.exit_code != 0:
        after = state(d)
        if after != before:
            raise StateChanged(f"refused migration (exit {r.exit_code}) changed {sorted(set(after['files']) ^ set(before['files']))}")
        raise Refused(r.exit_code)
    if (d / "inventory.json").exists() or not (d / "inventory.json.migrated").exists() or \
            not (d / "inventory.sqlite").exists():
        raise StateChanged("an accepted migration left the JSON inventory in place or no SQLite inventory")
