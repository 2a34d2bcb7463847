"""The lab EST server checked by standard clients, as in RFC 7030's examples: curl + base64 + openssl.

Our client and our server must not share a private misreading of RFC 7030, so nothing here uses
``enroll_clients.est``: requests are made by curl, responses decoded by ``base64 -d`` and ``openssl``.
Missing tools FAIL (with an install hint); they are never skipped.
"""
import re
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization

from tests.peers.est import (  # noqa: F401  (fixtures)
    EST_PASSWORD,
    EST_USER,
    _est_fault_server,
    est_fault_server,
    est_lab,
    est_root,
    est_server,
    require_tool,
)

EST = "/.well-known/est"


@pytest.fixture(scope="module")
def tools():
    return {t: require_tool(t) for t in ("curl", "openssl", "base64", "bash")}


@pytest.fixture
def work(tmp_path, est_lab, tools):
    pem = serialization.Encoding.PEM
    dom = est_lab.domain("plant")
    (tmp_path / "root.pem").write_bytes(dom.root_cert.public_bytes(pem))
    (tmp_path / "ca.pem").write_bytes(dom.ca_cert.public_bytes(pem))
    (tmp_path / "other-root.pem").write_bytes(est_lab.domain("other").root_cert.public_bytes(pem))
    return tmp_path


def sh(cmd: str, cwd, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        pytest.fail(f"command failed ({p.returncode}): {cmd}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def new_csr(cwd, cn, algo="ec"):
    newkey = "-newkey ec -pkeyopt ec_paramgen_curve:P-256" if algo == "ec" else "-newkey rsa:2048"
    sh(f"openssl req -new {newkey} -nodes -keyout {cn}.key -subj /CN={cn} -outform DER -out {cn}.csr.der "
       f"&& base64 {cn}.csr.der > {cn}.req.b64", cwd)


def print_certs(cwd, b64file, out_pem):
    return sh(f"base64 -d {b64file} | openssl pkcs7 -inform DER -print_certs -out {out_pem} && cat {out_pem}", cwd)


def same_pubkey(cwd, cert_pem, key_pem):
    a = sh(f"openssl x509 -in {cert_pem} -noout -pubkey", cwd).stdout
    b = sh(f"openssl pkey -in {key_pem} -pubout", cwd).stdout
    return a == b


def test_cacerts(work, est_server):
    sh(f"curl -sS --fail --cacert root.pem {est_server.url}{EST}/cacerts -o cacerts.b64", work)
    out = print_certs(work, "cacerts.b64", "cacerts.pem").stdout
    assert "devagent lab root CA (plant)" in out and "devagent lab issuing CA (plant)" in out
    # Headers as RFC 7030 §4.1.3 shows them.
    hdr = sh(f"curl -sS -D - -o /dev/null --cacert root.pem {est_server.url}{EST}/plant/cacerts", work).stdout
    assert re.search(r"(?im)^content-type: application/pkcs7-mime; smime-type=certs-only", hdr)
    assert re.search(r"(?im)^content-transfer-encoding: base64", hdr)


def test_untrusted_server_cert_rejected_by_curl(work, est_server):
    p = sh(f"curl -sS --cacert other-root.pem {est_server.url}{EST}/cacerts", work, check=False)
    assert p.returncode == 60, p.stderr  # CURLE_PEER_FAILED_VERIFICATION
    p = sh(f"curl -sS --cacert root.pem https://localhost:{est_server.port}{EST}/cacerts -o /dev/null", work,
           check=False)
    assert p.returncode == 0, p.stderr  # DNS:localhost is in the SAN too


@pytest.mark.parametrize("algo", ["ec", "rsa"])
def test_simpleenroll_basic(work, est_server, algo):
    new_csr(work, f"curl-{algo}", algo)
    sh(f"curl -sS --fail --cacert root.pem --user {EST_USER}:'{EST_PASSWORD.decode()}' "
       f"--data-binary @curl-{algo}.req.b64 -H 'Content-Type: application/pkcs10' "
       f"{est_server.url}{EST}/plant/simpleenroll -o cert.b64", work)
    out = print_certs(work, "cert.b64", "cert.pem").stdout
    assert f"subject=CN = curl-{algo}" in out
    sh("openssl verify -CAfile root.pem -untrusted ca.pem cert.pem", work)
    assert same_pubkey(work, "cert.pem", f"curl-{algo}.key")


def test_simpleenroll_wrong_password_is_401(work, est_server):
    new_csr(work, "curl-bad")
    p = sh(f"curl -sS -o body.txt -w '%{{http_code}}' -D hdr.txt --cacert root.pem --user {EST_USER}:wrong "
           f"--data-binary @curl-bad.req.b64 -H 'Content-Type: application/pkcs10' "
           f"{est_server.url}{EST}/simpleenroll", work)
    assert p.stdout == "401"
    assert re.search(r'(?im)^www-authenticate: Basic realm="', (work / "hdr.txt").read_text())


def test_simpleenroll_then_reenroll_with_client_cert(work, est_server):
    new_csr(work, "curl-renew")
    sh(f"curl -sS --fail --cacert root.pem --user {EST_USER}:'{EST_PASSWORD.decode()}' "
       f"--data-binary @curl-renew.req.b64 -H 'Content-Type: application/pkcs10' "
       f"{est_server.url}{EST}/simpleenroll -o cert.b64", work)
    print_certs(work, "cert.b64", "cert.pem")
    # Re-enroll with a new key, the current certificate as TLS client credential (RFC 7030 §4.2.2).
    sh("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout new.key -subj /CN=curl-renew "
       "-outform DER | base64 > new.req.b64", work)
    sh(f"cat cert.pem ca.pem > chain.pem && curl -sS --fail --cacert root.pem --cert chain.pem --key curl-renew.key "
       f"--data-binary @new.req.b64 -H 'Content-Type: application/pkcs10' "
       f"{est_server.url}{EST}/simplereenroll -o new.b64", work)
    print_certs(work, "new.b64", "new.pem")
    sh("openssl verify -CAfile root.pem -untrusted ca.pem new.pem", work)
    assert same_pubkey(work, "new.pem", "new.key")
    # Without the client certificate the server refuses re-enrollment.
    p = sh(f"curl -sS -o /dev/null -w '%{{http_code}}' --cacert root.pem --data-binary @new.req.b64 "
           f"-H 'Content-Type: application/pkcs10' {est_server.url}{EST}/simplereenroll", work)
    assert p.stdout == "401"
    # Simpleenroll authenticated only by the client certificate (LDevID, no password).
    sh("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout app.key -subj /CN=app "
       "-outform DER | base64 > app.req.b64", work)
    sh(f"curl -sS --fail --cacert root.pem --cert chain.pem --key curl-renew.key --data-binary @app.req.b64 "
       f"-H 'Content-Type: application/pkcs10' {est_server.url}{EST}/simpleenroll -o app.b64", work)
    assert "subject=CN = app" in print_certs(work, "app.b64", "app.pem").stdout


def test_serverkeygen_multipart(work, est_server):
    new_csr(work, "curl-keygen")
    sh(f"curl -sS --fail -D hdr.txt --cacert root.pem --user {EST_USER}:'{EST_PASSWORD.decode()}' "
       f"--data-binary @curl-keygen.req.b64 -H 'Content-Type: application/pkcs10' "
       f"{est_server.url}{EST}/serverkeygen -o resp.mime", work)
    m = re.search(r"(?im)^content-type: multipart/mixed; boundary=\"?([^\"\r\n;]+)", (work / "hdr.txt").read_text())
    assert m, (work / "hdr.txt").read_text()
    boundary = m.group(1).encode()
    body = (work / "resp.mime").read_bytes()
    assert body.rstrip().endswith(b"--" + boundary + b"--")
    # RFC 2046 §5.1.1: the delimiter is CRLF "--" boundary (the CRLF is not part of the preceding part).
    parts = [p for p in (b"\r\n" + body).split(b"\r\n--" + boundary) if p.strip() not in (b"", b"--")]
    kinds = {}
    for p in parts:
        head, _, content = p.lstrip(b"\r\n").partition(b"\r\n\r\n")
        kinds[head.split(b"\r\n")[0].decode()] = content
    key_b64 = kinds["Content-Type: application/pkcs8"]
    cert_b64 = kinds["Content-Type: application/pkcs7-mime; smime-type=certs-only"]
    (work / "key.b64").write_bytes(key_b64)
    (work / "kcert.b64").write_bytes(cert_b64)
    sh("base64 -d key.b64 | openssl pkey -inform DER -out srvkey.pem", work)
    print_certs(work, "kcert.b64", "kcert.pem")
    sh("openssl verify -CAfile root.pem -untrusted ca.pem kcert.pem", work)
    assert same_pubkey(work, "kcert.pem", "srvkey.pem")
    assert not same_pubkey(work, "kcert.pem", "curl-keygen.key")  # the server made a new key


def test_csrattrs(work, est_server):
    sh(f"curl -sS --fail -D hdr.txt --cacert root.pem {est_server.url}{EST}/csrattrs -o attrs.b64", work)
    assert re.search(r"(?im)^content-type: application/csrattrs", (work / "hdr.txt").read_text())
    out = sh("base64 -d attrs.b64 | openssl asn1parse -inform DER", work).stdout
    assert "ecdsa-with-SHA256" in out and "id-ecPublicKey" in out and "prime256v1" in out


def test_pending_202_retry_after(work, est_fault_server):
    est_fault_server.config.pending_rounds = 1
    new_csr(work, "curl-pending")
    cmd = (f"curl -sS -D - -o /dev/null --cacert root.pem --user {EST_USER}:'{EST_PASSWORD.decode()}' "
           f"--data-binary @curl-pending.req.b64 -H 'Content-Type: application/pkcs10' "
           f"{est_fault_server.url}{EST}/simpleenroll")
    first = sh(cmd, work).stdout
    assert re.search(r"^HTTP/1.1 202", first) and re.search(r"(?im)^retry-after: \d+", first)
    second = sh(cmd, work).stdout
    assert re.search(r"^HTTP/1.1 200", second)


def test_our_csr_body_is_what_openssl_reads(work, tools):
    """The other direction: the body our client sends is a PKCS#10 that openssl verifies."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from enroll_clients.est.messages import encode_csr
    from tests.peers.est import make_csr
    (work / "ours.b64").write_bytes(encode_csr(make_csr(ec.generate_private_key(ec.SECP256R1()), "ours")))
    out = sh("base64 -d ours.b64 | openssl req -inform DER -verify -noout -subject", work)
    assert "CN = ours" in out.stdout + out.stderr and "verify OK" in out.stdout + out.stderr
