"""End to end: lab CA + ``devagent clm`` + two ``devagent serve`` processes (one over OSCORE, one over DTLS-PSK),
each issued certificate checked with ``openssl verify``; the CLM's state holds no private key material; SIGTERM
stops the services cleanly."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from keystore.certs import pem
from tests.component.test_coap_clm import assert_no_private_material
from tests.peers.coap import DOMAIN, ROOT, device_env, require_tool, serve_process


def devagent(*args, state, check=True):
    p = subprocess.run([sys.executable, "-m", "agent.cli", "--state-dir", str(state), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if check:
        assert p.returncode == 0, p.stderr + p.stdout
    return p


def openssl_verify(lab, tmp_path, cert_pem: bytes, name: str) -> None:
    openssl = require_tool("openssl", "apt-get install -y openssl")
    dom = lab.domain(DOMAIN)
    (tmp_path / "root.pem").write_bytes(pem([dom.root_cert]))
    (tmp_path / "ca.pem").write_bytes(pem([dom.ca_cert]))
    (tmp_path / f"{name}.pem").write_bytes(cert_pem)
    p = subprocess.run([openssl, "verify", "-CAfile", str(tmp_path / "root.pem"), "-untrusted",
                        str(tmp_path / "ca.pem"), str(tmp_path / f"{name}.pem")], capture_output=True, text=True)
    assert p.returncode == 0 and ": OK" in p.stdout, p.stdout + p.stderr


def test_two_devices_end_to_end(tmp_path, lab):
    clm_dir = tmp_path / "clm"
    edge = tmp_path / "edge"
    envs = [device_env(tmp_path, lab, name, clm_dir=clm_dir) for name in ("dev1", "dev2")]
    procs = [serve_process(envs[0], "--san", "dns:dev1.plant"), serve_process(envs[1], "--no-oscore")]
    try:
        devagent("clm", "--clm-dir", str(clm_dir), "add-device", "dev1", "--uri", procs[0].uri, "--domain", DOMAIN,
                 "--san", "dns:dev1.plant", "--subject", "CN=dev1,O=Plant", state=edge)
        devagent("clm", "--clm-dir", str(clm_dir), "add-device", "dev2", "--uri", procs[1].dtls_uri,
                 "--domain", DOMAIN, "--key-type", "p384", state=edge)
        out = devagent("--json", "clm", "--clm-dir", str(clm_dir), "enroll", "dev1", "dev2", "--upstream",
                       f"lab:{lab.dir}", "--timeout", "10", state=edge)
        res = json.loads(out.stdout)
        assert set(res["enrolled"]) == {"dev1", "dev2"} and res["failed"] == {}
        for stages in res["enrolled"].values():
            assert stages["total_s"] > 0 and stages["keygen_csr_s"] > 0 and stages["cert_verify_s"] > 0
        rows = json.loads(devagent("clm", "--clm-dir", str(clm_dir), "list", "--json", state=edge).stdout)
        assert {r["id"]: (r["state"], r["security"]) for r in rows} == {
            "dev1": ("operational", "oscore"), "dev2": ("operational", "dtls-psk")}
        for env in envs:
            ks = env.keystore()
            cred = ks.get("ldevid")
            openssl_verify(lab, tmp_path, pem([cred.certificate]), env.device_id)
            chain = devagent("clm", "--clm-dir", str(clm_dir), "status", env.device_id, "--pem", state=edge).stdout
            openssl_verify(lab, tmp_path, chain.encode(), f"clm-{env.device_id}")
        # a renewal pass that is not due yet does nothing; the CLM never held key material
        devagent("clm", "--clm-dir", str(clm_dir), "run", "--once", "--upstream", f"lab:{lab.dir}", state=edge)
        assert_no_private_material(clm_dir, [], [e.keystore() for e in envs])
        assert not (edge / "keys").exists()
    finally:
        rcs = [p.stop() for p in procs]
    assert rcs == [0, 0], [p.log() for p in procs]
    for p in procs:
        log = p.log()
        assert "stopped" in log and "Traceback" not in log


def test_insecure_serve_warns_and_accepts_plain(tmp_path, lab):
    from tests.peers.coap import coap_call

    env = device_env(tmp_path, lab, "labdev")
    proc = serve_process(env, "--insecure", "--no-oscore", "--no-dtls")
    try:
        st = coap_call(proc.uri)(lambda d: d.status())
        assert st["device"] == "labdev"
    finally:
        assert proc.stop() == 0
    assert "WARNING: --insecure" in proc.log()
