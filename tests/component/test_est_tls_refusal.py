"""EST with a TLS client certificate behind a TLS front that refuses it without its alert (``silent_refusal``:
what a TLS 1.3 server that closes at once looks like) or drops a connection right after an accepted handshake
(``drop_after_handshake``/``drop_handshakes``). The lab EST server is the front's plain-HTTP backend.

The transport's one refusal probe (enroll_clients/tls_probe.py) names a refusal (exit 6, the certificate's
subject, no retry); a drop stays a ``TransportError``, a POST is never sent again (a second CSR could be issued
a second certificate), and a GET retried after an accepted probe is not probed again. The same front sending its
alert is an authentication refusal: ``ProtectionError``, exit 5, as over CMP (tests/interop/test_cmp_https.py)."""
from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from agent.cli import EXIT_NETWORK, EXIT_SERVER, classify
from agent.lab.est_server import start_est_server
from enroll_clients.base import CertRequest, ClientAuth, ProtectionError, TransportError
from enroll_clients.est import client_from_options, fingerprint
from tests.peers.est import Devagent, est_options, make_csr, name, new_key, run, stored
from tests.peers.tls_front import TlsFront, make_site_pki

USER, PASSWORD = "dev1", "s3cret"
PEM = serialization.Encoding.PEM


@pytest.fixture
def site(tmp_path):
    return make_site_pki(tmp_path / "site")


@pytest.fixture
def backend(lab):
    with start_est_server(lab, "plant", users={USER: PASSWORD}, plain_http=True) as est:
        yield est


@pytest.fixture
def plant_clients(lab, tmp_path):
    """The CA file of a front that accepts certificates of the plant domain (the LDevID's issuer)."""
    dom = lab.domain("plant")
    path = tmp_path / "plant-clients.pem"
    path.write_bytes(dom.root_cert.public_bytes(PEM) + dom.ca_cert.public_bytes(PEM))
    return str(path)


def _credential(lab, domain: str, cn: str):
    key = new_key()
    cert = lab.issue(domain, key.public_key(), name(cn), (), "ldevid")
    return key, cert, ClientAuth(certificate=cert, private_key=key, chain=(lab.domain(domain).ca_cert,))


def _client(lab, site, front, retries: int = 2):
    return client_from_options(est_options(f"https://127.0.0.1:{front.port}", [site.ca], label="plant",
                                           retries=retries, extra={"ca_anchors": (lab.domain("plant").root_cert,)}))


@pytest.mark.parametrize("op", ["simpleenroll", "simplereenroll"])
def test_silent_refusal_of_the_client_certificate_is_named(lab, site, backend, op):
    """simpleenroll with the IDevID (another CA's) and simplereenroll with the LDevID: the front refuses either
    and withholds its alert; one probe, the error names the certificate, exit 6, the CSR reaches no CA."""
    if op == "simpleenroll":
        key, cert, auth = _credential(lab, "other", "dev1 IDevID")
        new = new_key()
        csr = make_csr(new, "dev1")
        call = lambda c: c.enroll(CertRequest(subject=csr.subject, private_key=new, csr=csr), auth)  # noqa: E731
        subject = "CN=dev1 IDevID"
    else:
        key, cert, auth = _credential(lab, "plant", "dev1")
        csr = make_csr(key, "dev1")
        call = lambda c: c.renew(CertRequest(subject=csr.subject, private_key=key, csr=csr), auth)  # noqa: E731
        subject = "CN=dev1"
    with TlsFront(site, backend.port, client_cas=site.ca_file, silent_refusal=True) as front:
        with pytest.raises(TransportError) as ei:
            run(call(_client(lab, site, front)))
        refused = len(front.failed)
    msg = str(ei.value)
    assert (f"POST https://127.0.0.1:{front.port}/.well-known/est/plant/{op}: the EST server probably refused our "
            f"TLS client certificate '{subject}'") in msg, msg
    assert "before its alert is read" in msg, msg
    assert classify(ei.value)[0] == EXIT_NETWORK
    assert refused == 2, front.failed  # the request's connection and the probe's: no second POST
    assert front.handshakes == 0 and backend.requests == []


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
def test_a_refusal_with_its_alert_is_a_protection_error(lab, site, backend, tls12):
    """The front refuses the certificate and sends its alert (at TLS 1.3 read by the request or by the probe, at
    TLS 1.2 in the handshake): the server's explicit refusal of our credential, exit 5 (as CMP), not retried."""
    key, cert, auth = _credential(lab, "other", "dev1 IDevID")
    csr = make_csr(new_key(), "dev1")
    with TlsFront(site, backend.port, client_cas=site.ca_file, max_tls12=tls12) as front:
        with pytest.raises(ProtectionError) as ei:
            run(_client(lab, site, front).enroll(CertRequest(subject=csr.subject, csr=csr), auth))
    assert "the server refused our TLS client certificate 'CN=dev1 IDevID'" in str(ei.value), str(ei.value)
    if tls12:  # refused in the handshake: the alert itself, on the request's connection; CMP's words (tls.py)
        assert str(ei.value).endswith("the server refused our TLS client certificate 'CN=dev1 IDevID' "
                                      "(TLSV1_ALERT_UNKNOWN_CA): check that it is issued by a CA the server trusts "
                                      "for TLS clients and still valid"), str(ei.value)
    assert classify(ei.value)[0] == EXIT_SERVER
    assert front.handshakes == 0 and backend.requests == []  # no handshake accepted, nothing reached the CA


def test_drop_after_an_accepted_handshake_is_a_drop_and_the_post_is_not_sent_again(lab, site, backend,
                                                                                   plant_clients):
    """The front accepts the LDevID and drops the first connection: the probe finds the server waiting, so the
    error is the drop's TransportError (the scheduler retries later), not a refusal; the POST is not repeated."""
    key, cert, auth = _credential(lab, "plant", "dev1")
    csr = make_csr(new_key(), "dev1 app")
    with TlsFront(site, backend.port, client_cas=plant_clients, drop_after_handshake=1) as front:
        with pytest.raises(TransportError) as ei:
            run(_client(lab, site, front).request(CertRequest(subject=csr.subject, csr=csr), auth))
    msg = str(ei.value)
    assert "probably refused" not in msg and not getattr(ei.value, "refused", False), msg
    assert "was not refused (the refusal probe), so the connection was dropped" in msg, msg
    assert front.handshakes == 2 and front.dropped == 1 and not front.failed  # the POST's and the probe's
    assert backend.requests == []  # nothing reached the CA: the POST was not sent again


def test_a_get_is_retried_after_a_drop_and_an_accepted_certificate_not_probed_again(lab, site, backend,
                                                                                   plant_clients):
    """GET /cacerts with the LDevID, the 1st and 3rd handshakes dropped: drop, probe (accepted), retry dropped
    (no second probe), retry answered."""
    key, cert, auth = _credential(lab, "plant", "dev1")
    with TlsFront(site, backend.port, client_cas=plant_clients, drop_handshakes=(1, 3)) as front:
        result = run(_client(lab, site, front, retries=2).ca_certs(auth))
    assert lab.domain("plant").ca_cert in result.ca_certs
    assert front.dropped == 2 and front.handshakes == 4, (front.dropped, front.handshakes)  # 3 GETs + 1 probe
    assert backend.requests == [("GET", "/.well-known/est/plant/cacerts")]


def test_a_get_refusal_is_named_and_not_retried(lab, site, backend):
    key, cert, auth = _credential(lab, "plant", "dev1")
    with TlsFront(site, backend.port, client_cas=site.ca_file, silent_refusal=True) as front:
        with pytest.raises(TransportError) as ei:
            run(_client(lab, site, front, retries=2).ca_certs(auth))
        refused = len(front.failed)
    assert (f"GET https://127.0.0.1:{front.port}/.well-known/est/plant/cacerts: the EST server probably refused our "
            "TLS client certificate 'CN=dev1'") in str(ei.value), str(ei.value)
    assert refused == 2, front.failed  # one GET and its probe, no retry of a refusal


def test_cli_renew_refused_by_the_front_exits_6_naming_the_ldevid(lab, site, backend, tmp_path):
    """Enrolled through an accepting front (Basic), then the front starts refusing the LDevID silently: `devagent
    renew` exits 6 with the refusal naming the LDevID, and nothing stored changes; refusing it with its alert:
    exit 5, nothing stored changes."""
    dev = Devagent(tmp_path / "state")
    dev("keystore", "init")
    root_fp = fingerprint(lab.domain("plant").root_cert)
    with TlsFront(site, backend.port) as front:
        port = front.port
        dev("enroll", "--protocol", "est", "--server", f"https://127.0.0.1:{port}", "--label", "plant", "--domain",
            "plant", "--username", USER, "--password", f"pass:{PASSWORD}", "--tls-trust", site.ca_file,
            "--ca-fingerprint", root_fp, "--subject", "CN=dev1")
    before = stored(dev.state)
    with TlsFront(site, backend.port, port=port, client_cas=site.ca_file, silent_refusal=True) as front:
        r = dev("renew", "ldevid-plant", code=EXIT_NETWORK)
        refused = len(front.failed)
    assert "the EST server probably refused our TLS client certificate 'CN=dev1'" in r.output, r.output
    assert refused == 2, front.failed
    assert stored(dev.state) == before
    with TlsFront(site, backend.port, port=port, client_cas=site.ca_file) as front:  # its alert now
        r = dev("renew", "ldevid-plant", code=EXIT_SERVER)
    assert "the server refused our TLS client certificate 'CN=dev1'" in r.output, r.output
    assert stored(dev.state) == before


# --- TLS 1.2: a refusal without its alert is a close in the handshake; handshake_failure's two causes -------------
@pytest.mark.parametrize("op", ["simpleenroll", "cacerts"])
def test_tls12_silent_refusal_says_the_server_may_have_refused_the_certificate(lab, site, backend, op):
    """At TLS 1.2 the front judges our certificate inside the handshake; refusing it without its alert, it closes
    the handshake, as a drop would: a TransportError (exit 6, a close proves nothing) whose text says the server
    may have refused the certificate, naming it. The POST is not sent again, a GET is retried as any drop."""
    key, cert, auth = _credential(lab, "other", "dev1 IDevID")
    csr = make_csr(new_key(), "dev1")
    with TlsFront(site, backend.port, client_cas=site.ca_file, silent_refusal=True, max_tls12=True) as front:
        client = _client(lab, site, front, retries=1)
        with pytest.raises(TransportError) as ei:
            run(client.enroll(CertRequest(subject=csr.subject, csr=csr), auth) if op == "simpleenroll" else
                client.ca_certs(auth))
        refused = len(front.failed)
    msg = str(ei.value)
    path = f"https://127.0.0.1:{front.port}/.well-known/est/plant/{op}"
    assert (f"{path}: the server closed the connection in the TLS handshake, without an alert "
            "(UNEXPECTED_EOF_WHILE_READING); we presented our TLS client certificate 'CN=dev1 IDevID' in that "
            "handshake, and the server may have refused it") in msg, msg
    assert classify(ei.value)[0] == EXIT_NETWORK
    assert refused == (1 if op == "simpleenroll" else 2), front.failed
    assert front.handshakes == 0 and backend.requests == []


@pytest.mark.parametrize("case", ["no-client-certificate", "no-shared-cipher"])
def test_a_handshake_failure_alert_names_both_likely_causes(lab, site, backend, case):
    """Alert 40 (handshake_failure): a TLS 1.2 server requiring a client certificate that got none, or one that
    shares no cipher suite with us (here with our certificate offered): the error names the alert as OpenSSL
    reports it and both causes, as over CMP; exit 5, not retried."""
    key, cert, auth = _credential(lab, "plant", "dev1")
    kw = ({"client_cas": site.ca_file, "max_tls12": True} if case == "no-client-certificate" else
          {"ciphers": "ECDHE-ECDSA-AES128-SHA"})  # a TLS 1.2 suite we do not offer
    with TlsFront(site, backend.port, **kw) as front:
        with pytest.raises(ProtectionError) as ei:
            run(_client(lab, site, front).ca_certs(None if case == "no-client-certificate" else auth))
        failed = len(front.failed)
    first = ("it requires a TLS client certificate and we sent none" if case == "no-client-certificate" else
             "it refused our TLS client certificate 'CN=dev1' (some servers answer a refused certificate so)")
    msg = str(ei.value)
    assert (f"TLS to GET https://127.0.0.1:{front.port}/.well-known/est/plant/cacerts: the server ended the TLS "
            'handshake with a handshake_failure alert (40; OpenSSL: SSLV3_ALERT_HANDSHAKE_FAILURE, "sslv3 alert '
            f'handshake failure"): either {first}, or it shares no TLS version or cipher suite with us') in msg, msg
    assert classify(ei.value)[0] == EXIT_SERVER
    assert failed == 1 and backend.requests == [], front.failed


@pytest.mark.parametrize("op", ["cacerts", "simpleenroll"])
def test_a_tls13_server_requiring_a_client_certificate_we_did_not_send_says_so(lab, site, backend, op):
    """TLS 1.3 (the front's default) requiring a client certificate, none sent: our handshake completes before the
    server reads the empty Certificate, and its certificate_required alert (116) arrives on the first read after the
    request (a GET, or a POST with Basic only), or is lost with it (the server closes on our unread request: a
    reset, then one probe reads it). The error says the server requires a TLS client certificate and this request
    sent none; final (exit 5, as TLS 1.2's alert 40), not retried, nothing reached the CA. Repeated: the alert is
    lost in about one run of three."""
    csr = make_csr(new_key(), "dev1")
    method = "GET" if op == "cacerts" else "POST"
    with TlsFront(site, backend.port, client_cas=site.ca_file) as front:
        client = _client(lab, site, front)
        for _ in range(6):
            with pytest.raises(ProtectionError) as ei:
                run(client.ca_certs(None) if op == "cacerts" else
                    client.enroll(CertRequest(subject=csr.subject, csr=csr),
                                  ClientAuth(username=USER, password=PASSWORD)))
            msg = str(ei.value)
            assert msg.endswith(f"TLS to {method} https://127.0.0.1:{front.port}/.well-known/est/plant/{op}: the "
                                "server requires a TLS client certificate, and this request sent none "
                                "(TLSV13_ALERT_CERTIFICATE_REQUIRED)"), msg
            assert "attempt" not in msg and "probably" not in msg, msg
            assert classify(ei.value)[0] == EXIT_SERVER
        failed = len(front.failed)  # at most the request's connection and the probe's for each: none retried
    assert failed <= 12 and front.handshakes == 0 and backend.requests == [], front.failed


def test_a_close_of_the_kept_connection_of_a_bound_request_is_not_probed(site):
    """``bound_request`` (tls-unique, TLS 1.2) sends its POST on the kept connection that answered its GET: a server
    that closes it on the POST without an answer has passed the handshake and served a request on it, so the close
    is no refusal: the close's TransportError, with no refusal probe (one handshake in all, no second connection)."""
    import asyncio
    import http.server

    from enroll_clients.est.transport import HttpxTransport, TlsConfig
    from tests.peers.http_server import serving

    class AnswerThenClose(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):  # kept alive: no "Connection: close"
            self.send_response(200)
            self.send_header("Content-Type", "application/pkcs7-mime")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def do_POST(self):  # read, then close without an answer
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.close_connection = True

    with serving(AnswerThenClose) as port, TlsFront(site, port, max_tls12=True) as front:
        base = f"https://127.0.0.1:{front.port}/.well-known/est"
        with pytest.raises(TransportError) as ei:
            asyncio.run(HttpxTransport().bound_request(
                "POST", f"{base}/simpleenroll", {"Content-Type": "application/pkcs10"}, lambda unique: b"csr",
                TlsConfig(trust_anchors=(site.ca,)), 5.0, None, f"{base}/cacerts"))
        assert front.handshakes == 1 and front.failed == [] and front.forwarded == 1, front.failed
    assert f"POST {base}/simpleenroll" in str(ei.value), ei.value
    assert classify(ei.value)[0] == EXIT_NETWORK
