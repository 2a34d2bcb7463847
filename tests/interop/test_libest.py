"""Every devagent EST command against Cisco libest's ``estserver`` (an independent RFC 7030 server), with libest's
``estclient`` as the second reference client and ``openssl verify`` as the independent judge of every issued
certificate. After every failure the keystore is compared with a snapshot taken before: nothing was stored.

How it runs (tests/peers/libest.py): libest is built once into ~/.cache/devagent-peers/; its example CA is made
per module by its own createCA.sh; estserver binds 0.0.0.0, so it runs in a private network namespace, and the
devagent CLI runs in-process (click's CliRunner) on a thread that joined that namespace. Two servers share the CA:

- ``stock``: libest as shipped: HTTP Basic (estuser/estpwd) required even with a client certificate, and its
  built-in /csrattrs answer (macAddress, emailAddress, secp384r1, sha384 as bare OIDs, ending in a NUL byte).
- ``relaxed``: ``-o`` (no HTTP auth when TLS client authentication succeeds) and /csrattrs in RFC 7030 §4.5.2
  attribute form (``EST_CSR_ATTR``: ecdsa-with-SHA256, ecPublicKey{secp256r1}).

Known deviations of libest, met here (shared/peers/README.md): the trailing NUL (tolerated by ``--csrattrs use``);
only P-256 as ECDHE group, so a P-384 *client certificate* gets TLS alert 47 — curl gets the same, so devagent
reports it clearly and stores nothing (test_p384_client_certificate_refused_by_libest); serverkeygen labels a
PKCS#1 key application/pkcs8 (accepted); the example CA drops O= and SANs (subjects here are CN only); no label
paths (built without uriparser: --label/--profile are tested against the lab server, tests/component/test_cli_est.py).
"""
from __future__ import annotations

import base64
import logging
import socket
import threading

import pytest
from cryptography.hazmat.primitives import serialization

from agent.lab.est_server import DEFAULT_CSRATTRS_DER
from enroll_clients.est import fingerprint
from keystore.store import Keystore
from tests.peers import libest
from tests.peers.est import Devagent, new_key, stored

USER, PASSWORD = libest.EST_USER, libest.EST_PASSWORD
DOMAIN = "libest"
P256_ATTRS_B64 = base64.b64encode(DEFAULT_CSRATTRS_DER).decode()  # RFC 7030 §4.5.2 attribute form
# RFC 7030 §4.5.2's own example: challengePassword, ecPublicKey{secp384r1}, extensionRequest{macAddress},
# ecdsa-with-SHA384.
RFC7030_EXAMPLE_B64 = "MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJBgcrBgEBAQEWBggqhkjOPQQDAw=="


class Peer:
    def __init__(self, b, ca, ns, stock, relaxed):
        self.build, self.ca, self.ns, self.stock, self.relaxed = b, ca, ns, stock, relaxed


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    b = libest.build()
    ca = libest.make_ca(b, tmp_path_factory.mktemp("libest-ca"))
    ns = libest.Netns()
    servers = []
    try:
        servers.append(libest.EstServer(b, ca, ns, port=8085).start())
        servers.append(libest.EstServer(b, ca, ns, port=8086, auth_off_with_cert=True,
                                        csrattrs_b64=P256_ATTRS_B64).start())
        yield Peer(b, ca, ns, *servers)
    finally:
        for s in servers:
            s.stop()
        ns.close()


@pytest.fixture
def dev(tmp_path, peer):
    d = Devagent(tmp_path / "state", inside=peer.ns.run)
    d("keystore", "init")
    return d


def _enroll(dev, peer, server, *extra, trust=True, name=None, code=0, basic=True):
    args = ["enroll", "--protocol", "est", "--server", server.url, "--domain", DOMAIN, "--subject", "CN=dev1"]
    if basic:
        args += ["--username", USER, "--password", f"pass:{PASSWORD}"]
    if trust:
        args += ["--trust", str(peer.ca.cacert)]
    if name:
        args += ["--name", name]
    return dev(*args, *extra, code=code)


def _verify(dev, peer, name, tmp_path):
    """`openssl verify` of the stored certificate against libest's example CA (an independent judge)."""
    cred = Keystore.open(dev.state).get(name)
    pem = tmp_path / f"{name}-v{cred.version}.pem"
    pem.write_bytes(cred.certificate.public_bytes(serialization.Encoding.PEM))
    r = libest.openssl_verify(pem, peer.ca.cacert)
    assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr
    assert cred.certificate.issuer == peer.ca.root().subject
    return cred


# ---- the reference client -------------------------------------------------------------------------------------
def test_estclient_reference_run(peer, tmp_path):
    """libest's own client against its server: cacerts, csrattrs (with the NUL it accepts) and simpleenroll."""
    key = tmp_path / "k.pem"
    key.write_bytes(new_key("p256").private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    for args in (["-g"], ["-a"], ["-e", "-u", USER, "-h", PASSWORD, "-x", key, "--common-name", "ref1",
                                  "--pem-output"]):
        r = libest.estclient(peer.build, args, port=peer.stock.port, cacert=peer.ca.cacert, outdir=tmp_path,
                             netns=peer.ns)
        assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
    # estclient exits 0 even when an operation failed: check what it wrote.
    assert (tmp_path / "cacert-0-0.pkcs7").stat().st_size > 0 and (tmp_path / "csr-0-0.base64").stat().st_size > 0
    r = libest.openssl_verify(tmp_path / "cert-0-0.pem", peer.ca.cacert)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- /cacerts bootstrap ---------------------------------------------------------------------------------------
def test_bootstrap_by_fingerprint_and_builtin_csrattrs(dev, peer, tmp_path):
    fp = fingerprint(peer.ca.root())
    _enroll(dev, peer, peer.stock, "--ca-fingerprint", fp, trust=False)
    ks = Keystore.open(dev.state)
    assert [fingerprint(c) for c in ks.trust_anchors(DOMAIN)] == [fp]
    cred = _verify(dev, peer, f"ldevid-{DOMAIN}", tmp_path)
    # The built-in answer (NUL-terminated) was understood: its bare secp384r1 picked the key type.
    assert cred.key_type == "p384"


def test_bootstrap_over_tls_authenticated_by_tls_trust(dev, peer, tmp_path):
    """--tls-trust authenticates the server (here libest's own CA), --ca-fingerprint picks the domain root."""
    fp = fingerprint(peer.ca.root())
    _enroll(dev, peer, peer.relaxed, "--tls-trust", str(peer.ca.cacert), "--ca-fingerprint", fp, trust=False)
    ks = Keystore.open(dev.state)
    assert [fingerprint(c) for c in ks.trust_anchors(DOMAIN)] == [fp]
    assert [fingerprint(c) for c in ks.trust_anchors(DOMAIN, "tls")] == [fp]
    _verify(dev, peer, f"ldevid-{DOMAIN}", tmp_path)


def test_bootstrap_wrong_fingerprint_trusts_and_stores_nothing(dev, peer, lab):
    before = stored(dev.state)
    r = _enroll(dev, peer, peer.stock, "--ca-fingerprint", fingerprint(lab.domain("plant").root_cert), trust=False,
                code=5)
    assert "no CA certificate matches the expected fingerprint" in r.output and fingerprint(peer.ca.root()) in r.output
    assert stored(dev.state) == before


def test_bootstrap_by_trust_file_and_key_type_conflict(dev, peer, tmp_path):
    before = stored(dev.state)
    dev("keystore", "trust", "--domain", DOMAIN, "--add", str(peer.ca.cacert))
    before = stored(dev.state)
    r = _enroll(dev, peer, peer.stock, "--key-type", "p256", code=2)  # libest's csrattrs asks for P-384
    assert "requires key type p384" in r.output and "--csrattrs ignore" in r.output, r.output
    assert stored(dev.state) == before
    _enroll(dev, peer, peer.stock, "--key-type", "p256", "--csrattrs", "ignore")
    assert _verify(dev, peer, f"ldevid-{DOMAIN}", tmp_path).key_type == "p256"


# ---- simpleenroll, four key types ------------------------------------------------------------------------------
@pytest.mark.parametrize("key_type", ["p256", "p384", "rsa2048", "ed25519"])
def test_simpleenroll_key_types(dev, peer, tmp_path, key_type):
    extra = () if key_type == "p256" else ("--key-type", key_type, "--csrattrs", "ignore")
    _enroll(dev, peer, peer.relaxed, *extra)
    cred = _verify(dev, peer, f"ldevid-{DOMAIN}", tmp_path)
    assert cred.key_type == key_type
    assert cred.certificate.subject.rfc4514_string() == "CN=dev1"


def test_rfc7030_example_csrattrs(dev, peer, tmp_path, caplog):
    """/csrattrs exactly as RFC 7030 §4.5.2's example (attribute form): P-384, SHA-384, challengePassword (bound:
    the server runs with -t)."""
    caplog.set_level(logging.INFO, logger="devagent.lifecycle")
    # -t: the example's challengePassword is then enforced (tls-unique binding, automatic when csrattrs asks).
    with libest.EstServer(peer.build, peer.ca, peer.ns, port=8088, csrattrs_b64=RFC7030_EXAMPLE_B64,
                          extra_args=["-t"]) as srv:
        r = libest.estclient(peer.build, ["-a"], port=srv.port, cacert=peer.ca.cacert, outdir=tmp_path / "ref",
                             netns=peer.ns)
        assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-1000:]
        _enroll(dev, peer, srv)
    assert _verify(dev, peer, f"ldevid-{DOMAIN}", tmp_path).key_type == "p384"
    assert "challengePassword: the CSR is bound to the TLS session" in caplog.text


# ---- request with the LDevID as TLS client certificate --------------------------------------------------------
@pytest.mark.parametrize("key_type", ["p256", "rsa2048", "ed25519"])
def test_request_with_ldevid_as_tls_client_certificate(dev, peer, tmp_path, key_type):
    extra = () if key_type == "p256" else ("--key-type", key_type, "--csrattrs", "ignore")
    _enroll(dev, peer, peer.relaxed, *extra)
    # No password: -o lets the LDevID's TLS client authentication stand alone.
    dev("request", "app1", "--domain", DOMAIN, "--subject", "CN=dev1 app", *extra)
    cred = _verify(dev, peer, "app1", tmp_path)
    assert cred.kind == "app" and cred.key_type == key_type


def test_p384_client_certificate_refused_by_libest(dev, peer, tmp_path):
    """libest offers only P-256 as ECDHE group: a P-384 client certificate gets alert 47 (illegal_parameter).
    curl meets the same refusal; devagent names it and stores nothing."""
    _enroll(dev, peer, peer.relaxed, "--key-type", "p384", "--csrattrs", "ignore")
    before = stored(dev.state)
    r = dev("request", "app1", "--domain", DOMAIN, "--subject", "CN=dev1 app", code=5)
    assert "illegal parameter" in r.output.lower() and "curve" in r.output, r.output
    assert stored(dev.state) == before
    # The same with curl and the same credential: the server's deviation, not ours.
    ks = Keystore.open(dev.state)
    cred = ks.get(f"ldevid-{DOMAIN}")
    cert_pem, key_pem = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_pem.write_bytes(cred.certificate.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(ks.private_key(cred.key_uri).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_pem.chmod(0o600)
    c = peer.ns.subprocess(["curl", "-sS", "--cacert", peer.ca.cacert, "--cert", cert_pem, "--key", key_pem,
                            f"{peer.relaxed.url}/.well-known/est/cacerts"], text=True)
    assert c.returncode != 0 and "alert illegal parameter" in c.stderr, c.stderr


# ---- renew -----------------------------------------------------------------------------------------------------
def test_renew_with_and_without_rekey(dev, peer, tmp_path):
    _enroll(dev, peer, peer.relaxed)
    name = f"ldevid-{DOMAIN}"
    first = _verify(dev, peer, name, tmp_path)
    dev("renew", name)
    second = _verify(dev, peer, name, tmp_path)
    assert second.version == first.version + 1 and second.key_uri != first.key_uri
    dev("renew", name, "--no-rekey")
    third = _verify(dev, peer, name, tmp_path)
    assert third.key_uri == second.key_uri and third.certificate.serial_number != second.certificate.serial_number


def test_renew_when_basic_is_required_besides_the_certificate(dev, peer, tmp_path):
    """libest without -o wants HTTP Basic on /simplereenroll too (RFC 7030 §3.2.3)."""
    _enroll(dev, peer, peer.stock, "--key-type", "p256", "--csrattrs", "ignore")
    name = f"ldevid-{DOMAIN}"
    before = stored(dev.state)
    r = dev("renew", name, code=5)
    assert "HTTP 401" in r.output and "besides the TLS client certificate" in r.output, r.output
    assert stored(dev.state) == before
    pw = tmp_path / "est.pass"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    dev("renew", name, "--username", USER, "--password", f"file:{pw}")
    _verify(dev, peer, name, tmp_path)
    dev("renew", name)  # unattended: the remembered user and password file
    assert _verify(dev, peer, name, tmp_path).version == 3


# ---- serverkeygen, ca-update -----------------------------------------------------------------------------------
def test_server_keygen(dev, peer, tmp_path):
    _enroll(dev, peer, peer.stock, "--server-keygen")
    ks = Keystore.open(dev.state)
    cred = _verify(dev, peer, f"ldevid-{DOMAIN}", tmp_path)
    pub = ks.private_key(cred.key_uri).public_key()
    assert pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        cred.certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    assert any(e["action"] == "key-import" for e in ks.audit_entries())


def test_ca_update(dev, peer):
    fp = fingerprint(peer.ca.root())
    # No LDevID and no anchor yet: bootstrap by fingerprint.
    out = dev.json("ca-update", "--domain", DOMAIN, "--protocol", "est", "--server", peer.stock.url,
                   "--ca-fingerprint", fp)
    assert out["added"] == [fp]
    _enroll(dev, peer, peer.relaxed, trust=False)
    # With the LDevID: /cacerts over TLS authenticated by the stored anchor; nothing new.
    assert dev.json("ca-update", "--domain", DOMAIN)["added"] == []


def test_pop_binding_tls_unique(dev, peer, tmp_path):
    """estserver -t wants the CSR bound to the TLS session (tls-unique in challengePassword, RFC 7030 §3.5), as
    libest's own client does with -z. Without --tls-unique devagent says so; with it, enroll, renew (remembered),
    request (inherited) and serverkeygen go through."""
    key = _write_key_file(tmp_path / "k.pem")
    with libest.EstServer(peer.build, peer.ca, peer.ns, port=8089, extra_args=["-t", "-o"]) as srv:
        out = tmp_path / "ref"
        r = libest.estclient(peer.build, ["-e", "-z", "-u", USER, "-h", PASSWORD, "-x", key, "--common-name", "pop1",
                                          "--pem-output"], port=srv.port, cacert=peer.ca.cacert, outdir=out,
                             netns=peer.ns)
        assert r.returncode == 0 and (out / "cert-0-0.pem").exists(), r.stdout[-1500:]
        dev("keystore", "trust", "--domain", DOMAIN, "--add", str(peer.ca.cacert))
        before = stored(dev.state)
        r = _enroll(dev, peer, srv, "--key-type", "p256", "--csrattrs", "ignore", trust=False, code=5)
        assert "bound to the TLS session" in r.output and "--tls-unique" in r.output, r.output
        assert stored(dev.state) == before
        _enroll(dev, peer, srv, "--key-type", "p256", "--csrattrs", "ignore", "--tls-unique", trust=False)
        _verify(dev, peer, f"ldevid-{DOMAIN}", tmp_path)
        dev("renew", f"ldevid-{DOMAIN}")
        _verify(dev, peer, f"ldevid-{DOMAIN}", tmp_path)
        dev("request", "app1", "--domain", DOMAIN, "--subject", "CN=dev1 app", "--csrattrs", "ignore")
        _verify(dev, peer, "app1", tmp_path)
        _enroll(dev, peer, srv, "--server-keygen", "--tls-unique", name="skg", trust=False)
        _verify(dev, peer, "skg", tmp_path)


def _write_key_file(path):
    path.write_bytes(new_key("p256").private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return path


def test_revoke_is_not_in_est(dev, peer):
    _enroll(dev, peer, peer.relaxed)
    before = stored(dev.state)
    r = dev("revoke", f"ldevid-{DOMAIN}", "--reason", "superseded", code=5)
    assert "EST has no revocation" in r.output
    assert stored(dev.state) == before


# ---- failures: nothing stored ----------------------------------------------------------------------------------
def test_wrong_password(dev, peer):
    dev("keystore", "trust", "--domain", DOMAIN, "--add", str(peer.ca.cacert))
    before = stored(dev.state)
    r = dev("enroll", "--protocol", "est", "--server", peer.stock.url, "--domain", DOMAIN, "--subject", "CN=dev1",
            "--username", USER, "--password", "pass:wrong", code=5)
    assert f"HTTP 401 Unauthorized: authentication failed for user '{USER}'" in r.output, r.output
    assert stored(dev.state) == before


def test_untrusted_server_certificate(dev, peer, lab):
    """The domain's anchor is another CA (the lab's): libest's TLS certificate is refused before any request."""
    f = lab.dir / "plant" / "root.pem"
    dev("keystore", "trust", "--domain", DOMAIN, "--add", str(f))
    before = stored(dev.state)
    r = _enroll(dev, peer, peer.stock, trust=False, code=5)
    assert "server certificate is not trusted by the EST trust anchor" in r.output, r.output
    assert stored(dev.state) == before


def test_server_stopped(dev, peer):
    srv = libest.EstServer(peer.build, peer.ca, peer.ns, port=8087, auth_off_with_cert=True,
                           csrattrs_b64=P256_ATTRS_B64).start()
    try:
        _enroll(dev, peer, srv)
    finally:
        srv.stop()
    before = stored(dev.state)
    r = dev("renew", f"ldevid-{DOMAIN}", code=6)
    assert "cannot connect" in r.output and "127.0.0.1:8087" in r.output, r.output
    assert stored(dev.state) == before
    status = dev.json("status", f"ldevid-{DOMAIN}")["credentials"][0]
    assert "cannot connect" in status["last_error"]


def test_server_accepts_tcp_and_never_answers(dev, peer):
    _enroll(dev, peer, peer.relaxed)

    def listen():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        return s

    silent = peer.ns.run(listen)  # a socket inside the namespace, accepting and never sending a byte
    conns = []
    t = threading.Thread(target=lambda: conns.append(silent.accept()), daemon=True)
    t.start()
    try:
        before = stored(dev.state)
        port = silent.getsockname()[1]
        r = dev("renew", f"ldevid-{DOMAIN}", "--server", f"https://127.0.0.1:{port}", "--timeout", "1", code=6)
        assert "timed out after 1 s (connect)" in r.output, r.output
        assert stored(dev.state) == before
    finally:
        silent.close()
        for c, _ in conns:
            c.close()


# ---- the lab EST server, checked by libest's client --------------------------------------------------------------
def test_estclient_against_the_lab_server(peer, lab, tmp_path):
    """libest's estclient against our lab EST server (on this process's loopback): cacerts, csrattrs,
    simpleenroll with Basic, simplereenroll with the certificate, serverkeygen; openssl verifies what it got."""
    from agent.lab.est_server import start_est_server

    root = lab.dir / "plant" / "root.pem"
    chain = tmp_path / "chain.pem"
    chain.write_bytes(lab.domain("plant").ca_cert.public_bytes(serialization.Encoding.PEM))
    with start_est_server(lab, "plant", users={USER: PASSWORD}) as est:
        def ref(*args, out="o"):
            r = libest.estclient(peer.build, list(args), port=est.port, cacert=root, outdir=tmp_path / out)
            assert r.returncode == 0, (args, r.stdout[-1500:], r.stderr[-1500:])
            return tmp_path / out

        assert (ref("-g", out="g") / "cacert-0-0.pkcs7").stat().st_size > 0
        assert (ref("-a", out="a") / "csr-0-0.base64").stat().st_size > 0
        key = tmp_path / "k.pem"
        key.write_bytes(new_key("p256").private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        d = ref("-e", "-u", USER, "-h", PASSWORD, "-x", key, "--common-name", "ref-dev", "--pem-output", out="e")
        r = libest.openssl_verify(d / "cert-0-0.pem", root, chain)
        assert r.returncode == 0, r.stdout + r.stderr
        d = ref("-r", "-c", d / "cert-0-0.pem", "-k", key, "-x", key, "--pem-output", out="r")
        assert libest.openssl_verify(d / "cert-0-0.pem", root, chain).returncode == 0
        # serverkeygen: the lab server generates a key like the CSR's. estclient refuses key parts shorter than
        # 256 bytes (EST_MIN_CLIENT_PKEY_LEN: it expects RSA, as libest's server generates), so ask with RSA.
        rsa_key = tmp_path / "rsa.pem"
        rsa_key.write_bytes(new_key("rsa2048").private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        d = ref("-q", "-u", USER, "-h", PASSWORD, "-x", rsa_key, "--common-name", "ref-skg", "--pem-output", out="q")
        got = sorted(p.name for p in d.iterdir())  # estclient exits 0 even when it failed: look at what it wrote
        assert any(n.startswith("key-") for n in got) and any(n.startswith("cert-") for n in got), got
    assert ("POST", "/.well-known/est/simplereenroll") in est.requests
