"""`devagent` CMP over https:// against OpenSSL's CMP mock server behind a TLS front whose certificate comes from
a site CA that is not the domain's CA (issue #13, trust stores by purpose): --tls-trust SITE-CA authenticates the
server, is kept in the domain's tls store and serves kur, rr, genm and the daemon's renewals without the option;
without it, or with the wrong CA, the enrollment fails with one clear ProtectionError (the server failed to
authenticate: exit 5, as over EST), not retried, and stores nothing (no --trust anchor left behind); a missing or
garbage --tls-trust file is a usage error naming it.

The mock server (``openssl cmp -port``, plain HTTP) and the front (Python ssl = OpenSSL) run in a private
network namespace; the CLI runs in-process on a thread that joined it (tests/peers/openssl_cmp.py)."""
from __future__ import annotations

import pytest

from keystore.certs import fingerprint
from keystore.store import Keystore
from tests.peers import openssl_cmp as O
from tests.peers.est import Devagent, stored
from tests.peers.tls_front import TlsFront, make_site_pki

NO_SYSTEM_TRUST = {"SSL_CERT_FILE": None, "SSL_CERT_DIR": None}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    O.require_tools()
    return O.make_pki(tmp_path_factory.mktemp("cmp-pki"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_site_pki(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def front(pki, site):
    with O.MockServer(pki, signed=True) as srv, TlsFront(site, srv.port, netns_pid=srv.pid) as tls:
        tls.srv = srv
        yield tls


@pytest.fixture
def dev(tmp_path, front):
    d = Devagent(tmp_path / "state", inside=front.srv.run, env=NO_SYSTEM_TRUST)
    d("keystore", "init")
    return d


def _enroll(dev, front, pki, *extra, code=0):
    return dev("enroll", "--protocol", "cmp", "--server", front.url, "--domain", "plant", "--ref", O.REF,
               "--secret", f"pass:{O.SECRET}", "--trust", pki.path("root.pem"), "--key", pki.path("device_key.pem"),
               "--subject", "CN=device-0001", *extra, code=code)


def test_tls_trust_enrolls_and_is_remembered_for_kur_rr_genm(dev, front, pki, site):
    shakes, forwarded = front.handshakes, front.forwarded
    _enroll(dev, front, pki, "--tls-trust", site.ca_file)
    ks = Keystore.open(dev.state)
    assert ks.get("ldevid-plant").certificate == pki.device_cert
    assert [fingerprint(a) for a in ks.trust_anchors("plant", "tls")] == [fingerprint(site.ca)]
    assert fingerprint(site.ca) not in [fingerprint(a) for a in ks.trust_anchors("plant")]  # not a domain anchor
    listed = dev("keystore", "trust", "--domain", "plant", "--purpose", "tls").output
    assert fingerprint(site.ca) in listed and "tls" in listed
    # kur (the mock answers one fixed certificate: no rekey), genm, rr: no --tls-trust needed any more
    dev("renew", "ldevid-plant", "--no-rekey")
    assert Keystore.open(dev.state).get("ldevid-plant").version == 2
    # genm over TLS: OpenSSL 3.0's mock echoes caCerts without certificates (test_cmp_openssl), so the verified
    # answer ends in "no CA certificate" (exit 4) -- not in a TLS error (exit 5)
    r = dev("ca-update", "--domain", "plant", code=4)
    assert "the server sent no CA certificate" in r.output, r.output
    # the daemon's renewal path: the client it builds from the record (lifecycle.client_for_credential)
    from agent import lifecycle

    ks = Keystore.open(dev.state)
    client = lifecycle.client_for_credential(ks, ks.get("ldevid-plant"))
    assert client.transport.verify == (site.ca,)
    ks.close()
    dev("revoke", "ldevid-plant", "--reason", "superseded")
    assert Keystore.open(dev.state).get("ldevid-plant").record["meta"].get("revoked") == "superseded"
    # ir, certConf, kur, certConf, genm, rr: each a connection of its own, TLS through the front to the mock
    assert front.handshakes - shakes >= 6 and front.forwarded - forwarded == front.handshakes - shakes


def _refused(dev, front, pki, *extra):
    before = stored(dev.state)
    forwarded = front.forwarded
    r = _enroll(dev, front, pki, *extra, code=5)
    assert "certificate verify failed" in r.output and "not trusted by" in r.output, r.output
    assert "enrollment failed" in r.output, r.output
    assert "attempt" not in r.output, "a TLS verification failure is final, not retried"
    assert front.forwarded == forwarded, "no CMP request may reach the server"
    assert stored(dev.state) == before, "nothing stored, no --trust anchor left behind"
    ks = Keystore.open(dev.state)
    assert ks.trust_records("plant") == [] and ks.list() == [] and ks.pending_keys() == []
    return r.output


def test_without_tls_trust_the_system_store_refuses_the_site_ca(dev, front, pki):
    out = _refused(dev, front, pki)
    assert "the system trust store (OpenSSL's default paths)" in out and "--tls-trust" in out, out


def test_with_the_wrong_tls_trust_refused_naming_the_tls_store(dev, front, pki, tmp_path):
    out = _refused(dev, front, pki, "--tls-trust", pki.path("root.pem"))  # the domain CA, not the site CA
    assert "domain plant's tls trust store" in out and "--tls-trust" in out, out
    other = make_site_pki(tmp_path / "other", cn="Other Site CA")
    _refused(dev, front, pki, "--tls-trust", other.ca_file)


@pytest.mark.parametrize("case", ["missing", "garbage", "not-a-ca"])
def test_bad_tls_trust_file_is_a_usage_error_naming_it(dev, front, pki, site, tmp_path, case):
    path = tmp_path / "site.pem"
    if case == "garbage":
        path.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    elif case == "not-a-ca":
        path.write_bytes(site.server.public_bytes(__import__("cryptography.hazmat.primitives.serialization",
                                                             fromlist=["Encoding"]).Encoding.PEM))
    before = stored(dev.state)
    forwarded = front.forwarded
    r = _enroll(dev, front, pki, "--tls-trust", str(path), code=2)
    assert "--tls-trust" in r.output and "site.pem" in r.output, r.output
    assert front.forwarded == forwarded and stored(dev.state) == before


def test_renew_with_tls_trust_after_the_front_changed_ca(dev, front, pki, site, tmp_path):
    """An LDevID enrolled before the front (no tls store) renews once --tls-trust is given to renew; a failed
    renew with a wrong file leaves that anchor behind in no store."""
    _enroll(dev, front, pki, "--tls-trust", site.ca_file)
    ks = Keystore.open(dev.state)
    ks.remove_trust_anchor("plant", fingerprint(site.ca), "tls")
    ks.close()
    other = make_site_pki(tmp_path / "other", cn="Other Site CA")
    before = stored(dev.state)
    r = dev("renew", "ldevid-plant", "--no-rekey", "--tls-trust", other.ca_file, code=5)
    assert "certificate verify failed" in r.output and "domain plant's tls trust store" in r.output, r.output
    assert stored(dev.state) == before
    r = dev("renew", "ldevid-plant", "--no-rekey", code=5)
    assert "the system trust store" in r.output, r.output
    dev("renew", "ldevid-plant", "--no-rekey", "--tls-trust", site.ca_file)
    dev("renew", "ldevid-plant", "--no-rekey")
    assert Keystore.open(dev.state).get("ldevid-plant").version == 3


# --- TLS client authentication (--tls-client-auth; RFC 9483 §6.1) ----------------------------------------------
@pytest.fixture(scope="module")
def mtls(pki, site):
    """The front requires a TLS client certificate from the IDevID CA or the domain root (TLS 1.3), and a second
    one the same at TLS 1.2 for the refusals."""
    with O.MockServer(pki, signed=True) as srv, \
            TlsFront(site, srv.port, netns_pid=srv.pid, client_cas=pki.path("trusted_clients.pem")) as tls, \
            TlsFront(site, srv.port, netns_pid=srv.pid, client_cas=pki.path("trusted_clients.pem"),
                     max_tls12=True) as tls12:
        tls.srv = tls12.srv = srv
        tls.tls12 = tls12
        yield tls


@pytest.fixture
def mdev(tmp_path, mtls, pki):
    d = Devagent(tmp_path / "state", inside=mtls.srv.run, env=NO_SYSTEM_TRUST)
    d("keystore", "init")
    d("keystore", "import-idevid", "idevid", "--cert", pki.path("idevid.pem"), "--key", pki.path("idevid_key.pem"),
      "--chain", pki.path("idevid_ca.pem"))
    return d


def _zero_touch(dev, url, pki, site, *extra, code=0):
    return dev("enroll", "--protocol", "cmp", "--server", url, "--domain", "plant", "--idevid", "idevid",
               "--trust", pki.path("root.pem"), "--tls-trust", site.ca_file, "--key", pki.path("device_key.pem"),
               "--subject", "CN=device-0001", *extra, code=code)


def test_tls_client_auth_idevid_then_ldevid_remembered(mdev, mtls, pki, site):
    seen = len(mtls.client_subjects)
    _zero_touch(mdev, mtls.url, pki, site, "--tls-client-auth")
    assert Keystore.open(mdev.state).get("ldevid-plant").certificate == pki.device_cert
    assert set(mtls.client_subjects[seen:]) == {"organizationName=devagent test, commonName=device-0001 IDevID"}
    seen = len(mtls.client_subjects)
    mdev("renew", "ldevid-plant", "--no-rekey")  # remembered: the LDevID is the TLS client certificate now
    mdev("revoke", "ldevid-plant")
    assert set(mtls.client_subjects[seen:]) == {"organizationName=devagent test, commonName=device-0001"}


def test_without_tls_client_auth_the_refusal_is_named_and_nothing_stored(mdev, mtls, pki, site):
    front = mtls.tls12
    before, forwarded = stored(mdev.state), front.forwarded
    r = _zero_touch(mdev, front.url, pki, site, code=5)  # the server's alert: an authentication refusal
    assert ("handshake_failure alert (40; OpenSSL: SSLV3_ALERT_HANDSHAKE_FAILURE, \"sslv3 alert handshake failure\"): "
            "either it requires a TLS client certificate and we sent none, or it shares no TLS version or cipher "
            "suite with us") in r.output and "--tls-client-auth" in r.output, r.output
    assert "attempt" not in r.output and front.forwarded == forwarded
    assert stored(mdev.state) == before
    # MAC-protected enroll asking for TLS client auth has no certificate to present: refused before sending
    r = mdev("enroll", "--protocol", "cmp", "--server", front.url, "--domain", "plant", "--ref", O.REF,
             "--secret", f"pass:{O.SECRET}", "--trust", pki.path("root.pem"), "--tls-trust", site.ca_file,
             "--tls-client-auth", code=2)
    assert "needs a certificate to present" in r.output, r.output
    assert front.forwarded == forwarded and stored(mdev.state) == before


# --- TLS 1.3: a refused client certificate whose alert is lost, and a drop right after the handshake --------------
@pytest.mark.parametrize("silent", [False, True], ids=["alert", "no-alert"])
def test_tls13_refused_client_certificate_is_named_and_not_retried(mdev, mtls, pki, site, silent):
    """A front that wants client certificates from another CA (the site CA issued neither the IDevID nor the
    LDevID), at TLS 1.3: with its alert (which races the request on the closing connection), and closing without
    it (the race lost: docs/cmp.md). Either way the error names the refused certificate, after at most one
    refusal probe and no retry; nothing is stored. The alert is an authentication refusal (exit 5, as EST's), the
    silent close a transport failure (exit 6, as EST's)."""
    before = stored(mdev.state)
    with TlsFront(site, mtls.srv.port, netns_pid=mtls.srv.pid, client_cas=site.ca_file,
                  silent_refusal=silent) as front:
        r = _zero_touch(mdev, front.url, pki, site, "--tls-client-auth", code=6 if silent else 5)
        refused = len(front.failed)
    assert "refused our TLS client certificate 'CN=device-0001 IDevID,O=devagent test'" in r.output, r.output
    assert "attempt" not in r.output, r.output
    if silent:
        assert "probably refused" in r.output and "before its alert is read" in r.output, r.output
        assert refused == 2  # the request's connection and the probe's, no retry
    else:
        assert refused in (1, 2), front.failed
    assert front.forwarded == 0 and stored(mdev.state) == before


def test_tls12_silent_refusal_says_the_server_may_have_refused_the_certificate(mdev, mtls, pki, site):
    """At TLS 1.2 the front judges the IDevID inside the handshake; refusing it without its alert it closes the
    handshake, which a drop looks like too: retried, exit 6 (a close proves nothing), and the final error says
    the server may have refused the IDevID, naming it; nothing is stored."""
    before = stored(mdev.state)
    with TlsFront(site, mtls.srv.port, netns_pid=mtls.srv.pid, client_cas=site.ca_file, silent_refusal=True,
                  max_tls12=True) as front:
        r = _zero_touch(mdev, front.url, pki, site, "--tls-client-auth", code=6)
        closed = len(front.failed)
    assert ("the server closed the connection in the TLS handshake; we presented our TLS client certificate "
            "'CN=device-0001 IDevID,O=devagent test' in that handshake, and the server may have refused it") in r.output, \
        r.output
    assert closed == 4 and front.handshakes == 0 and front.forwarded == 0, front.failed  # 3 attempts + 1 probe
    assert stored(mdev.state) == before


def test_drop_right_after_the_tls13_handshake_is_retried(mdev, mtls, pki, site):
    """A front that accepts the client certificate but drops the first connection right after the handshake (a
    restart, a load balancer): the probe finds the server waiting for a request, and the retry enrolls."""
    with TlsFront(site, mtls.srv.port, netns_pid=mtls.srv.pid, client_cas=pki.path("trusted_clients.pem"),
                  drop_after_handshake=1) as front:
        _zero_touch(mdev, front.url, pki, site, "--tls-client-auth")
        assert front.dropped == 1 and not front.failed
    assert Keystore.open(mdev.state).get("ldevid-plant").certificate == pki.device_cert


# --- the CLM's CMP upstream over https (clm enroll/run --tls-trust) ----------------------------------------------
def test_clm_cmp_upstream_over_https_with_tls_trust(front, pki, site, tmp_path):
    import click
    from cryptography import x509

    from agent.cli_clm import build_upstream
    from agent.clm import ClmError
    from keystore.csr import build_csr

    csr = build_csr(pki.device_key, x509.Name.from_rfc4514_string("CN=device-0001"), ())

    def upstream(*tls):
        return build_upstream(None, f"cmp:{front.url}", "plant", None, None, [pki.path("root.pem")], (), None, None,
                              None, O.REF, f"pass:{O.SECRET}", tls_trust_files=tls)

    def enroll(up):
        return front.srv.run_async(lambda: up.enroll(csr, domain="plant"))

    res = enroll(upstream(site.ca_file))
    assert res.certificate == pki.device_cert
    forwarded = front.forwarded
    with pytest.raises(ClmError, match=r"certificate verify failed.*not trusted by the system trust store"):
        enroll(upstream())
    with pytest.raises(ClmError, match=r"not trusted by --tls-trust .*root\.pem"):
        enroll(upstream(pki.path("root.pem")))
    assert front.forwarded == forwarded
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"garbage")
    with pytest.raises(click.BadParameter, match="garbage.pem"):
        upstream(str(garbage))
