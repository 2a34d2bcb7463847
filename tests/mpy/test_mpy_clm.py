"""One CLM for both agents: `devagent clm` drives a real `micropython` unix-port process running the board's CoAP
service (HMAC-protected, agent/mpy) on 127.0.0.1 with the lab CA upstream, and the same Clm code drives a
`devagent serve` device (OSCORE). The result is verified on the board (its /verify), with cryptography and
with `openssl verify`; refusals come back with the same diagnostic shape from both devices."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import cli_mpy
from agent.cli import App
from agent.clm import Clm, ClmError, HmacDevice, LabUpstream, open_inventory
from coap_services.client import CoapClient
from coap_services.errors import DeviceError
from tests.mpy.helpers import micropython_binary
from tests.peers.coap import DOMAIN, DeviceThread, device_env

BOARD = "board-1"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pem(certs) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class Board:
    """A board commissioned with `devagent mpy deploy --dry-run` (config, trust anchor, secret file) whose
    staged tree runs the CoAP service under the MicroPython unix port."""

    def __init__(self, tmp_path, lab):
        self.root_pem = tmp_path / "plant-root.pem"
        self.root_pem.write_bytes(_pem([lab.domain(DOMAIN).root_cert]))
        self.secret_file = tmp_path / f"{BOARD}.secret"
        self.stage = tmp_path / "stage"
        res = CliRunner().invoke(cli_mpy.mpy, [
            "deploy", "--port", "/dev/null", "--device-id", BOARD, "--ca-cert", str(self.root_pem), "--clock", "set",
            "--main", "coap", "--secret-file", str(self.secret_file), "--stage-dir", str(self.stage), "--dry-run"])
        assert res.exit_code == 0, res.output
        assert oct(self.secret_file.stat().st_mode & 0o777) == "0o600"
        self.port = _free_udp_port()
        self.uri = f"coap://127.0.0.1:{self.port}"
        self.dir = self.stage / "devagent"
        code = ("import sys; sys.path.insert(0, %r); from mpy import run; run.coap_main(%r, '127.0.0.1', %d)"
                % (str(self.stage / "lib"), str(self.dir), self.port))
        self.log = tmp_path / "board.log"
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen([micropython_binary(), "-X", "heapsize=256K", "-c", code],
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def files(self, with_counter=False) -> list[str]:
        return sorted(f for f in os.listdir(self.dir) if with_counter or not f.startswith("ctr."))

    def alive(self) -> str:
        if self.proc.poll() is not None:
            return f"the micropython board exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
        return ""

    def close(self):
        self.proc.kill()
        self.proc.wait(5)
        self._log.close()


@pytest.fixture
def board(tmp_path, lab):
    b = Board(tmp_path, lab)
    yield b
    b.close()


def _clm_cli(clm_dir, *args):
    from agent.cli_clm import clm

    obj = App(state_dir_option=clm_dir.parent / "edge-state", json=False)
    return CliRunner().invoke(clm, ["--clm-dir", str(clm_dir), *args], obj=obj)


def _run_clm(inv, lab, fn, **kw):
    async def main():
        async with CoapClient(timeout_s=10) as c:
            return await fn(Clm(inv, LabUpstream(lab), c, retries=1, retry_delay_s=0.01, **kw))

    return asyncio.run(main())


def test_clm_cli_enrolls_a_micropython_board(tmp_path, lab, board):
    clm_dir = tmp_path / "clm"
    res = _clm_cli(clm_dir, "add-device", BOARD, "--uri", board.uri, "--hmac-secret", f"file:{board.secret_file}",
                   "--domain", DOMAIN, "--subject", f"CN={BOARD},serialNumber=SN-1", "--san", "dns:board-1.plant",
                   "--san", "ip:10.0.0.7")
    assert res.exit_code == 0, res.output
    assert "hmac" in res.output
    assert oct((clm_dir / "contexts" / BOARD / "hmac.json").stat().st_mode & 0o777) == "0o600"
    res = _clm_cli(clm_dir, "enroll", BOARD, "--upstream", f"lab:{lab.dir}", "--timeout", "10", "--retries", "1")
    assert res.exit_code == 0, res.output + board.alive()
    for stage in ("1 CoAP CSR request", "2 key + CSR creation", "4 CoAP verify", "5 certificate verification"):
        assert stage in res.output
    # verified and stored on the board (its /verify answered 2.04); check it independently here
    assert board.files() == ["ca.1", "cert.1", "config.json", "key.1"], board.files()
    cert = x509.load_der_x509_certificate((board.dir / "cert.1").read_bytes())
    key = serialization.load_der_private_key((board.dir / "key.1").read_bytes(), None)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == BOARD
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["board-1.plant"]
    dom = lab.domain(DOMAIN)
    cert.verify_directly_issued_by(dom.ca_cert)
    (tmp_path / "leaf.pem").write_bytes(_pem([cert]))
    (tmp_path / "inter.pem").write_bytes(_pem([dom.ca_cert]))
    openssl = shutil.which("openssl") or pytest.fail("openssl is required: apt-get install openssl")
    p = subprocess.run([openssl, "verify", "-CAfile", str(board.root_pem), "-untrusted", str(tmp_path / "inter.pem"),
                        str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert p.returncode == 0 and ": OK" in p.stdout, p.stdout + p.stderr
    rec = open_inventory(None, clm_dir).get(BOARD)
    assert rec["state"] == "operational" and rec["serial"] == format(cert.serial_number, "x")
    # the CLM holds no board key material
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    for dirpath, _, names in os.walk(clm_dir):
        for n in names:
            blob = (os.path.join(dirpath, n))
            data = open(blob, "rb").read()
            assert scalar not in data and scalar.hex().encode() not in data and b"PRIVATE KEY" not in data
    # renewal through the same command: a fresh key, generation 2 replaces 1
    res = _clm_cli(clm_dir, "enroll", BOARD, "--upstream", f"lab:{lab.dir}", "--timeout", "10", "--retries", "1")
    assert res.exit_code == 0, res.output + board.alive()
    assert board.files() == ["ca.1", "cert.2", "config.json", "key.2"], board.files()
    assert serialization.load_der_private_key((board.dir / "key.2").read_bytes(), None).public_key() != key.public_key()


def test_clm_refusals_from_the_board(tmp_path, lab, board):
    inv = open_inventory(None, tmp_path / "clm")
    from coap_services.security import write_hmac_context

    secret = bytes.fromhex(board.secret_file.read_text().strip())
    write_hmac_context(tmp_path / "ctx-good", BOARD, secret)
    write_hmac_context(tmp_path / "ctx-bad", BOARD, bytes(32))
    cases = [  # (inventory fields, expected text in the CLM's error)
        (dict(context=str(tmp_path / "ctx-bad")), "4.01 unauthenticated"),
        (dict(context=str(tmp_path / "ctx-good"), subject="CN=board-1,O=Plant"),
         "4.00 bad-subject: subject attribute O is not supported by this board"),
        (dict(context=str(tmp_path / "ctx-good"), key_type="rsa2048"),
         "4.00 unknown-key-type: key type 'rsa2048' is not supported by this board (p256 only)"),
        (dict(context=str(tmp_path / "ctx-good"), san=["ip:fe80::1"]), "4.00 bad-san"),
        (dict(context=str(tmp_path / "ctx-good"), name="opcua"), "4.00 bad-name"),
    ]
    for i, (fields, want) in enumerate(cases):
        inv.add(f"b{i}", board.uri, security="hmac", domain=DOMAIN, **fields)
        with pytest.raises(ClmError) as ei:
            _run_clm(inv, lab, lambda m, d=f"b{i}": m.enroll(d))
        assert want in str(ei.value), (str(ei.value), board.alive())
        assert inv.get(f"b{i}")["state"] == "not operational"
        assert board.files() == ["ca.1", "config.json"], board.files()  # nothing stored on the board
    # the board itself refuses a certificate for another key (the CLM's pre-verification is bypassed here)
    other = ec.generate_private_key(ec.SECP256R1())

    async def push_other():
        dev = HmacDevice(board.uri, tmp_path / "ctx-good", timeout_s=10)
        from coap_services import codec

        csr, _, _, _ = await dev.csr(codec.CsrRequest(subject=f"CN={BOARD}"))
        wrong = lab.issue(DOMAIN, other.public_key(), csr.subject, (), "ldevid", None)
        with pytest.raises(DeviceError) as ei:
            await dev.verify(wrong.public_bytes(serialization.Encoding.DER), codec.CF_PKIX_CERT)
        return ei.value

    err = asyncio.run(push_other())
    assert (err.code, err.reason) == ("4.03", "key-mismatch"), err
    assert board.files() == ["ca.1", "config.json", "pending.1"], board.files()


def test_one_clm_drives_serve_and_the_board(tmp_path, lab, board):
    """The same Clm code, upstream and inventory fields against both agents: same success path, same
    diagnostic for the same bad request."""
    env = device_env(tmp_path / "serve", lab, "dev1", clm_dir=tmp_path / "clm")
    from coap_services.security import write_hmac_context

    write_hmac_context(tmp_path / "clm" / "contexts" / BOARD, BOARD,
                       bytes.fromhex(board.secret_file.read_text().strip()))
    inv = open_inventory(None, tmp_path / "clm")
    with DeviceThread(env, csr_burst=50, csr_rate_per_min=6000) as dev:
        targets = {"dev1": (dev.uri, "oscore", env.context), BOARD: (board.uri, "hmac", tmp_path / "clm" / "contexts" /
                                                                    BOARD)}
        for name, (uri, sec, ctx) in targets.items():
            inv.add(name, uri, security=sec, context=str(ctx), domain=DOMAIN, subject=f"CN={name}",
                    san=[f"dns:{name}.plant"])
            inv.add(f"{name}-bad", uri, security=sec, context=str(ctx), domain=DOMAIN, key_type="p521")

        async def both(m):
            out = {}
            for name in targets:
                stages = await m.enroll(name)
                try:
                    await m.enroll(f"{name}-bad")
                except ClmError as e:
                    out[name] = (stages, e.__cause__)
            return out

        out = _run_clm(inv, lab, both)
    for name in targets:
        stages, err = out[name]
        assert stages["attempts"] == 1 and stages["keygen_csr_s"] > 0 and stages["cert_verify_s"] > 0, stages
        assert inv.get(name)["state"] == "operational"
        assert isinstance(err, DeviceError) and (err.code, err.reason) == ("4.00", "unknown-key-type"), err
        assert "p521" in err.device_message
    assert env.keystore().get("ldevid").certificate.subject.rfc4514_string() == "CN=dev1"
    assert "cert.1" in board.files()


def test_add_device_hmac_errors_change_nothing(tmp_path):
    clm_dir = tmp_path / "clm"
    (tmp_path / "short.secret").write_text("00" * 8 + "\n")
    (tmp_path / "nothex.secret").write_text("zz" * 32 + "\n")
    (tmp_path / "good.secret").write_text("11" * 32 + "\n")
    uri = "coap://127.0.0.1:5683"
    cases = [
        (["--security", "hmac"], "give the board's commissioning secret"),
        (["--hmac-secret", "11" * 32], "pass:"),  # a bare secret is refused, as everywhere in devagent
        (["--hmac-secret", f"file:{tmp_path / 'nothex.secret'}"], "must be hex"),
        (["--hmac-secret", f"file:{tmp_path / 'short.secret'}"], "at least 16 bytes"),
        (["--security", "oscore", "--hmac-secret", f"file:{tmp_path / 'good.secret'}"], "only with --security hmac"),
        (["--uri", "coaps://127.0.0.1:5684", "--hmac-secret", f"file:{tmp_path / 'good.secret'}"], "coap://"),
    ]
    for extra, want in cases:
        args = ["add-device", BOARD] + (["--uri", uri] if "--uri" not in extra else []) + extra
        res = _clm_cli(clm_dir, *args)
        assert res.exit_code != 0 and want in res.output, (extra, res.output)
        assert open_inventory(None, clm_dir).list() == [], extra
    # auto-detection from an existing hmac.json
    res = _clm_cli(clm_dir, "add-device", BOARD, "--uri", uri, "--hmac-secret", f"file:{tmp_path / 'good.secret'}",
                   "--board-id", "pump-3")
    assert res.exit_code == 0, res.output
    from coap_services.security import load_hmac_context

    assert load_hmac_context(clm_dir / "contexts" / BOARD) == ("pump-3", bytes.fromhex("11" * 32))
    res = _clm_cli(clm_dir, "add-device", BOARD, "--uri", uri, "--replace")
    assert res.exit_code == 0 and "hmac" in res.output, res.output
    (tmp_path / "other.secret").write_text("22" * 32 + "\n")
    res = _clm_cli(clm_dir, "add-device", BOARD, "--uri", uri, "--hmac-secret", f"file:{tmp_path / 'other.secret'}")
    assert res.exit_code == 2 and "already in the inventory" in res.output, res.output
    assert load_hmac_context(clm_dir / "contexts" / BOARD) == ("pump-3", bytes.fromhex("11" * 32))  # unchanged
    res = _clm_cli(clm_dir, "add-device", "board-2", "--uri", uri, "--context", str(clm_dir / "contexts" / BOARD),
                   "--hmac-secret", f"file:{tmp_path / 'other.secret'}")
    assert res.exit_code == 2 and "exists already" in res.output, res.output
    assert load_hmac_context(clm_dir / "contexts" / BOARD) == ("pump-3", bytes.fromhex("11" * 32))
