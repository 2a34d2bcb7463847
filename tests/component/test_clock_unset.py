"""A board whose clock was never set (no RTC, no NTP yet: it reads 1970) still accepts a fresh certificate, and
still rejects a certificate that is wrong for another reason.

- Through the command line: ``devagent enroll`` / ``renew`` run under libfaketime (Debian ``faketime``) at
  1970-01-02 against the lab CMP server on loopback (which sends its time in messageTime).
- Through the lifecycle with a CA that sends no time at all (the simulator peer with its time field stripped), the
  clock given by the lifecycle's clock injection (``now=``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent import lifecycle
from agent.lab.ca import LabCA
from agent.lab.cmp_server import start_cmp_server
from keystore.csr import parse_subject
from keystore.errors import VerificationError
from keystore.store import Keystore
from tests.peers import faketime
from tests.peers.labsim import LabSimClient

REPO = Path(__file__).resolve().parents[2]
EPOCH = "1970-01-02 00:00:00"
T1970 = datetime.datetime(1970, 1, 2, tzinfo=datetime.timezone.utc)


def devagent_at(when: str, state: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVAGENT_")}
    env.update(PYTHONPATH=str(REPO), DEVAGENT_PROFILE="generic-x86_64", DEVAGENT_CONFIG=str(state.parent / "none.toml"))
    (state.parent / "none.toml").write_text("")
    return subprocess.run([sys.executable, "-m", "agent.cli", "--state-dir", str(state), *args],
                          cwd=REPO, env=faketime.env("@" + when, env), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def lab_cmp(tmp_path_factory):
    lab = LabCA.create(tmp_path_factory.mktemp("clocklab"), domains=("plant", "other"))
    srv = start_cmp_server(lab, "plant", secrets={b"dev1": b"s3cret"})
    yield lab, srv
    srv.stop()


def test_cli_enroll_and_renew_with_a_1970_clock(lab_cmp, tmp_path):
    lab, srv = lab_cmp
    root = tmp_path / "root.pem"
    root.write_bytes(lab.domain("plant").root_cert.public_bytes(__import__("cryptography").hazmat.primitives
                                                              .serialization.Encoding.PEM))
    state = tmp_path / "state"
    r = devagent_at(EPOCH, state, "keystore", "init")
    assert r.returncode == 0, r.stderr
    r = devagent_at(EPOCH, state, "enroll", "--protocol", "cmp", "--server", srv.url, "--domain", "plant",
                    "--ref", "dev1", "--secret", "pass:s3cret", "--trust", str(root), "--subject", "CN=dev1")
    assert r.returncode == 0, r.stderr
    assert "local clock differs from the CA's" in r.stderr  # logged, not silently accepted
    r = devagent_at(EPOCH, state, "renew", "ldevid-plant")
    assert r.returncode == 0, r.stderr
    ks = Keystore.open(state)
    assert ks.get("ldevid-plant").version == 2 and ks.check() == []


def test_cli_with_a_1970_clock_still_rejects_an_untrusted_ca(lab_cmp, tmp_path):
    lab, srv = lab_cmp
    other = tmp_path / "other-root.pem"  # a root that did not issue the server's certificates
    other.write_bytes(lab.domain("other").root_cert.public_bytes(__import__("cryptography").hazmat.primitives
                                                                .serialization.Encoding.PEM))
    state = tmp_path / "state"
    assert devagent_at(EPOCH, state, "keystore", "init").returncode == 0
    r = devagent_at(EPOCH, state, "enroll", "--protocol", "cmp", "--server", srv.url, "--domain", "plant",
                    "--ref", "dev1", "--secret", "pass:s3cret", "--trust", str(other), "--subject", "CN=dev1")
    assert r.returncode in (4, 5), r.stderr  # rejected (protection or certificate does not chain), nothing stored
    ks = Keystore.open(state)
    assert ks.list() == [] and ks.pending_keys() == []


# ---- a CA that sends no time ------------------------------------------------------------------------------
class TimelessSim(LabSimClient):
    """The simulator CA, but its responses carry no time (as an EST server's body does not); ``wrong_key`` makes it
    certify another key than the one requested."""

    wrong_key = False
    lifetime_override: tuple | None = None

    def _issue(self, request):
        if self.wrong_key:
            other = ec.generate_private_key(ec.SECP256R1())
            request = dataclasses.replace(request, csr=None, private_key=other)
        res = super()._issue(request)
        return dataclasses.replace(res, server_time=None)


@pytest.fixture
def world(tmp_path):
    ca = LabCA.create(tmp_path / "lab", domains=("plant", "other"))
    ks = Keystore.init(tmp_path / "state")
    ks.add_trust_anchors("plant", [ca.domain("plant").root_cert], source="test")
    return ca, ks


def _enroll(ks, sim, now, name="ldevid-plant"):
    return asyncio.run(lifecycle.enroll(ks, sim, name=name, domain="plant", subject=parse_subject("CN=dev1"),
                                        remember={"server": "labsim://plant"}, now=now))


def test_no_ca_time_and_a_1970_clock_accepts_a_fresh_certificate(world, caplog):
    ca, ks = world
    sim = TimelessSim(ca, lifetime_s=3600)
    cred = _enroll(ks, sim, T1970)
    assert cred.version == 1
    assert any("it was never set" in r.getMessage() for r in caplog.records)
    new = asyncio.run(lifecycle.renew(ks, cred.name, client=sim, now=T1970))
    assert new.version == 2 and new.certificate != cred.certificate and ks.check() == []


def test_no_ca_time_and_a_1970_clock_still_rejects_a_wrong_key(world):
    ca, ks = world
    sim = TimelessSim(ca, lifetime_s=3600)
    sim.wrong_key = True
    with pytest.raises(VerificationError, match="key"):
        _enroll(ks, sim, T1970)
    assert ks.list() == [] and ks.pending_keys() == []


def test_no_ca_time_and_a_1970_clock_still_rejects_an_untrusted_issuer(world):
    ca, ks = world
    sim = TimelessSim(ca, "other", lifetime_s=3600)  # issued under a root the device does not trust for plant
    with pytest.raises(VerificationError):
        _enroll(ks, sim, T1970)
    assert ks.list() == [] and ks.pending_keys() == []


def test_a_certificate_that_expired_before_any_plausible_time_is_still_rejected(world):
    """The clock floor bounds the correction: a certificate whose notAfter lies before 2024 cannot be fresh."""
    ca, ks = world
    sim = TimelessSim(ca, lifetime_s=3600, clock_offset_s=-(datetime.datetime.now(datetime.timezone.utc) - datetime.
                      datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)).total_seconds())
    with pytest.raises(VerificationError, match="expired|not valid|validity"):
        _enroll(ks, sim, T1970)
    assert ks.list() == []
