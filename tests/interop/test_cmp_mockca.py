"""devagent against the Siemens cmp-test-suite MockCA (an independent CMP server with real issuance).

The MockCA (``tests/peers/mockca.py``; built once into ~/.cache/devagent-peers/) runs on 127.0.0.1 for the
whole module. Every devagent CMP command runs against it from the CLI, and its issued certificates must pass
``openssl verify`` against its root. Its own client test suite (``client_tests/cmp_tests_jinja.robot``) runs
with a devagent template and must pass all 5 tests, as OpenSSL's template does.

Known deviations of this server (shared/peers/README.md) and the switch each needs, named where used:
- its pkiConf repeats the ip's senderNonce: ``--tolerate-nonce-reuse`` (else: stored, exit 8, message names it);
- answers to signed requests are signed by its root, whose keyUsage lacks digitalSignature: ``--ignore-keyusage``
  (as ``openssl cmp -ignore_keyusage``);
- the genp to an unprotected genm carries no extraCerts: ``--trusted-signer-fallback`` (its root is our anchor);
- its PBMAC1 answers use PBKDF2 with 262144 iterations: inside the PBKDF2 bound (no switch);
- p10cr/genm with MAC want the NULL-DN sender and ref ``NULL-DN``: ``--mac-sender null-dn``.
Never skipped: a missing Python 3.13 or build failure fails with what to install.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import snapshot
from tests.peers import mockca as MC

pytestmark = pytest.mark.peer
DEVAGENT = str(Path(sys.executable).with_name("devagent"))


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    from tests.peers import openssl_cmp as O

    d = tmp_path_factory.mktemp("mockca")
    pki = O.make_pki(d / "pki")  # its manufacturer IDevID CA goes into the MockCA's trust anchors
    srv = MC.MockCA(d, allow_same_key=True, trust_anchors=(pki.idevid_ca,))
    srv.start()
    srv.pki = pki
    (d / "root.pem").write_bytes(srv.root.public_bytes(serialization.Encoding.PEM))
    yield srv
    srv.stop()


def _root(ca) -> str:
    return str(ca.workdir / "root.pem")


def dv(state, *args, check=None):
    if args[0] != "keystore" and not (Path(state) / "master.key").exists():
        subprocess.run([DEVAGENT, "--state-dir", str(state), "keystore", "init"], check=True, capture_output=True)
    r = subprocess.run([DEVAGENT, "--state-dir", str(state), *args], capture_output=True, text=True, timeout=120)
    if check is not None:
        assert r.returncode == check, f"rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def _verify(ca, *pems):
    r = subprocess.run(["openssl", "verify", "-CAfile", _root(ca), *map(str, pems)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _mac(ca, cn):
    return ["--protocol", "cmp", "--server", ca.url, "--ref", cn, "--secret", f"pass:{MC.SECRET}",
            "--subject", f"/CN={cn}", "--recipient", MC.RECIPIENT, "--trust", _root(ca)]


def test_ir_pbm_with_certconf_needs_nonce_switch(ca, tmp_path):
    """ir + certConf: the MockCA's pkiConf repeats the ip's senderNonce (needs --tolerate-nonce-reuse)."""
    st = tmp_path / "st"
    r = dv(st, "enroll", "--domain", "mock", *_mac(ca, "dv-ir-1"), "--tolerate-nonce-reuse",
           "--certout", tmp_path / "c.pem", "--chainout", tmp_path / "ch.pem", check=0)
    assert "CN=dv-ir-1" in r.stdout and "senderNonce" in r.stderr  # the accepted deviation is logged
    _verify(ca, tmp_path / "c.pem")
    js = dv(st, "--json", "keystore", "show", "ldevid-mock", check=0).stdout
    assert '"revoked": null' in js


def test_nonce_reuse_without_switch_is_refused_but_not_orphaned(ca, tmp_path):
    """Switch off: the pkiConf is refused with a message naming the switch; the certificate, which passed all
    our checks and which we confirmed, is stored (not orphaned on the CA), and the exit code says so (8)."""
    st = tmp_path / "st"
    r = dv(st, "enroll", "--domain", "mock", *_mac(ca, "dv-ir-2"), check=8)
    assert "--tolerate-nonce-reuse" in r.stderr and "NOT authenticated" in r.stderr, r.stderr
    js = dv(st, "--json", "keystore", "show", "ldevid-mock", check=0).stdout
    assert "dv-ir-2" in js


def test_ir_pbmac1_pbkdf2_262144(ca, tmp_path):
    """PBMAC1: the MockCA answers with PBKDF2-SHA512, 262144 iterations: inside the PBKDF2 bound."""
    st = tmp_path / "st"
    dv(st, "enroll", "--domain", "mock", *_mac(ca, "dv-ir-3"), "--mac", "pbmac1", "--implicit-confirm",
       "--certout", tmp_path / "c.pem", check=0)
    _verify(ca, tmp_path / "c.pem")


def test_ir_hmac_sha1(ca, tmp_path):
    st = tmp_path / "st"
    dv(st, "enroll", "--domain", "mock", *_mac(ca, "dv-ir-4"), "--mac-alg", "hmac-sha1", "--implicit-confirm",
       check=0)


def test_p10cr_from_csr_null_dn_sender(ca, tmp_path):
    """p10cr from an existing CSR (its key stays outside the keystore); MAC with the NULL-DN sender."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name.from_rfc4514_string("CN=dv-p10-1")).sign(key, hashes.SHA256())
    (tmp_path / "r.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    st = tmp_path / "st"
    dv(st, "keystore", "init", check=0)
    dv(st, "keystore", "trust", "--domain", "mock", "--add", _root(ca), check=0)
    before = snapshot(st)
    r = dv(st, "enroll", "--domain", "mock", "--protocol", "cmp", "--server", ca.url, "--ref", "NULL-DN",
           "--mac-sender", "null-dn", "--secret", f"pass:{MC.SECRET}", "--recipient", MC.RECIPIENT,
           "--csr", tmp_path / "r.csr", "--certout", tmp_path / "p10.pem", "--tolerate-nonce-reuse", check=0)
    assert "not stored" in r.stdout
    cert = x509.load_pem_x509_certificate((tmp_path / "p10.pem").read_bytes())
    assert cert.public_key() == key.public_key()
    _verify(ca, tmp_path / "p10.pem")
    assert snapshot(st) == before  # nothing stored: the key is not in the keystore


def test_robot_client_suite_with_devagent_template(ca, tmp_path):
    """The MockCA's own client tests, 5 of 5, with devagent plugged in as a jinja template (the switches the
    server needs are in the template: --tolerate-nonce-reuse, and --mac-sender null-dn where the suite's
    ref defaults to NULL-DN, as OpenSSL's template does)."""
    st = tmp_path / "robot-state"
    template = (
        f"{DEVAGENT} --state-dir {st} enroll --domain mockca --protocol cmp --server {{{{ server }}}}\n"
        f" --trust {_root(ca)} --tolerate-nonce-reuse\n"
        " {% if ref %}--ref {{ ref }}{% else %}--ref NULL-DN --mac-sender null-dn{% endif %}\n"
        " --secret {{ secret }}\n"
        " {% if cmd == 'p10cr' %}--csr={{ csr }}{% else %}--subject {{ subject }}{% endif %}\n"
        " {% if recipient %}--recipient {{ recipient }}{% endif %}\n"
        " {% if newkey %}--key {{ newkey }}{% endif %}\n"
        " {% if certout %}--certout {{ certout }}{% endif %}\n"
        " {% if unprotected_requests %}--unprotected-requests{% endif %}\n")
    dv(st, "keystore", "init", check=0)
    r = ca.robot("devagent", template, tmp_path / "robot")
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "5 tests, 5 passed, 0 failed" in out, out[-4000:]


def test_cert_template_show_and_apply(ca, tmp_path):
    """genm certReqTemplate: the MockCA asks for an RSA-2048 key. Shown by 'cert-template'; applied with
    --cert-template: a P-256 key is refused before anything is sent for it (nothing stored), an RSA-2048 one
    is enrolled."""
    st = tmp_path / "st"
    mac = ["--ref", "NULL-DN", "--mac-sender", "null-dn", "--secret", f"pass:{MC.SECRET}", "--recipient",
           MC.RECIPIENT]
    out = dv(st, "cert-template", "--domain", "mock", "--server", ca.url, "--trust", _root(ca), *mac, check=0).stdout
    assert "RSA-2048" in out
    dv(st, "keystore", "trust", "--domain", "mock", "--add", _root(ca), check=0)
    before = snapshot(st)
    r = dv(st, "enroll", "--domain", "mock", *_mac(ca, "dv-tpl-1"), "--implicit-confirm", "--cert-template",
           "--key-type", "p256", check=5)
    assert "RSA-2048" in r.stderr, r.stderr
    after = snapshot(st)
    after.pop("audit.log", None), before.pop("audit.log", None)
    assert after == before
    dv(st, "enroll", "--domain", "mock", *_mac(ca, "dv-tpl-2"), "--implicit-confirm", "--cert-template",
       "--key-type", "rsa2048", "--certout", tmp_path / "c.pem", check=0)
    _verify(ca, tmp_path / "c.pem")


def test_ca_update_over_mac(ca, tmp_path):
    """ca-update with MAC protection: genm caCerts, then genm rootCaCert carrying our current root. The MockCA
    answers rootCaCert with a freshly made "new root" that has no basicConstraints/keyUsage: the newWithOld link
    verifies, but such a certificate cannot be a trust anchor, so the update is refused naming it, and the
    truststore is unchanged (file snapshot)."""
    st = tmp_path / "st"
    dv(st, "keystore", "init", check=0)
    dv(st, "keystore", "trust", "--domain", "mock", "--add", _root(ca), check=0)
    before = snapshot(st)
    r = dv(st, "ca-update", "--domain", "mock", "--protocol", "cmp", "--server", ca.url,
           "--ref", "NULL-DN", "--mac-sender", "null-dn", "--secret", f"pass:{MC.SECRET}",
           "--recipient", MC.RECIPIENT, check=4)
    assert "root CA key update refused" in r.stderr and "not a CA certificate" in r.stderr, r.stderr
    after = snapshot(st)
    after.pop("audit.log", None), before.pop("audit.log", None)
    assert after == before


def test_signed_flows_cr_kur_rr_with_ignore_keyusage(ca, tmp_path):
    """cr, kur, rr signed with the LDevID; the MockCA's root signs the answers without digitalSignature in its
    keyUsage: refused naming --ignore-keyusage, then, with the switch (remembered), every flow completes and the
    certificates pass openssl verify."""
    st = tmp_path / "st"
    dv(st, "enroll", "--domain", "mock", *_mac(ca, "dv-sig-1"), "--tolerate-nonce-reuse", check=0)
    before = snapshot(st)
    r = dv(st, "request", "app1", "--domain", "mock", "--subject", "/CN=dv-sig-1", check=5)
    assert "keyUsage lacks digitalSignature" in r.stderr and "--ignore-keyusage" in r.stderr, r.stderr
    after = snapshot(st)
    after.pop("audit.log", None), before.pop("audit.log", None)
    assert after == before
    dv(st, "request", "app1", "--domain", "mock", "--subject", "/CN=dv-sig-1", "--ignore-keyusage",
       "--certout", tmp_path / "app1.pem", check=0)
    dv(st, "renew", "ldevid-mock", "--ignore-keyusage", "--certout", tmp_path / "renewed.pem", check=0)
    _verify(ca, tmp_path / "app1.pem", tmp_path / "renewed.pem")
    dv(st, "revoke", "app1", "--reason", "superseded", check=0)  # remembered from 'request'
    assert "REVOKED" in dv(st, "status", "app1", check=0).stdout
    from keystore.store import Keystore

    remembered = Keystore.open(st).get("ldevid-mock").record["meta"]["enroll"]
    assert remembered["ignore_keyusage"] is True and remembered["tolerate_nonce_reuse"] is True  # renew -> daemon


def test_idevid_signed_ir(ca, tmp_path):
    """Zero-touch ir signed with the IDevID (its CA is in the MockCA's trust anchors)."""
    pki = ca.pki
    st = tmp_path / "st"
    dv(st, "keystore", "init", check=0)
    dv(st, "keystore", "import-idevid", "idevid", "--cert", pki.path("idevid.pem"), "--key", pki.path("idevid_key.pem"),
       "--chain", pki.path("idevid_ca.pem"), check=0)
    dv(st, "enroll", "--domain", "mock", "--idevid", "idevid", "--protocol", "cmp", "--server", ca.url,
       "--subject", "/CN=dv-zt-1", "--recipient", MC.RECIPIENT, "--trust", _root(ca), "--ignore-keyusage",
       "--tolerate-nonce-reuse", "--certout", tmp_path / "zt.pem", check=0)
    _verify(ca, tmp_path / "zt.pem")


def test_genp_to_unprotected_genm_needs_trusted_signer_fallback(ca):
    """genm caCerts without protection: the MockCA's genp is signed by its root but carries no extraCerts.
    Refused naming the switch; with --trusted-signer-fallback (and --ignore-keyusage for its root) the root we
    trust is the signer."""
    import asyncio

    from enroll_clients.base import ProtectionError
    from enroll_clients.cmp import CmpClient, HttpTransport

    def client(**kw):
        return CmpClient(HttpTransport(ca.url, retries=0), trust_anchors=(ca.root,),
                         recipient=x509.Name.from_rfc4514_string(MC.RECIPIENT), **kw)

    with pytest.raises(ProtectionError, match="without extraCerts.*--trusted-signer-fallback"):
        asyncio.run(client(ignore_keyusage=True).ca_certs(None))
    res = asyncio.run(client(ignore_keyusage=True, trusted_signer_fallback=True).ca_certs(None))
    assert ca.root in res.ca_certs
