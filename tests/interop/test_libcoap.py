"""Interop with an independent CoAP/DTLS implementation: Debian's libcoap3-bin clients (OpenSSL and GnuTLS
builds) against ``devagent serve`` with DTLS-PSK. Missing tools FAIL with an apt-get hint (never skipped)."""
from __future__ import annotations

import json
import subprocess

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from tests.peers.coap import DOMAIN, device_env, require_tool, serve_process

CLIENTS = ["coap-client-openssl", "coap-client-gnutls"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, lab):
    env = device_env(tmp_path_factory.mktemp("libcoap"), lab, "devlc")
    proc = serve_process(env, "--csr-burst", "50", "--csr-rate", "6000")
    psk = json.loads((env.state / "coap" / "dtls" / "clm.json").read_text())
    yield env, proc, psk
    assert proc.stop() == 0


def coap_client(tool, *args, timeout=20):
    return subprocess.run([require_tool(tool), "-B", "5", *args], capture_output=True, timeout=timeout)


@pytest.mark.parametrize("tool", CLIENTS)
def test_status_over_dtls_psk(served, tool, tmp_path):
    env, proc, psk = served
    out = tmp_path / "status.cbor"
    p = coap_client(tool, "-m", "get", "-u", psk["identity"], "-k", psk["psk_ascii"], "-o", str(out),
                    f"{proc.dtls_uri}/status")
    assert p.returncode == 0, p.stderr
    st = cbor2.loads(out.read_bytes())
    assert st["device"] == "devlc" and st["state"] in ("operational", "not operational")


@pytest.mark.parametrize("tool", CLIENTS)
def test_csr_and_verify_over_dtls_psk(served, tool, tmp_path, lab):
    env, proc, psk = served
    name = tool.rsplit("-", 1)[1]
    req = tmp_path / "req.cbor"
    req.write_bytes(cbor2.dumps({"subject": f"CN={name}", "name": name, "domain": DOMAIN}))
    csr_file = tmp_path / "csr.der"
    p = coap_client(tool, "-m", "post", "-u", psk["identity"], "-k", psk["psk_ascii"], "-t", "60", "-f", str(req),
                    "-o", str(csr_file), f"{proc.dtls_uri}/csr")
    assert p.returncode == 0, p.stderr
    ossl = subprocess.run([require_tool("openssl", "apt-get install -y openssl"), "req", "-inform", "DER", "-in",
                           str(csr_file), "-verify", "-noout"], capture_output=True, text=True)
    assert ossl.returncode == 0 and "verify OK" in (ossl.stdout + ossl.stderr)
    csr = x509.load_der_x509_csr(csr_file.read_bytes())
    cert = lab.issue_from_csr(DOMAIN, csr)
    p7 = tmp_path / "cert.p7"
    p7.write_bytes(pkcs7.serialize_certificates([cert, lab.domain(DOMAIN).ca_cert], serialization.Encoding.DER))
    answer = tmp_path / "answer.cbor"
    # -b 64: force small Block1 transfers of the ~1.2 kB chain
    p = coap_client(tool, "-m", "post", "-u", psk["identity"], "-k", psk["psk_ascii"], "-t", "281", "-b", "64",
                    "-f", str(p7), "-o", str(answer), f"{proc.dtls_uri}/verify")
    assert p.returncode == 0, p.stderr
    assert cbor2.loads(answer.read_bytes())["stored"] == name
    assert env.keystore().get(name).certificate == cert


@pytest.mark.parametrize("tool", CLIENTS)
def test_wrong_psk_fails(served, tool, tmp_path):
    env, proc, psk = served
    out = tmp_path / "nothing"
    p = coap_client(tool, "-m", "get", "-u", psk["identity"], "-k", "0123456789abcdef", "-o", str(out),
                    f"{proc.dtls_uri}/status")
    assert not out.exists() or out.read_bytes() == b""
    assert p.returncode != 0 or b"ERR" in p.stdout + p.stderr  # libcoap reports the failed handshake / send
    assert proc.proc.poll() is None  # the service keeps running


@pytest.mark.parametrize("tool", CLIENTS)
def test_plain_unauthenticated_refused(served, tool):
    env, proc, psk = served
    p = coap_client(tool, "-m", "post", "-t", "60", "-e", "", f"{proc.uri}/csr")
    text = p.stdout + p.stderr
    assert b"4.01" in text and b"unauthenticated" in text
