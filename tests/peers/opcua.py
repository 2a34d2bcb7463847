"""OPC UA push-management peers for tests: the device (devagent's asyncua server, in-process or as
``devagent opcua serve``) and GDS-side identities whose certificates a lab CA issues.

Everything listens on 127.0.0.1 only. The GDS role is played by ``agent.opcua.client.PushClient`` (asyncua's
client stack) — an independent asyncua client session driving the standard ns=0 methods.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.lab.ca import LabCA
from keystore.store import Keystore

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "plant"
GDS_DN = "CN=gds,O=Plant"
APP_URI = "urn:dev1:devagent:opcua"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Party:
    """A client's application instance certificate and key."""

    certificate: x509.Certificate
    key: object
    uri: str

    def identity(self):
        from agent.opcua.client import Identity

        return Identity(self.certificate, self.key, self.uri)


def make_party(ca: LabCA, domain: str, dn: str, uri: str) -> Party:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = ca.issue(domain, key.public_key(), x509.Name.from_rfc4514_string(dn), [x509.UniformResourceIdentifier(uri)],
                    profile="opcua")
    return Party(cert, key, uri)


@dataclasses.dataclass
class World:
    base: Path
    lab: LabCA
    ks: Keystore
    gds: Party  # SecurityAdmin
    operator: Party  # trusted, no role
    stranger: Party  # certificate of another domain's CA

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def pki(self) -> Path:
        return self.base / "pki"

    def anchors(self):
        return [self.lab.domain(DOMAIN).root_cert]

    def intermediates(self):
        return [self.lab.domain(DOMAIN).ca_cert]


def make_world(base: Path, lab: LabCA | None = None) -> World:
    base.mkdir(parents=True, exist_ok=True)
    lab = lab or LabCA.create(base / "lab", domains=(DOMAIN, "other"))
    ks = Keystore.init(base / "state")
    d = lab.domain(DOMAIN)
    ks.add_trust_anchors(DOMAIN, [d.root_cert, d.ca_cert], source="commissioning")
    return World(base, lab, ks, make_party(lab, DOMAIN, GDS_DN, "urn:test:gds"),
                 make_party(lab, DOMAIN, "CN=operator,O=Plant", "urn:test:operator"),
                 make_party(lab, "other", "CN=stranger,O=Elsewhere", "urn:test:stranger"))


def push_config(**kw):
    from agent.opcua.push import PushConfig

    kw.setdefault("admin_subjects", (GDS_DN,))
    kw.setdefault("hostnames", ("127.0.0.1",))
    return PushConfig(application_uri=APP_URI, domain=DOMAIN, **kw)


@contextlib.asynccontextmanager
async def device(world: World, **kw):
    """An in-process device: PushService + PushServer on a free port, deploying into ``world.pki``."""
    from agent.opcua.deploy import deploy
    from agent.opcua.push import PushService
    from agent.opcua.server import PushServer

    server_kw = {k: kw.pop(k) for k in ("allow_none", "policies") if k in kw}
    hooks = kw.pop("hooks", ())

    async def deployer(creds, tl):
        await deploy(world.ks, creds, tl, [world.pki], hooks, timeout_s=30)

    svc = PushService(world.ks, push_config(**kw), world.state, deploy=deployer)
    srv = PushServer(svc, f"opc.tcp://127.0.0.1:{free_port()}/devagent", close_delay_s=0.2, **server_kw)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def gds_client(world: World, srv_or_url, party: Party | None = None, **kw):
    """A PushClient for ``party`` (default the GDS) that trusts the device's bootstrap certificate by fingerprint
    and the domain's CA otherwise."""
    from agent.opcua.client import PushClient

    url = getattr(srv_or_url, "url", srv_or_url)
    if "server_fingerprint" not in kw and hasattr(srv_or_url, "endpoint_fingerprint"):
        kw["server_fingerprint"] = srv_or_url.endpoint_fingerprint
    kw.setdefault("intermediates", world.intermediates())
    kw.setdefault("anchors", world.anchors())
    return PushClient(url, (party or world.gds).identity(), **kw)


class CliDevice:
    """``devagent opcua serve`` as a child process (a real process: SIGTERM, kill -9, restart)."""

    def __init__(self, world: World, *extra: str, port: int | None = None, config: str = "",
                 pki_dir_option: bool = True):
        self.world = world
        self.config = config  # agent.toml text ([credential.opcua] deploy targets and hooks)
        self.pki_dir_option = pki_dir_option
        self.port = port or free_port()
        self.ready = world.base / f"ready-{self.port}"
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.url = f"opc.tcp://127.0.0.1:{self.port}/devagent"
        self.endpoint_fingerprint: str | None = None

    def start(self, timeout_s: float = 60.0) -> "CliDevice":
        self.ready.unlink(missing_ok=True)
        env = dict(os.environ, DEVAGENT_PROFILE="generic-x86_64", DEVAGENT_CONFIG=str(self.world.base / "none.toml"))
        (self.world.base / "none.toml").write_text("")
        if self.config:
            (self.world.base / "agent.toml").write_text(self.config)
            env["DEVAGENT_CONFIG"] = str(self.world.base / "agent.toml")
        self.log = open(self.world.base / f"serve-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--state-dir", str(self.world.state), "opcua", "serve",
             "--port", str(self.port), "--domain", DOMAIN, "--application-uri", APP_URI, "--hostname", "127.0.0.1",
             "--admin-subject", GDS_DN, *(["--pki-dir", str(self.world.pki)] if self.pki_dir_option else []),
             "--ready-file", str(self.ready), *self.extra], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"devagent opcua serve exited with {self.proc.returncode}: "
                                   f"{(self.world.base / f'serve-{self.port}.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("devagent opcua serve did not become ready in time")
            time.sleep(0.05)
        self.endpoint_fingerprint = self.ready.read_text().split()[1]
        return self

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        rc, self.proc = self.proc.returncode, None
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        self.proc = None
