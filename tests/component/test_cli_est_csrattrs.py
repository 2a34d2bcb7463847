"""`devagent enroll --protocol est` applies the server's /csrattrs (RFC 7030 §4.5) to the key and CSR."""
from __future__ import annotations

import hashlib
import json

from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from agent.cli import cli
from agent.lab.est_server import start_est_server
from tests.conftest import snapshot


def _enroll(state, url, fp, *extra):
    return CliRunner().invoke(cli, ["--state-dir", str(state), "--json", "enroll", "--protocol", "est", "--server", url,
                                    "--label", "plant", "--domain", "plant", "--username", "u", "--password", "pass:p",
                                    "--ca-fingerprint", fp, "--subject", "CN=dev", *extra])


def test_csrattrs_key_type_applied_and_conflict_refused(tmp_path, lab):
    fp = "sha256:" + hashlib.sha256(lab.domain("plant").root_cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    with start_est_server(lab, "plant", users={"u": "p"}) as est:  # lab server asks for an EC P-256 key
        state = tmp_path / "a"
        assert CliRunner().invoke(cli, ["--state-dir", str(state), "keystore", "init"]).exit_code == 0
        r = _enroll(state, est.url, fp, "--key-type", "rsa2048")
        assert r.exit_code != 0 and "requires" in r.output and "--key-type" in r.output, r.output
        before = snapshot(state)
        r = _enroll(state, est.url, fp, "--key-type", "rsa2048")
        assert snapshot(state) == before, "a refused enrollment stores nothing"
        r = _enroll(state, est.url, fp)
        assert r.exit_code == 0, r.output
        assert json.loads(r.output[r.output.index("{"):])["key_type"] == "p256"
