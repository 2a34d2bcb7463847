"""Lifecycle stories over the real lab CA with certificates living seconds, run by the real daemon through the
simulator transport (tests/peers/labsim.py). Each row: a story, what we do to the world, what must come out.

Throughout every story a watcher samples the deployed bundle every 20 ms: from the first deployment on, it must
always hold a key and a certificate for that key that is valid at that instant ("nothing lost").
"""
from __future__ import annotations

import asyncio
import datetime
import errno
import logging
import time

import pytest

from agent import policy
from keystore import fsutil
from keystore.certs import fingerprint
from tests.scenario.conftest import NAME, utcnow

SAMPLE_S = 0.02


def deploy_toml(w, hooks=()) -> str:
    hook_list = ", ".join(f'"{h}"' for h in hooks)
    return f"""
[credential.{NAME}]
hooks = [{hook_list}]
[[credential.{NAME}.deploy]]
type = "pem"
bundle = "{w.deploy_dir}/bundle.pem"
cert = "{w.deploy_dir}/cert.pem"
key = "{w.deploy_dir}/key.pem"
chain = "{w.deploy_dir}/chain.pem"
[[credential.{NAME}.deploy]]
type = "opcua"
pki_dir = "{w.deploy_dir}/pki"
"""


async def drive(w, daemon, *, until, timeout_s: float, actions=()):
    """Run the daemon until ``until()`` holds (or timeout), applying (at_s, fn) actions; watch the bundle."""
    bundle = w.deploy_dir / "bundle.pem"
    problems: list[str] = []
    task = asyncio.create_task(daemon.run())
    t0 = time.monotonic()
    pending = sorted(actions, key=lambda a: a[0])
    deployed_once = False
    try:
        while time.monotonic() - t0 < timeout_s:
            while pending and time.monotonic() - t0 >= pending[0][0]:
                pending.pop(0)[1]()
            if bundle.exists():
                deployed_once = True
            if deployed_once:
                err = w.bundle_ok(bundle)
                if err:
                    problems.append(f"t={time.monotonic() - t0:.2f}s: {err}")
            if until():
                break
            assert not task.done(), f"daemon ended early: {task.exception() if task.done() else ''}"
            await asyncio.sleep(SAMPLE_S)
        else:
            pytest.fail(f"condition not reached in {timeout_s} s; meta: {w.ks.get(NAME).record.get('meta')}")
    finally:
        daemon.stop()
        code = await asyncio.wait_for(task, 5)
    assert code == 0
    assert problems == [], problems[:5]
    assert deployed_once


def version(w) -> int:
    return w.ks.get(NAME).version


def meta(w) -> dict:
    return w.ks.get(NAME).record.get("meta") or {}


def deployed_live(w) -> bool:
    cred = w.ks.get(NAME)
    return meta(w).get("deployed") == fingerprint(cred.certificate)


# ---- the stories ------------------------------------------------------------------------------------------
def steady(w):
    cfg = w.config(deploy_toml(w, hooks=[f"sh -c 'echo $DEVAGENT_SERIAL >> {w.root}/hook.log'"]),
                   **{"renewal.jitter": 0.1})
    keys = set()

    def until():
        keys.add(w.ks.get(NAME).key_uri)
        return version(w) >= 9 and deployed_live(w)
    return cfg, until, [], 20


def check_steady(w, cfg):
    m = meta(w)
    assert m.get("failures_total", 0) == 0 and m["failures"] == 0
    serials = (w.root / "hook.log").read_text().split()
    assert len(serials) >= 8 and len(set(serials)) == len(serials)  # one hook run per renewal, each new
    uris = {e["key_uri"] for e in w.ks.audit_entries() if e["action"] == "key-generate"}
    assert len(uris) >= 9  # rekeyed on every renewal (enrollment + 8 renewals)
    prom = w.metrics.read_text()
    assert f'devagent_renewal_consecutive_failures{{credential="{NAME}"' in prom
    assert "devagent_certificate_expiry_seconds" in prom


def ca_down(w):
    cfg = w.config(deploy_toml(w))
    # Renewal falls due at ~3.7 s; the CA is unreachable from 0 to 5 s; the certificate expires at 6 s.
    return cfg, lambda: version(w) >= 2 and deployed_live(w), [
        (0.0, lambda: setattr(w.sim, "down", True)), (5.0, lambda: setattr(w.sim, "down", False))], 12


def check_ca_down(w, cfg):
    m = meta(w)
    assert m["failures_total"] >= 3 and m["failures"] == 0
    assert "last_error" not in m  # cleared by the success
    assert 'devagent_renewal_failures_total{credential="mqtt"' in w.metrics.read_text()


def ca_rollover(w):
    cfg = w.config(deploy_toml(w))
    old_root = w.ca.domain("plant").root_cert
    w.old_root_fp = fingerprint(old_root)
    done = {"rolled": False}

    def roll():
        w.sim.rollover()
        done["rolled"] = True

    def until():
        cred = w.ks.get(NAME)
        return done["rolled"] and cred.chain and fingerprint(cred.chain[-1]) != w.old_root_fp and deployed_live(w)
    return cfg, until, [(0.5, roll)], 12


def check_ca_rollover(w, cfg):
    roots = {r["fingerprint"]: r for r in w.ks.trust_records("plant") if r["role"] == "root"}
    assert w.old_root_fp in roots  # old root kept while old certificates may be in use
    new = [r for fp, r in roots.items() if fp != w.old_root_fp]
    assert len(new) == 1 and new[0]["verified_by"] == "newWithOld link"
    trusted = list((w.deploy_dir / "pki" / "trusted" / "certs").iterdir())
    assert len(trusted) == 2  # the OPC UA trust list holds both roots


def clock_far_ahead(w):
    skew = datetime.timedelta(days=3 * 365)
    cfg = w.config(deploy_toml(w))
    return cfg, lambda: version(w) >= 3 and deployed_live(w), [], 10, {"wall": lambda: utcnow() + skew}


def clock_1970(w):
    cfg = w.config(deploy_toml(w))
    epoch = utcnow()

    def wall():  # an RTC-less board after power-up: 1970 plus uptime
        return datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + (utcnow() - epoch)
    return cfg, lambda: version(w) >= 3 and deployed_live(w), [], 10, {"wall": wall}


def check_clock(w, cfg):
    assert meta(w).get("failures_total", 0) == 0
    offset = [ln for ln in w.metrics.read_text().splitlines() if ln.startswith("devagent_clock_offset_seconds ")]
    assert abs(float(offset[0].split()[1])) > 86400


def hook_failing(w):
    flag = w.root / "hook-broken"
    flag.write_text("x")
    cfg = w.config(deploy_toml(w, hooks=[f"sh -c 'test ! -e {flag}'"]))
    return cfg, lambda: version(w) >= 3 and deployed_live(w), [(2.5, flag.unlink)], 12


def check_hook_failing(w, cfg):
    m = meta(w)
    assert m["deploy_failures_total"] >= 1
    assert m.get("failures_total", 0) == 0  # renewals themselves never failed
    assert "last_error" not in m


def disk_full(w):
    cfg = w.config(deploy_toml(w))
    state = {"full": False}

    def fault(stage, path):
        if state["full"] and path.startswith(str(w.deploy_dir)) and stage == "write":
            raise OSError(errno.ENOSPC, "No space left on device", path)

    fsutil._FAULT_HOOK = fault  # keystore.fsutil's documented fault-injection point
    w.cleanup = lambda: setattr(fsutil, "_FAULT_HOOK", None)
    # The disk is full from 1.5 s to 3 s: the first renewal (~2-3 s) cannot be deployed; the enrolled certificate
    # (valid until >= 4 s) stays deployed meanwhile. A disk full past the deployed certificate's expiry would lose it
    # whatever the daemon did.
    return cfg, lambda: version(w) >= 3 and deployed_live(w), [
        (1.5, lambda: state.update(full=True)), (3.0, lambda: state.update(full=False))], 12


def check_disk_full(w, cfg):
    assert meta(w)["deploy_failures_total"] >= 1
    assert not list(w.deploy_dir.glob(".*.tmp"))  # no temp files left behind


SCENARIOS = [
    # story,            lifetime_s, setup,          check
    ("steady renewal",  2, steady, check_steady),
    ("CA down, back",   6, ca_down, check_ca_down),
    ("CA rollover",     3, ca_rollover, check_ca_rollover),
    ("clock +3 years",  2, clock_far_ahead, check_clock),
    ("clock in 1970",   2, clock_1970, check_clock),
    ("hook failing",    3, hook_failing, check_hook_failing),
    ("disk full",       5, disk_full, check_disk_full),
]


@pytest.mark.parametrize("story,lifetime,setup,check", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario(world, story, lifetime, setup, check, caplog):
    caplog.set_level(logging.INFO, logger="devagent")
    w = world(lifetime_s=lifetime)
    w.cleanup = None
    cfg, until, actions, timeout, *extra = setup(w)
    try:
        asyncio.run(drive(w, w.daemon(cfg, **(extra[0] if extra else {})), until=until, timeout_s=timeout,
                          actions=actions))
    finally:
        if w.cleanup:
            w.cleanup()
    check(w, cfg)
    if "clock" in story:
        assert any("using CA time" in r.getMessage() for r in caplog.records)


def test_rollover_without_link_keeps_old_certificate(world, caplog):
    """A new root offered without a verifiable link and no operator fingerprint is refused: the device keeps its
    (still valid) certificate, reports the error, and does not trust the new root."""
    w = world(lifetime_s=3)
    cfg = w.config(deploy_toml(w))
    dom = w.sim.rollover()
    dom.new_with_old = None  # the CA publishes no link certificate
    dom.old_with_new = None
    old = w.ks.get(NAME)

    async def go():
        d = w.daemon(cfg)
        task = asyncio.create_task(d.run())
        await asyncio.sleep(2.2)
        d.stop()
        return await task
    asyncio.run(go())
    cred = w.ks.get(NAME)
    assert cred.version == old.version
    assert "untrusted" in meta(w)["last_error"] or "does not chain" in meta(w)["last_error"]
    assert all(r["fingerprint"] != fingerprint(dom.root_cert) for r in w.ks.trust_records("plant"))
    assert w.bundle_ok(w.deploy_dir / "bundle.pem") is None  # the old one is still deployed and valid


def test_rollover_with_operator_fingerprint(world):
    """Without a link, the operator's fingerprint of the new root is the other way in."""
    w = world(lifetime_s=2)
    dom = w.sim.rollover()
    dom.new_with_old = None
    cfg = w.config(deploy_toml(w), **{"ca.fingerprint": fingerprint(dom.root_cert)})
    asyncio.run(drive(w, w.daemon(cfg), until=lambda: version(w) >= 2 and deployed_live(w), timeout_s=8))
    rec = [r for r in w.ks.trust_records("plant") if r["fingerprint"] == fingerprint(dom.root_cert)]
    assert rec and rec[0]["verified_by"] == "operator fingerprint"


def test_sigterm_stops_cleanly_and_notifies(world, tmp_path):
    """sd_notify READY/STOPPING go to $NOTIFY_SOCKET; SIGTERM ends the loop with status 0."""
    import os
    import signal
    import socket

    from agent.daemon import Notifier

    w = world(lifetime_s=30)
    sock_path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.settimeout(5)
    cfg = w.config("", **{"daemon.notify": True})

    async def go():
        d = w.daemon(cfg, notifier=Notifier({"NOTIFY_SOCKET": sock_path}))
        task = asyncio.create_task(d.run())
        await asyncio.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(task, 5)
    assert asyncio.run(go()) == 0
    msgs = []
    s.settimeout(0.2)
    try:
        while True:
            msgs.append(s.recv(4096).decode())
    except socket.timeout:
        pass
    s.close()
    assert any("READY=1" in m for m in msgs) and any("STOPPING=1" in m for m in msgs)


def test_schedule_follows_policy(world):
    """The stored next_renewal is policy.renewal_time of the live certificate (jitter 0)."""
    w = world(lifetime_s=60)
    cfg = w.config("")
    d = w.daemon(cfg)
    asyncio.run(d.run(once=True))
    cred = w.ks.get(NAME)
    want = policy.renewal_time(cred.not_before, cred.not_after, fraction=cfg.renewal.fraction, jitter=0)
    assert datetime.datetime.fromisoformat(meta(w)["next_renewal"]) == want
