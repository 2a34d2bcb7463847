"""Decommissioning over the simulator: revoked at the CA, keys and deployed copies gone, audit record left."""
from __future__ import annotations

import asyncio

from agent.cli_ops import decommission_keystore
from tests.scenario.conftest import NAME
from tests.scenario.test_daemon_scenarios import deploy_toml


def test_decommission_revokes_deletes_and_audits(world):
    w = world(lifetime_s=60)
    cfg = w.config(deploy_toml(w))
    asyncio.run(w.daemon(cfg).run(once=True))  # deploy first
    assert (w.deploy_dir / "key.pem").exists()
    cred = w.ks.get(NAME)
    key_file = w.ks.root / cred.key_uri.split(":", 1)[1]
    assert key_file.exists()

    report = asyncio.run(decommission_keystore(w.ks, cfg, client_factory=lambda c: w.sim))

    assert report["revoked"] == [NAME] and report["not_revoked"] == {}
    assert w.ca.is_revoked(cred.certificate.serial_number)
    assert w.ks.list() == [] and w.ks.trust_records() == [] and w.ks.pending_keys() == []
    assert not key_file.exists()
    for f in ("key.pem", "cert.pem", "bundle.pem", "pki/own/private/mqtt.pem"):
        assert not (w.deploy_dir / f).exists()
    audit = [e for e in w.ks.audit_entries() if e["action"] == "decommission"]
    assert audit and audit[-1]["revoked"] == [NAME] and audit[-1]["deleted"] == [NAME]


def test_decommission_with_ca_down_still_wipes_and_names_the_serial(world):
    w = world(lifetime_s=60)
    cfg = w.config("")
    serial = w.ks.get(NAME).certificate.serial_number
    w.sim.down = True
    report = asyncio.run(decommission_keystore(w.ks, cfg, client_factory=lambda c: w.sim))
    assert NAME in report["not_revoked"] and "outage" in report["not_revoked"][NAME]
    assert w.ks.list() == [] and not w.ca.is_revoked(serial)
