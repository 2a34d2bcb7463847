"""Bad input from EST peers: every case ends in a clear EnrollError subclass naming what and where."""
import ssl
import time

import pytest
from cryptography.hazmat.primitives import serialization

from enroll_clients.base import (
    CertRequest,
    ClientAuth,
    EnrollError,
    ProtectionError,
    ProtocolError,
    ServerError,
    TransportError,
)
from enroll_clients.est import client_from_options, fingerprint
from enroll_clients.est.transport import TlsConfig, make_ssl_context
from tests.peers.est import (  # noqa: F401  (fixtures)
    EST_USER,
    _est_fault_server,
    basic_auth,
    est_fault_server,
    est_lab,
    est_ldevid,
    est_options,
    est_root,
    est_server,
    make_csr,
    new_key,
    run,
)


def _req(key=None, cn="device-0001"):
    key = key or new_key()
    csr = make_csr(key, cn)
    return CertRequest(subject=csr.subject, private_key=key, csr=csr)


def _client(server, anchors, **kw):
    return client_from_options(est_options(server.url, anchors, **kw))


def test_untrusted_server_certificate(est_server, est_lab):
    other_root = est_lab.domain("other").root_cert
    with pytest.raises(ProtectionError, match="not trusted by the EST trust anchor") as ei:
        run(_client(est_server, [other_root]).enroll(_req(), basic_auth()))
    assert est_server.url in str(ei.value)


def test_wrong_host_server_certificate(est_lab, est_root):
    from agent.lab.est_server import start_est_server
    with start_est_server(est_lab, "plant", users={EST_USER: "x"}, tls_names=("est.example.org",)) as h:
        with pytest.raises(ProtectionError, match="not valid for this host name"):
            run(client_from_options(est_options(h.url, [est_root])).ca_certs())


def test_https_to_a_plain_http_server_names_it(est_lab, est_root):
    """An https:// URL whose server answers in plain HTTP: it answered wrongly (exit 5, as over CMP), and the
    error says what the server spoke."""
    from agent.cli import EXIT_SERVER, classify
    from agent.lab.est_server import start_est_server

    with start_est_server(est_lab, "plant", users={EST_USER: "x"}, plain_http=True) as h:
        url = f"https://127.0.0.1:{h.port}/.well-known/est"
        with pytest.raises(ProtectionError, match=r"WRONG_VERSION_NUMBER.*: the server did not answer in TLS; is it "
                                                  r"a plain HTTP endpoint \(http://\)\?") as ei:
            run(client_from_options(est_options(url, [est_root], retries=0)).ca_certs())
    assert url in str(ei.value) and classify(ei.value)[0] == EXIT_SERVER


def test_bootstrap_fingerprint_mismatch(est_server, est_lab):
    wrong = fingerprint(est_lab.domain("other").root_cert)
    c = client_from_options(est_options(est_server.url, [], ca_fingerprint=wrong))
    with pytest.raises(ProtectionError, match="no CA certificate matches the expected fingerprint.*nothing was trusted"):
        run(c.ca_certs())
    assert c.trust_anchors == ()


def test_401_wrong_password_quotes_status_and_text(est_server, est_root):
    from enroll_clients.base import ClientAuth
    with pytest.raises(ServerError, match=r"HTTP 401 Unauthorized: authentication failed for user 'device-0001'.*"
                                          r"server says: authentication failed") as ei:
        run(_client(est_server, [est_root]).enroll(_req(), ClientAuth(username=EST_USER, password=b"wrong")))
    assert ei.value.status == 401 and "authentication failed" in ei.value.text


def test_401_without_credentials_hints(est_server, est_root):
    with pytest.raises(ServerError, match=r"401.*requires authentication \(Basic realm="):
        run(_client(est_server, [est_root]).enroll(_req(), ClientAuth()))


def test_client_cert_from_other_domain_rejected(est_server, est_root, est_lab):
    key = new_key()
    cert = est_lab.issue("other", key.public_key(), _req().subject)
    with pytest.raises((ProtectionError, TransportError),
                       match="refused our TLS client certificate 'CN=device-0001'|rejects a TLS client certificate"
                       ) as ei:
        run(_client(est_server, [est_root]).request(_req(), ClientAuth(certificate=cert, private_key=key)))
    if isinstance(ei.value, ProtectionError):  # the server's alert: named as CMP names it (tls.py)
        assert "a CA the server trusts for TLS clients and still valid" in str(ei.value), str(ei.value)


@pytest.mark.parametrize("fault,exc,text", [
    ("bad-base64", ProtocolError, "malformed base64"),
    ("empty-pkcs7", ProtocolError, "contains no certificate"),
    ("wrong-key", ProtocolError, "no certificate in the response is for our public key"),
    ("foreign-chain", ProtectionError, "does not chain to the EST trust anchor"),
    ("html", ProtocolError, "HTML page.*Welcome to nginx"),
    ("html-500", ServerError, "HTTP 500 Internal Server Error: 500 Internal Server Error.*CA backend is unavailable"),
    ("reset", TransportError, "simpleenroll: the connection broke while reading the response"),
    ("redirect-other", ProtectionError, "redirect to another origin"),
])
def test_bad_simpleenroll_responses(est_fault_server, est_root, fault, exc, text):
    est_fault_server.set_fault(fault)
    with pytest.raises(exc, match=text) as ei:
        run(_client(est_fault_server, [est_root]).enroll(_req(), basic_auth()))
    assert "simpleenroll" in str(ei.value) or fault in ("foreign-chain", "html-500", "html", "redirect-other")


def test_multipart_without_key_part(est_fault_server, est_root):
    est_fault_server.set_fault("no-key-part")
    req = CertRequest(subject=_req().subject, server_keygen=True)
    with pytest.raises(ProtocolError, match="serverkeygen.*application/pkcs8 private-key part, found 0"):
        run(_client(est_fault_server, [est_root]).enroll(req, basic_auth()))


def test_endless_202_is_bounded(est_fault_server, est_root):
    est_fault_server.config.pending_rounds = -1
    est_fault_server.config.retry_after_s = 1
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=r"still pending \(HTTP 202\).*max_wait_s") as ei:
        run(_client(est_fault_server, [est_root], max_wait_s=2.5).enroll(_req(), basic_auth()))
    assert ei.value.status == 202
    assert time.monotonic() - t0 < 6


def test_202_without_retry_after_respects_bound(est_fault_server, est_root):
    est_fault_server.config.pending_rounds = -1
    est_fault_server.set_fault("no-retry-after")
    with pytest.raises(ServerError, match="still pending"):
        run(_client(est_fault_server, [est_root], max_wait_s=1).enroll(_req(), basic_auth()))


def test_connection_refused_is_transport_error(est_root):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = client_from_options(est_options(f"https://127.0.0.1:{port}", [est_root], retries=0))
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}"):
        run(c.ca_certs())


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_a_close_in_the_tls_handshake_is_a_transport_error_retried(est_root, reset):
    """A server that reads our ClientHello and closes (or resets) without an alert (a drop, or a front cutting
    connections): it proves neither a refusal nor a server that failed to authenticate, so it is a network error
    (exit 6, as over CMP) naming what happened, and a GET is tried again."""
    from agent.cli import EXIT_NETWORK, classify
    from tests.peers.tls_front import handshake_dropper

    with handshake_dropper(reset=reset) as (port, accepted):
        c = client_from_options(est_options(f"https://127.0.0.1:{port}", [est_root], retries=1))
        with pytest.raises(TransportError) as ei:
            run(c.ca_certs())
    want = ("the server ended the connection in the TLS handshake with a reset, without an alert "
            "(ConnectionResetError: [Errno 104] Connection reset by peer)" if reset else
            "the server closed the connection in the TLS handshake, without an alert (UNEXPECTED_EOF_WHILE_READING)")
    assert want + "; retry later, and if it persists check that the URL's port is the server's TLS port" in str(
        ei.value), str(ei.value)
    assert "is the EST server running" not in str(ei.value) and "may have refused" not in str(ei.value)
    assert classify(ei.value)[0] == EXIT_NETWORK
    assert len(accepted) == 2, "a GET met by a dropped connection is tried again"


def test_bootstrap_never_sends_credentials(est_server):
    c = client_from_options(est_options(est_server.url, []))
    with pytest.raises(EnrollError, match="unauthenticated"):
        run(c._exchange("cacerts", "GET", verify=False, auth=basic_auth()))


def test_tls_context_minimum_version_and_no_system_store(est_root):
    ctx = make_ssl_context(TlsConfig(trust_anchors=(est_root,)))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert len(ctx.get_ca_certs()) == 1  # only our anchor, not the system store
    der = ctx.get_ca_certs(binary_form=True)[0]
    assert der == est_root.public_bytes(serialization.Encoding.DER)


def test_client_key_temp_files_are_removed(est_server, est_root, est_ldevid, tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cert, key = est_ldevid
    make_ssl_context(TlsConfig(trust_anchors=(est_root,), client_certificate=cert, client_key=key))
    assert list(tmp_path.iterdir()) == []
