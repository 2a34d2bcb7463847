"""A device's ApplyChanges as a program, for kill -9 tests (tests/fault/test_opcua_apply_kill.py).

``python -m tests.peers.opcua_apply prepare BASE``: a world whose device already has a pushed certificate and
TrustList (version 1) deployed into BASE/pki, and a staged second version (new key, certificate, TrustList) in
BASE/staged.json. ``apply BASE [--kill-at N] [--trace FILE]`` commits the staged transaction exactly as
ApplyChanges does (``PushService._apply``), SIGKILLing itself at the N-th durable write step (the documented
``keystore.fsutil._FAULT_HOOK``). ``restart BASE`` starts the service again (``initialize``: rolls an interrupted
ApplyChanges forward) and deploys.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.opcua import trustlist as tlmod
from keystore import fsutil

DOMAIN = "plant"
CALLER = None


def _service(base: Path):
    from agent.opcua.deploy import deploy
    from agent.opcua.push import PushService
    from keystore.store import Keystore
    from tests.peers.opcua import push_config

    ks = Keystore.open(base / "state")

    async def deployer(creds, tl):
        await deploy(ks, creds, tl, [base / "pki"])

    return PushService(ks, push_config(), base / "state", deploy=deployer)


def _caller():
    from agent.opcua.push import Caller

    return Caller(session="gds-session", encrypted=True, admin=True, who="CN=gds,O=Plant")


async def prepare(base: Path) -> None:
    from tests.peers.opcua import make_world

    w = make_world(base)
    svc = _service(base)
    await svc.initialize()
    c = _caller()
    d = w.lab.domain(DOMAIN)
    tl1 = tlmod.TrustList(trusted_certificates=(d.root_cert.public_bytes(Encoding.DER),),
                          issuer_certificates=(d.ca_cert.public_bytes(Encoding.DER),))
    csr = x509.load_der_x509_csr(await svc.create_signing_request(c, None, None, "CN=dev1,O=Plant", True, os.urandom(32)))
    await svc.update_certificate(c, None, None, w.lab.issue_from_csr(DOMAIN, csr, "opcua").public_bytes(Encoding.DER),
                                 [d.ca_cert.public_bytes(Encoding.DER)], None, None)
    h = await svc.open(c, 6)
    await svc.write(c, h, tlmod.encode(tl1))
    await svc.close_and_update(c, h)
    await svc.apply_changes(c)
    # The second version, staged: a new key (pending), its certificate, a TrustList with one more root.
    csr2 = x509.load_der_x509_csr(await svc.create_signing_request(c, None, None, "CN=dev1,O=Plant", True,
                                                                   os.urandom(32)))
    cert2 = w.lab.issue_from_csr(DOMAIN, csr2, "opcua")
    tl2 = tlmod.TrustList(trusted_certificates=(*tl1.trusted_certificates,
                                                w.lab.domain("other").root_cert.public_bytes(Encoding.DER)),
                          issuer_certificates=tl1.issuer_certificates)
    key_uri = [k["uri"] for k in svc.ks.pending_keys() if k["pending_for"].get("slot") == "opcua"][0]
    (base / "staged.json").write_text(json.dumps({
        "key_uri": key_uri, "certificate": cert2.public_bytes(Encoding.DER).hex(),
        "chain": [d.ca_cert.public_bytes(Encoding.DER).hex(), d.root_cert.public_bytes(Encoding.DER).hex()],
        "trustlist": tlmod.encode(tl2).hex()}))


async def apply(base: Path) -> None:
    from agent.opcua.push import Staged, Transaction

    svc = _service(base)
    s = json.loads((base / "staged.json").read_text())
    slot = svc.config.slots[0]
    cert = x509.load_der_x509_certificate(bytes.fromhex(s["certificate"]))
    chain = tuple(x509.load_der_x509_certificate(bytes.fromhex(h)) for h in s["chain"])
    t = Transaction("gds-session", "CN=gds,O=Plant", 0.0, {slot.credential: Staged(slot, cert, chain, s["key_uri"])},
                    tlmod.decode(bytes.fromhex(s["trustlist"]))[1])
    await svc._apply(t)


async def restart(base: Path) -> None:
    await _service(base).initialize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("prepare", "apply", "restart"))
    ap.add_argument("base", type=Path)
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--trace")
    a = ap.parse_args(argv)
    step = 0

    def hook(stage, path):
        nonlocal step
        step += 1
        if a.trace:
            with open(a.trace, "a") as f:
                f.write(f"{step} {stage} {path}\n")
        if a.kill_at and step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    if a.kill_at or a.trace:
        fsutil._FAULT_HOOK = hook
    asyncio.run({"prepare": prepare, "apply": apply, "restart": restart}[a.mode](a.base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
