"""Lifecycle stories over the real lab CA with certificates living seconds, run by the real daemon through the
simulator transport (tests/peers/labsim.py). Each row: a story, what we do to the world, what must come out.

Throughout every story a watcher samples the deployed bundle every 20 ms: from the first deployment on, it must
always hold a key and a certificate for that key that is valid at that instant ("nothing lost").

Robust on a loaded machine: what we do to the world happens when a condition holds (the CA goes back up after three
failed attempts, not at "5 s"), every wait is for a condition with a generous deadline (reaching it early ends the
story at once), and lifetimes leave seconds of margin between the renewal and the expiry (a low renewal fraction
keeps the cycle as short as before: renew at 0.34 of a 6 s validity = ~1 s after issuance, 4 s before expiry).
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import errno
import logging
import time

import pytest

from agent import policy
from keystore import fsutil
from keystore.certs import fingerprint
from tests.peers.labsim import LabSimClient
from tests.scenario.conftest import NAME, utcnow

SAMPLE_S = 0.02
DEADLINE_S = 90.0  # a deadline for a condition, not a duration: stories end as soon as their condition holds
FAST = {"renewal.fraction": 0.34}  # renew early in the validity: same cycle length, large margin before expiry


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


async def drive(w, daemon, *, until, timeout_s: float = DEADLINE_S, actions=()):
    """Run the daemon until ``until()`` holds (or the deadline passes), applying (when, fn) actions in order, each
    once, as soon as ``when()`` holds; watch the bundle."""
    bundle = w.deploy_dir / "bundle.pem"
    problems: list[str] = []
    task = asyncio.create_task(daemon.run())
    t0 = time.monotonic()
    pending = list(actions)
    deployed_once = False
    try:
        while time.monotonic() - t0 < timeout_s:
            while pending and pending[0][0]():
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
        code = await asyncio.wait_for(task, 60)
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


def always() -> bool:
    return True


def once_deployed(w):
    return lambda: bool(meta(w).get("deployed"))


# ---- the stories ------------------------------------------------------------------------------------------
def steady(w):
    cfg = w.config(deploy_toml(w, hooks=[f"sh -c 'echo $DEVAGENT_SERIAL >> {w.root}/hook.log'"]),
                   **FAST, **{"renewal.jitter": 0.1})
    return cfg, lambda: version(w) >= 9 and deployed_live(w), []


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
    cfg = w.config(deploy_toml(w), **{"renewal.fraction": 0.25})
    # The CA is unreachable from the start; renewal falls due ~1 s after issuance and fails; after three failed
    # attempts the CA comes back, and the renewal succeeds well before the expiry (8 s after issuance).
    return cfg, lambda: version(w) >= 2 and deployed_live(w), [
        (always, lambda: setattr(w.sim, "down", True)),
        (lambda: meta(w).get("failures_total", 0) >= 3, lambda: setattr(w.sim, "down", False))]


def check_ca_down(w, cfg):
    m = meta(w)
    assert m["failures_total"] >= 3 and m["failures"] == 0
    assert "last_error" not in m  # cleared by the success
    assert 'devagent_renewal_failures_total{credential="mqtt"' in w.metrics.read_text()


def ca_rollover(w):
    cfg = w.config(deploy_toml(w), **FAST)
    old_root = w.ca.domain("plant").root_cert
    w.old_root_fp = fingerprint(old_root)
    done = {"rolled": False}

    def roll():
        w.sim.rollover()
        done["rolled"] = True

    def until():
        cred = w.ks.get(NAME)
        return done["rolled"] and cred.chain and fingerprint(cred.chain[-1]) != w.old_root_fp and deployed_live(w)
    return cfg, until, [(once_deployed(w), roll)]


def check_ca_rollover(w, cfg):
    roots = {r["fingerprint"]: r for r in w.ks.trust_records("plant") if r["role"] == "root"}
    assert w.old_root_fp in roots  # old root kept while old certificates may be in use
    new = [r for fp, r in roots.items() if fp != w.old_root_fp]
    assert len(new) == 1 and new[0]["verified_by"] == "newWithOld link"
    trusted = list((w.deploy_dir / "pki" / "trusted" / "certs").iterdir())
    assert len(trusted) == 2  # the OPC UA trust list holds both roots


def clock_far_ahead(w):
    skew = datetime.timedelta(days=3 * 365)
    cfg = w.config(deploy_toml(w), **FAST)
    return cfg, lambda: version(w) >= 3 and deployed_live(w), [], {"wall": lambda: utcnow() + skew}


def clock_1970(w):
    cfg = w.config(deploy_toml(w), **FAST)
    epoch = utcnow()

    def wall():  # an RTC-less board after power-up: 1970 plus uptime
        return datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + (utcnow() - epoch)
    return cfg, lambda: version(w) >= 3 and deployed_live(w), [], {"wall": wall}


class TimelessSim(LabSimClient):
    """The simulator CA without its time in the responses (an EST server's body carries none)."""

    def _issue(self, request):
        return dataclasses.replace(super()._issue(request), server_time=None)

    async def ca_certs(self, auth=None):
        return dataclasses.replace(await super().ca_certs(auth), server_time=None)


def no_ca_time_1970(w):
    cfg = w.config(deploy_toml(w), **FAST)
    w.sim = TimelessSim(w.ca, w.sim.domain, lifetime_s=w.sim.lifetime_s)
    epoch = utcnow()

    def wall():
        return datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + (utcnow() - epoch)
    return cfg, lambda: version(w) >= 3 and deployed_live(w), [], {"wall": wall}


def check_no_ca_time(w, cfg):
    check_clock(w, cfg)  # no failures; the metrics show the clock correction
    assert len(w.sim.issued) >= 2  # the renewals came from the timeless CA


def check_clock(w, cfg):
    assert meta(w).get("failures_total", 0) == 0
    offset = [ln for ln in w.metrics.read_text().splitlines() if ln.startswith("devagent_clock_offset_seconds ")]
    assert abs(float(offset[0].split()[1])) > 86400


def hook_failing(w):
    flag = w.root / "hook-broken"
    flag.write_text("x")
    cfg = w.config(deploy_toml(w, hooks=[f"sh -c 'test ! -e {flag}'"]), **FAST)
    # The hook fails (first deployment and its retries, maybe a renewal's too) until it has failed twice.
    return cfg, lambda: version(w) >= 3 and deployed_live(w), [
        (lambda: meta(w).get("deploy_failures_total", 0) >= 2, flag.unlink)]


def check_hook_failing(w, cfg):
    m = meta(w)
    assert m["deploy_failures_total"] >= 1
    assert m.get("failures_total", 0) == 0  # renewals themselves never failed
    assert "last_error" not in m


def disk_full(w):
    cfg = w.config(deploy_toml(w), **FAST)
    state = {"full": False}

    def fault(stage, path):
        if state["full"] and path.startswith(str(w.deploy_dir)) and stage == "write":
            raise OSError(errno.ENOSPC, "No space left on device", path)

    fsutil._FAULT_HOOK = fault  # keystore.fsutil's documented fault-injection point
    w.cleanup = lambda: setattr(fsutil, "_FAULT_HOOK", None)
    # The disk fills up after the first deployment: the first renewal (~1 s after issuance) cannot be deployed, and
    # the enrolled certificate (valid until 5 s after issuance) stays deployed meanwhile; the disk has room again
    # after the first failed deployment. (A disk full past the deployed certificate's expiry would lose it whatever
    # the daemon did.)
    return cfg, lambda: version(w) >= 3 and deployed_live(w), [
        (once_deployed(w), lambda: state.update(full=True)),
        (lambda: meta(w).get("deploy_failures_total", 0) >= 1, lambda: state.update(full=False))]


def check_disk_full(w, cfg):
    assert meta(w)["deploy_failures_total"] >= 1
    assert not list(w.deploy_dir.glob(".*.tmp"))  # no temp files left behind


SCENARIOS = [
    # story,            lifetime_s, setup,          check
    ("steady renewal",  5, steady, check_steady),
    ("CA down, back",   8, ca_down, check_ca_down),
    ("CA rollover",     5, ca_rollover, check_ca_rollover),
    ("clock +3 years",  5, clock_far_ahead, check_clock),
    ("clock in 1970",   5, clock_1970, check_clock),
    ("hook failing",    5, hook_failing, check_hook_failing),
    ("disk full",       5, disk_full, check_disk_full),
    ("1970, no CA time", 5, no_ca_time_1970, check_no_ca_time),
]


@pytest.mark.parametrize("story,lifetime,setup,check", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario(world, story, lifetime, setup, check, caplog):
    caplog.set_level(logging.INFO, logger="devagent")
    w = world(lifetime_s=lifetime)
    w.cleanup = None
    cfg, until, actions, *extra = setup(w)
    try:
        asyncio.run(drive(w, w.daemon(cfg, **(extra[0] if extra else {})), until=until, actions=actions))
    finally:
        if w.cleanup:
            w.cleanup()
    check(w, cfg)
    if "clock" in story:
        assert any("using CA time" in r.getMessage() for r in caplog.records)
    if "no CA time" in story:
        assert any("newest notBefore of our certificates" in r.getMessage() for r in caplog.records)


def test_1970_no_ca_time_stores_a_certificate_a_few_seconds_ahead_of_the_estimate(world, caplog):
    """A board at 1970+uptime whose CA sends no time estimates the time as the newest notBefore of its certificates
    plus uptime. The enrolled certificate was backdated 4 s and the renewals are not backdated (as with many CAs),
    so the first renewal's notBefore is >= 3 s after that estimate: inside its uncertainty, so it is stored (checked
    at the estimate as a trusted time, it was refused as not yet valid), and status/audit say it was checked at an
    estimated time."""
    caplog.set_level(logging.INFO, logger="devagent")
    w = world(lifetime_s=5, backdate_s=4)
    cfg = w.config(deploy_toml(w), **FAST)
    w.sim = TimelessSim(w.ca, w.sim.domain, lifetime_s=5, backdate_s=0)
    first_nb = w.ks.get(NAME).not_before
    epoch = utcnow()

    def wall():
        return datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + (utcnow() - epoch)
    asyncio.run(drive(w, w.daemon(cfg, wall=wall), until=lambda: version(w) >= 3 and deployed_live(w)))
    assert meta(w).get("failures_total", 0) == 0, meta(w).get("last_error")
    assert w.sim.issued[0].not_valid_before_utc - first_nb >= datetime.timedelta(seconds=3)
    checked = meta(w)["checked_at"]  # status shows what the last renewal's validity was checked at
    assert checked["clock"] == "estimate" and 0 < checked["uncertainty_s"] <= policy.NOT_BEFORE_SLACK_S
    assert "newest notBefore" in checked["source"]
    stores = [e for e in w.ks.audit_entries() if e["action"] == "certificate-store" and e["version"] > 1]
    assert stores and all(e["checked_at"]["clock"] == "estimate" for e in stores)  # the audit log, per certificate
    assert any("validity checked at the estimated time" in r.getMessage() for r in caplog.records)


def test_1970_no_ca_time_refuses_a_certificate_far_ahead_of_the_estimate(world, caplog):
    """A board at 1970+uptime whose CA sends no time, and a CA whose notBefore is two hours ahead of what the board
    can know (newest notBefore + uptime, plus the hour CAs backdate by): the certificate is refused as not yet
    valid, the error names the estimate, its window and how it was made, the current certificate stays live and
    deployed, and nothing new is stored."""
    caplog.set_level(logging.INFO, logger="devagent")
    w = world(lifetime_s=30)
    cfg = w.config(deploy_toml(w), **{"renewal.fraction": 0.1})  # due ~3 s after issuance, valid for 30 s
    w.sim = TimelessSim(w.ca, w.sim.domain, lifetime_s=w.sim.lifetime_s, clock_offset_s=2 * 3600.0)
    epoch = utcnow()

    def wall():
        return datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + (utcnow() - epoch)
    old = w.ks.get(NAME)
    asyncio.run(drive(w, w.daemon(cfg, wall=wall), until=lambda: meta(w).get("failures", 0) >= 1
                      and deployed_live(w)))
    cred = w.ks.get(NAME)
    assert cred.version == old.version and fingerprint(cred.certificate) == fingerprint(old.certificate)
    assert len(w.sim.issued) >= 1  # the CA did issue; the keystore refused it
    err = meta(w)["last_error"]
    assert "is not valid before" in err and "estimated time" in err and "newest notBefore" in err, err
    assert "s after the latest time allowed" in err
    assert meta(w)["checked_at"]["clock"] == "estimate"
    assert not [e for e in w.ks.audit_entries() if e["action"] == "certificate-store" and e.get("version", 0) > 1]
    assert w.bundle_ok(w.deploy_dir / "bundle.pem") is None  # the old one is still deployed and valid


def test_rollover_without_link_keeps_old_certificate(world, caplog):
    """A new root offered without a verifiable link and no operator fingerprint is refused: the device keeps its
    (still valid) certificate, reports the error, and does not trust the new root."""
    w = world(lifetime_s=30)
    cfg = w.config(deploy_toml(w), **{"renewal.fraction": 0.1})  # due ~2 s after issuance, valid for 30 s
    dom = w.sim.rollover()
    dom.new_with_old = None  # the CA publishes no link certificate
    dom.old_with_new = None
    old = w.ks.get(NAME)
    asyncio.run(drive(w, w.daemon(cfg), until=lambda: meta(w).get("failures", 0) >= 1 and deployed_live(w)))
    cred = w.ks.get(NAME)
    assert cred.version == old.version
    assert "untrusted" in meta(w)["last_error"] or "does not chain" in meta(w)["last_error"]
    assert all(r["fingerprint"] != fingerprint(dom.root_cert) for r in w.ks.trust_records("plant"))
    assert w.bundle_ok(w.deploy_dir / "bundle.pem") is None  # the old one is still deployed and valid


def test_rollover_with_operator_fingerprint(world):
    """Without a link, the operator's fingerprint of the new root is the other way in."""
    w = world(lifetime_s=5)
    dom = w.sim.rollover()
    dom.new_with_old = None
    cfg = w.config(deploy_toml(w), **FAST, **{"ca.fingerprint": fingerprint(dom.root_cert)})
    asyncio.run(drive(w, w.daemon(cfg), until=lambda: version(w) >= 2 and deployed_live(w)))
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
        while not (w.metrics.exists() and d._stop is not None):  # the first pass is done: handlers installed
            assert not task.done(), task
            await asyncio.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(task, 60)
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


def test_revoked_credential_is_neither_renewed_nor_deployed(world):
    """A credential recorded as revoked (``devagent revoke``) is left alone by the daemon: a renewal that is due is
    not attempted and nothing is deployed for it; ``status`` shows it as REVOKED."""
    w = world(lifetime_s=30)
    cfg = w.config(deploy_toml(w), **{"renewal.fraction": 0.1})  # due ~3 s after issuance
    w.ks.set_meta(NAME, revoked="keyCompromise", revoked_at=utcnow().isoformat())
    old = w.ks.get(NAME)
    d = w.daemon(cfg, wall=lambda: utcnow() + datetime.timedelta(seconds=20))  # the renewal is due
    assert NAME not in [c.name for c in d.managed()]
    asyncio.run(d.tick())
    assert w.ks.get(NAME).version == old.version
    assert not (w.deploy_dir / "bundle.pem").exists()
    assert w.ks.get(NAME).summary()["revoked"] == "keyCompromise"


def test_daemon_time_reading_per_source(world):
    """What the daemon checks certificates at (Daemon.reading), per what it knows: a trusted clock is strict; an
    untrusted one is an estimate whose uncertainty comes from how it was obtained."""
    w = world(lifetime_s=60)
    real = utcnow()
    mono = {"t": 1000.0}
    wall = {"t": real}
    trusted = w.daemon(w.config("", **{"clock.trusted": True}), wall=lambda: wall["t"], mono=lambda: mono["t"])
    r = trusted.reading()
    assert r.trusted and r.at == real and r.uncertainty_s == 0
    d = w.daemon(w.config(""), wall=lambda: wall["t"], mono=lambda: mono["t"])
    r = d.reading()  # plausible system clock, not compared with the CA yet: up to clock.tolerance_s off
    assert (r.clock, r.uncertainty_s) == ("estimate", 300.0) and "not yet compared" in r.source
    d._observe_time(real + datetime.timedelta(seconds=2), "cmp response time", round_trip_s=0.5)
    r = d.reading()  # agrees with the CA within tolerance: the system clock, off by that much besides
    assert r.at == real and r.uncertainty_s == pytest.approx(1 + 0.5 + 2) and "2 s from the CA's time" in r.source
    wall["t"] = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    d._observe_time(real, "cmp response time", round_trip_s=0.5)
    mono["t"] += 600  # ten minutes later (by both clocks)
    wall["t"] += datetime.timedelta(seconds=600)
    r = d.reading()  # obviously wrong clock: the CA's time carried forward, its resolution + round trip + drift
    assert r.at == real + datetime.timedelta(seconds=600)
    assert r.uncertainty_s == pytest.approx(1 + 0.5 + 600 * policy.CLOCK_DRIFT_PPM / 1e6)
    assert "the CA's time (cmp response time) seen 600 s ago" in r.source
    blank = w.daemon(w.config(""), wall=lambda: wall["t"], mono=lambda: mono["t"])
    assert blank.reading().uncertainty_s > 10 * 365 * 86400  # 1970, nothing known: only "after 2024"
    blank._note_not_before(w.ks.list())
    r = blank.reading()  # 1970, no CA time: at least the newest notBefore + uptime, CAs backdate up to an hour
    nb = w.ks.get(NAME).not_before
    assert r.at - datetime.timedelta(seconds=r.uncertainty_s) <= nb
    assert r.at + datetime.timedelta(seconds=r.uncertainty_s) >= nb + datetime.timedelta(hours=1)
    assert "newest notBefore" in r.source


def test_ca_update_is_checked_at_the_daemons_reading(world):
    """The daemon's CA checks (rollover) judge the offered certificates at its reading too: a new root whose
    notBefore is 20 s after the estimate is accepted within +- 30 s and refused with +- 5 s (nothing trusted)."""
    from agent import lifecycle
    from keystore.errors import VerificationError
    from keystore.validator import ClockReading

    w = world(lifetime_s=60)
    w.sim.rollover()
    result = asyncio.run(w.sim.ca_certs())
    before = [r["fingerprint"] for r in w.ks.trust_records("plant")]
    at = result.new_root.not_valid_before_utc - datetime.timedelta(seconds=20)
    with pytest.raises(VerificationError) as e:
        lifecycle.apply_ca_update(w.ks, "plant", result, now=ClockReading(at, "estimate", 5.0, "test estimate"))
    assert e.value.reason == "not-yet-valid" and "test estimate" in str(e.value)
    assert [r["fingerprint"] for r in w.ks.trust_records("plant")] == before
    added = lifecycle.apply_ca_update(w.ks, "plant", result, now=ClockReading(at, "estimate", 30.0, "test estimate"))
    assert fingerprint(result.new_root) in added
