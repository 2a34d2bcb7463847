"""The devagent CLI on the keystore: commands, JSON output, exit codes, bad input (issue 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from agent.cli import EXIT_KEYSTORE, EXIT_REJECTED, cli
from keystore.csr import parse_subject
from tests.conftest import snapshot

PEM = serialization.Encoding.PEM


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "state"
    r = CliRunner().invoke(cli, ["--state-dir", str(d), "keystore", "init"])
    assert r.exit_code == 0, r.output
    return d


def run(state, *args):
    return CliRunner().invoke(cli, ["--state-dir", str(state), *args])


@pytest.fixture
def idevid_files(tmp_path, lab):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = lab.issue("other", key.public_key(), parse_subject("CN=pump-7,serialNumber=SN-0007"))
    files = {
        "key": tmp_path / "idevid.key", "cert": tmp_path / "idevid.pem", "chain": tmp_path / "chain.pem",
        "p12": tmp_path / "idevid.p12",
    }
    files["key"].write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    files["cert"].write_bytes(cert.public_bytes(PEM))
    files["chain"].write_bytes(b"".join(c.public_bytes(PEM) for c in lab.domain("other").chain))
    files["p12"].write_bytes(pkcs12.serialize_key_and_certificates(
        b"idevid", key, cert, lab.domain("other").chain, serialization.BestAvailableEncryption(b"factory")))
    return files


def test_import_list_show_export_delete(state, idevid_files, tmp_path):
    r = run(state, "keystore", "import-idevid", "idevid", "--p12", str(idevid_files["p12"]), "--password", "pass:factory")
    assert r.exit_code == 0, r.output
    r = run(state, "--json", "keystore", "list")
    data = json.loads(r.output)
    (c,) = data["credentials"]
    assert c["name"] == "idevid" and c["kind"] == "idevid" and c["subject"] == "CN=pump-7,serialNumber=SN-0007"
    assert set(c) >= {"name", "kind", "domain", "subject", "issuer", "serial", "not_before", "not_after",
                      "fingerprint", "key_uri", "key_type", "days_left", "expired", "version"}
    r = run(state, "--json", "status", "idevid")
    assert json.loads(r.output)["credentials"][0]["name"] == "idevid"
    r = run(state, "keystore", "show", "idevid", "--pem")
    assert r.output.count("BEGIN CERTIFICATE") == 3
    out = tmp_path / "out.p12"
    r = run(state, "keystore", "export", "idevid", "--format", "p12", "--password", "pass:x", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    r = run(state, "keystore", "delete", "idevid")
    assert r.exit_code == EXIT_KEYSTORE and "--force" in r.output
    r = run(state, "keystore", "delete", "idevid", "--force")
    assert r.exit_code == 0


def test_pem_import(state, idevid_files):
    r = run(state, "keystore", "import-idevid", "idevid", "--key", str(idevid_files["key"]), "--cert",
            str(idevid_files["cert"]), "--chain", str(idevid_files["chain"]))
    assert r.exit_code == 0, r.output


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _garbage(p):
    p.write_bytes(os.urandom(300))


@pytest.mark.parametrize("case", ["truncated-cert", "garbage-cert-der", "garbage-key", "truncated-key", "p12-wrong-pw",
                                  "p12-garbage", "mismatch", "unknown-key-type", "cert-is-a-key", "bare-secret"])
def test_bad_input_is_named_and_changes_nothing(state, idevid_files, tmp_path, case, lab):
    f = idevid_files
    args = ["keystore", "import-idevid", "idevid", "--key", str(f["key"]), "--cert", str(f["cert"])]
    expect = {"code": EXIT_KEYSTORE, "text": None}
    if case == "truncated-cert":
        _truncate(f["cert"]); expect["text"] = str(f["cert"])
    elif case == "garbage-cert-der":
        _garbage(f["cert"]); expect["text"] = str(f["cert"])
    elif case == "garbage-key":
        _garbage(f["key"]); expect["text"] = str(f["key"])
    elif case == "truncated-key":
        _truncate(f["key"]); expect["text"] = str(f["key"])
    elif case == "p12-wrong-pw":
        args = ["keystore", "import-idevid", "idevid", "--p12", str(f["p12"]), "--password", "pass:wrong"]
        expect["text"] = "wrong password"
    elif case == "p12-garbage":
        _garbage(f["p12"])
        args = ["keystore", "import-idevid", "idevid", "--p12", str(f["p12"]), "--password", "pass:factory"]
        expect["text"] = str(f["p12"])
    elif case == "mismatch":
        other = ec.generate_private_key(ec.SECP256R1())
        f["key"].write_bytes(other.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        expect = {"code": EXIT_REJECTED, "text": "public key mismatch"}
    elif case == "unknown-key-type":
        k = ec.generate_private_key(ec.SECP521R1())
        f["key"].write_bytes(k.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        cert = lab.issue("other", k.public_key(), parse_subject("CN=x"))
        f["cert"].write_bytes(cert.public_bytes(PEM))
        expect["text"] = "unsupported elliptic curve secp521r1"
    elif case == "cert-is-a-key":
        f["cert"].write_bytes(f["key"].read_bytes())
        expect["text"] = "expected a PEM certificate, found -----BEGIN PRIVATE KEY-----"
    elif case == "bare-secret":
        args = ["keystore", "import-idevid", "idevid", "--p12", str(f["p12"]), "--password", "factory"]
        expect["text"] = "env:VAR, file:PATH, pass:TEXT"
    before = snapshot(state)
    r = run(state, *args)
    assert r.exit_code == expect["code"], r.output
    assert expect["text"] in r.output
    assert "Traceback" not in r.output
    assert snapshot(state) == before


def test_console_script_exit_codes_and_no_traceback(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "devagent")
    r = subprocess.run([exe, "--state-dir", str(tmp_path / "nope"), "status"], capture_output=True, text=True)
    assert r.returncode == EXIT_KEYSTORE
    assert "no keystore at" in r.stderr and "devagent keystore init" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "keystore" in r.stdout


def test_world_readable_key_refused_with_fix(state, idevid_files):
    run(state, "keystore", "import-idevid", "idevid", "--key", str(idevid_files["key"]), "--cert", str(idevid_files["cert"]))
    (keyfile,) = (state / "keys").iterdir()
    keyfile.chmod(0o644)
    r = run(state, "keystore", "check")
    assert r.exit_code == EXIT_KEYSTORE and f"chmod 600 {keyfile}" in r.output
