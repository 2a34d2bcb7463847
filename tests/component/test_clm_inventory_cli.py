"""`devagent clm` over both inventories through the real root command (agent.cli): --inventory, the
DEVAGENT_CLM_INVENTORY variable and [clm] inventory in agent.toml; list filters, status, remove-device, and
clear errors for a bad or unreachable inventory."""
from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.inventory import open_inventory
from tests.conftest import snapshot


def run(tmp_path, *args, env=None, config=None):
    base = ["--state-dir", str(tmp_path / "state")]
    if config is not None:
        base += ["--config", str(config)]
    return CliRunner().invoke(cli, [*base, *args], env=env or {}, catch_exceptions=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def inv_spec(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'fleet.sqlite'}"
    return request.getfixturevalue("postgres").create_database(f"cli_{int(time.time() * 1e6) % 10**9}")


def test_add_list_filters_status_remove(tmp_path, inv_spec):
    for i in range(3):
        r = run(tmp_path, "clm", "--inventory", inv_spec, "add-device", f"d{i}", "--uri", f"coap://10.0.0.{i + 1}",
                "--security", "none", "--domain", "plant")
        assert r.exit_code == 0, r.output
    inv = open_inventory(inv_spec, tmp_path / "state" / "clm")
    inv.update("d1", state="operational", not_after="2030-01-01T00:00:00+00:00", next_renewal=time.time() + 86400)
    inv.update("d2", last_error="4.03 untrusted: the certificate does not chain", next_attempt=time.time() + 60)
    inv.close()
    ids = lambda r: [x["id"] for x in json.loads(r.output)]  # noqa: E731
    assert ids(run(tmp_path, "clm", "--inventory", inv_spec, "list", "--json")) == ["d0", "d1", "d2"]
    assert ids(run(tmp_path, "clm", "--inventory", inv_spec, "list", "--due", "--json")) == ["d0"]
    assert ids(run(tmp_path, "clm", "--inventory", inv_spec, "list", "--due-before", "now+2d", "--json")) == \
        ["d0", "d1", "d2"]
    assert ids(run(tmp_path, "clm", "--inventory", inv_spec, "list", "--failing", "--json")) == ["d2"]
    assert ids(run(tmp_path, "clm", "--inventory", inv_spec, "list", "--error", "untrusted", "--json")) == ["d2"]
    assert ids(run(tmp_path, "clm", "--inventory", inv_spec, "list", "--state", "operational", "--json")) == ["d1"]
    text = run(tmp_path, "clm", "--inventory", inv_spec, "list").output
    assert "d2" in text and "untrusted" in text and "now" in text
    r = run(tmp_path, "clm", "--inventory", inv_spec, "list", "--due-before", "next tuesday")
    assert r.exit_code == 2 and "ISO 8601" in r.output
    s = json.loads(run(tmp_path, "clm", "--inventory", inv_spec, "status", "--json").output)
    assert s["devices"] == 3 and s["by_state"] == {"not operational": 2, "operational": 1} and s["failing"] == 1
    assert s["due_now"] == 1
    text = run(tmp_path, "clm", "--inventory", inv_spec, "status").output
    assert "failing     1" in text and "due now     1" in text
    one = json.loads(run(tmp_path, "clm", "--inventory", inv_spec, "status", "d1", "--json").output)
    assert one["not_after"] == "2030-01-01T00:00:00+00:00"
    r = run(tmp_path, "clm", "--inventory", inv_spec, "status", "d1", "--pem")
    assert r.exit_code == 5 and "no certificate yet" in r.output
    r = run(tmp_path, "clm", "--inventory", inv_spec, "status", "nope")
    assert r.exit_code == 2 and "no device 'nope'" in r.output
    assert run(tmp_path, "clm", "--inventory", inv_spec, "remove-device", "d0").exit_code == 0
    r = run(tmp_path, "clm", "--inventory", inv_spec, "remove-device", "d0")
    assert r.exit_code == 2 and "no device" in r.output
    assert ids(run(tmp_path, "clm", "--inventory", inv_spec, "list", "--json")) == ["d1", "d2"]


def test_inventory_from_environment_and_config_file(tmp_path, postgres):
    url = postgres.create_database("cli_config")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[clm]\ninventory = "{url}"\n')
    r = run(tmp_path, "clm", "add-device", "viafile", "--uri", "coap://h", "--security", "none", config=cfg)
    assert r.exit_code == 0, r.output
    r = run(tmp_path, "clm", "add-device", "viaenv", "--uri", "coap://h", "--security", "none",
            env={"DEVAGENT_CLM_INVENTORY": url})
    assert r.exit_code == 0, r.output
    inv = open_inventory(url, tmp_path)
    assert [d["id"] for d in inv.list()] == ["viaenv", "viafile"]
    inv.close()
    # the command line wins over the file; the default is the SQLite file in the CLM directory
    r = run(tmp_path, "clm", "--inventory", "sqlite:" + str(tmp_path / "other.sqlite"), "list", "--json",
            config=cfg)
    assert json.loads(r.output) == []
    assert json.loads(run(tmp_path, "clm", "list", "--json").output) == []
    assert (tmp_path / "state" / "clm" / "inventory.sqlite").exists()


@pytest.mark.parametrize("spec, code, match", [
    ("mysql://clm@db/fleet", 7, "use sqlite:PATH or postgresql://"),
    ("postgresql://clm:topsecret@127.0.0.1:1/fleet", 6, "unreachable: .*Connection refused"),
    ("postgresql://clm:topsecret@127.0.0.1/fleet?bogus=1", 7, "not a valid PostgreSQL connection string"),
])
def test_bad_inventory_is_named_and_nothing_is_stored(tmp_path, spec, code, match):
    (tmp_path / "state").mkdir()
    before = snapshot(tmp_path)
    r = run(tmp_path, "clm", "--inventory", spec, "add-device", "d0", "--uri", "coap://h", "--security", "none")
    assert r.exit_code == code, r.output
    assert "topsecret" not in r.output
    import re

    assert re.search(match, r.output), r.output
    assert snapshot(tmp_path) == before


def test_import_jsonl_and_csv_all_or_nothing(tmp_path, inv_spec):
    from agent.lab import fleet
    from agent.lab.ca import LabCA

    LabCA.create(tmp_path / "lab", domains=("plant",))
    fleet.create(tmp_path / "fleet", 3, tmp_path / "state" / "clm", tmp_path / "lab")
    lines = "\n".join(json.dumps({k: r[k] for k in ("id", "uri", "domain", "subject")})
                      for r in fleet.records(tmp_path / "fleet"))
    src = tmp_path / "devices.jsonl"
    src.write_text(lines + "\n")
    r = run(tmp_path, "clm", "--inventory", inv_spec, "import", str(src))
    assert r.exit_code == 0 and "imported 3 device(s)" in r.output, r.output
    rows = json.loads(run(tmp_path, "clm", "--inventory", inv_spec, "list", "--json").output)
    assert [x["security"] for x in rows] == ["oscore"] * 3  # detected from CLM_DIR/contexts/ID
    assert rows[0]["context"].endswith("/contexts/sim00000")
    csv_src = tmp_path / "more.csv"
    csv_src.write_text("id,uri,security,san,domain\npump-1,coap://10.1.0.1,none,dns:pump-1.plant dns:p1,plant\n"
                       "pump-2,coap://10.1.0.2,none,,plant\n")
    r = run(tmp_path, "clm", "--inventory", inv_spec, "import", str(csv_src))
    assert r.exit_code == 0, r.output
    assert "without a security context" in r.output
    one = json.loads(run(tmp_path, "clm", "--inventory", inv_spec, "status", "pump-1", "--json").output)
    assert one["san"] == ["dns:pump-1.plant", "dns:p1"] and one["context"] is None
    before = run(tmp_path, "clm", "--inventory", inv_spec, "list", "--json").output
    for content, match in (("id,uri\npump-3,coap://h\npump-1,coap://h\n", "already in the inventory"),
                           ("id,uri\npump-3,coap://h\npump-4,http://h\n", "line 3: device URI 'http://h'"),
                           ("id,uri,colour\npump-3,coap://h,red\n", "colour unknown"),
                           ('{"id": "pump-3", "uri": "coap://h"}\n{"id": "pump-3", "uri": "coap://h"}\n',
                            "pump-3 appear more than once"),
                           ('{"id": "pump-3", "uri": "coap://h"}\n{"id": 5\n', "line 2: not JSON")):
        bad = tmp_path / "bad.txt"
        bad.write_text(content)
        r = run(tmp_path, "clm", "--inventory", inv_spec, "import", str(bad))
        assert r.exit_code == 2 and match in r.output, (content, r.output)
        assert run(tmp_path, "clm", "--inventory", inv_spec, "list", "--json").output == before


@pytest.mark.parametrize("content,match", [
    (b"id,uri\npump-3,coap://h,extra,more\n", "line 2: 2 more field(s) than the header row"),
    (b"id,uri\npump-3,coap://h\xff\n", "not UTF-8 text (byte 22"),
    (b'id,uri\npump-3,"' + b"x" * 200000 + b'"\n', "line 2: not CSV (field larger than field limit"),
    (b'{"id": "pump-3", "uri": "coap://h", "subject": 5}\n', "line 1: 'subject' must be a string, not int"),
    (b'{"id": "pump-3", "uri": "coap://h", "san": "dns:x"}\n', "line 1: 'san' must be a list of strings"),
    (b'{"id": "pump-3", "uri": "coap://h", "x": ' + b"[" * 100000 + b"\n", "line 1: not JSON"),
])
def test_import_refuses_malformed_files_naming_what(tmp_path, content, match):
    """Found by the fuzz suite (tests/fuzz, target clm_import): extra CSV fields, a non-UTF-8 byte, a NUL, JSON
    values of other types and deep nesting ended in 'internal error' (TypeError, UnicodeDecodeError, csv.Error,
    RecursionError) or stored non-text fields; now exit 2 naming the line and nothing is stored."""
    spec = f"sqlite:{tmp_path / 'fleet.sqlite'}"
    assert run(tmp_path, "clm", "--inventory", spec, "add-device", "d0", "--uri", "coap://10.0.0.1",
               "--security", "none").exit_code == 0
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    before = snapshot(tmp_path)
    r = CliRunner().invoke(cli, ["--state-dir", str(tmp_path / "state"), "clm", "--inventory", spec, "import",
                                 str(bad)], env={})
    assert r.exit_code == 2 and match in r.output, r.output
    after = snapshot(tmp_path)
    for k in [k for k in set(before) | set(after) if k.startswith("fleet.sqlite")]:
        before.pop(k, None), after.pop(k, None)  # compared as rows below (-wal/-shm come and go)
    assert after == before
    inv = open_inventory(spec, tmp_path / "state" / "clm")
    try:
        assert [x["id"] for x in inv.list()] == ["d0"]
    finally:
        inv.close()


def test_import_jsonl_null_is_absent(tmp_path):
    spec = f"sqlite:{tmp_path / 'fleet.sqlite'}"
    src = tmp_path / "d.jsonl"
    src.write_text('{"id": "pump-9", "uri": "coap://10.0.0.9", "security": "none", "name": null, "san": null}\n')
    r = run(tmp_path, "clm", "--inventory", spec, "import", str(src))
    assert r.exit_code == 0, r.output
