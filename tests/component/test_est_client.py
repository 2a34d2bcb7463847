"""EST client against the lab EST server over real TLS on loopback: every operation and authentication mode."""
import dataclasses
import datetime
import logging

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_clients import client_for
from enroll_clients.base import CertRequest, ClientAuth, EnrollError, ServerError, UnsupportedError
from enroll_clients.est import client_from_options, fingerprint
from enroll_clients.est.messages import _spki
from tests.peers.est import (  # noqa: F401  (fixtures)
    EST_ONE_TIME_PASSWORD,
    EST_ONE_TIME_USER,
    _est_fault_server,
    basic_auth,
    est_fault_server,
    est_lab,
    est_ldevid,
    est_options,
    est_root,
    est_server,
    make_csr,
    name,
    new_key,
    run,
)


def _req(key, cn="device-0001", **kw):
    csr = make_csr(key, cn, **kw)
    return CertRequest(subject=csr.subject, private_key=key, csr=csr)


def _client(server, anchors, **kw):
    return client_from_options(est_options(server.url, anchors, **kw))


def test_cacerts_with_explicit_trust_anchor(est_server, est_root, est_lab):
    res = run(_client(est_server, [est_root]).ca_certs())
    assert est_root in res.ca_certs and est_lab.domain("plant").ca_cert in res.ca_certs
    assert res.new_root is None


def test_client_for_est(est_server, est_root):
    c = client_for("est", est_options(est_server.url, [est_root]))
    assert c.protocol == "est"


@pytest.mark.parametrize("label", [None, "plant", "plant/tls-client"])
@pytest.mark.parametrize("kind", ["p256", "rsa2048"])
def test_simpleenroll_basic_auth(est_server, est_root, est_lab, label, kind):
    key = new_key(kind)
    res = run(_client(est_server, [est_root], label=label).enroll(_req(key), basic_auth()))
    assert _spki(res.certificate) == _spki(key)
    assert res.chain[-1] == est_root and res.chain[0] == est_lab.domain("plant").ca_cert
    assert res.info["operation"] == "simpleenroll" and res.info["basic_auth_used"]
    # The server's HTTP Date is reported as its clock (the daemon's time estimate on boards without an RTC).
    assert res.server_time is not None and res.server_time.tzinfo is not None
    assert abs((res.server_time - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) < 120
    if label:
        assert f"/.well-known/est/{label}/simpleenroll" in res.info["url"]


def test_profile_segment_is_used(est_server, est_root):
    key = new_key()
    res = run(_client(est_server, [est_root], label="plant/tls-server").enroll(_req(key), basic_auth()))
    eku = res.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_simpleenroll_with_idevid_tls_client_cert(est_server, est_root, est_ldevid):
    cert, ckey = est_ldevid  # stands in for an IDevID: zero-touch, no password
    key = new_key()
    res = run(_client(est_server, [est_root]).enroll(_req(key), ClientAuth(certificate=cert, private_key=ckey)))
    assert res.info["tls_client_cert"] and not res.info["basic_auth_used"]


def test_simpleenroll_with_both(est_server, est_root, est_ldevid):
    cert, ckey = est_ldevid
    res = run(_client(est_server, [est_root]).enroll(_req(new_key()), basic_auth(certificate=cert, private_key=ckey)))
    assert res.info["tls_client_cert"] and res.info["basic_auth_used"]


def test_request_uses_ldevid(est_server, est_root, est_ldevid):
    cert, ckey = est_ldevid
    res = run(_client(est_server, [est_root]).request(_req(new_key(), "opcua-app"),
                                                      ClientAuth(certificate=cert, private_key=ckey)))
    assert res.certificate.subject == name("opcua-app")
    with pytest.raises(EnrollError, match="existing certificate"):
        run(_client(est_server, [est_root]).request(_req(new_key()), basic_auth()))


def test_client_key_from_encrypted_key_file(est_server, est_root, est_ldevid, tmp_path):
    cert, ckey = est_ldevid
    kf = tmp_path / "ldevid.key"
    kf.write_bytes(ckey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(b"pw")))
    auth = ClientAuth(certificate=cert, key_file=str(kf), key_password=b"pw")
    res = run(_client(est_server, [est_root]).request(_req(new_key(), "app2"), auth))
    assert res.certificate.subject == name("app2")


@pytest.mark.parametrize("kind", ["p256", "rsa2048"])
def test_simplereenroll_rekey_and_same_key(est_server, est_root, kind):
    c = _client(est_server, [est_root])
    old_key = new_key(kind)
    first = run(c.enroll(_req(old_key, "renew-me"), basic_auth()))
    auth = ClientAuth(certificate=first.certificate, private_key=old_key, chain=first.chain[:-1])
    new = new_key(kind)
    res = run(c.renew(_req(new, "renew-me"), auth))  # rekey
    assert _spki(res.certificate) == _spki(new) and res.info["operation"] == "simplereenroll"
    same = run(c.renew(_req(old_key, "renew-me"), auth))  # renew with the same key
    assert _spki(same.certificate) == _spki(old_key) and same.certificate.serial_number != first.certificate.serial_number


def test_simplereenroll_subject_must_match(est_server, est_root, est_ldevid):
    cert, ckey = est_ldevid
    with pytest.raises(EnrollError, match="RFC 7030 §4.2.2"):
        run(_client(est_server, [est_root]).renew(_req(new_key(), "someone-else"),
                                                  ClientAuth(certificate=cert, private_key=ckey)))
    with pytest.raises(EnrollError, match="current certificate"):
        run(_client(est_server, [est_root]).renew(_req(new_key()), basic_auth()))


@pytest.mark.parametrize("key_type", ["p256", "rsa2048"])
def test_serverkeygen(est_server, est_root, key_type, caplog):
    req = CertRequest(subject=name("keygen-device"), server_keygen=True, key_type=key_type)
    with caplog.at_level(logging.INFO, logger="devagent.audit"):
        res = run(_client(est_server, [est_root]).enroll(req, basic_auth()))
    assert _spki(res.private_key) == _spki(res.certificate)
    assert res.info["server_generated_key"] is True
    assert any("serverkeygen" in r.getMessage() and "keygen-device" in r.getMessage() for r in caplog.records)
    assert not any("PRIVATE KEY" in r.getMessage() for r in caplog.records)


def test_csrattrs_parsed_and_applied(est_server, est_root):
    attrs = run(_client(est_server, [est_root]).csrattrs())
    assert (attrs.key_type, attrs.curve, attrs.signature_hash) == ("p256", "secp256r1", "sha256")
    from enroll_clients.est import apply_csrattrs
    assert apply_csrattrs(CertRequest(subject=name("x")), attrs).key_type == "p256"


def test_csrattrs_204(est_lab, est_root):
    from agent.lab.est_server import start_est_server
    with start_est_server(est_lab, "plant", csrattrs_der=None) as h:
        attrs = run(client_from_options(est_options(h.url, [est_root])).csrattrs())
    assert attrs.items == ()


def test_pending_202_then_success(est_fault_server, est_root):
    est_fault_server.config.pending_rounds = 2
    est_fault_server.config.retry_after_s = 0
    res = run(_client(est_fault_server, [est_root]).enroll(_req(new_key()), basic_auth()))
    posts = [r for r in est_fault_server.requests if r[0] == "POST"]
    assert len(posts) == 3 and res.certificate is not None


def test_one_time_password_works_once(est_server, est_root):
    auth = ClientAuth(username=EST_ONE_TIME_USER, password=EST_ONE_TIME_PASSWORD)
    c = _client(est_server, [est_root])
    run(c.enroll(_req(new_key()), auth))
    with pytest.raises(ServerError, match="401.*one-time password that was already used") as ei:
        run(c.enroll(_req(new_key()), auth))
    assert ei.value.status == 401


@pytest.mark.parametrize("encoding", ["der", "pem", "no-cte"])
def test_response_encodings_servers_use(est_fault_server, est_root, encoding):
    est_fault_server.set_fault(encoding)
    key = new_key()
    res = run(_client(est_fault_server, [est_root]).enroll(_req(key), basic_auth()))
    assert _spki(res.certificate) == _spki(key)


def test_same_origin_redirect_followed(est_fault_server, est_root):
    est_fault_server.set_fault("redirect-same")
    res = run(_client(est_fault_server, [est_root]).enroll(_req(new_key()), basic_auth()))
    assert "redirected=1" in res.info["url"]


def test_bootstrap_with_fingerprint(est_server, est_root):
    c = client_from_options(est_options(est_server.url, [], ca_fingerprint=fingerprint(est_root)))
    boot = run(c.bootstrap_cacerts())
    assert boot.accepted == est_root and boot.server_trusted and len(boot.validated) == 2
    assert c.trust_anchors == (est_root,)
    # Afterwards the same client enrolls over TLS authenticated by the accepted anchor.
    assert run(c.enroll(_req(new_key()), basic_auth())).chain[-1] == est_root


def test_enroll_bootstraps_from_fingerprint_option(est_server, est_root):
    c = client_from_options(est_options(est_server.url, [], ca_fingerprint=fingerprint(est_root)))
    res = run(c.ca_certs())
    assert est_root in res.ca_certs


def test_bootstrap_without_fingerprint_trusts_nothing_until_confirmed(est_server, est_root):
    c = client_from_options(est_options(est_server.url, []))
    boot = run(c.bootstrap_cacerts())
    assert boot.accepted is None and c.trust_anchors == ()
    assert fingerprint(est_root) in boot.fingerprints and fingerprint(est_root) in boot.describe()
    with pytest.raises(EnrollError, match="no EST trust anchor"):
        run(c.enroll(_req(new_key()), basic_auth()))  # nothing trusted, no credential sent
    accepted = c.accept_bootstrap(boot, fingerprint(est_root))  # the user confirmed
    assert accepted.accepted == est_root
    run(c.enroll(_req(new_key()), basic_auth()))


def test_no_trust_anchor_is_an_error_not_system_store(est_server):
    with pytest.raises(EnrollError, match="system trust store is not used by default"):
        run(client_from_options(est_options(est_server.url, [])).ca_certs())


def test_revoke_unsupported(est_server, est_root, est_ldevid):
    with pytest.raises(UnsupportedError, match="EST has no revocation; use CMP rr"):
        run(_client(est_server, [est_root]).revoke(est_ldevid[0], ClientAuth(), "keyCompromise"))


class _HardwareKey:
    """A key that cannot be exported, like a TPM or PKCS#11 key."""

    def private_bytes(self, *a, **k):
        raise TypeError("key is not exportable")


def test_hardware_key_without_key_file_is_a_clear_error(est_server, est_root, est_ldevid):
    auth = ClientAuth(certificate=est_ldevid[0], private_key=_HardwareKey())
    with pytest.raises(EnrollError, match="non-exportable .TPM/PKCS#11. key.*OpenSSL provider"):
        run(_client(est_server, [est_root]).request(_req(new_key()), auth))


def test_bad_options_are_config_errors():
    from enroll_clients.est import EstConfigError
    for kw in (dict(server="http://x"), dict(server="https://x", label="../a"),
               dict(server="https://x", ca_fingerprint="md5:00")):
        with pytest.raises(EstConfigError):
            client_from_options(est_options(**kw))
    assert issubclass(EstConfigError, ValueError) and issubclass(EstConfigError, EnrollError)


def test_import_is_cheap():
    import subprocess
    import sys
    code = ("import sys, enroll_clients.est; "
            "print(any(m in sys.modules for m in ('httpx', 'pyasn1', 'enroll_clients.est.client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_csr_must_belong_to_private_key(est_server, est_root):
    req = dataclasses.replace(_req(new_key()), private_key=new_key())
    with pytest.raises(EnrollError, match="not signed for"):
        run(_client(est_server, [est_root]).enroll(req, basic_auth()))
