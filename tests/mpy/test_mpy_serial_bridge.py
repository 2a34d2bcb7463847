"""End to end: pyserial <-> pty <-> a `micropython` child running the board agent <-> an in-test CA.

The upstream here is a tiny CA made with cryptography (issuing from the CSR); the lab CA / EST / CMP
path goes through the same enroll-strategy hook (``client_strategy``) and is wired by the lead.
"""
import json

import pytest
import serial
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import cli_mpy
from agent.mpy import frame
from tests.mpy.helpers import Board, der, issue, make_ca, micropython_binary

RUNTIMES = ["micropython", "cpython"]


@pytest.fixture
def ca():
    key = ec.generate_private_key(ec.SECP256R1())
    return make_ca(key, "Bridge Test CA"), key


@pytest.fixture(params=RUNTIMES)
def board(request, tmp_path, ca):
    if request.param == "micropython":
        micropython_binary()
    staged = cli_mpy.stage(tmp_path / "stage", {"device_id": "board-7", "cn": "board-7", "clock": "auto",
                                                "coap_secret": "00" * 32}, ca_cert=None, main="none")
    b = Board(request.param, staged)
    yield b
    b.close()


def test_bridge_end_to_end(board, ca):
    ca_cert, ca_key = ca
    link = cli_mpy.BoardLink(board.ser, timeout_s=20)
    info = cli_mpy.run_bridge(link, cli_mpy.local_ca_strategy(ca_cert, ca_key), ca_cert, cn="board-7",
                              serial="SN7", sans=["board-7.plant.example"])
    assert info["gen"] == 1 and info["cn"] == "board-7" and info["hello"]["has_ca"] is False
    root = board.staged / "devagent"
    cert = x509.load_der_x509_certificate((root / "cert.1").read_bytes())
    key = serialization.load_der_private_key((root / "key.1").read_bytes(), None)
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca_cert)
    assert (root / "ca.1").read_bytes() == der(ca_cert)
    assert not [f for f in board.files() if f.startswith("pending")]
    # renewal with a fresh key: generation 2 replaces 1
    info = cli_mpy.run_bridge(link, cli_mpy.local_ca_strategy(ca_cert, ca_key), ca_cert, new_key=True)
    assert info["gen"] == 2 and "cert.1" not in board.files()


def test_bridge_bad_input_on_the_wire(board, ca):
    ca_cert, ca_key = ca
    link = cli_mpy.BoardLink(board.ser, timeout_s=20)
    link.hello()
    link.call("CA", der(ca_cert))
    # garbage and a CRC error: the board answers ERR seq 0 and keeps serving
    good = frame.encode("STATUS", 77)
    link.send_raw(b"\x00\xffgarbage~zzzz" + good[:-4] + b"0000\n")
    r = frame.FrameReader(lambda n: board.ser.read(n), chunk=4096)
    got = []
    for _ in range(30):
        try:
            got.append(r.read())
        except frame.FrameError:
            pass
        except frame.FrameTimeout:
            if got:
                break
    assert got and all(k == "ERR" and s == 0 for k, s, _ in got), got
    assert json.loads(got[0][2])["code"] == "4.00"
    # a certificate for another key, garbage DER, a truncated certificate: refused, nothing stored
    _, der_csr = link.call("CSR", json.dumps({"cn": "x"}).encode())
    csr = x509.load_der_x509_csr(der_csr)
    other = ec.generate_private_key(ec.SECP256R1())
    right = issue(ca_cert, ca_key, csr.public_key())
    for payload, code in ((der(issue(ca_cert, ca_key, other.public_key())), "4.03"), (b"\x30\x03abc", "4.00"),
                          (der(right)[:-20], "4.00")):
        with pytest.raises(cli_mpy.BoardError) as ei:
            link.call("CERT", payload)
        assert ei.value.code == code, ei.value
    assert not [f for f in board.files() if f.startswith(("cert", "key"))]
    # and the host pre-verification refuses an upstream that answers for another key
    with pytest.raises(cli_mpy.BridgeError, match="another key"):
        cli_mpy.run_bridge(link, lambda c: [issue(ca_cert, ca_key, other.public_key())], ca_cert)
    # finally the right certificate is accepted
    _, answer = link.call("CERT", der(right))
    assert json.loads(answer)["gen"] == 1


def test_bridge_cli_local_upstream(board, ca, tmp_path):
    ca_cert, ca_key = ca
    (tmp_path / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(ca_key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    board.ser.close()  # the CLI opens the port itself
    res = CliRunner().invoke(cli_mpy.mpy, ["bridge", "--port", board.tty, "--upstream", "local",
                                           "--ca-cert", str(tmp_path / "ca.pem"), "--ca-key", str(tmp_path / "ca.key"),
                                           "--cn", "board-7", "--timeout", "20"])
    assert res.exit_code == 0, res.output
    assert "generation 1" in res.output
    board.ser = serial.Serial(board.tty, 115200, timeout=0.2)


def test_bridge_cli_errors(tmp_path):
    res = CliRunner().invoke(cli_mpy.mpy, ["bridge", "--port", str(tmp_path / "nope"), "--upstream", "local"])
    assert res.exit_code != 0 and "--ca-cert" in res.output
    res = CliRunner().invoke(cli_mpy.mpy, ["bridge", "--port", str(tmp_path / "nope"), "--upstream", "est"])
    assert res.exit_code != 0 and "--server" in res.output
