"""`devagent` EST commands against the lab EST server in the modes of real servers that no peer in CI shows:
the profile in the path (`<label>/<profile>`, Trustpoint), 403 on a wrong password (Trustpoint), HTTP Basic
required on re-enrollment (libest without -o), a TLS server certificate from another CA than the issuing one;
plus /csrattrs handling (--csrattrs require|use|ignore) and timeouts. After every failure nothing is stored."""
from __future__ import annotations

import logging
import socket
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.lab.est_server import start_est_server
from enroll_clients.est import client_from_options, fingerprint
from keystore.store import Keystore
from tests.peers.est import Devagent, est_options, new_key, run, stored

USER, PASSWORD = "dev1", "s3cret"


@pytest.fixture
def root_fp(lab):
    return fingerprint(lab.domain("plant").root_cert)


@pytest.fixture
def dev(tmp_path):
    d = Devagent(tmp_path / "state")
    d("keystore", "init")
    return d


def _enroll(dev, url, fp, *extra, code=0, name=None):
    args = ["enroll", "--protocol", "est", "--server", url, "--label", "plant", "--domain", "plant",
            "--username", USER, "--password", f"pass:{PASSWORD}", "--ca-fingerprint", fp, "--subject", "CN=dev1"]
    if name:
        args += ["--name", name]
    return dev(*args, *extra, code=code)


def _eku(state, name):
    cert = Keystore.open(state).get(name).certificate
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_profile_is_a_path_segment_and_remembered(lab, dev, root_fp):
    with start_est_server(lab, "plant", users={USER: PASSWORD}) as est:
        _enroll(dev, est.url, root_fp, "--profile", "tls-server")
        assert ("POST", "/.well-known/est/plant/tls-server/simpleenroll") in est.requests
        assert ExtendedKeyUsageOID.SERVER_AUTH in _eku(dev.state, "ldevid-plant")  # the profile was applied
        dev("renew", "ldevid-plant")
        assert est.requests[-1] == ("POST", "/.well-known/est/plant/tls-server/simplereenroll")
        # An application credential takes its own profile; the LDevID's label is inherited, its profile not.
        dev("request", "tls-client", "--domain", "plant", "--profile", "tls-client", "--subject", "CN=dev1 TLS")
        assert est.requests[-1] == ("POST", "/.well-known/est/plant/tls-client/simpleenroll")
        dev("request", "plain", "--domain", "plant", "--subject", "CN=dev1 app")
        assert est.requests[-1] == ("POST", "/.well-known/est/plant/simpleenroll")


def test_profile_given_twice_is_a_usage_error(lab, dev, root_fp):
    with start_est_server(lab, "plant", users={USER: PASSWORD}) as est:
        before = stored(dev.state)
        r = dev("enroll", "--protocol", "est", "--server", est.url, "--label", "plant/ldevid", "--profile", "opcua",
                "--domain", "plant", "--username", USER, "--password", "pass:x", "--ca-fingerprint", root_fp,
                code=None)
        assert r.exit_code == 2 and "give it once" in r.output, r.output
        assert stored(dev.state) == before
        assert est.requests == []


def test_wrong_password_answered_with_403(lab, dev, root_fp):
    with start_est_server(lab, "plant", users={USER: PASSWORD}, bad_credentials_status=403) as est:
        # Trust first (so only the enrollment fails), then a wrong password.
        _enroll(dev, est.url, root_fp, name="first")
        before = stored(dev.state)
        r = dev("enroll", "--protocol", "est", "--server", est.url, "--label", "plant", "--domain", "plant",
                "--username", USER, "--password", "pass:wrong", "--subject", "CN=dev1", "--name", "second", code=5)
        assert "HTTP 403" in r.output and "server refused this client" in r.output
        assert f"HTTP Basic user '{USER}' was sent" in r.output
        assert stored(dev.state) == before


def test_renew_with_basic_required_and_remembered(lab, dev, root_fp, monkeypatch):
    with start_est_server(lab, "plant", users={USER: PASSWORD}, basic_on_reenroll=True) as est:
        _enroll(dev, est.url, root_fp)
        before = stored(dev.state)
        r = dev("renew", "ldevid-plant", code=5)
        assert "HTTP 401" in r.output and "besides the TLS client certificate" in r.output, r.output
        assert "--username and --password" in r.output
        assert stored(dev.state) == before
        r = dev("renew", "ldevid-plant", "--username", USER, "--password", "pass:wrong", code=5)
        assert "authentication failed for user 'dev1'" in r.output
        assert stored(dev.state) == before
        monkeypatch.setenv("EST_RENEW_PASSWORD", PASSWORD)
        dev("renew", "ldevid-plant", "--username", USER, "--password", "env:EST_RENEW_PASSWORD")
        meta = Keystore.open(dev.state).get("ldevid-plant").record["meta"]["enroll"]
        assert meta["renew_username"] == USER and meta["renew_password_source"] == "env:EST_RENEW_PASSWORD"
        assert PASSWORD not in (dev.state / "keystore.json").read_text()
        dev("renew", "ldevid-plant", "--no-rekey")  # unattended: the remembered source is used
        assert Keystore.open(dev.state).get("ldevid-plant").version == 3
        # pass: secrets are used once and never remembered
        dev("renew", "ldevid-plant", "--username", USER, "--password", f"pass:{PASSWORD}")
        assert "renew_password_source" not in Keystore.open(dev.state).get("ldevid-plant").record["meta"]["enroll"]


def test_tls_server_certificate_from_another_ca(lab):
    """The TLS front's certificate chains to another root than the issuing CA (client level: the CLI side of
    this waits for --tls-trust, issue #13)."""
    plant, other = lab.domain("plant").root_cert, lab.domain("other").root_cert
    with start_est_server(lab, "plant", users={USER: PASSWORD}, tls_domain="other") as est:
        assert est.tls_certificate.issuer != lab.domain("plant").ca_cert.subject
        from tests.peers.est import make_csr
        from enroll_clients.base import CertRequest, ClientAuth, ProtectionError
        key = new_key()
        csr = make_csr(key, "dev1")
        req = CertRequest(subject=csr.subject, private_key=key, csr=csr)
        auth = ClientAuth(username=USER, password=PASSWORD.encode())
        with pytest.raises(ProtectionError, match="not trusted by the EST trust anchor"):
            run(client_from_options(est_options(est.url, [plant], label="plant")).enroll(req, auth))
        res = run(client_from_options(est_options(est.url, [other], label="plant",
                                                  extra={"ca_anchors": (plant,)})).enroll(req, auth))
        assert res.chain[-1] == plant


def test_tls_ca_is_not_the_issuer_refused_before_the_server_issues(lab, dev):
    """Only the TLS front's CA is trusted: the issued certificate would be refused by verify-before-store and left
    orphaned on the CA, so devagent checks /cacerts against the domain's anchors before it POSTs anything."""
    with start_est_server(lab, "plant", users={USER: PASSWORD}, tls_domain="other") as est:
        r = dev("enroll", "--protocol", "est", "--server", est.url, "--label", "plant", "--domain", "plant",
                "--username", USER, "--password", f"pass:{PASSWORD}", "--trust",
                str(lab.dir / "other" / "root.pem"), "--subject", "CN=dev1", code=4)
        assert "do not chain to domain plant's trust anchors" in r.output and "nothing was requested" in r.output
        assert not any(m == "POST" for m, _ in est.requests), est.requests
        assert Keystore.open(dev.state).list() == [] and Keystore.open(dev.state).pending_keys() == []


def test_tls_front_ca_with_the_domain_root_by_fingerprint(lab, dev, root_fp):
    """Trustpoint behind a TLS front: --tls-trust names the TLS CA, --ca-fingerprint the domain root, which is
    then fetched from /cacerts over TLS authenticated by the TLS CA (neither ignored). The two stay in their own
    stores, and renewal and ca-update use both."""
    other_root = lab.dir / "other" / "root.pem"
    with start_est_server(lab, "plant", users={USER: PASSWORD}, tls_domain="other") as est:
        dev("enroll", "--protocol", "est", "--server", est.url, "--label", "plant", "--domain", "plant",
            "--username", USER, "--password", f"pass:{PASSWORD}", "--tls-trust", str(other_root),
            "--ca-fingerprint", root_fp, "--subject", "CN=dev1")
        ks = Keystore.open(dev.state)
        assert ks.get("ldevid-plant").certificate.issuer == lab.domain("plant").ca_cert.subject
        assert root_fp in [fingerprint(a) for a in ks.trust_anchors("plant")]
        assert [fingerprint(a) for a in ks.trust_anchors("plant", "tls")] == [fingerprint(lab.domain("other").root_cert)]
        assert fingerprint(lab.domain("other").root_cert) not in [fingerprint(a) for a in ks.trust_anchors("plant")]
        assert ("GET", "/.well-known/est/plant/cacerts") in est.requests
        dev("renew", "ldevid-plant")
        assert dev.json("ca-update", "--domain", "plant")["added"] == []


def test_tls_front_with_both_stores_given(lab, dev):
    with start_est_server(lab, "plant", users={USER: PASSWORD}, tls_domain="other") as est:
        dev("enroll", "--protocol", "est", "--server", est.url, "--label", "plant", "--domain", "plant",
            "--username", USER, "--password", f"pass:{PASSWORD}", "--tls-trust", str(lab.dir / "other" / "root.pem"),
            "--trust", str(lab.dir / "plant" / "root.pem"), "--subject", "CN=dev1")
        dev("request", "app1", "--domain", "plant", "--subject", "CN=dev1 app")


def test_tls_front_without_the_domain_root_stores_nothing(lab, dev):
    """Only the TLS CA and no way to know the domain root (no --trust, no fingerprint, no terminal to confirm):
    refused before any POST, and the --tls-trust anchor does not stay behind."""
    with start_est_server(lab, "plant", users={USER: PASSWORD}, tls_domain="other") as est:
        before = stored(dev.state)
        r = dev("enroll", "--protocol", "est", "--server", est.url, "--label", "plant", "--domain", "plant",
                "--username", USER, "--password", f"pass:{PASSWORD}", "--tls-trust",
                str(lab.dir / "other" / "root.pem"), "--subject", "CN=dev1", code=4)
        assert "no trust anchor yet" in r.output and "--ca-fingerprint" in r.output, r.output
        assert stored(dev.state) == before
        assert not any(m == "POST" for m, _ in est.requests)


def test_fingerprint_that_matches_nothing_is_refused_even_with_trust(lab, dev):
    with start_est_server(lab, "plant", users={USER: PASSWORD}) as est:
        dev("keystore", "trust", "--domain", "plant", "--add", str(lab.dir / "plant" / "root.pem"))
        before = stored(dev.state)
        wrong = fingerprint(lab.domain("other").root_cert)
        r = _enroll(dev, est.url, wrong, code=4)
        assert f"none of the received CA certificates has fingerprint {wrong}" in r.output, r.output
        assert stored(dev.state) == before
        assert not any(m == "POST" for m, _ in est.requests)


def test_broken_cacerts_does_not_block_a_server_that_sends_the_chain(lab, dev, caplog):
    with start_est_server(lab, "plant", users={USER: PASSWORD}, fault="cacerts-500") as est:
        dev("keystore", "trust", "--domain", "plant", "--add", str(lab.dir / "plant" / "root.pem"))
        dev("enroll", "--protocol", "est", "--server", est.url, "--label", "plant", "--domain", "plant",
            "--username", USER, "--password", f"pass:{PASSWORD}", "--subject", "CN=dev1", "--csrattrs", "ignore")
        assert "could not be checked against domain plant's anchors" in caplog.text
        assert Keystore.open(dev.state).get("ldevid-plant").certificate.subject.rfc4514_string() == "CN=dev1"


def test_tls_unique_binding_when_the_server_checks_it(lab, dev, root_fp):
    """RFC 7030 §3.5: the lab server (require_pop) wants challengePassword = base64(tls-unique) of the session."""
    with start_est_server(lab, "plant", users={USER: PASSWORD}, require_pop=True) as est:
        dev("keystore", "trust", "--domain", "plant", "--add", str(lab.dir / "plant" / "root.pem"))
        before = stored(dev.state)
        r = _enroll(dev, est.url, root_fp, code=5)
        assert "bound to the TLS session" in r.output and "--tls-unique" in r.output, r.output
        assert stored(dev.state) == before
        _enroll(dev, est.url, root_fp, "--tls-unique")
        assert Keystore.open(dev.state).get("ldevid-plant").record["meta"]["enroll"]["tls_unique"] is True
        dev("renew", "ldevid-plant")  # remembered
        dev("request", "app1", "--domain", "plant", "--subject", "CN=dev1 app")  # inherited from the LDevID
        dev("enroll", "--protocol", "est", "--server", est.url, "--label", "plant", "--domain", "plant", "--name",
            "skg", "--username", USER, "--password", f"pass:{PASSWORD}", "--subject", "CN=skg", "--server-keygen",
            "--tls-unique")


def test_tls_unique_automatic_when_csrattrs_asks(lab, dev, root_fp, caplog):
    from agent.lab.est_server import DEFAULT_CSRATTRS_DER
    from enroll_clients.est import messages as m

    # challengePassword (bare OID) + the lab default (ecdsa-with-SHA256, ecPublicKey{secp256r1})
    caplog.set_level(logging.INFO, logger="devagent.lifecycle")
    items = [m.CsrAttrItem("1.2.840.113549.1.9.7")] + list(m.decode_csrattrs(DEFAULT_CSRATTRS_DER))
    with start_est_server(lab, "plant", users={USER: PASSWORD}, require_pop=True,
                          csrattrs_der=m.encode_csrattrs(items)) as est:
        dev("keystore", "trust", "--domain", "plant", "--add", str(lab.dir / "plant" / "root.pem"))
        before = stored(dev.state)
        r = _enroll(dev, est.url, root_fp, "--no-tls-unique", code=5)
        assert "bound to the TLS session" in r.output
        assert "binding is off (--no-tls-unique)" in caplog.text
        assert stored(dev.state) == before
        _enroll(dev, est.url, root_fp)
        assert "the CSR is bound to the TLS session" in caplog.text
        dev("renew", "ldevid-plant")  # the binding was remembered when the server asked for it


@pytest.mark.parametrize("fault,mode,code,stored_ok", [
    ("csrattrs-nul", "use", 0, True),      # libest's trailing NUL: tolerated
    ("csrattrs-garbage", "use", 0, True),   # unusable answer: warning, enrolled without attributes
    ("csrattrs-500", "use", 0, True),
    ("csrattrs-garbage", "require", 5, False),
    ("csrattrs-500", "require", 5, False),
    ("csrattrs-garbage", "ignore", 0, True),
])
def test_csrattrs_modes(lab, dev, root_fp, caplog, fault, mode, code, stored_ok):
    with start_est_server(lab, "plant", users={USER: PASSWORD}, fault=fault) as est:
        dev("keystore", "trust", "--domain", "plant", "--add", str(lab.dir / "plant" / "root.pem"))
        before = stored(dev.state)
        r = _enroll(dev, est.url, root_fp, "--csrattrs", mode, code=code)
        asked = ("GET", "/.well-known/est/plant/csrattrs") in est.requests
        assert asked == (mode != "ignore")
        if stored_ok:
            cred = Keystore.open(dev.state).get("ldevid-plant")
            assert cred.record["meta"]["enroll"]["csrattrs"] == mode
            if fault == "csrattrs-nul":
                assert cred.key_type == "p256"  # the server's attributes (EC P-256) were applied
            elif mode == "use":
                assert "going on without the server's CSR attributes" in caplog.text
        else:
            assert "csrattrs" in r.output
            assert stored(dev.state) == before


def test_csrattrs_key_type_conflict_is_a_usage_error(lab, dev, root_fp):
    with start_est_server(lab, "plant", users={USER: PASSWORD}) as est:  # asks for EC P-256
        dev("keystore", "trust", "--domain", "plant", "--add", str(lab.dir / "plant" / "root.pem"))
        before = stored(dev.state)
        r = _enroll(dev, est.url, root_fp, "--key-type", "rsa2048", code=2)
        assert "--csrattrs ignore" in r.output and "drop --key-type" in r.output
        assert stored(dev.state) == before
        _enroll(dev, est.url, root_fp, "--key-type", "rsa2048", "--csrattrs", "ignore")
        assert Keystore.open(dev.state).get("ldevid-plant").key_type == "rsa2048"


def test_openssl_style_subject(lab, dev, root_fp):
    with start_est_server(lab, "plant", users={USER: PASSWORD}) as est:
        _enroll(dev, est.url, root_fp, "--subject", "/C=DE/O=Plant/CN=pump-7")
        assert Keystore.open(dev.state).get("ldevid-plant").certificate.subject.rfc4514_string() == \
            "CN=pump-7,O=Plant,C=DE"
        before = stored(dev.state)
        r = _enroll(dev, est.url, root_fp, "--subject", "/CN=x/Q=y", "--name", "bad", code=2)
        assert "unknown attribute type 'Q'" in r.output
        assert stored(dev.state) == before


def test_trust_file_with_text_before_pem(lab, dev, tmp_path):
    """`openssl x509 -text` / `openssl pkcs7 -print_certs` output is accepted as --trust."""
    root = lab.domain("plant").root_cert
    f = tmp_path / "root-text.pem"
    f.write_bytes(b"subject=" + root.subject.rfc4514_string().encode() + b"\n\n"
                  + root.public_bytes(serialization.Encoding.PEM))
    with start_est_server(lab, "plant", users={USER: PASSWORD}) as est:
        dev("enroll", "--protocol", "est", "--server", est.url, "--label", "plant", "--domain", "plant",
            "--username", USER, "--password", f"pass:{PASSWORD}", "--trust", str(f), "--subject", "CN=dev1")


class _SilentTcp:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte (a hung server or a black-holing proxy)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_timeouts_are_network_errors_with_the_phase(lab, dev, root_fp):
    silent = _SilentTcp()
    try:
        dev("keystore", "trust", "--domain", "plant", "--add", str(lab.dir / "plant" / "root.pem"))
        before = stored(dev.state)
        r = _enroll(dev, f"https://127.0.0.1:{silent.port}", root_fp, "--timeout", "0.5", "--csrattrs", "ignore",
                    code=6)
        assert "timed out after 0.5 s (connect)" in r.output, r.output
        assert stored(dev.state) == before
    finally:
        silent.close()
    with start_est_server(lab, "plant", users={USER: PASSWORD}, fault="silent") as est:
        r = _enroll(dev, est.url, root_fp, "--timeout", "0.5", "--csrattrs", "ignore", code=6)
        assert "timed out after 0.5 s (read)" in r.output, r.output
        assert stored(dev.state) == before
