"""Shared fixtures: a session lab CA and fresh keystores. Protocol peers live in tests/peers/."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from agent.lab.ca import LabCA
from keystore.store import Keystore

DOMAIN = "plant"

# Properties are checked, never times (GUIDE: no timed assertions): hypothesis's default deadline of 200 ms per
# example and its "too slow" health check fail a correct test on a loaded machine (test_daemon_status's schedule
# property took 300-700 ms per example next to other test runs). HYPOTHESIS_PROFILE=default restores them.
settings.register_profile("devagent", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "devagent"))


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> LabCA:
    """A lab CA with domains 'plant' (P-256) and 'other' (a second, unrelated hierarchy)."""
    return LabCA.create(tmp_path_factory.mktemp("lab"), domains=(DOMAIN, "other"))


@pytest.fixture
def ks(tmp_path, lab) -> Keystore:
    """A fresh keystore trusting the lab's 'plant' root."""
    k = Keystore.init(tmp_path / "state")
    k.add_trust_anchors(DOMAIN, [lab.domain(DOMAIN).root_cert], source="test")
    return k


def snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` with its SHA-256: compare before/after to prove nothing was stored."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if f == ".lock":
                continue
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (tests/peers/postgres.py: initdb + pg_ctl on 127.0.0.1, as a non-root user),
    started once per session and stopped at the end. ``postgres.create_database(name)`` gives a fresh URL."""
    from tests.peers.postgres import start_server

    srv = start_server()
    yield srv
    srv.close()
