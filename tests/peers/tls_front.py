"""A TLS front (a site's reverse proxy / TLS terminator) before a plain TCP server, e.g. OpenSSL's CMP mock
server, which speaks plain HTTP only: ``https://127.0.0.1:<port>/`` with a server certificate from a *site CA*
that is not the PKI domain's CA, relayed byte for byte to ``127.0.0.1:<backend_port>``.

- ``make_site_pki(directory)``: the site CA and a TLS server certificate for 127.0.0.1 (IP SAN, serverAuth),
  as PEM files (``site-ca.pem``, ``tls-server.pem`` with the chain, ``tls-server-key.pem``).
- ``TlsFront(site, backend_port, netns_pid=...)``: listens inside the network namespace of ``netns_pid`` (the
  mock server's, ``MockServer.pid``), so clients reach it from ``MockServer.run``. Use as a context manager.
  ``handshakes`` counts completed TLS handshakes, ``forwarded`` the connections that sent bytes to the backend,
  ``failed`` the handshake errors (a client that refused our certificate). ``client_cas`` (PEM file): require a
  TLS client certificate issued by one of them (``client_subjects`` records the subjects seen); ``max_tls12``
  caps the version (a refused client certificate is then a handshake alert the client reads before it sends
  anything, where TLS 1.3 would race the alert against the request on a closing socket). ``silent_refusal``: the
  front runs the handshake over memory BIOs and, when it refuses the client certificate, closes the TCP connection
  without sending its alert: the race above lost every time (under TLS 1.3 the client has finished its side of the
  handshake by then and sends its request into a closed connection); this mode only refuses (a handshake that
  succeeds is closed as well, counted in ``handshakes``). ``drop_after_handshake=N``: the first N connections
  whose handshake succeeds are closed at once, before their request is read (a transient drop: a server restart,
  a load balancer cutting connections); ``dropped`` counts them. ``drop_handshakes``: the connections whose
  handshake is the n-th to succeed (1-based, n in it) are dropped the same way (a drop after an accepted one).
  ``ciphers`` (an OpenSSL cipher string): the TLS 1.2 cipher suites the front accepts, and TLS 1.2 at most (TLS
  1.3's suites are always shared): one the client does not offer makes the front answer with a handshake_failure
  alert (no shared cipher).

Reading ``handshakes``, ``failed`` or ``dropped`` first waits (up to 5 s) until every connection accepted so far
has an outcome of its handshake: a client that got the front's alert may return before the front's thread has
recorded the failure that sent it (a race a loaded host loses).

Python's ``ssl`` on both ends is OpenSSL: a real TLS stack, no mock. One thread per connection, one
``select`` loop per thread (an SSLSocket is never used from two threads).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
import select
import socket
import ssl
import struct
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM


@dataclasses.dataclass
class SitePki:
    dir: Path
    ca: x509.Certificate
    server: x509.Certificate

    @property
    def ca_file(self) -> str:
        return str(self.dir / "site-ca.pem")

    @property
    def cert_file(self) -> str:
        return str(self.dir / "tls-server.pem")

    @property
    def key_file(self) -> str:
        return str(self.dir / "tls-server-key.pem")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devagent test site"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_site_pki(directory, *, cn: str = "Site TLS CA") -> SitePki:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ku = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
              encipher_only=False, decipher_only=False)
    ca = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **ku), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    srv = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
           .public_key(srv_key.public_key()).serial_number(x509.random_serial_number()).not_valid_before(now)
           .not_valid_after(now + datetime.timedelta(days=30))
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **ku),
                          critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                          critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
           .sign(ca_key, hashes.SHA256()))
    site = SitePki(d, ca, srv)
    Path(site.ca_file).write_bytes(ca.public_bytes(PEM))
    Path(site.cert_file).write_bytes(srv.public_bytes(PEM) + ca.public_bytes(PEM))
    fd = os.open(site.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(srv_key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return site


class TlsFront:
    def __init__(self, site: SitePki, backend_port: int, *, netns_pid: int | None = None, port: int = 0,
                 client_cas: str | None = None, max_tls12: bool = False, silent_refusal: bool = False,
                 drop_after_handshake: int = 0, drop_handshakes=(), ciphers: str | None = None):
        self.site = site
        self.silent_refusal = silent_refusal
        self.drop_after_handshake = drop_after_handshake
        self.drop_handshakes = frozenset(drop_handshakes)
        self._dropped = 0
        self.backend_port = backend_port
        self.netns_pid = netns_pid
        self.port = port
        self._handshakes = 0
        self.forwarded = 0
        self._failed: list[str] = []
        self.client_subjects: list[str] = []
        self._lock = threading.Lock()
        self._decided = threading.Condition(self._lock)
        self._accepted = 0  # connections accepted; each is decided once its handshake failed, succeeded or dropped
        self._outcomes = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ctx.load_cert_chain(site.cert_file, site.key_file)
        if client_cas:
            self._ctx.load_verify_locations(cafile=client_cas)
            self._ctx.verify_mode = ssl.CERT_REQUIRED
        if max_tls12 or ciphers:
            self._ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if ciphers:
            self._ctx.set_ciphers(ciphers)

    def _settled(self):
        with self._decided:
            self._decided.wait_for(lambda: self._outcomes >= self._accepted, timeout=5)

    @property
    def handshakes(self) -> int:
        self._settled()
        return self._handshakes

    @property
    def failed(self) -> list[str]:
        self._settled()
        return self._failed

    @property
    def dropped(self) -> int:
        self._settled()
        return self._dropped

    def _decide(self) -> None:  # under self._lock
        self._outcomes += 1
        self._decided.notify_all()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/pkix/"

    def start(self) -> "TlsFront":
        self._thread = threading.Thread(target=self._serve, name="tls-front", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"TLS front did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _serve(self) -> None:
        try:
            if self.netns_pid is not None:
                from tests.peers.openssl_cmp import _setns

                _setns(self.netns_pid)  # this thread only; sockets it creates live in that namespace
            lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(("127.0.0.1", self.port))
            lsock.listen(16)
            lsock.settimeout(0.1)
            self.port = lsock.getsockname()[1]
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        with lsock:
            while not self._stop.is_set():
                try:
                    conn, _ = lsock.accept()
                except TimeoutError:
                    continue
                except OSError:
                    break
                with self._lock:
                    self._accepted += 1
                try:  # made here, in the namespace: the relay thread need not join it
                    up = socket.create_connection(("127.0.0.1", self.backend_port), timeout=10)
                except OSError as e:
                    with self._lock:
                        self._failed.append(f"backend: {e}")
                        self._decide()
                    conn.close()
                    continue
                threading.Thread(target=self._relay, args=(conn, up), name="tls-front-relay", daemon=True).start()

    def _silent_handshake(self, conn: socket.socket) -> None:
        """The server's handshake over memory BIOs; what OpenSSL writes after a failure (its alert) is not sent."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self._ctx.wrap_bio(incoming, outgoing, server_side=True)
        while True:
            try:
                obj.do_handshake()
                conn.sendall(outgoing.read())
                return
            except ssl.SSLWantReadError:
                conn.sendall(outgoing.read())
                data = conn.recv(65536)
                if not data:
                    raise ConnectionError("client closed during the handshake") from None
                incoming.write(data)

    def _relay(self, conn: socket.socket, up: socket.socket) -> None:
        conn.settimeout(10)
        try:
            if self.silent_refusal:
                self._silent_handshake(conn)
                with self._lock:
                    self._handshakes += 1
                    self._decide()
                conn.close()
                up.close()
                return
            tls = self._ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as e:
            with self._lock:
                self._failed.append(str(e))
                self._decide()
            conn.close()
            up.close()
            return
        with self._lock:
            self._handshakes += 1
            peer = tls.getpeercert()
            if peer:
                self.client_subjects.append(", ".join(f"{k}={v}" for rdn in peer["subject"] for k, v in rdn))
            drop = self._dropped < self.drop_after_handshake or self._handshakes in self.drop_handshakes
            if drop:
                self._dropped += 1
            self._decide()
        if drop:
            tls.close()
            up.close()
            return
        sent = False
        try:
            tls.setblocking(False)
            up.setblocking(False)
            client_open = True
            while not self._stop.is_set():
                r, _, _ = select.select([tls, up] if client_open else [up], [], [], 0.2)
                if tls in r or (client_open and tls.pending()):
                    try:
                        data = tls.recv(65536)
                    except ssl.SSLWantReadError:
                        data = None
                    except (ssl.SSLError, OSError):
                        data = b""
                    if data == b"":
                        client_open = False
                        up.shutdown(socket.SHUT_WR)
                    elif data:
                        up.setblocking(True)
                        up.sendall(data)
                        up.setblocking(False)
                        if not sent:
                            sent = True
                            with self._lock:
                                self.forwarded += 1
                if up in r:
                    data = up.recv(65536)
                    if not data:
                        break
                    tls.setblocking(True)
                    tls.sendall(data)
                    tls.setblocking(False)
        except OSError:
            pass
        finally:
            try:
                tls.close()
            finally:
                up.close()


__all__ = ["SitePki", "make_site_pki", "TlsFront"]


@contextlib.contextmanager
def handshake_dropper(*, reset: bool = False):
    """A TCP server on 127.0.0.1 that reads each connection's first bytes (a TLS ClientHello) and closes it without
    an answer or alert (``reset``: with an RST), as a front cutting connections; yields (port, the accepted
    connections, one per attempt of a client)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    accepted: list = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.recv(65536)
            if reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    threading.Thread(target=serve, name="handshake-dropper", daemon=True).start()
    try:
        yield srv.getsockname()[1], accepted
    finally:
        srv.close()
