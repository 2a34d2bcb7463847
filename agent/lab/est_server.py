"""TEST-ONLY EST server (RFC 7030) in front of the lab CA, over real TLS on 127.0.0.1.

Serves ``/.well-known/est[/<domain>[/<profile>]]/{cacerts,simpleenroll,simplereenroll,serverkeygen,csrattrs}``
for one ``LabCA`` domain. It is written from RFC 7030 independently of the client's parsing code (it uses only
``cryptography`` and the stdlib), and the tests check it with curl + openssl, so client and server cannot
share a private misreading.

Authentication: HTTP Basic (users given at start; ``one_time`` users' passwords work once) and/or a TLS client
certificate chaining to the domain's root (or to extra ``client_cas``, e.g. an IDevID manufacturer CA).
/simplereenroll requires the client certificate, with CSR subject and SAN identical to it (RFC 7030 §4.2.2).

Modes for behaviour of real servers that no peer in CI shows: ``bad_credentials_status=403`` (Trustpoint answers
a wrong password so), ``basic_on_reenroll`` (Basic required besides the client certificate, RFC 7030 §3.2.3, as
libest without ``-o``), ``tls_domain`` (the TLS server certificate comes from another lab domain than the issuing
CA: a TLS front with its own PKI), and ``<label>/<profile>`` paths that pick the issued profile (Trustpoint).
``pending_rounds`` answers each new CSR with 202 + Retry-After that many times first (-1: forever).
``fault`` (settable on the handle) makes it misbehave in one named way, for the client's bad-input tests.

Invariants: binds 127.0.0.1 only; private keys never leave memory except the TLS key, which is written to a
0600 file in a 0700 temp directory only while OpenSSL loads it.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import hashlib
import http.server
import logging
import os
import shutil
import socket
import ssl
import struct
import sys
import tempfile
import threading
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from agent.lab.ca import PROFILES, LabCA, LabCAError

log = logging.getLogger("agent.lab.est_server")

EST_PREFIX = "/.well-known/est"
OPERATIONS = ("cacerts", "simpleenroll", "simplereenroll", "serverkeygen", "csrattrs")
FAULTS = ("bad-base64", "empty-pkcs7", "wrong-key", "foreign-chain", "no-key-part", "html", "html-500", "reset",
          "redirect-other", "redirect-same", "der", "pem", "no-cte", "no-retry-after", "silent", "csrattrs-nul",
          "csrattrs-garbage", "csrattrs-500", "cacerts-500")
MAX_BODY_BYTES = 256 * 1024
# /csrattrs default: ecdsa-with-SHA256, Attribute{ecPublicKey, {secp256r1}} (RFC 7030 §4.5.2 / RFC 9908 style).
DEFAULT_CSRATTRS_DER = bytes.fromhex("3021" "06082a8648ce3d040302" "3015" "06072a8648ce3d0201" "310a"
                                     "06082a8648ce3d030107")


def _b64(der: bytes) -> bytes:
    b = base64.b64encode(der)
    # LF line ends, like `base64` and OpenSSL: GNU `base64 -d` (RFC 7030's own examples) rejects CR.
    return b"".join(b[i:i + 64] + b"\n" for i in range(0, len(b), 64))


def _certs_only(certs) -> bytes:
    return pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER)


EMPTY_CERTS_ONLY_DER = bytes.fromhex(  # SignedData v1, no digestAlgorithms, no certificates, no signerInfos
    "3023" "06092a864886f70d010702" "a016" "3014" "020101" "3100" "300b06092a864886f70d010701" "3100")


@dataclasses.dataclass
class EstServerConfig:
    """Settings of the lab EST server: domain, users, pending rounds, csrattrs."""

    domain: str
    users: dict = dataclasses.field(default_factory=dict)  # username -> password (str or bytes)
    one_time: set = dataclasses.field(default_factory=set)  # usernames whose password works once
    pending_rounds: int = 0
    retry_after_s: int = 1
    csrattrs_der: bytes | None = DEFAULT_CSRATTRS_DER
    fault: str | None = None
    lifetime_s: int | None = None
    client_cas: tuple = ()
    realm: str = "devagent lab EST"
    bad_credentials_status: int = 401  # Trustpoint answers a wrong password with 403
    basic_on_reenroll: bool = False  # require HTTP Basic besides the client certificate (libest without -o)
    tls_domain: str | None = None  # lab domain that issued the TLS server certificate (None: ``domain``)
    require_pop: bool = False  # the CSR's challengePassword must be this session's tls-unique (RFC 7030 §3.5)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, lab: LabCA, cfg: EstServerConfig, ctx: ssl.SSLContext):
        self.lab, self.cfg, self.ctx = lab, cfg, ctx
        self.pending: dict[bytes, int] = {}
        self.used_one_time: set = set()
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path) seen, for tests
        super().__init__(addr, handler)

    def handle_error(self, request, client_address):
        # Failed handshakes (untrusted server cert on the client side, resets) are expected in tests.
        log.debug("request from %s failed", client_address, exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "devagent-lab-est/1"
    server: _Server

    def setup(self):
        self.request.settimeout(10)
        if self.server.ctx is None:  # plain HTTP behind a TLS front
            super().setup()
            return
        try:
            self.request = self.server.ctx.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.debug("TLS handshake failed: %s", e)
            self.request.close()
            raise
        super().setup()

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, ssl.SSLError, TimeoutError, OSError) as e:
            log.debug("connection closed: %s", e)

    def finish(self):
        try:
            super().finish()
        except (OSError, ValueError):
            pass

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.client_address[0], *args)

    # ---- plumbing ----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", ctype: str | None = None, headers: dict | None = None):
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, text: str, headers: dict | None = None):
        self._send(status, (text + "\n").encode(), "text/plain; charset=utf-8", headers)

    def _certs_response(self, certs):
        fault = self.server.cfg.fault
        der = EMPTY_CERTS_ONLY_DER if fault == "empty-pkcs7" else _certs_only(certs)
        if fault == "bad-base64":
            self._send(200, _b64(der)[:40] + b"!!not*base64!!\r\n", "application/pkcs7-mime; smime-type=certs-only",
                       {"Content-Transfer-Encoding": "base64"})
        elif fault == "der":
            self._send(200, der, "application/pkcs7-mime; smime-type=certs-only")
        elif fault == "pem":
            pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
            self._send(200, pem, "application/x-pem-file")
        elif fault == "no-cte":
            self._send(200, _b64(der), "application/pkcs7-mime; smime-type=certs-only")
        else:
            self._send(200, _b64(der), "application/pkcs7-mime; smime-type=certs-only",
                       {"Content-Transfer-Encoding": "base64"})

    def _route(self):
        """(operation, profile) from the path, or None after answering 404."""
        path = urllib.parse.urlsplit(self.path).path
        if not path.startswith(EST_PREFIX + "/"):
            self._text(404, f"not an EST path: {path}")
            return None
        segs = [s for s in path[len(EST_PREFIX):].split("/") if s]
        if not segs or segs[-1] not in OPERATIONS or len(segs) > 3:
            self._text(404, f"unknown EST operation in {path}")
            return None
        op, label = segs[-1], segs[:-1]
        profile = "ldevid"
        if label:
            if label[0] != self.server.cfg.domain:
                self._text(404, f"unknown EST label {label[0]!r}")
                return None
            if len(label) == 2:
                if label[1] not in PROFILES:
                    self._text(404, f"unknown certificate profile {label[1]!r}")
                    return None
                profile = label[1]
        return op, profile

    def _client_cert(self) -> x509.Certificate | None:
        if not isinstance(self.request, ssl.SSLSocket):  # plain HTTP: no client certificate reaches us
            return None
        der = self.request.getpeercert(binary_form=True)
        if not der:
            return None
        cert = x509.load_der_x509_certificate(der)
        if self.server.lab.is_revoked(cert.serial_number):
            return None
        return cert

    def _basic_ok(self) -> tuple[bool, str | None]:
        h = self.headers.get("Authorization")
        if not h or not h.lower().startswith("basic "):
            return False, None
        try:
            user, _, pw = base64.b64decode(h[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        want = self.server.cfg.users.get(user)
        if want is None:
            return False, user
        want_b = want.encode() if isinstance(want, str) else want
        import hmac
        ok = hmac.compare_digest(pw.encode(), want_b)
        if ok and user in self.server.cfg.one_time:
            with self.server.lock:
                if user in self.server.used_one_time:
                    return False, user
                self.server.used_one_time.add(user)
        return ok, user

    def _pop_linked(self, csr) -> bool:
        """RFC 7030 §3.5: challengePassword == base64(tls-unique) of this connection (TLS 1.2)."""
        if not isinstance(self.request, ssl.SSLSocket):
            return False
        tls_unique = self.request.get_channel_binding("tls-unique")
        try:
            got = csr.attributes.get_attribute_for_oid(x509.oid.AttributeOID.CHALLENGE_PASSWORD).value
        except x509.AttributeNotFound:
            return False
        return bool(tls_unique) and got == base64.b64encode(tls_unique)

    def _unauthorized(self, why: str):
        self._text(401, why, {"WWW-Authenticate": f'Basic realm="{self.server.cfg.realm}", charset="UTF-8"'})

    def _read_body(self) -> bytes | None:
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if n < 0 or n > MAX_BODY_BYTES:
            self._text(413, "request body missing length or too large")
            return None
        return self.rfile.read(n)

    def _fault_prelude(self) -> bool:
        """Faults that replace the whole answer. True when the request was answered."""
        fault = self.server.cfg.fault
        if fault == "silent":
            # TLS is up and the request was read; no answer ever comes (the client's read timeout must fire).
            # Wait until the client gives up and closes, bounded by the socket timeout.
            try:
                self.rfile.read(1)
            except OSError:
                pass
            self.close_connection = True
        elif fault == "html":
            self._send(200, b"<!DOCTYPE html><html><head><title>Welcome to nginx!</title></head>"
                            b"<body><h1>Welcome to nginx!</h1></body></html>", "text/html")
        elif fault == "html-500":
            self._send(500, b"<html><head><title>500 Internal Server Error</title></head><body>"
                            b"<h1>Internal Server Error</h1><p>The CA backend is unavailable.</p></body></html>",
                       "text/html")
        elif fault == "reset":
            self.send_response(200)
            self.send_header("Content-Type", "application/pkcs7-mime; smime-type=certs-only")
            self.send_header("Content-Length", "4000")
            self.end_headers()
            self.wfile.write(b"MIIHfQYJKoZIhvcNAQcCoIIHbjCCB2oCAQExADALBgkqhkiG9w0BBwGgggdQ")
            self.wfile.flush()
            raw = self.request
            try:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock = socket.socket(fileno=os.dup(raw.fileno()))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                raw.close()
            except OSError:
                pass
            self.close_connection = True
        elif fault in ("redirect-other", "redirect-same") and "redirected=1" not in self.path:
            port = self.server.server_address[1]
            if fault == "redirect-other":
                loc = f"https://localhost:{port}{self.path}?redirected=1"  # other host name = other origin
            else:
                loc = f"{self.path}?redirected=1"
            self._send(307, b"", None, {"Location": loc})
        else:
            return False
        return True

    # ---- methods -----------------------------------------------------------------------------
    def do_GET(self):
        with self.server.lock:
            self.server.requests.append(("GET", self.path))
        route = self._route()
        if route is None:
            return
        op, _ = route
        if self._fault_prelude():
            return
        dom = self.server.lab.domain(self.server.cfg.domain)
        if op == "cacerts" and self.server.cfg.fault == "cacerts-500":
            self._text(500, "cacerts backend failure")
        elif op == "cacerts":
            certs = [dom.ca_cert, dom.root_cert]
            for extra in (dom.old_root_cert, dom.new_with_old, dom.old_with_new):
                if extra is not None:
                    certs.append(extra)
            if self.server.cfg.fault in ("empty-pkcs7", "wrong-key", "foreign-chain", "no-key-part"):
                saved, self.server.cfg.fault = self.server.cfg.fault, None
                try:
                    self._certs_response(certs)
                finally:
                    self.server.cfg.fault = saved
                return
            self._certs_response(certs)
        elif op == "csrattrs":
            der, fault = self.server.cfg.csrattrs_der, self.server.cfg.fault
            if fault == "csrattrs-500":
                self._text(500, "csrattrs backend failure")
            elif fault == "csrattrs-garbage":
                self._send(200, b"this is not base64 DER!\n", "application/csrattrs")
            elif der is None:
                self._send(204)
            else:
                tail = b"\x00" if fault == "csrattrs-nul" else b""  # libest's C-string terminator
                self._send(200, base64.b64encode(der) + tail if tail else _b64(der), "application/csrattrs",
                           {"Content-Transfer-Encoding": "base64"})
        else:
            self._text(405, f"{op} needs POST", {"Allow": "POST"})

    def do_POST(self):
        with self.server.lock:
            self.server.requests.append(("POST", self.path))
        route = self._route()
        if route is None:
            return
        op, profile = route
        body = self._read_body()
        if body is None:
            return
        if op in ("cacerts", "csrattrs"):
            self._text(405, f"{op} needs GET", {"Allow": "GET"})
            return
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/pkcs10":
            self._text(415, f"Content-Type must be application/pkcs10, got {ctype or 'none'}")
            return
        try:
            text = body.strip()
            der = body if body[:1] == b"\x30" else base64.b64decode(b"".join(text.split()), validate=True)
            csr = x509.load_der_x509_csr(der)
        except ValueError as e:
            self._text(400, f"malformed PKCS#10 request: {e}")
            return
        if not csr.is_signature_valid:
            self._text(400, "CSR signature does not verify (proof of possession failed)")
            return
        if self.server.cfg.require_pop and not self._pop_linked(csr):
            self._unauthorized("Proof of Possession Mismatch: the CSR's challengePassword is not this TLS session's "
                               "tls-unique value (RFC 7030 section 3.5)")
            return
        # Authentication (RFC 7030 §3.2.3, §3.3.2)
        client = self._client_cert()
        basic_ok, user = self._basic_ok()
        cfg = self.server.cfg
        if user is not None and not basic_ok:
            # Wrong credentials are refused even when a client certificate would do (as Trustpoint and libest).
            if cfg.bad_credentials_status == 403:
                self._text(403, f"Forbidden: invalid credentials for user {user!r}")
            else:
                self._unauthorized(f"authentication failed for user {user!r}")
            return
        if op == "simplereenroll":
            if client is None:
                self._unauthorized("simplereenroll requires the current certificate as TLS client certificate")
                return
            if cfg.basic_on_reenroll and not basic_ok:
                self._unauthorized("simplereenroll requires HTTP Basic besides the client certificate")
                return
            if csr.subject != client.subject or _sans(csr) != _sans(client):
                self._text(400, "CSR subject/subjectAltName differ from the certificate being renewed "
                                "(RFC 7030 section 4.2.2)")
                return
        elif not (basic_ok or client is not None):
            self._unauthorized("authentication required: HTTP Basic or a TLS client certificate")
            return
        # 202 Retry-After mode (RFC 7030 §4.2.3)
        key = hashlib.sha256(der).digest()
        with self.server.lock:
            seen = self.server.pending.get(key, 0)
            if cfg.pending_rounds < 0 or seen < cfg.pending_rounds:
                self.server.pending[key] = seen + 1
                pending = True
            else:
                pending = False
        if pending:
            hdr = {} if cfg.fault == "no-retry-after" else {"Retry-After": str(cfg.retry_after_s)}
            self._text(202, "request accepted, pending approval", hdr)
            return
        if self._fault_prelude():
            return
        try:
            if op == "serverkeygen":
                self._serverkeygen(csr, profile)
            else:
                self._issue(csr, profile)
        except LabCAError as e:
            self._text(400, str(e))

    def _issue(self, csr, profile):
        lab, cfg = self.server.lab, self.server.cfg
        pub = csr.public_key()
        if cfg.fault == "wrong-key":
            pub = ec.generate_private_key(ec.SECP256R1()).public_key()
        if cfg.fault == "foreign-chain":
            cert, chain = _foreign_issue(pub, csr.subject)
            self._certs_response([cert] + chain)
            return
        cert = lab.issue(cfg.domain, pub, csr.subject, tuple(_sans_obj(csr)), profile, cfg.lifetime_s)
        if cfg.fault == "cacerts-500":  # the chain comes with the certificate, as some servers send it
            dom = lab.domain(cfg.domain)
            self._certs_response([cert, dom.ca_cert, dom.root_cert])
            return
        self._certs_response([cert])

    def _serverkeygen(self, csr, profile):
        lab, cfg = self.server.lab, self.server.cfg
        key = _key_like(csr.public_key())
        cert = lab.issue(cfg.domain, key.public_key(), csr.subject, tuple(_sans_obj(csr)), profile, cfg.lifetime_s)
        boundary = "estServerKeyGenBoundary"
        crlf = b"\r\n"
        key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        # RFC 2046 §5.1.1: the CRLF before each "--boundary" belongs to the delimiter, so every part's content
        # ends in an extra CRLF (libest's estclient rejects parts without it).
        key_part = (b"--" + boundary.encode() + crlf + b"Content-Type: application/pkcs8" + crlf
                    + b"Content-Transfer-Encoding: base64" + crlf + crlf + _b64(key_der) + crlf)
        cert_part = (b"--" + boundary.encode() + crlf
                     + b"Content-Type: application/pkcs7-mime; smime-type=certs-only" + crlf
                     + b"Content-Transfer-Encoding: base64" + crlf + crlf + _b64(_certs_only([cert])) + crlf)
        body = (b"" if cfg.fault == "no-key-part" else key_part) + cert_part + b"--" + boundary.encode() + b"--" + crlf
        self._send(200, body, f"multipart/mixed; boundary={boundary}")


def _sans_obj(obj):
    try:
        return list(obj.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _sans(obj):
    return sorted(str(g) for g in _sans_obj(obj))


def _key_like(pub):
    if isinstance(pub, rsa.RSAPublicKey):
        return rsa.generate_private_key(65537, pub.key_size)
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return ec.generate_private_key(type(pub.curve)())
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _foreign_issue(pub, subject):
    """A certificate for ``pub`` from a throwaway CA that is not the domain's (bad-input tests)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "foreign CA (not the lab)")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(name).public_key(pub)
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    return cert, [ca]


def _server_context(lab: LabCA, domain: str, tls_names, client_cas, tls_domain: str | None = None
                    ) -> tuple[ssl.SSLContext, x509.Certificate]:
    dom = lab.domain(domain)
    tls_dom = lab.domain(tls_domain or domain)
    key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for n in tls_names:
        try:
            import ipaddress
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devagent lab (TEST ONLY)"),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"EST server ({domain})")])
    cert = lab.issue(tls_domain or domain, key.public_key(), subject, tuple(sans), "tls-server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    pem = serialization.Encoding.PEM
    d = tempfile.mkdtemp(prefix="lab-est-")  # 0700
    try:
        fd, cpath = tempfile.mkstemp(dir=d)
        with os.fdopen(fd, "wb") as f:
            f.write(cert.public_bytes(pem) + tls_dom.ca_cert.public_bytes(pem))
        fd, kpath = tempfile.mkstemp(dir=d)  # 0600
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        ctx.load_cert_chain(cpath, kpath)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    trusted = [dom.root_cert, dom.ca_cert] + ([dom.old_root_cert] if dom.old_root_cert else []) + list(client_cas)
    ctx.load_verify_locations(cadata="".join(c.public_bytes(pem).decode() for c in trusted))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx, cert


class EstServerHandle:
    """A running lab EST server. ``fault``/``pending_rounds`` may be changed while it runs."""

    def __init__(self, server: _Server, thread: threading.Thread, tls_cert: x509.Certificate):
        self._server, self._thread, self.tls_certificate = server, thread, tls_cert
        self.port = server.server_address[1]
        self.host = "127.0.0.1"
        self.url = f"{'https' if server.ctx is not None else 'http'}://127.0.0.1:{self.port}"

    @property
    def config(self) -> EstServerConfig:
        return self._server.cfg

    @property
    def requests(self) -> list:
        return list(self._server.requests)

    def set_fault(self, fault: str | None) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r} (known: {', '.join(FAULTS)})")
        self._server.cfg.fault = fault

    def reset_state(self) -> None:
        with self._server.lock:
            self._server.pending.clear()
            self._server.used_one_time.clear()
            self._server.requests.clear()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_est_server(lab: LabCA, domain: str, *, port: int = 0, users: dict | None = None, one_time=(),
                     pending_rounds: int = 0, retry_after_s: int = 1, csrattrs_der: bytes | None = DEFAULT_CSRATTRS_DER,
                     tls_names=("127.0.0.1", "localhost"), client_cas=(), lifetime_s: int | None = None,
                     fault: str | None = None, bad_credentials_status: int = 401, basic_on_reenroll: bool = False,
                     tls_domain: str | None = None, require_pop: bool = False,
                     plain_http: bool = False) -> EstServerHandle:
    """Start the lab EST server on 127.0.0.1:``port`` (0 = ephemeral) in a daemon thread.

    Args:
        lab: the lab CA; ``domain`` must exist in it.
        users: Basic credentials ``{username: password}``; ``one_time`` names users whose password works once.
        pending_rounds: answer each new CSR with 202 + ``Retry-After: retry_after_s`` this often (-1: always).
        csrattrs_der: DER CsrAttrs for /csrattrs (None: 204 No Content).
        tls_names: IP addresses / DNS names in the server certificate's SAN.
        client_cas: extra CA certificates accepted for TLS client authentication (IDevID issuers).
        fault: one of ``FAULTS`` for negative tests.
        bad_credentials_status: 401 (RFC 7030 / libest) or 403 (Trustpoint) for a wrong username or password.
        basic_on_reenroll: /simplereenroll needs HTTP Basic besides the client certificate.
        tls_domain: the lab domain whose CA issues the TLS server certificate (a TLS front with its own PKI);
            issuance and /cacerts stay with ``domain``.
        require_pop: every CSR must carry this TLS session's tls-unique as challengePassword (RFC 7030 §3.5, as
            libest ``estserver -t``); TLS is then limited to 1.2 (TLS 1.3 has no tls-unique).
        plain_http: HTTP without TLS, the backend of a TLS front (``tests/peers/tls_front.py``): no client
            certificate reaches the server (only Basic authenticates), and ``require_pop`` cannot be met.

    Returns:
        A handle with ``url``, ``port``, ``tls_certificate``, ``set_fault()``, ``stop()``.
    """
    lab.domain(domain)  # fail early on an unknown domain
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}")
    if bad_credentials_status not in (401, 403):
        raise ValueError("bad_credentials_status must be 401 or 403")
    ctx, cert = _server_context(lab, domain, tls_names, client_cas, tls_domain)
    cfg = EstServerConfig(domain, dict(users or {}), set(one_time), pending_rounds, retry_after_s, csrattrs_der,
                          fault, lifetime_s, tuple(client_cas), bad_credentials_status=bad_credentials_status,
                          basic_on_reenroll=basic_on_reenroll, tls_domain=tls_domain, require_pop=require_pop)
    if require_pop:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server = _Server(("127.0.0.1", port), _Handler, lab, cfg, None if plain_http else ctx)
    t = threading.Thread(target=server.serve_forever, name=f"lab-est-{domain}", daemon=True)
    t.start()
    return EstServerHandle(server, t, cert)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.lab.est_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--lab", required=True, help="lab CA directory (created if missing)")
    p.add_argument("--domain", default="plant")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD", help="Basic credentials")
    p.add_argument("--pending", type=int, default=0, help="answer each new CSR with 202 this many times")
    p.add_argument("--retry-after", type=int, default=1)
    p.add_argument("--forbidden-on-bad-credentials", action="store_true",
                   help="answer a wrong password with 403 (as Trustpoint) instead of 401")
    p.add_argument("--basic-on-reenroll", action="store_true",
                   help="require HTTP Basic besides the client certificate on /simplereenroll (as libest without -o)")
    p.add_argument("--tls-domain", default=None,
                   help="lab domain whose CA issues the TLS server certificate (a TLS CA other than the issuing CA)")
    a = p.parse_args(argv)
    lab = LabCA.create(a.lab, domains=tuple(dict.fromkeys(d for d in (a.domain, a.tls_domain) if d)))
    users = dict(u.split(":", 1) for u in a.user)
    h = start_est_server(lab, a.domain, port=a.port, users=users, pending_rounds=a.pending,
                         retry_after_s=a.retry_after, bad_credentials_status=403 if a.forbidden_on_bad_credentials
                         else 401, basic_on_reenroll=a.basic_on_reenroll, tls_domain=a.tls_domain)
    root = lab.domain(a.domain).root_cert
    fp = hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()
    print(f"lab EST server (TEST ONLY) for domain {a.domain!r}: {h.url}/.well-known/est/{a.domain}/")
    print(f"trust anchor: {lab.dir / a.domain / 'root.pem'}  sha256:{fp}")
    if a.tls_domain:
        print(f"TLS trust anchor (server certificate): {lab.dir / a.tls_domain / 'root.pem'}")
    print(f"users: {', '.join(users) or '(none: client certificates only)'}; Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        h.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
