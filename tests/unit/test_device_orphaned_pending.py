"""A CoAP pending key whose maker died is garbage (keystore/owner.py), whatever the start order. A service killed
between /csr and /verify loses that pending enrollment: with a software key there is nothing on disk (the key was
held in memory); with a PKCS#11 (or TPM) key its durable pending record stays until gc, and a new service never
offers it to /verify. Either way /verify gets 4.09 no-pending-key and nothing stored changes; `devagent coap serve`
discards orphaned pending keys at start (Keystore.gc, as `devagent run` does)."""
from __future__ import annotations

import asyncio
import hashlib
import json
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
from tests.peers.pkcs11 import softhsm  # noqa: F401  (fixture)

CHILD = textwrap.dedent('''
    import asyncio, json, os, signal, sys
    from coap_services import codec
    from coap_services.device import DeviceConfig, DeviceService
    from keystore.store import Keystore
    ks = Keystore.open(sys.argv[1], backend_options=json.loads(sys.argv[3]))
    svc = DeviceService(ks, DeviceConfig(device_id="dev1", default_domain="plant", key_backend=sys.argv[4]))
    res = asyncio.run(svc.csr(codec.CsrRequest(name="ldevid", domain="plant"), peer="dtls:clm1"))
    open(sys.argv[2], "wb").write(res.csr_der)
    os.kill(os.getpid(), signal.SIGKILL)   # the service dies between /csr and /verify
''')

RECORD_CHILD = textwrap.dedent('''
    import os, signal, sys
    from keystore.store import Keystore
    ks = Keystore.open(sys.argv[1])
    ks.generate_key("p256", label="ldevid", pending_for={"source": "coap", "name": "ldevid", "domain": "plant",
                                                         "peer": "dtls:clm1", "kind": "ldevid"})
    os.kill(os.getpid(), signal.SIGKILL)   # a durable CoAP pending record, its maker gone
''')


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(params=["soft", "pkcs11"])
def store(request, tmp_path, lab):
    opts = {}
    if request.param == "pkcs11":
        opts = {"pkcs11": dict(request.getfixturevalue("softhsm").options)}
    k = Keystore.init(tmp_path / "state", backend_options=opts)
    k.add_trust_anchors(DOMAIN, [lab.domain(DOMAIN).root_cert], source="test")
    return k, request.param, opts


def test_verify_after_the_maker_was_killed_gets_no_pending_key(store, lab, tmp_path):
    ks, backend, opts = store
    before_csr = snapshot(ks.root)
    csr_path = tmp_path / "csr.der"
    p = subprocess.run([sys.executable, "-c", CHILD, str(ks.root), str(csr_path), json.dumps(opts), backend],
                       env=dict(os.environ))
    assert p.returncode == -signal.SIGKILL
    if backend == "soft":  # held in memory: the killed service wrote nothing
        assert ks.pending_keys() == [] and snapshot(ks.root) == before_csr
    else:  # a durable record names the token's key; its owner is gone
        [rec] = ks.pending_keys()
        assert owner.alive(rec.get("owner")) is False
    cert = lab.issue_from_csr(DOMAIN, x509.load_der_x509_csr(csr_path.read_bytes()))
    svc = DeviceService(ks, DeviceConfig(device_id="dev1", default_domain=DOMAIN, key_backend=backend))  # no gc
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

    p = subprocess.run([sys.executable, "-c", RECORD_CHILD, str(ks.root)], env=dict(os.environ))
    assert p.returncode == -signal.SIGKILL
    [rec] = ks.pending_keys()
    assert owner.alive(rec.get("owner")) is False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:  # the service starts, then cannot listen
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        res = CliRunner().invoke(serve, ["--insecure", "--port", str(port)], obj=App(state_dir_option=ks.root,
                                                                                      json=False))
    assert res.exit_code == 6, res.output
    assert Keystore.open(ks.root).pending_keys() == []
    assert not (ks.root / rec["uri"].removeprefix("file:")).exists()
