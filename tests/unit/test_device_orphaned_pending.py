"""A CoAP pending key whose maker died is garbage (keystore/owner.py), whatever the start order: a service killed
between /csr and /verify leaves a pending key that a new service never offers to /verify (4.09 no-pending-key,
nothing stored changes), and `devagent coap serve` discards at start (Keystore.gc, as `devagent run` does)."""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509

from coap_services.device import DeviceConfig, DeviceService
from coap_services.errors import CONFLICT, ServiceError
from keystore import owner
from keystore.store import Keystore
from tests.conftest import DOMAIN

CHILD = textwrap.dedent('''
    import asyncio, os, signal, sys
    from coap_services import codec
    from coap_services.device import DeviceConfig, DeviceService
    from keystore.store import Keystore
    ks = Keystore.open(sys.argv[1])
    svc = DeviceService(ks, DeviceConfig(device_id="dev1", default_domain="plant"))
    res = asyncio.run(svc.csr(codec.CsrRequest(name="ldevid", domain="plant"), peer="dtls:clm1"))
    open(sys.argv[2], "wb").write(res.csr_der)
    os.kill(os.getpid(), signal.SIGKILL)   # the service dies between /csr and /verify
''')


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def killed_after_csr(ks, tmp_path) -> bytes:
    csr_path = tmp_path / "csr.der"
    p = subprocess.run([sys.executable, "-c", CHILD, str(ks.root), str(csr_path)], env=dict(os.environ))
    assert p.returncode == -signal.SIGKILL
    [rec] = ks.pending_keys()
    assert owner.alive(rec.get("owner")) is False
    return csr_path.read_bytes()


def test_verify_after_the_maker_was_killed_gets_no_pending_key(ks, lab, tmp_path):
    csr = killed_after_csr(ks, tmp_path)
    cert = lab.issue_from_csr(DOMAIN, x509.load_der_x509_csr(csr))
    svc = DeviceService(ks, DeviceConfig(device_id="dev1", default_domain=DOMAIN))  # restarted, no gc run
    assert asyncio.run(svc.status())["pending"] == 0
    before = snapshot(ks.root)
    with pytest.raises(ServiceError) as e:
        asyncio.run(svc.verify([cert, lab.domain(DOMAIN).ca_cert], peer="dtls:clm1"))
    assert (e.value.code, e.value.reason) == (CONFLICT, "no-pending-key")
    assert snapshot(ks.root) == before
    assert [c.name for c in ks.list()] == []


def test_coap_serve_start_discards_the_orphaned_pending_key(ks, tmp_path):
    from click.testing import CliRunner

    from agent.cli import App
    from agent.cli_coap import serve

    killed_after_csr(ks, tmp_path)
    uri = ks.pending_keys()[0]["uri"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:  # the service starts, then cannot listen
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        res = CliRunner().invoke(serve, ["--insecure", "--port", str(port)], obj=App(state_dir_option=ks.root,
                                                                                      json=False))
    assert res.exit_code == 6, res.output
    assert Keystore.open(ks.root).pending_keys() == []
    assert not (ks.root / uri.removeprefix("file:")).exists()
