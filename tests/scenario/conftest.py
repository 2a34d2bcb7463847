"""Scenario fixtures: a lab CA, a keystore with one enrolled credential, the simulator transport, the daemon."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import lifecycle
from agent.config import load_config
from agent.daemon import Daemon
from agent.lab.ca import LabCA
from keystore.certs import same_public_key
from keystore.csr import parse_subject
from keystore.store import Keystore
from tests.peers.labsim import LabSimClient

DOMAIN = "plant"
NAME = "mqtt"


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


@dataclasses.dataclass
class World:
    ks: Keystore
    ca: LabCA
    sim: LabSimClient
    root: Path
    deploy_dir: Path
    metrics: Path

    def config(self, toml: str = "", **sets):
        cfg_file = self.root / "agent.toml"
        cfg_file.write_text(toml)
        base = {"profile": "generic-x86_64", "keystore.path": str(self.ks.root), "renewal.retry_base_s": 0.3,
                "renewal.retry_cap_s": 1.0, "renewal.check_interval_s": 0.5, "renewal.jitter": 0.0,
                "metrics.textfile": str(self.metrics), "daemon.notify": False}
        base.update(sets)
        return load_config(base, env={}, config_path=cfg_file)

    def daemon(self, cfg, **kw) -> Daemon:
        return Daemon(self.ks, cfg, client_factory=lambda cred: self.sim, **kw)

    def bundle_ok(self, path: Path, now=None) -> str | None:
        """None when ``path`` holds a key and a certificate for it that is valid now; else what is wrong."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return "missing"
        key = serialization.load_pem_private_key(data, None)
        cert = x509.load_pem_x509_certificates(data)[0]
        now = now or utcnow()
        if not same_public_key(key.public_key(), cert.public_key()):
            return "key and certificate do not match"
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return f"certificate not valid now ({cert.not_valid_before_utc} .. {cert.not_valid_after_utc})"
        return None


@pytest.fixture
def world(tmp_path) -> World:
    def make(lifetime_s: float = 3, **simkw) -> World:
        ca = LabCA.create(tmp_path / "lab", domains=(DOMAIN,))
        ks = Keystore.init(tmp_path / "state")
        ks.add_trust_anchors(DOMAIN, [ca.domain(DOMAIN).root_cert], source="test")
        sim = LabSimClient(ca, DOMAIN, lifetime_s=lifetime_s, **simkw)
        asyncio.run(lifecycle.enroll(ks, sim, name=NAME, domain=DOMAIN, subject=parse_subject("CN=dev1,O=Plant"),
                                     remember={"server": "labsim://plant"}))
        return World(ks, ca, sim, tmp_path, tmp_path / "deploy", tmp_path / "metrics" / "devagent.prom")
    return make
