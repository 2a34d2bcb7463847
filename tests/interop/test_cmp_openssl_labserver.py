"""The lab CMP server (``agent/lab/cmp_server.py``) checked by ``openssl cmp`` as the reference client, plus a
smoke run of our own client against it. The server binds 127.0.0.1, so no network namespace is needed."""
from __future__ import annotations

import asyncio
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.lab.ca import LabCA
from agent.lab.cmp_server import start_cmp_server
from enroll_clients.base import CertRequest, ClientAuth, EnrollOptions
from enroll_clients.cmp import client_from_options
from tests.peers import openssl_cmp as O

pytestmark = pytest.mark.peer
REF, SECRET = "lab-ref", "lab-secret"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    O.require_tools(need_netns=False)
    d = tmp_path_factory.mktemp("labcmp")
    lab = LabCA.create(d / "lab", domains=("plant",))
    pki = O.make_pki(d / "pki")  # for the IDevID manufacturer CA
    dom = lab.domain("plant")
    (d / "root.pem").write_bytes(dom.root_cert.public_bytes(serialization.Encoding.PEM))
    srv = start_cmp_server(lab, "plant", secrets={REF.encode(): SECRET.encode()}, client_cas=(pki.idevid_ca,),
                           grant_implicit_confirm=True)
    yield lab, pki, srv, d
    srv.stop()


def _key(d, name):
    k = ec.generate_private_key(ec.SECP256R1())
    p = d / f"{name}.pem"
    p.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return k, str(p)


def ossl(srv, d, *args):
    cmd = ["openssl", "cmp", "-config", "", "-server", f"127.0.0.1:{srv.port}", "-path", "pkix/",
           "-keep_alive", "0", "-trusted", str(d / "root.pem")] + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=d, timeout=60)


def _enroll_mac(srv, d, name="dev"):
    k, kp = _key(d, name)
    out = d / f"{name}-cert.pem"
    r = ossl(srv, d, "-cmd", "ir", "-ref", REF, "-secret", f"pass:{SECRET}", "-newkey", kp,
             "-subject", f"/CN={name}", "-sans", f"{name}.plant.local", "-certout", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return k, kp, out, x509.load_pem_x509_certificate(out.read_bytes())


def test_ir_mac_with_certconf(env):
    lab, _, srv, d = env
    k, _, _, cert = _enroll_mac(srv, d)
    assert cert.public_key() == k.public_key() and cert.subject.rfc4514_string() == "CN=dev"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dev.plant.local"]
    assert lab.issued("plant", cert.serial_number) == cert
    assert srv.core.requests[-2:] == ["ir", "certConf"]


def test_ir_implicit_confirm(env):
    _, _, srv, d = env
    _, kp = _key(d, "imp")
    r = ossl(srv, d, "-cmd", "ir", "-ref", REF, "-secret", f"pass:{SECRET}", "-newkey", kp, "-subject", "/CN=imp",
             "-implicit_confirm", "-certout", str(d / "imp.crt"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert srv.core.requests[-1] == "ir"


def test_ir_signed_by_idevid(env):
    _, pki, srv, d = env
    _, kp = _key(d, "zt")
    r = ossl(srv, d, "-cmd", "ir", "-cert", pki.path("idevid.pem"), "-key", pki.path("idevid_key.pem"),
             "-extracerts", pki.path("idevid_ca.pem"), "-newkey", kp, "-subject", "/CN=zt", "-certout",
             str(d / "zt.crt"))
    assert r.returncode == 0, r.stderr[-2000:]


def test_cr_p10cr_kur_rr_signed_by_ldevid(env):
    lab, _, srv, d = env
    k, kp, cert_path, cert = _enroll_mac(srv, d, "ldev")
    _, kp2 = _key(d, "second")
    r = ossl(srv, d, "-cmd", "cr", "-cert", str(cert_path), "-key", kp, "-newkey", kp2, "-subject", "/CN=second",
             "-certout", str(d / "second.crt"))
    assert r.returncode == 0, r.stderr[-2000:]
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name.from_rfc4514_string("CN=p10")).sign(
        k, hashes.SHA256())
    (d / "p10.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    r = ossl(srv, d, "-cmd", "p10cr", "-cert", str(cert_path), "-key", kp, "-csr", str(d / "p10.csr"),
             "-certout", str(d / "p10.crt"))
    assert r.returncode == 0, r.stderr[-2000:]
    new_k, new_kp = _key(d, "rekey")
    r = ossl(srv, d, "-cmd", "kur", "-cert", str(cert_path), "-key", kp, "-newkey", new_kp,
             "-certout", str(d / "rekey.crt"))
    assert r.returncode == 0, r.stderr[-2000:]
    renewed = x509.load_pem_x509_certificate((d / "rekey.crt").read_bytes())
    assert renewed.public_key() == new_k.public_key() and renewed.subject == cert.subject
    r = ossl(srv, d, "-cmd", "rr", "-cert", str(d / "rekey.crt"), "-key", new_kp, "-oldcert", str(d / "rekey.crt"),
             "-revreason", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert lab.is_revoked(renewed.serial_number)


def test_wrong_secret_refused(env):
    _, _, srv, d = env
    _, kp = _key(d, "bad")
    r = ossl(srv, d, "-cmd", "ir", "-ref", REF, "-secret", "pass:wrong", "-newkey", kp, "-subject", "/CN=bad",
             "-certout", str(d / "bad.crt"), "-unprotected_errors")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "badMessageCheck" in out and "MAC does not verify" in out, out[-2000:]


def test_our_client_against_lab_server(env):
    lab, _, srv, _ = env
    dom = lab.domain("plant")
    key = ec.generate_private_key(ec.SECP256R1())

    async def go():
        c = client_from_options(EnrollOptions(server=srv.url, trust_anchors=(dom.root_cert,)))
        try:
            r = await c.enroll(CertRequest(x509.Name.from_rfc4514_string("CN=ours"), key),
                               ClientAuth(reference=REF.encode(), secret=SECRET.encode()))
            auth = ClientAuth(certificate=r.certificate, private_key=key, chain=r.chain)
            r2 = await c.renew(CertRequest(r.certificate.subject, key), auth)
            cas = await c.ca_certs(auth)
            await c.revoke(r2.certificate, ClientAuth(certificate=r2.certificate, private_key=key), "superseded")
            return r, cas
        finally:
            await c.aclose()

    r, cas = asyncio.run(go())
    assert r.chain == (dom.ca_cert, dom.root_cert) and r.ca_certs == (dom.root_cert,)
    assert cas.ca_certs == (dom.ca_cert, dom.root_cert)
