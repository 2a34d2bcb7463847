"""`devagent mpy bridge` with the project's real EST and CMP clients: pyserial <-> pty <-> a `micropython` child
running the board agent <-> bridge <-> the lab EST server (HTTP Basic over TLS) or the lab CMP server (PBM).
The certificate is verified on the board, stored there, and checked again here with cryptography and
`openssl verify`. Upstream refusals and a certificate for another key leave no certificate on the board."""
from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest
import serial
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import cli_mpy
from agent.lab.cmp_server import start_cmp_server
from agent.lab.est_server import start_est_server
from enroll_clients import ClientAuth, EnrollOptions, client_for
from enroll_clients.base import CertRequest
from tests.mpy.helpers import Board, micropython_binary

DOMAIN = "plant"
EST_USER, EST_PASSWORD = "board-7", b"est-pw-7f3a"
CMP_REF, CMP_SECRET = b"board-7-ref", b"cmp-secret-9c1d"


@pytest.fixture(scope="module")
def upstreams(lab):
    est = start_est_server(lab, DOMAIN, users={EST_USER: EST_PASSWORD})
    cmp = start_cmp_server(lab, DOMAIN, secrets={CMP_REF: CMP_SECRET})
    yield {"est": est, "cmp": cmp}
    est.stop()
    cmp.stop()


@pytest.fixture
def board(tmp_path):
    micropython_binary()
    staged = cli_mpy.stage(tmp_path / "stage", {"device_id": "board-7", "cn": "board-7", "clock": "auto"},
                           ca_cert=None, main="none")
    b = Board("micropython", staged)
    yield b
    b.close()


@pytest.fixture
def root_pem(tmp_path, lab):
    p = tmp_path / "plant-root.pem"
    p.write_bytes(lab.domain(DOMAIN).root_cert.public_bytes(serialization.Encoding.PEM))
    return p


def _args(kind, upstreams, secret_ok=True):
    if kind == "est":
        pw = EST_PASSWORD if secret_ok else b"wrong-password"
        return ["--upstream", "est", "--server", upstreams["est"].url, "--username", EST_USER,
                "--password", f"pass:{pw.decode()}"]
    sec = CMP_SECRET if secret_ok else b"wrong-secret"
    return ["--upstream", "cmp", "--server", upstreams["cmp"].url, "--reference", CMP_REF.decode(),
            "--secret", f"pass:{sec.decode()}"]


def _bridge(board, root_pem, *args):
    board.ser.close()  # the command opens the port itself
    try:
        return CliRunner().invoke(cli_mpy.mpy, ["bridge", "--port", board.tty, "--ca-cert", str(root_pem),
                                                "--cn", "board-7", "--san", "dns:board-7.plant", "--timeout", "20",
                                                *args])
    finally:
        board.ser = serial.Serial(board.tty, 115200, timeout=0.2)


def _stored(board):
    return [f for f in board.files() if f.startswith(("cert", "key"))]


@pytest.mark.parametrize("kind", ["est", "cmp"])
def test_bridge_enrolls_through_real_upstream(kind, board, upstreams, root_pem, lab, tmp_path):
    res = _bridge(board, root_pem, *_args(kind, upstreams))
    assert res.exit_code == 0, res.output
    assert "generation 1" in res.output
    root = board.staged / "devagent"
    assert _stored(board) == ["cert.1", "key.1"] and not [f for f in board.files() if f.startswith("pending")]
    cert = x509.load_der_x509_certificate((root / "cert.1").read_bytes())
    key = serialization.load_der_private_key((root / "key.1").read_bytes(), None)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "board-7"
    dom = lab.domain(DOMAIN)
    cert.verify_directly_issued_by(dom.ca_cert)  # issued by the lab's plant issuing CA via EST/CMP
    (tmp_path / "leaf.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "inter.pem").write_bytes(dom.ca_cert.public_bytes(serialization.Encoding.PEM))
    openssl = shutil.which("openssl") or pytest.fail("openssl is required: apt-get install openssl")
    p = subprocess.run([openssl, "verify", "-CAfile", str(root_pem), "-untrusted", str(tmp_path / "inter.pem"),
                        str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert p.returncode == 0 and ": OK" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("kind,words", [("est", ["EST", "401"]), ("cmp", ["CMP", "badMessageCheck"])])
def test_upstream_refusal_stores_nothing(kind, words, board, upstreams, root_pem):
    res = _bridge(board, root_pem, *_args(kind, upstreams, secret_ok=False))
    assert res.exit_code != 0
    assert "upstream enrollment at" in res.output and "nothing was sent to the board" in res.output, res.output
    for w in words:
        assert w in res.output, res.output
    assert _stored(board) == [], board.files()
    # the same board then enrolls with the right credentials: the refusal left it usable
    res = _bridge(board, root_pem, *_args(kind, upstreams))
    assert res.exit_code == 0, res.output


def test_certificate_for_another_key_is_refused_by_the_board(board, upstreams, root_pem, lab):
    root = lab.domain(DOMAIN).root_cert
    est = client_for("est", EnrollOptions(server=upstreams["est"].url, trust_anchors=(root,)))
    auth = ClientAuth(username=EST_USER, password=EST_PASSWORD)
    other = ec.generate_private_key(ec.SECP256R1())

    def enroll_other_key(board_csr):
        csr = (x509.CertificateSigningRequestBuilder().subject_name(board_csr.subject)
               .sign(other, board_csr.signature_hash_algorithm))
        r = asyncio.run(est.enroll(CertRequest(subject=csr.subject, csr=csr), auth))
        return [r.certificate, *[c for c in (r.chain or r.ca_certs) if c.subject != c.issuer]]

    link = cli_mpy.BoardLink(board.ser, timeout_s=20)
    # the host's pre-verification catches it first ...
    with pytest.raises(cli_mpy.BridgeError, match="another key"):
        cli_mpy.run_bridge(link, enroll_other_key, root, cn="board-7")
    # ... and without it the board refuses on its own: 4.03 key-mismatch, nothing stored
    with pytest.raises(cli_mpy.BoardError) as ei:
        cli_mpy.run_bridge(link, enroll_other_key, root, cn="board-7", preverify=False)
    assert (ei.value.code, ei.value.reason) == ("4.03", "key-mismatch"), ei.value
    assert _stored(board) == [], board.files()
