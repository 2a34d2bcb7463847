"""The CMP client against OpenSSL 3.0's ``openssl cmp`` (an independent implementation).

- HTTP: the mock server runs in a private network namespace (``tests/peers/openssl_cmp.MockServer``); the
  client runs in a thread that joined that namespace, so these are the production client and transport.
- Socket-less: OpenSSL's ``-use_mock_srv -reqin -rspout`` answers our request files (byte-level interop and
  the file transport).
- Reference client: requests captured with ``openssl cmp -reqout`` must decode (and re-encode byte-exact)
  with our ASN.1 layer, and their MACs must verify with our code.

The mock server returns one fixed certificate: the test PKI pre-generates the key it was made for.
Never skipped: a missing tool fails with an install hint.
"""
from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from enroll_clients.base import CertRequest, ClientAuth, EnrollOptions, ProtectionError
from enroll_clients.cmp import CallableTransport, CmpClient, FileTransport, HttpTransport, client_from_options
from enroll_clients.cmp import asn1 as A
from enroll_clients.cmp import messages as M
from enroll_clients.cmp import protection as P
from enroll_clients.cmp.errors import CmpServerError, KeyMismatchError
from tests.peers import openssl_cmp as O

pytestmark = pytest.mark.peer

SUBJECT = x509.Name.from_rfc4514_string("CN=device-0001,O=devagent test")
MAC = ClientAuth(reference=O.REF.encode(), secret=O.SECRET.encode())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    O.require_tools()
    return O.make_pki(tmp_path_factory.mktemp("cmp-pki"))


@pytest.fixture(scope="module")
def sig_server(pki):
    """Signature-protected responses; accepts MAC- and signature-protected requests."""
    with O.MockServer(pki, signed=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def mac_server(pki):
    """MAC-protected responses (PasswordBasedMac with the shared secret)."""
    with O.MockServer(pki, signed=False) as srv:
        yield srv


def idevid(pki):
    return ClientAuth(certificate=pki.idevid, private_key=pki.idevid_key, chain=(pki.idevid_ca,))


def ldevid(pki):
    return ClientAuth(certificate=pki.device_cert, private_key=pki.device_key, chain=(pki.root,))


def enroll_in(srv, pki, method, request, auth, **kw):
    """Run ``client.<method>(request, auth)`` in the server's namespace over the real HTTP transport."""
    recorded = []

    async def go():
        http = HttpTransport(srv.url, timeout_s=10, retries=0)

        async def fwd(der):
            recorded.append(A.der_decode(der, A.PKIMessage())["body"].getName())
            return await http.exchange(der)

        c = CmpClient(CallableTransport(fwd), trust_anchors=(pki.root,), **kw)
        try:
            return await getattr(c, method)(request, auth)
        finally:
            await http.aclose()

    result = srv.run_async(go)
    return result, recorded


# --- HTTP, the message types ----------------------------------------------------------------------
def test_ir_mac_protected(mac_server, pki):
    r, sent = enroll_in(mac_server, pki, "enroll", CertRequest(SUBJECT, pki.device_key), MAC)
    assert r.certificate == pki.device_cert and sent == ["ir", "certConf"]
    assert r.ca_certs == (pki.root,) and r.chain == (pki.root,) and r.info["protection"] == "mac"


def test_ir_signature_protected_with_idevid(sig_server, pki):
    r, _ = enroll_in(sig_server, pki, "enroll", CertRequest(SUBJECT, pki.device_key), idevid(pki))
    assert r.certificate == pki.device_cert
    assert r.info["response_signer"] == pki.server.subject.rfc4514_string()


def test_ir_rsa2048(pki):
    with O.MockServer(pki, rsa=True) as srv:
        r, _ = enroll_in(srv, pki, "enroll", CertRequest(SUBJECT, pki.device_rsa_key), MAC)
    assert r.certificate == pki.device_rsa_cert


def test_client_from_options_http(sig_server, pki):
    opts = EnrollOptions(server=sig_server.url, trust_anchors=(pki.root,), timeout_s=10)

    async def go():
        c = client_from_options(opts)
        try:
            return await c.enroll(CertRequest(SUBJECT, pki.device_key), MAC)
        finally:
            await c.aclose()

    assert sig_server.run_async(go).certificate == pki.device_cert


def test_cr_with_ldevid(sig_server, pki):
    r, sent = enroll_in(sig_server, pki, "request", CertRequest(SUBJECT, pki.device_key), ldevid(pki))
    assert r.certificate == pki.device_cert and sent == ["cr", "certConf"]


def test_p10cr(sig_server, pki):
    csr = x509.CertificateSigningRequestBuilder().subject_name(SUBJECT).sign(pki.device_key, hashes.SHA256())
    r, sent = enroll_in(sig_server, pki, "enroll", CertRequest(SUBJECT, csr=csr), MAC)
    assert r.certificate == pki.device_cert and sent == ["p10cr", "certConf"]


def test_kur_signed_by_old_cert(sig_server, pki):
    r, sent = enroll_in(sig_server, pki, "renew", CertRequest(SUBJECT, pki.device_key), ldevid(pki))
    assert r.certificate == pki.device_cert and sent == ["kur", "certConf"]


def test_kur_with_new_key_gets_fixed_cert_rejected(sig_server, pki):
    """The mock server returns its fixed certificate for any key: a rekey must be rejected by us."""
    new_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(KeyMismatchError, match="public key mismatch"):
        enroll_in(sig_server, pki, "renew", CertRequest(SUBJECT, new_key), ldevid(pki))


def test_rr(sig_server, pki):
    async def go():
        c = CmpClient(HttpTransport(sig_server.url, timeout_s=10, retries=0), trust_anchors=(pki.root,))
        await c.revoke(pki.device_cert, ldevid(pki), "superseded")
        await c.aclose()

    sig_server.run_async(go)


def test_rr_of_unknown_certificate_refused(sig_server, pki):
    async def go():
        c = CmpClient(HttpTransport(sig_server.url, timeout_s=10, retries=0), trust_anchors=(pki.root,))
        try:
            await c.revoke(pki.idevid, idevid(pki), "keyCompromise")
        finally:
            await c.aclose()

    with pytest.raises(CmpServerError) as ei:
        sig_server.run_async(go)
    assert ei.value.protected and "status rejection" in str(ei.value)


def test_genm_ca_certs_and_root_ca_cert(sig_server, pki):
    """OpenSSL 3.0's mock server echoes the genm ITAVs: caCerts without a value (no certificates) and
    rootCaCert (not a rootCaKeyUpdate, so no new root). The exchange itself must verify."""
    async def go():
        c = CmpClient(HttpTransport(sig_server.url, timeout_s=10, retries=0), trust_anchors=(pki.root,),
                      old_root=pki.root)
        try:
            return await c.ca_certs(MAC)
        finally:
            await c.aclose()

    r = sig_server.run_async(go)
    assert r.ca_certs == () and r.new_root is None and r.server_time is not None


def test_polling(pki):
    with O.MockServer(pki, poll_count=2, check_after=1) as srv:
        r, sent = enroll_in(srv, pki, "enroll", CertRequest(SUBJECT, pki.device_key), MAC)
    assert r.certificate == pki.device_cert and r.info["polls"] == 2
    assert sent == ["ir", "pollReq", "pollReq", "certConf"]


def test_implicit_confirm_granted(pki):
    with O.MockServer(pki, grant_implicitconf=True) as srv:
        r, sent = enroll_in(srv, pki, "enroll", CertRequest(SUBJECT, pki.device_key), MAC, implicit_confirm=True)
    assert sent == ["ir"] and r.info["implicit_confirm"] is True


def test_error_response_named_in_words(pki):
    with O.MockServer(pki, send_error=True) as srv, pytest.raises(CmpServerError) as ei:
        enroll_in(srv, pki, "enroll", CertRequest(SUBJECT, pki.device_key), MAC)
    e = ei.value
    assert e.protected is True and e.status == "rejection"
    assert "failInfo" in str(e) and "refused by the CMP server" in str(e)


def test_unprotected_error_response_reported_untrusted(pki):
    with O.MockServer(pki, send_error=True, send_unprot_err=True) as srv, pytest.raises(CmpServerError) as ei:
        enroll_in(srv, pki, "enroll", CertRequest(SUBJECT, pki.device_key), MAC)
    assert ei.value.protected is False and "UNAUTHENTICATED" in str(ei.value)


def test_public_key_mismatch(mac_server, pki):
    with pytest.raises(KeyMismatchError, match="public key mismatch"):
        enroll_in(mac_server, pki, "enroll", CertRequest(SUBJECT, pki.other_key), MAC)


def test_wrong_shared_secret(mac_server, pki):
    bad = ClientAuth(reference=O.REF.encode(), secret=b"not-the-secret")
    with pytest.raises(CmpServerError) as ei:
        enroll_in(mac_server, pki, "enroll", CertRequest(SUBJECT, pki.device_key), bad)
    assert ei.value.protected is False
    assert "wrong pbm value" in str(ei.value) and "MAC does not verify with our shared secret" in str(ei.value)


def test_response_signed_by_untrusted_key(pki):
    """OpenSSL answers signature-protected requests with signatures (MAC requests with MACs): a server key
    that looks like ours (same names) but chains to another root must be refused."""
    with O.MockServer(pki, rogue=True) as srv, pytest.raises(ProtectionError, match="untrusted signer"):
        enroll_in(srv, pki, "enroll", CertRequest(SUBJECT, pki.device_key), idevid(pki))


def test_pbmac1_not_supported_by_openssl_30(mac_server, pki):
    """OpenSSL 3.0 has no PBMAC1 (RFC 9481); the refusal must come back as a clear, named error."""
    with pytest.raises(CmpServerError) as ei:
        enroll_in(mac_server, pki, "enroll", CertRequest(SUBJECT, pki.device_key), MAC, mac="pbmac1")
    assert "status rejection" in str(ei.value)


# --- byte level -------------------------------------------------------------------------------------
def _capture(pki, tmp_path, args, n, **mock_kwargs):
    names = ",".join(str(tmp_path / f"m{i}.der") for i in range(n))
    r = O.reference_client(pki, list(args) + ["-reqout", names], workdir=tmp_path, mock_kwargs=mock_kwargs)
    assert r.returncode == 0, r.stderr[-2000:]
    return [(tmp_path / f"m{i}.der").read_bytes() for i in range(n)]


@pytest.mark.parametrize("cmd,extra,types", [
    ("ir", ["-newkey", "device_key.pem", "-subject", "/CN=device-0001"], ["ir", "certConf"]),
    ("cr", ["-newkey", "device_key.pem", "-subject", "/CN=device-0001"], ["cr", "certConf"]),
    ("p10cr", ["-csr", "device.csr"], ["p10cr", "certConf"]),
    ("kur", ["-newkey", "device_key.pem", "-oldcert", "device_cert.pem"], ["kur", "certConf"]),
    ("rr", ["-oldcert", "device_cert.pem"], ["rr"]),
    ("genm", [], ["genm"]),
])
def test_openssl_requests_decode_with_our_code(pki, tmp_path, cmd, extra, types):
    csr = x509.CertificateSigningRequestBuilder().subject_name(SUBJECT).sign(pki.device_key, hashes.SHA256())
    (pki.dir / "device.csr").write_bytes(csr.public_bytes(Encoding.PEM))
    args = ["-cmd", cmd, "-ref", O.REF, "-secret", f"pass:{O.SECRET}", "-recipient", "/CN=CMP Test RA",
            "-certout", str(tmp_path / "out.pem")] + [str(pki.dir / a) if a.endswith((".pem", ".csr")) else a
                                                     for a in extra]
    if cmd == "genm":
        args = [a for a in args if a not in ("-certout", str(tmp_path / "out.pem"))]
    msgs = _capture(pki, tmp_path, args, len(types), signed=False)
    for der, t in zip(msgs, types, strict=True):
        msg = M.decode_message(der)
        assert msg["body"].getName() == t
        assert A.der_encode(msg) == der  # byte-exact round trip
        # and their MAC verifies with our PasswordBasedMac implementation (hmac-sha1, OpenSSL's default)
        mac = P.compute_mac(msg["header"]["protectionAlg"], O.SECRET.encode(), M._protected_part(msg))
        assert mac == msg["protection"].asOctets()


def _our_request(pki, kind, protector):
    txn = M.Transaction(protector, sender=SUBJECT)
    gi = [(A.id_it_implicitConfirm, A.Null(""))]
    if kind in ("ir", "cr", "kur"):
        controls = (M.old_cert_id_control(pki.device_cert),) if kind == "kur" else ()
        body = M.cert_req_messages(M.cert_template(SUBJECT, pki.device_key.public_key()), pki.device_key,
                                   controls=controls)
        return txn, txn.request(kind, body, general_info=gi), {"ir": "ip", "cr": "cp", "kur": "kup"}[kind]
    if kind == "p10cr":
        csr = x509.CertificateSigningRequestBuilder().subject_name(SUBJECT).sign(pki.device_key, hashes.SHA256())
        return txn, txn.request("p10cr", M.p10cr_body(csr), general_info=gi), "cp"
    if kind == "rr":
        return txn, txn.request("rr", M.rr_body(pki.device_cert, "superseded")), "rp"
    return txn, txn.request("genm", M.genm_body([(A.id_it_caCerts, None)])), "genp"


@pytest.mark.parametrize("kind", ["ir", "cr", "kur", "p10cr", "rr", "genm"])
@pytest.mark.parametrize("prot", ["mac", "signature"])
def test_our_requests_decode_with_openssl(pki, tmp_path, kind, prot):
    """Our requests through OpenSSL's socket-less mock server: it must parse, verify and accept them, and
    its answer must pass all our response checks."""
    if prot == "mac":
        protector = M.Protector(reference=O.REF.encode(), secret=O.SECRET.encode(), trust_anchors=(pki.root,))
    elif kind == "ir":
        protector = M.Protector(certificate=pki.idevid, private_key=pki.idevid_key, chain=(pki.idevid_ca,),
                                trust_anchors=(pki.root,))
    else:
        protector = M.Protector(certificate=pki.device_cert, private_key=pki.device_key, chain=(pki.root,),
                                trust_anchors=(pki.root,))
    txn, der, reply = _our_request(pki, kind, protector)
    rsp = O.socketless(pki, der, tmp_path, signed=(prot == "signature"), grant_implicitconf=True)
    resp = txn.accept(rsp, [reply])
    assert resp.body_type == reply and resp.protected
    if reply in ("ip", "cp", "kup"):
        cr = resp.body["response"][0]
        assert M.status_of(cr["status"])[0] == 0 and resp.implicit_confirm_granted
        assert M.asn1_to_cert(cr["certifiedKeyPair"]["certOrEncCert"].getComponent()) == pki.device_cert
    elif reply == "rp":
        assert M.status_of(resp.body["status"][0])[0] == 0


def test_file_transport_with_socketless_server(pki, tmp_path):
    """Air-gapped flow: the client writes req-N.der and waits; an 'operator' (here a task running the
    socket-less OpenSSL server) produces rsp-N.der."""
    req_t, rsp_t = str(tmp_path / "req-{n}.der"), str(tmp_path / "rsp-{n}.der")

    async def operator():
        req, rsp = Path(req_t.replace("{n}", "1")), rsp_t.replace("{n}", "1")
        while not req.exists():
            await asyncio.sleep(0.02)
        proc = await asyncio.create_subprocess_exec(
            *O.socketless_cmd(pki, req, rsp, grant_implicitconf=True),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await proc.wait()

    async def go():
        c = CmpClient(FileTransport(req_t, rsp_t, wait_s=30), trust_anchors=(pki.root,), implicit_confirm=True)
        op = asyncio.create_task(operator())
        r = await c.enroll(CertRequest(SUBJECT, pki.device_key), MAC)
        await op
        return r

    r = asyncio.run(go())
    assert r.certificate == pki.device_cert and r.info["implicit_confirm"] is True


def test_file_transport_via_options(pki, tmp_path):
    opts = EnrollOptions(server="file:", reqout=str(tmp_path / "ir.der"), rspin=str(tmp_path / "ip.der"),
                         trust_anchors=(pki.root,), implicit_confirm=True)

    async def go():
        c = client_from_options(opts)
        task = asyncio.create_task(c.enroll(CertRequest(SUBJECT, pki.device_key), MAC))
        while not (tmp_path / "ir.der").exists():
            await asyncio.sleep(0.02)
        rsp = O.socketless(pki, (tmp_path / "ir.der").read_bytes(), tmp_path, name="op", grant_implicitconf=True)
        (tmp_path / "ip.der").write_bytes(rsp)
        return await task

    assert asyncio.run(go()).certificate == pki.device_cert


# --- PBMAC1 (RFC 9481) against OpenSSL's PBKDF2 and HMAC ------------------------------------------
def test_pbmac1_matches_openssl_kdf_and_mac():
    O.require_tools(need_netns=False)
    alg = P.new_mac_alg("pbmac1", iterations=2048)
    params = A.der_decode(bytes(alg["parameters"]), A.PBMAC1Params())
    kdf = A.der_decode(bytes(params["keyDerivationFunc"]["parameters"]), A.PBKDF2Params())
    salt, secret, data = bytes(kdf["salt"]), b"pbmac1 secret", b"protected part bytes"
    key = subprocess.run(["openssl", "kdf", "-keylen", "32", "-kdfopt", "digest:SHA256", "-kdfopt",
                          f"hexpass:{secret.hex()}", "-kdfopt", f"hexsalt:{salt.hex()}", "-kdfopt", "iter:2048",
                          "PBKDF2"], capture_output=True, text=True, check=True).stdout.strip().replace(":", "")
    mac = subprocess.run(["openssl", "mac", "-digest", "SHA256", "-macopt", f"hexkey:{key}", "HMAC"],
                         input=data, capture_output=True, check=True).stdout.decode().strip()
    assert P.compute_mac(alg, secret, data).hex().upper() == mac.upper()
