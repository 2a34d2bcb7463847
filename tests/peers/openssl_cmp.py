"""Reusable helper for OpenSSL 3.0's ``openssl cmp`` as a CMP peer (mock server and reference client).

- ``make_pki(directory)``: a test PKI (root CA, server signing cert, device keys with the certificates the
  mock server will return, an IDevID CA + IDevID, and an unrelated "rogue" CA), as PEM files + objects.
- ``MockServer``: ``openssl cmp -port`` in a private network namespace (it cannot bind to loopback only),
  started with ``unshare -n``. ``server.run(fn)`` runs ``fn`` in a thread that has joined that namespace
  (``setns`` on the thread), so a test drives it with ordinary in-process client code and assertions;
  ``server.run_async(coro_fn)`` does the same for an async function.
- ``socketless(...)``: OpenSSL's socket-less mock server: one request file in, one response file out.
- ``reference_client(...)``: ``openssl cmp`` as the client (captures requests with ``-reqout``).

Every entry point fails (never skips) with an install hint when a tool is missing.
"""
from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import datetime
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

INSTALL_HINT = ("needs OpenSSL >= 3.0 with 'openssl cmp', util-linux 'unshare' and iproute2 'ip', run as root "
                "(or with CAP_SYS_ADMIN): apt-get install -y openssl util-linux iproute2")
CLONE_NEWNET = 0x40000000
REF = "devagent-ref"
SECRET = "devagent-secret"


def require_tools(need_netns: bool = True) -> None:
    """Fail the calling test (never skip) if a real peer cannot run here."""
    import pytest

    missing = [t for t in (["openssl"] + (["unshare", "ip"] if need_netns else [])) if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: {INSTALL_HINT}")
    r = subprocess.run(["openssl", "cmp", "-help"], capture_output=True, text=True)
    if "use_mock_srv" not in (r.stdout + r.stderr):
        pytest.fail(f"this openssl has no 'cmp' command with -use_mock_srv: {INSTALL_HINT}")
    if need_netns:
        r = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"cannot create a network namespace ({r.stderr.strip()}): {INSTALL_HINT}")


# --- PKI --------------------------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devagent test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, public_key, issuer_name, issuer_key, *, ca=False, days=30, not_before=None, eku=None,
          serial=None, ski=True):
    now = not_before or (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5))
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(public_key)
         .serial_number(serial or x509.random_serial_number()).not_valid_before(now)
         .not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if ski:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    h = None if not isinstance(issuer_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)) else hashes.SHA256()
    return b.sign(issuer_key, h)


@dataclasses.dataclass
class Pki:
    dir: Path
    root_key: object
    root: x509.Certificate
    server_key: object
    server: x509.Certificate
    device_key: object  # P-256: the key rsp_cert was made for
    device_cert: x509.Certificate
    device_rsa_key: object
    device_rsa_cert: x509.Certificate
    idevid_ca_key: object
    idevid_ca: x509.Certificate
    idevid_key: object
    idevid: x509.Certificate
    rogue_key: object
    rogue_root: x509.Certificate
    rogue_server_key: object
    rogue_server: x509.Certificate
    other_key: object  # a key no certificate was made for

    def path(self, name: str) -> str:
        return str(self.dir / name)


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _write_cert(path: Path, *certs) -> None:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))


def make_pki(directory) -> Pki:
    """Generate the test PKI under ``directory`` (PEM files named after the Pki fields)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    p256 = lambda: ec.generate_private_key(ec.SECP256R1())  # noqa: E731
    root_key = p256()
    root = _cert(_name("CMP Test Root CA"), root_key.public_key(), _name("CMP Test Root CA"), root_key, ca=True)
    server_key = p256()
    server = _cert(_name("CMP Test RA"), server_key.public_key(), root.subject, root_key,
                   eku=[x509.ObjectIdentifier("1.3.6.1.5.5.7.3.28")])  # id-kp-cmcRA
    device_key = p256()
    device_cert = _cert(_name("device-0001"), device_key.public_key(), root.subject, root_key,
                        eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    device_rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    device_rsa_cert = _cert(_name("device-0001"), device_rsa_key.public_key(), root.subject, root_key,
                            eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    idevid_ca_key = p256()
    idevid_ca = _cert(_name("Manufacturer IDevID CA"), idevid_ca_key.public_key(), _name("Manufacturer IDevID CA"),
                      idevid_ca_key, ca=True, days=3650)
    idevid_key = p256()
    idevid = _cert(_name("device-0001 IDevID"), idevid_key.public_key(), idevid_ca.subject, idevid_ca_key, days=3650)
    rogue_key = p256()
    rogue_root = _cert(_name("CMP Test Root CA"), rogue_key.public_key(), _name("CMP Test Root CA"), rogue_key, ca=True)
    rogue_server_key = p256()
    rogue_server = _cert(_name("CMP Test RA"), rogue_server_key.public_key(), rogue_root.subject, rogue_key)
    other_key = p256()
    pki = Pki(d, root_key, root, server_key, server, device_key, device_cert, device_rsa_key, device_rsa_cert,
              idevid_ca_key, idevid_ca, idevid_key, idevid, rogue_key, rogue_root, rogue_server_key, rogue_server,
              other_key)
    for name in ("root", "server", "device_cert", "device_rsa_cert", "idevid_ca", "idevid", "rogue_root",
                 "rogue_server"):
        _write_cert(d / f"{name}.pem", getattr(pki, name))
    for name in ("root_key", "server_key", "device_key", "device_rsa_key", "idevid_ca_key", "idevid_key",
                 "rogue_key", "rogue_server_key", "other_key"):
        _write_key(d / f"{name}.pem", getattr(pki, name))
    _write_cert(d / "trusted_clients.pem", idevid_ca, root)
    return pki


def server_args(pki: Pki, *, signed: bool = True, rsa: bool = False, poll_count: int = 0, check_after: int = 1,
                send_error: bool = False, grant_implicitconf: bool = False, send_unprotected: bool = False,
                send_unprot_err: bool = False, rogue: bool = False, secret: str = SECRET, extra=()) -> list[str]:
    """Mock-server arguments (shared by the HTTP and the socket-less mode)."""
    args = ["-srv_ref", REF, "-srv_secret", f"pass:{secret}",
            "-rsp_cert", pki.path("device_rsa_cert.pem" if rsa else "device_cert.pem"),
            "-rsp_capubs", pki.path("root.pem"), "-rsp_extracerts", pki.path("root.pem"),
            "-srv_trusted", pki.path("trusted_clients.pem")]
    if signed:
        srv = "rogue_server" if rogue else "server"
        args += ["-srv_cert", pki.path(f"{srv}.pem"), "-srv_key", pki.path(f"{srv}_key.pem")]
    if poll_count:
        args += ["-poll_count", str(poll_count), "-check_after", str(check_after)]
    if send_error:
        args += ["-send_error"]
    if grant_implicitconf:
        args += ["-grant_implicitconf"]
    if send_unprotected:
        args += ["-send_unprotected"]
    if send_unprot_err:
        args += ["-send_unprot_err"]
    return args + list(extra)


# --- network namespace --------------------------------------------------------------------------
_libc = None


def _setns(pid: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into the network namespace of pid {pid}: {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(pid: int, fn, *args, timeout_s: float = 120.0):
    """Run ``fn(*args)`` in a new thread that joined the network namespace of ``pid``; return its result
    or re-raise its exception. Only that thread is moved (network namespaces are per thread)."""
    box = {}

    def target():
        try:
            _setns(pid)
            box["result"] = fn(*args)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name=f"netns-{pid}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"function in netns of pid {pid} did not finish within {timeout_s} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


class MockServer:
    """``openssl cmp -port`` in its own network namespace. Use as a context manager."""

    def __init__(self, pki: Pki, *, port: int = 8080, log_path=None, **kwargs):
        self.pki = pki
        self.port = port
        self.args = server_args(pki, **kwargs)
        self.log_path = Path(log_path or pki.dir / f"mock-srv-{os.getpid()}-{id(self)}.log")
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/pkix/"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> "MockServer":
        require_tools()
        cmd = " ".join(["openssl", "cmp", "-config", "''", "-port", str(self.port)] + [_q(a) for a in self.args])
        self._log = open(self.log_path, "wb")
        # exec: the pid we hold is openssl itself, so stop() ends exactly the server we started.
        self.proc = subprocess.Popen(["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {cmd}"],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"openssl cmp mock server exited: {self.log()}")
            try:
                run_in_netns(self.pid, _probe, self.port)
                return self
            except OSError as e:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"openssl cmp mock server did not listen: {self.log()}") from e
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def run(self, fn, *args, timeout_s: float = 120.0):
        return run_in_netns(self.pid, fn, *args, timeout_s=timeout_s)

    def run_async(self, coro_fn, *args, timeout_s: float = 120.0):
        """``asyncio.run(coro_fn(*args))`` inside the server's namespace."""
        return self.run(lambda: asyncio.run(coro_fn(*args)), timeout_s=timeout_s)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _probe(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        pass


def _q(a: str) -> str:
    return "'" + a.replace("'", "'\\''") + "'"


# --- socket-less mode and reference client ------------------------------------------------------
def socketless(pki: Pki, request: bytes, workdir, *, name: str = "msg", **kwargs) -> bytes:
    """One request through OpenSSL's socket-less mock server (``-use_mock_srv -reqin -rspout``).

    The openssl client side only carries the message (``-cmd genm`` as a carrier; it may then complain
    about a response that was not meant for it); the mock server's response is returned. Stateless: one
    message per call, so use implicitConfirm (``grant_implicitconf=True``) for certificate requests.
    """
    require_tools(need_netns=False)
    wd = Path(workdir)
    req, rsp = wd / f"{name}-req.der", wd / f"{name}-rsp.der"
    req.write_bytes(request)
    if rsp.exists():
        rsp.unlink()
    cmd = ["openssl", "cmp", "-config", "", "-cmd", "genm", "-use_mock_srv", "-ref", "carrier",
           "-secret", "pass:carrier", "-reqin", str(req), "-rspout", str(rsp)] + server_args(pki, **kwargs)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if not rsp.exists():
        raise RuntimeError(f"openssl mock server wrote no response: {r.stderr[-2000:]}")
    return rsp.read_bytes()


def socketless_cmd(pki: Pki, req_path, rsp_path, **kwargs) -> list[str]:
    return (["openssl", "cmp", "-config", "", "-cmd", "genm", "-use_mock_srv", "-ref", "carrier",
             "-secret", "pass:carrier", "-reqin", str(req_path), "-rspout", str(rsp_path)]
            + server_args(pki, **kwargs))


def reference_client(pki: Pki, args, *, workdir, server: MockServer | None = None, mock_kwargs=None):
    """Run ``openssl cmp`` as the client (against ``server`` in its namespace, or the socket-less mock
    server with ``mock_kwargs``). Returns the CompletedProcess."""
    cmd = ["openssl", "cmp", "-config", ""] + list(args)
    if server is not None:
        cmd = ["nsenter", "--net=/proc/%d/ns/net" % server.pid] + cmd + ["-server", f"127.0.0.1:{server.port}",
                                                                         "-path", "pkix/"]
    else:
        cmd += ["-use_mock_srv"] + server_args(pki, **(mock_kwargs or {}))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=str(workdir), timeout=60)
