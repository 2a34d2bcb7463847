"""The operations commands from the README against the lab CMP server on loopback, through the command line:
``devagent run --once`` deploys every target type and runs hooks with the documented DEVAGENT_* variables,
``devagent status`` shows the next renewal and, after a failed renewal, the last error."""
from __future__ import annotations

import datetime
import json
import os

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from agent.cli import cli
from agent.lab.ca import LabCA
from agent.lab.cmp_server import start_cmp_server
from keystore.certs import fingerprint, same_public_key
from keystore.store import Keystore

NAME = "ldevid-plant"
DOCUMENTED = ("EVENT", "CREDENTIAL", "KIND", "DOMAIN", "VERSION", "SUBJECT", "ISSUER", "SERIAL", "FINGERPRINT",
              "NOT_BEFORE", "NOT_AFTER", "KEY_URI", "KEY_TYPE", "CERT_FILE", "KEY_FILE", "CHAIN_FILE",
              "FULLCHAIN_FILE", "BUNDLE_FILE", "P12_FILE", "OPCUA_CERT_FILE", "OPCUA_KEY_FILE")


@pytest.fixture
def site(tmp_path):
    lab = LabCA.create(tmp_path / "lab", domains=("plant",))
    srv = start_cmp_server(lab, "plant", secrets={b"dev1": b"s3cret"})
    root = tmp_path / "root.pem"
    root.write_bytes(lab.domain("plant").root_cert.public_bytes(serialization.Encoding.PEM))
    d = tmp_path / "deploy"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
profile = "generic-x86_64"
[metrics]
textfile = "{tmp_path}/metrics/devagent.prom"
[daemon]
notify = false
[credential.{NAME}]
hooks = ["sh -c 'env > {tmp_path}/hook-$DEVAGENT_VERSION.env'"]
[[credential.{NAME}.deploy]]
type = "pem"
cert = "{d}/tls/device.crt"
key = "{d}/tls/device.key"
chain = "{d}/tls/ca.crt"
fullchain = "{d}/tls/fullchain.pem"
bundle = "{d}/tls/bundle.pem"
[[credential.{NAME}.deploy]]
type = "p12"
path = "{d}/app/device.p12"
password = "pass:p12pass"
[[credential.{NAME}.deploy]]
type = "opcua"
pki_dir = "{d}/pki"
""")
    env = {k: None for k in os.environ if k.startswith("DEVAGENT_")}
    env["DEVAGENT_STATE_DIR"] = str(tmp_path / "state")
    runner = CliRunner()

    def devagent(*args, code=0):
        r = runner.invoke(cli, ["--config", str(cfg), *args], env=env)
        assert r.exit_code == code, (args, r.output, r.exception)
        return r.output
    devagent("keystore", "init")
    devagent("enroll", "--protocol", "cmp", "--server", srv.url, "--domain", "plant", "--ref", "dev1",
             "--secret", "pass:s3cret", "--trust", str(root), "--subject", "CN=dev1,O=Plant")
    yield tmp_path, srv, devagent
    srv.stop()


def _hook_env(path) -> dict:
    return {k[len("DEVAGENT_"):]: v for k, v in (ln.split("=", 1) for ln in path.read_text().splitlines() if "=" in ln)
            if k.startswith("DEVAGENT_")}


def _due_now(state) -> None:
    ks = Keystore.open(state)
    cred = ks.get(NAME)
    ks.set_meta(NAME, next_renewal=(datetime.datetime.now(datetime.timezone.utc)
                                    - datetime.timedelta(seconds=1)).isoformat(), schedule_for=fingerprint(cred.certificate))


def test_run_deploys_every_target_and_hooks_get_the_documented_variables(site):
    tmp, srv, devagent = site
    devagent("run", "--once")
    env = _hook_env(tmp / "hook-1.env")
    assert set(DOCUMENTED) <= set(env), set(DOCUMENTED) - set(env)
    cred = Keystore.open(tmp / "state").get(NAME)
    c = cred.certificate
    assert env["EVENT"] == "deploy" and env["CREDENTIAL"] == NAME and env["KIND"] == "ldevid"
    assert env["DOMAIN"] == "plant" and env["VERSION"] == "1" and env["KEY_TYPE"] == "p256"
    assert env["SERIAL"] == format(c.serial_number, "x") and env["FINGERPRINT"] == fingerprint(c)
    assert env["SUBJECT"] == c.subject.rfc4514_string() and env["ISSUER"] == c.issuer.rfc4514_string()
    assert datetime.datetime.fromisoformat(env["NOT_AFTER"]) == c.not_valid_after_utc
    assert datetime.datetime.fromisoformat(env["NOT_BEFORE"]) == c.not_valid_before_utc
    assert env["KEY_URI"] == cred.key_uri
    # every file variable names a file that holds what it should
    assert x509.load_pem_x509_certificate(open(env["CERT_FILE"], "rb").read()) == c
    key = serialization.load_pem_private_key(open(env["KEY_FILE"], "rb").read(), None)
    assert same_public_key(key.public_key(), c.public_key())
    assert x509.load_pem_x509_certificates(open(env["FULLCHAIN_FILE"], "rb").read())[0] == c
    assert x509.load_pem_x509_certificates(open(env["CHAIN_FILE"], "rb").read())[0].subject == c.issuer
    assert x509.load_pem_x509_certificates(open(env["BUNDLE_FILE"], "rb").read())[0] == c
    k12, c12, _ = pkcs12.load_key_and_certificates(open(env["P12_FILE"], "rb").read(), b"p12pass")
    assert c12 == c and same_public_key(k12.public_key(), c.public_key())
    assert x509.load_der_x509_certificate(open(env["OPCUA_CERT_FILE"], "rb").read()) == c
    assert env["OPCUA_KEY_FILE"].endswith(f"own/private/{NAME}.pem")

    status = json.loads(devagent("--json", "status"))["credentials"][0]
    assert status["next_renewal"] and status["last_error"] is None
    assert "next renewal " in devagent("status")

    _due_now(tmp / "state")
    devagent("run", "--once")
    env2 = _hook_env(tmp / "hook-2.env")
    assert env2["EVENT"] == "renewed" and env2["VERSION"] == "2" and env2["SERIAL"] != env["SERIAL"]


def test_status_shows_the_last_error_and_the_next_attempt_after_a_failed_renewal(site):
    tmp, srv, devagent = site
    devagent("run", "--once")
    srv.stop()  # the CA is gone
    _due_now(tmp / "state")
    devagent("run", "--once")  # the current certificate is still valid: exit 0
    s = json.loads(devagent("--json", "status"))["credentials"][0]
    assert s["last_error"] and ("onnect" in s["last_error"] or "refused" in s["last_error"]), s["last_error"]
    nxt = datetime.datetime.fromisoformat(s["next_renewal"])
    assert nxt > datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    text = devagent("status")
    assert "last error: " in text and "next renewal " in text
    prom = (tmp / "metrics" / "devagent.prom").read_text()
    assert f'devagent_renewal_consecutive_failures{{credential="{NAME}",kind="ldevid",domain="plant"}} 1' in prom
