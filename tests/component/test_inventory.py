"""The inventory contract, run against both implementations: SQLite (a file in a temp CLM directory) and a real
PostgreSQL server the session starts itself (tests/peers/postgres.py). Leases are exercised with real
concurrency: several connections claiming at once."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from agent.inventory import (
    InventoryError, InventorySpecError, InventoryUnavailableError, new_record, open_inventory, parse_spec, redact,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def spec(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'inv.sqlite'}"
    return request.getfixturevalue("postgres").create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def inv(spec, tmp_path):
    i = open_inventory(spec, tmp_path / "clm")
    yield i
    i.close()


def wait_for(cond, timeout_s=30.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_add_get_update_remove_roundtrip(inv, spec, tmp_path):
    rec = inv.add("dev1", "coap://127.0.0.1:5683/", security="oscore", context="/ctx/dev1", san=["dns:d1.plant"],
                  subject="CN=dev1", domain="plant", line="L3")
    assert rec["uri"] == "coap://127.0.0.1:5683" and rec["state"] == "not operational" and rec["failures"] == 0
    assert rec["san"] == ["dns:d1.plant"] and rec["line"] == "L3" and rec["added"].endswith("+00:00")
    assert rec["lease_owner"] is None and rec["due_at"] is None  # never enrolled: due at once
    up = inv.update("dev1", state="operational", not_after="2030-01-01T00:00:00Z", serial="ab", line="L4", bay=2)
    assert up["not_after"] == "2030-01-01T00:00:00+00:00" and up["line"] == "L4" and up["bay"] == 2
    assert inv.get("dev1") == up
    assert "bay" not in inv.update("dev1", bay=None)  # an extension field set to None is removed
    up = inv.update("dev1", bay=2)
    # a second object (another process) sees the same state
    other = open_inventory(spec, tmp_path / "clm")
    try:
        assert other.get("dev1") == up
    finally:
        other.close()
    assert inv.remove("dev1") is True and inv.remove("dev1") is False
    with pytest.raises(InventoryError, match="no device 'dev1'"):
        inv.get("dev1")


@pytest.mark.parametrize("args, match", [
    (("bad id!", "coap://h:1"), "invalid device id"),
    (("d", "http://h:1"), "must start with coap:// or coaps://"),
    (("d", "coaps://h:1", {"security": "hmac"}), "reached over coap://"),
    (("d", "coap://h:1", {"security": "psk"}), "unknown security method 'psk'"),
])
def test_bad_input_stores_nothing(inv, args, match):
    inv.add("keep", "coap://h:1")
    before = inv.list()
    kw = args[2] if len(args) > 2 else {}
    with pytest.raises(InventoryError, match=match):
        inv.add(args[0], args[1], **kw)
    assert inv.list() == before


def test_duplicates_and_bad_updates_change_nothing(inv):
    inv.add("dev1", "coap://h:1")
    before = inv.list()
    with pytest.raises(InventoryError, match="already in the inventory"):
        inv.add("dev1", "coap://h:2")
    with pytest.raises(InventoryError, match="already in the inventory"):
        inv.add_many([new_record("dev2", "coap://h:2"), new_record("dev1", "coap://h:3")])
    with pytest.raises(InventoryError, match="no device 'nope'"):
        inv.update("nope", state="operational")
    with pytest.raises(InventoryError, match="leases belong to the scheduler"):
        inv.update("dev1", lease_owner="me")
    with pytest.raises(InventoryError, match="state 'broken'"):
        inv.update("dev1", state="broken")
    with pytest.raises(InventoryError, match="next_renewal: 'soon' is not an ISO 8601 time"):
        inv.update("dev1", next_renewal="soon")
    assert inv.list() == before  # all-or-nothing: dev2 of the failed batch is not there either
    inv.add("dev1", "coap://h:9", replace=True)
    assert inv.get("dev1")["uri"] == "coap://h:9"


def test_list_filters(inv):
    now = time.time()
    inv.add_many([new_record(f"d{i:02d}", "coap://h:1") for i in range(6)])
    inv.update("d01", state="operational", next_renewal=now + 3600)
    inv.update("d02", state="operational", next_renewal=now - 10)
    inv.update("d03", state="operational", next_renewal=now + 7200, last_error="4.03 untrusted: 100% bad_x")
    inv.update("d04", next_attempt=now + 600, last_error="device unreachable: timeout")
    ids = lambda rows: [r["id"] for r in rows]  # noqa: E731
    assert ids(inv.list(state="operational")) == ["d01", "d02", "d03"]
    assert ids(inv.list(due_before=now)) == ["d00", "d02", "d05"]
    assert ids(inv.list(due_before=now + 3601)) == ["d00", "d01", "d02", "d04", "d05"]
    assert ids(inv.list(failing=True)) == ["d03", "d04"]
    assert ids(inv.list(error="unreachable")) == ["d04"]
    assert ids(inv.list(error="100% bad_x")) == ["d03"] and inv.list(error="100%% bad") == []  # no LIKE wildcards
    assert ids(inv.list(limit=2)) == ["d00", "d01"]
    assert inv.due(now) == ["d00", "d05", "d02"] or sorted(inv.due(now)) == ["d00", "d02", "d05"]
    with pytest.raises(InventoryError, match="state 'x'"):
        inv.list(state="x")


def test_claim_extend_complete_release(inv):
    now = time.time()
    inv.add_many([new_record(f"d{i}", "coap://h:1") for i in range(5)])
    for i in range(5):  # due at different times: claims come earliest first
        inv.update(f"d{i}", state="operational", next_renewal=now - 100 + i)
    inv.update("d4", next_renewal=now + 3600)
    a = inv.claim("wA", limit=2, lease_s=30)
    assert [r["id"] for r in a] == ["d0", "d1"] and all(r["lease_owner"] == "wA" for r in a)
    b = inv.claim("wB", limit=10, lease_s=30)
    assert [r["id"] for r in b] == ["d2", "d3"]  # d4 is not due; d0, d1 are leased
    assert inv.claim("wC", limit=10, lease_s=30) == []
    assert inv.claim("wC", limit=1, lease_s=30, ids=["d0", "d4"])[0]["id"] == "d4"  # by id: due or not
    tok = {r["id"]: r["lease_token"] for r in a + b}
    assert inv.extend("wA", [("d0", tok["d0"]), ("d1", tok["d1"]), ("d2", tok["d2"])], 30) == {"d0", "d1"}
    # a stale token (the lease was lost) changes nothing
    assert inv.complete("d0", "wA", tok["d0"] + 1, {"serial": "bad"}) is False
    assert inv.complete("d0", "wB", tok["d0"], {"serial": "bad"}) is False
    assert inv.get("d0")["serial"] is None
    assert inv.complete("d0", "wA", tok["d0"], {"serial": "01", "next_renewal": now + 999}, b"PEM") is True
    r = inv.get("d0")
    assert r["serial"] == "01" and r["lease_owner"] is None and inv.certificate("d0") == b"PEM"
    assert inv.complete("d0", "wA", tok["d0"], {"serial": "02"}) is False  # a lease ends once
    inv.release("d1", "wA", tok["d1"])
    assert inv.get("d1")["lease_owner"] is None
    assert [x["id"] for x in inv.claim("wB", limit=5, lease_s=30)] == ["d1"]
    s = inv.summary()
    assert s["devices"] == 5 and s["leased"] == {"wB": 3, "wC": 1} and s["due_now"] == 0


def test_expired_lease_is_taken_over_and_fences_the_old_worker(inv):
    inv.add("d0", "coap://h:1")
    old = inv.claim("dead", limit=1, lease_s=0.3)[0]
    assert inv.claim("alive", limit=1, lease_s=30) == []
    new = wait_for(lambda: inv.claim("alive", limit=1, lease_s=30), what="the expired lease to be claimable")[0]
    assert new["lease_token"] == old["lease_token"] + 1 and new["lease_owner"] == "alive"
    assert inv.extend("dead", [("d0", old["lease_token"])], 30) == set()
    assert inv.complete("d0", "dead", old["lease_token"], {"serial": "stale"}) is False
    assert inv.complete("d0", "alive", new["lease_token"], {"serial": "fresh"}) is True
    assert inv.get("d0")["serial"] == "fresh"


def test_next_due_in(inv):
    assert inv.next_due_in() is None
    inv.add("d0", "coap://h:1")
    assert inv.next_due_in() == 0
    inv.update("d0", state="operational", next_renewal=time.time() + 100)
    assert 90 < inv.next_due_in() <= 101  # SQLite's clock has millisecond resolution
    inv.claim("w", limit=1, lease_s=500, ids=["d0"])  # leased until +500, due at +100: next event at +500
    assert 400 < inv.next_due_in() <= 501


def test_concurrent_claims_never_share_a_device(spec, tmp_path, inv):
    """Eight connections claim at once from 400 due devices: each device goes to exactly one of them."""
    n = 400
    inv.add_many([new_record(f"d{i:03d}", "coap://h:1") for i in range(n)])
    got: dict[str, list[str]] = {}
    errors = []
    start = threading.Barrier(8)

    def worker(w):
        i = open_inventory(spec, tmp_path / "clm")
        try:
            start.wait()
            mine = []
            while True:
                batch = i.claim(w, limit=7, lease_s=60)
                if not batch:
                    break
                mine += [r["id"] for r in batch]
            got[w] = mine
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            i.close()

    threads = [threading.Thread(target=worker, args=(f"w{k}",)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    claimed = [d for ids in got.values() for d in ids]
    assert len(claimed) == n and len(set(claimed)) == n


def test_spec_parsing_and_redaction(tmp_path):
    assert parse_spec(None, tmp_path) == ("sqlite", str(tmp_path / "inventory.sqlite"))
    assert parse_spec("sqlite:///var/x.db", tmp_path) == ("sqlite", "/var/x.db")
    assert parse_spec("postgresql://u@h/db", tmp_path)[0] == "postgresql"
    with pytest.raises(InventorySpecError, match="use sqlite:PATH or postgresql://"):
        open_inventory("mysql://u:secret@h/db", tmp_path)
    assert redact("postgresql://clm:s3cret@db:5432/fleet") == "postgresql://clm:***@db:5432/fleet"
    assert redact("postgresql://db/fleet?password=s3cret&sslmode=verify-full") == \
        "postgresql://db/fleet?password=***&sslmode=verify-full"
    with pytest.raises(InventorySpecError, match="synchronous=normal|full"):
        open_inventory(f"sqlite:{tmp_path}/x.sqlite?journal=off", tmp_path)


def test_postgres_bad_connection_strings_are_named(postgres, tmp_path):
    cases = [
        ("postgresql://devagent@127.0.0.1:5432/x?nosuchoption=1", InventorySpecError, "not a valid PostgreSQL"),
        (postgres.url("no_such_db"), InventorySpecError, 'database "no_such_db" does not exist'),
        (postgres.url().replace(postgres.password, "wrong-pw"), InventorySpecError, "password authentication failed"),
        (f"postgresql://devagent:pw@127.0.0.1:{_closed_port()}/x", InventoryUnavailableError, "Connection refused"),
    ]
    for url, exc, match in cases:
        with pytest.raises(exc, match=match) as ei:
            open_inventory(url, tmp_path)
        assert "wrong-pw" not in str(ei.value) and postgres.password not in str(ei.value)
        assert "inventory postgresql://" in str(ei.value)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_postgres_restart_unavailable_then_resumes(postgres, tmp_path):
    url = postgres.create_database("restart")
    inv = open_inventory(url, tmp_path)
    try:
        inv.add("d0", "coap://h:1")
        postgres.stop()
        try:
            with pytest.raises(InventoryUnavailableError, match="inventory postgresql://devagent:\\*\\*\\*@"):
                inv.get("d0")
            with pytest.raises(InventoryUnavailableError, match="unreachable"):
                inv.get("d0")
        finally:
            postgres.start()
        assert inv.get("d0")["id"] == "d0"
    finally:
        inv.close()


def test_sqlite_file_is_private_and_wal(tmp_path):
    import os
    import sqlite3

    inv = open_inventory(None, tmp_path / "clm")
    inv.add("d0", "coap://h:1")
    p = tmp_path / "clm" / "inventory.sqlite"
    assert os.stat(p).st_mode & 0o077 == 0
    assert sqlite3.connect(p).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    inv.close()


def test_sqlite_not_a_database(tmp_path):
    p = tmp_path / "junk.sqlite"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InventoryError, match="junk.sqlite"):
        open_inventory(f"sqlite:{p}", tmp_path / "clm")
    assert p.read_bytes() == b"this is not sqlite" * 100
