"""Pending keys carry their owner; gc (keystore check, the daemon's start) discards orphans (issue 20, item 2).

An owner is gone when its pid, boot id and start time no longer match a running process; a pending key older than
``pending_max_age_s`` goes whoever owns it. Owners here are real forked processes.
"""
from __future__ import annotations

import datetime
import os
import signal

import pytest
from click.testing import CliRunner

from agent.cli import cli
from keystore import fsutil, owner
from keystore.csr import build_csr, parse_subject
from keystore.errors import KeyGoneError, StorageError
from keystore.store import Keystore
from tests.conftest import DOMAIN


def _in_child(fn) -> int:
    """Run ``fn()`` in a forked child that then exits; returns the child's pid (reaped)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pid


def _key_files(root, hidden=False):
    d = root / "keys"
    return sorted(p.name for p in d.iterdir() if hidden or not p.name.startswith(".")) if d.is_dir() else []


def test_pending_keys_record_their_owner(ks):
    uri = ks.generate_key("p256", label="ldevid", pending_for={"name": "ldevid", "op": "enroll"})
    rec = ks.key_record(uri)
    me = rec["owner"]
    assert me["pid"] == os.getpid() and me["boot_id"] == owner.boot_id() and isinstance(me["start"], int)
    assert owner.alive(me) is True
    assert owner.alive(dict(me, start=me["start"] + 1)) is False, "a reused pid is not the owner"
    assert owner.alive(dict(me, boot_id="another-boot")) is False
    assert ks.orphaned_pending() == []
    assert ks.gc() == [] and ks.key_record(uri)["state"] == "pending", "a live owner's young key stays"


def test_a_dead_owners_pending_key_is_discarded_through_the_backend(ks):
    def child():
        Keystore.open(ks.root).generate_key("p256", pending_for={"name": "dev", "op": "enroll"})

    pid = _in_child(child)
    [rec] = ks.pending_keys()
    assert rec["owner"]["pid"] == pid and owner.alive(rec["owner"]) is False
    assert len(_key_files(ks.root)) == 1 and len(list((ks.root / "locks").iterdir())) == 1
    removed = Keystore.open(ks.root).gc()
    assert removed == [f"pending key {rec['uri']}"]
    assert ks.pending_keys() == [] and _key_files(ks.root) == [] and list((ks.root / "locks").iterdir()) == []
    [line] = [e for e in ks.audit_entries() if e["action"] == "pending-key-discard"]
    assert line["key_uri"] == rec["uri"] and "is gone" in line["reason"] and line["owner"]["pid"] == pid


def _kill_at(ks, at, run=None) -> None:
    """Run ``run()`` (default: generate_key on a fresh Keystore object) in a forked child and SIGKILL it when the
    fault hook sees ``at(stage, path)``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)

        def hook(stage, path):
            if at(stage, path):
                os.write(w, b"x")
                signal.pause()  # the parent kills us here

        fsutil._FAULT_HOOK = hook
        try:
            run() if run is not None else Keystore.open(ks.root).generate_key("p256")
        finally:
            os._exit(3)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(r)


def test_killed_between_the_record_and_the_key_leaves_only_a_record_gc_finishes(ks):
    """generate_key records the key before keeping it: killed in between, there is a record and nothing else."""
    # The key's data is written and fsynced under a temp name before the record (in one fsync batch with the
    # index); the key file gets its name by the rename ("replace") after the record is durable: killed there,
    # after the index write and before the key file.
    _kill_at(ks, lambda stage, path: stage == "replace" and path.endswith(".key"))
    [rec] = ks.pending_keys()
    assert _key_files(ks.root) == []
    removed = Keystore.open(ks.root).gc()
    assert f"pending key {rec['uri']}" in removed  # and the temp file the write had opened
    assert ks.pending_keys() == [] and _key_files(ks.root, hidden=True) == [] and Keystore.open(ks.root).check() == []


@pytest.mark.parametrize("at", [
    pytest.param(lambda stage, path: stage == "write" and path.endswith(".key"), id="key-temp-write"),
    pytest.param(lambda stage, path: stage == "replace" and path.endswith("keystore.json"), id="index-replace"),
])
def test_killed_before_the_record_leaves_only_a_temp_file_gc_securely_deletes(ks, at):
    """The key's encrypted data is written (and fsynced, together with the index temp file) before the record that
    names it: killed before the index replace, there is no record and no key file, only temp files that name
    nothing; gc securely deletes them (overwritten, then unlinked) and the keystore checks clean."""
    before = ks.pending_keys()
    _kill_at(ks, at)
    assert ks.pending_keys() == before == [] and _key_files(ks.root) == []
    [tmp] = _key_files(ks.root, hidden=True)
    assert tmp.startswith(".") and tmp.endswith(".tmp")
    path = ks.root / "keys" / tmp
    written = path.read_bytes()
    at_unlink = []  # what the file holds when gc unlinks it: overwritten, so no longer the key's bytes

    def hook(stage, p):
        if stage == "unlink" and p == str(path):
            at_unlink.append(path.read_bytes())

    fsutil._FAULT_HOOK = hook
    try:
        removed = Keystore.open(ks.root).gc()
    finally:
        fsutil._FAULT_HOOK = None
    assert str(path) in removed
    # killed at the temp write, the file may still be empty: nothing to overwrite; else the bytes are random
    assert len(at_unlink) == 1 and len(at_unlink[0]) == len(written) and (not written or at_unlink[0] != written)
    assert _key_files(ks.root, hidden=True) == [] and list(ks.root.glob(".*.tmp")) == []
    assert Keystore.open(ks.root).check() == [] and ks.pending_keys() == []


def test_meanwhile_runs_once_the_key_has_its_name_and_generate_key_returns_after_its_fsync(ks):
    """generate_key(meanwhile=...) runs the callable after the key file got its name, while keys/ is fsynced: the
    key can be loaded and used there, and generate_key returns only after that fsync (the fsync-dir step of the key
    comes before the callable)."""
    steps = []
    fsutil._FAULT_HOOK = lambda stage, path: steps.append((stage, os.path.basename(path)))
    try:
        def meanwhile(uri):
            steps.append(("meanwhile", uri))
            assert (ks.root / uri.split(":", 1)[1]).is_file() and [r["uri"] for r in ks.pending_keys()] == [uri]
            return build_csr(ks.private_key(uri), parse_subject("CN=m"))

        uri = ks.generate_key("p256", meanwhile=meanwhile)
    finally:
        fsutil._FAULT_HOOK = None
    key = os.path.basename(uri.split(":", 1)[1])
    assert steps.index(("replace", key)) < steps.index(("fsync-dir", key)) < steps.index(("meanwhile", uri))
    assert [r["uri"] for r in Keystore.open(ks.root).pending_keys()] == [uri]


@pytest.mark.parametrize("fail", ["meanwhile", "fsync-dir"])
def test_a_failure_meanwhile_or_of_the_last_fsync_undoes_the_key_generation(ks, fail):
    """The callable raising, or the key directory's fsync failing while it runs: the key is destroyed, its record
    removed and no hold is left; the keystore is as it was (after gc)."""
    from tests.conftest import snapshot

    before = snapshot(ks.root)
    seen = []

    def meanwhile(uri):
        seen.append(uri)
        ks.private_key(uri)  # takes a hold that the undo must drop
        if fail == "meanwhile":
            raise RuntimeError("CSR failed")

    def hook(stage, path):
        if fail == "fsync-dir" and stage == "fsync-dir" and path.endswith(".key"):
            raise OSError(5, "Input/output error")

    fsutil._FAULT_HOOK = hook
    try:
        with pytest.raises(RuntimeError if fail == "meanwhile" else StorageError):
            ks.generate_key("p256", meanwhile=meanwhile)
    finally:
        fsutil._FAULT_HOOK = None
    assert seen or fail == "fsync-dir"
    assert ks.pending_keys() == [] and not ks._locks._held
    Keystore.open(ks.root).gc()
    assert snapshot(ks.root) == before and _key_files(ks.root, hidden=True) == []


def test_an_old_pending_key_goes_whoever_owns_it(ks, lab):
    uri = ks.generate_key("p256", pending_for={"name": "dev"})
    ks.private_key(uri)  # the owner holds it
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=25)
    other = Keystore.open(ks.root)
    [(rec, why)] = other.orphaned_pending(now=later)
    assert rec["uri"] == uri and "more than 24 h" in why
    assert other.discard_orphaned_pending(now=later) == [uri]
    assert ks.key_record(uri)["state"] == "retired", "still held by its live owner: retired, not yet destroyed"
    csr = build_csr(ks.private_key(uri), parse_subject("CN=dev"))
    cert = lab.issue(DOMAIN, csr.public_key(), csr.subject)
    with pytest.raises(KeyGoneError, match="discarded before its certificate arrived"):
        ks.store_certificate("dev", cert, lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN)
    assert not ks.exists("dev")
    ks.close()  # the owner gives up
    Keystore.open(ks.root).gc()
    assert _key_files(ks.root) == [] and ks.key_record(uri) is None


def test_the_bound_is_configurable(ks, tmp_path):
    uri = ks.generate_key("p256")
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=10)
    assert Keystore.open(ks.root).orphaned_pending(now=soon) == []
    short = Keystore.open(ks.root, pending_max_age_s=300)
    assert [r["uri"] for r, _ in short.orphaned_pending(now=soon)] == [uri]
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[keystore]\npending_max_age_s = 300\n")
    from agent.config import load_config

    assert load_config({}, config_path=cfg, env={}).keystore_pending_max_age_s == 300


def test_keystore_list_shows_pending_keys_with_age_and_owner(ks):
    def child():
        Keystore.open(ks.root).generate_key("p256", pending_for={"name": "app1", "op": "request"})

    dead = _in_child(child)
    ks.generate_key("p256", pending_for={"name": "ldevid", "op": "renew"})
    r = CliRunner().invoke(cli, ["--state-dir", str(ks.root), "--json", "keystore", "list"])
    assert r.exit_code == 0, r.output
    import json

    pending = {p["for"]: p for p in json.loads(r.output)["pending_keys"]}
    assert pending["app1"]["owner"]["pid"] == dead and pending["app1"]["owner"]["state"] == "gone"
    assert pending["ldevid"]["owner"]["state"] == "running" and pending["ldevid"]["op"] == "renew"
    assert all(p["age_s"] is not None and p["age_s"] >= 0 for p in pending.values())
    r = CliRunner().invoke(cli, ["--state-dir", str(ks.root), "keystore", "list"])
    assert "2 pending key(s)" in r.output and f"pid {dead}" in r.output and "(gone)" in r.output
    r = CliRunner().invoke(cli, ["--state-dir", str(ks.root), "keystore", "check"])
    assert r.exit_code == 0 and "1 orphaned pending key(s) discarded" in r.output, r.output
    assert [p["for"] for p in (ks.pending_summary(k) for k in ks.pending_keys())] == ["ldevid"]
    # The audit listing: the discard's action (19 characters) is longer than the others, and every line's fields
    # still start in one column.
    r = CliRunner().invoke(cli, ["--state-dir", str(ks.root), "keystore", "audit"])
    assert r.exit_code == 0, r.output
    import re

    lines = r.output.splitlines()
    assert any(" pending-key-discard " in line for line in lines), r.output
    assert len(lines) >= 3 and all(len(line.split()) >= 4 for line in lines), r.output
    columns = {len(re.match(r"\S+ +\S+ +\S+ +", line).group(0)) for line in lines}
    assert len(columns) == 1, r.output


def test_a_key_in_use_without_a_credential_is_not_pending_and_survives_its_owner(ks):
    """An OPC UA server's bootstrap key (self-signed certificate until a GDS pushes a managed one) outlives the
    process that made it: generated with pending=False it is active, and gc never discards it."""
    uris = []

    def child():
        uris.append(Keystore.open(ks.root).generate_key("p256", label="opcua-bootstrap", pending=False,
                                                        pending_for={"source": "opcua-bootstrap"}))
        (ks.root / "uri").write_text(uris[0])

    _in_child(child)
    uri = (ks.root / "uri").read_text()
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30)
    opened = Keystore.open(ks.root)
    assert opened.pending_keys() == [] and opened.orphaned_pending(now=later) == []
    assert opened.gc() == [] and opened.key_record(uri)["state"] == "active"
    assert build_csr(opened.private_key(uri), parse_subject("CN=x")).is_signature_valid
    opened.discard_key(uri)  # its user discards it when a managed certificate replaces it
    assert _key_files(ks.root) == []
