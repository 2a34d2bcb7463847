"""Reusable pytest fixtures and helpers for EST tests: a lab CA and lab EST servers over real TLS on loopback.

Import the fixtures you use into a test module (``from tests.peers.est import est_lab, est_server, ...``);
conftest.py is shared, so they live here. Servers are session-scoped; ``est_fault_server`` resets its fault
after each test.
"""
from __future__ import annotations

import asyncio
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from enroll_clients.base import ClientAuth, EnrollOptions

EST_USER = "device-0001"
EST_PASSWORD = b"correct horse battery staple"
EST_ONE_TIME_USER = "otp-0001"
EST_ONE_TIME_PASSWORD = b"one-time-7f3a"

INSTALL_HINT = {"curl": "apt-get install curl", "openssl": "apt-get install openssl"}


def require_tool(name: str) -> str:
    """Path of a peer tool; a missing one FAILS the test (peers are never skipped) with an install hint."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is required for this interop test and is not installed: {INSTALL_HINT.get(name, '')}")
    return path


def run(coro):
    return asyncio.run(coro)


def new_key(kind: str = "p256"):
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind.startswith("rsa"):
        return rsa.generate_private_key(65537, int(kind[3:]))
    raise ValueError(kind)


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_csr(key, cn: str = "device-0001", sans=(), extensions=(), challenge_password: str | None = None
             ) -> x509.CertificateSigningRequest:
    """Test-side CSR builder (in production the keystore builds CSRs)."""
    b = x509.CertificateSigningRequestBuilder().subject_name(name(cn))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    for e in extensions:
        b = b.add_extension(e.value, critical=e.critical)
    if challenge_password is not None:
        b = b.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge_password.encode())
    return b.sign(key, hashes.SHA256())


def est_options(server, anchors=(), **kw) -> EnrollOptions:
    return EnrollOptions(server=server, trust_anchors=tuple(anchors), timeout_s=kw.pop("timeout_s", 10.0), **kw)


def basic_auth(**kw) -> ClientAuth:
    return ClientAuth(username=EST_USER, password=EST_PASSWORD, **kw)


@pytest.fixture(scope="session")
def est_lab(tmp_path_factory):
    from agent.lab.ca import LabCA

    return LabCA.create(tmp_path_factory.mktemp("est-lab") / "lab", domains=("plant", "other"))


@pytest.fixture(scope="session")
def est_root(est_lab):
    return est_lab.domain("plant").root_cert


@pytest.fixture(scope="session")
def est_server(est_lab):
    from agent.lab.est_server import start_est_server

    h = start_est_server(est_lab, "plant", users={EST_USER: EST_PASSWORD, EST_ONE_TIME_USER: EST_ONE_TIME_PASSWORD},
                         one_time={EST_ONE_TIME_USER})
    yield h
    h.stop()


@pytest.fixture(scope="session")
def _est_fault_server(est_lab):
    from agent.lab.est_server import start_est_server

    h = start_est_server(est_lab, "plant", users={EST_USER: EST_PASSWORD})
    yield h
    h.stop()


@pytest.fixture
def est_fault_server(_est_fault_server):
    """The fault-injection server, with faults, pending rounds and counters reset after each test."""
    yield _est_fault_server
    _est_fault_server.set_fault(None)
    _est_fault_server.config.pending_rounds = 0
    _est_fault_server.config.retry_after_s = 1
    _est_fault_server.reset_state()


@pytest.fixture(scope="session")
def est_ldevid(est_lab):
    """(certificate, key) of a device credential issued by the plant domain, for TLS client auth."""
    key = new_key("p256")
    cert = est_lab.issue("plant", key.public_key(), name("device-0001"), profile="ldevid")
    return cert, key


__all__ = ["est_lab", "est_root", "est_server", "_est_fault_server", "est_fault_server", "est_ldevid",
           "require_tool", "run", "new_key", "make_csr", "est_options", "basic_auth", "name",
           "EST_USER", "EST_PASSWORD", "EST_ONE_TIME_USER", "EST_ONE_TIME_PASSWORD"]


# ---- the devagent CLI on one keystore, and "nothing was stored" checks ----------------------------------------
def stored(state) -> dict:
    """What a keystore directory holds, for "a failure stored nothing" checks: the SHA-256 of every file, with
    the index compared as data minus the failure bookkeeping a failed renewal records on purpose for
    ``devagent status`` (``meta.last_error``, ``meta.last_failure``) and without empty tables. The append-only
    audit log is left out: it records the attempt (a pending key generated and discarded) by design."""
    import hashlib
    import json
    import os
    from pathlib import Path

    root = Path(state)
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            rel = str(p.relative_to(root))
            if f == ".lock" or rel == "audit.log":
                continue
            if rel == "keystore.json":
                doc = json.loads(p.read_text())
                for rec in (doc.get("credentials") or {}).values():
                    for k in ("last_error", "last_failure"):
                        (rec.get("meta") or {}).pop(k, None)
                doc = {k: v for k, v in doc.items() if v != {}}  # an empty table is no stored data
                out[rel] = json.dumps(doc, sort_keys=True)
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Devagent:
    """``devagent`` commands run in-process through click's CliRunner (the real command line: option parsing,
    lifecycle, exit codes) on one state directory. ``inside`` runs each invocation through a callable, e.g.
    a server's ``run`` that executes it on a thread inside the server's network namespace."""

    def __init__(self, state, inside=None, env=None):
        self.state = state
        self.inside = inside
        self.env = {"DEVAGENT_STATE_DIR": None, "DEVAGENT_CONFIG": None, **(env or {})}

    def __call__(self, *args, code: int | None = 0):
        from click.testing import CliRunner

        from agent.cli import cli

        def go():
            return CliRunner().invoke(cli, ["--state-dir", str(self.state), *args], env=self.env)

        r = self.inside(go) if self.inside else go()
        if code is not None:
            assert r.exit_code == code, (args, r.exit_code, r.output, r.exception)
        return r

    def json(self, *args, code: int | None = 0) -> dict:
        import json

        r = self("--json", *args, code=code)
        return json.loads(r.output[r.output.index("{"):])


__all__ += ["stored", "Devagent"]
