"""The lab CMP server's deviation modes (agent/lab/cmp_server.py), one per behaviour of a real server that no CI
peer shows (issue #15's table: Trustpoint), driven through the ``devagent`` command line. For each: what happens
without the option (a clear error naming it, nothing stored: file snapshot), and that the option makes the flow
complete and is remembered for renew/revoke/ca-update. Also revocation state and a failed revoke."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.cli import cli
from agent.lab.ca import LabCA
from agent.lab.cmp_server import start_cmp_server
from keystore.store import Keystore
from tests.conftest import snapshot as _snapshot

REF, SECRET = "dev1", "s3cret"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    d = tmp_path_factory.mktemp("labmodes")
    lab = LabCA.create(d / "lab", domains=("plant",))
    (d / "root.pem").write_bytes(lab.domain("plant").root_cert.public_bytes(serialization.Encoding.PEM))
    lab.root_pem = str(d / "root.pem")
    return lab


@pytest.fixture
def run(tmp_path, monkeypatch):
    for k in list(os.environ):
        if k.startswith("DEVAGENT_"):
            monkeypatch.delenv(k)
    state = tmp_path / "state"
    Keystore.init(state)

    def go(*args, code=0):
        r = CliRunner().invoke(cli, ["--state-dir", str(state), *map(str, args)], catch_exceptions=False)
        assert r.exit_code == code, f"exit {r.exit_code} (want {code}): {r.output}"
        return r.output

    go.state = state
    return go


def _enroll(lab, srv, *extra, url=None, code=0, run):
    return run("enroll", "--domain", "plant", "--protocol", "cmp", "--server", url or srv.url, "--ref", REF,
               "--secret", f"pass:{SECRET}", "--trust", lab.root_pem, "--subject", "CN=dev1", *extra, code=code)


def snapshot(root):
    """Stored state; the audit log records the generated-and-discarded key, so it is left out."""
    snap = _snapshot(root)
    snap.pop("audit.log", None)
    return snap


def _show(run, name="ldevid-plant"):
    return json.loads(run("--json", "keystore", "show", name))


def test_hmac_sha1_only_pbm(lab, run):
    with start_cmp_server(lab, "plant", secrets={REF.encode(): SECRET.encode()}, pbm_macs={"sha1"}) as srv:
        run("keystore", "trust", "--domain", "plant", "--add", lab.root_pem)
        before = snapshot(run.state)
        out = _enroll(lab, srv, code=5, run=run)
        assert "PBM MAC sha256 not supported (only sha1)" in out and "badAlg" in out
        assert snapshot(run.state) == before
        _enroll(lab, srv, "--mac-alg", "hmac-sha1", run=run)
        assert _show(run)["subject"] == "CN=dev1"
        # remembered: ca-update over MAC uses HMAC-SHA1 again
        run("ca-update", "--domain", "plant", "--ref", REF, "--secret", f"pass:{SECRET}")


def test_operation_labels_in_path(lab, run):
    with start_cmp_server(lab, "plant", secrets={REF.encode(): SECRET.encode()}, operation_paths=True) as srv:
        run("keystore", "trust", "--domain", "plant", "--add", lab.root_pem)
        before = snapshot(run.state)
        out = _enroll(lab, srv, url=srv.base_url, code=5, run=run)
        assert "HTTP 500" in out and "no suitable responder" in out and "--operation-labels" in out
        assert "retry later" not in out
        assert snapshot(run.state) == before
        _enroll(lab, srv, "--operation-labels", url=srv.base_url, run=run)
        run("request", "app1", "--domain", "plant", "--subject", "CN=dev1 app")
        run("renew", "ldevid-plant")
        run("ca-update", "--domain", "plant")
        run("revoke", "app1", "--reason", "superseded")
        labels = [p.rsplit("/", 1)[-1] for p in srv.core.paths]
        for want in ("initialization", "certification", "keyupdate", "getcacerts", "getrootupdate", "revocation"):
            assert want in labels, labels


def test_profile_in_path(lab, run):
    with start_cmp_server(lab, "plant", secrets={REF.encode(): SECRET.encode()}, profile_in_path=True) as srv:
        # generalInfo only: this server reads the profile from the path, so it issues its default profile
        _enroll(lab, srv, "--operation-labels", "--profile", "tls-server", url=srv.base_url, run=run)
        eku = _eku(run)
        assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH not in eku
        _enroll(lab, srv, "--operation-labels", "--profile", "tls-server", "--profile-in", "path",
                "--name", "web", url=srv.base_url, run=run)
        assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in _eku(run, "web")
        assert any("/tls-server/initialization" in p for p in srv.core.paths)


def _eku(run, name="ldevid-plant"):
    ks = Keystore.open(run.state)
    try:
        return list(ks.get(name).certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


def test_http_500_for_kur_is_not_retry_later(lab, run):
    with start_cmp_server(lab, "plant", secrets={REF.encode(): SECRET.encode()}, http_500_for=("kur", "genm")) as srv:
        _enroll(lab, srv, run=run)
        before = snapshot(run.state)
        out = run("renew", "ldevid-plant", code=5)
        assert "HTTP 500" in out and "may not implement keyupdate request" in out and "retry later" not in out
        after = snapshot(run.state)
        # only the index changed (last_error recorded); certificate and key files are the same
        assert {k: v for k, v in after.items() if k != "keystore.json"} == {
            k: v for k, v in before.items() if k != "keystore.json"}
        assert "HTTP 500" in _show(run)["last_error"]
        out = run("ca-update", "--domain", "plant", code=5)
        assert "may not implement getcacerts request" in out


def test_pkiconf_without_extracerts_stored_with_exit_8(lab, run):
    """A signed pkiConf without extraCerts after our positive certConf: without the signer-reuse switch it cannot
    be verified, but the certificate passed every check and the CA has it: stored, exit 8, clearly said."""
    with start_cmp_server(lab, "plant", secrets={REF.encode(): SECRET.encode()}, pkiconf_extra_certs=False,
                          grant_implicit_confirm=False) as srv:
        _enroll(lab, srv, run=run)  # MAC-protected pkiConf: no certificate needed
        out = run("request", "app1", "--domain", "plant", "--subject", "CN=dev1 app", "--certout",
                  run.state.parent / "app1.pem", code=8)
        assert "NOT authenticated" in out and "without extraCerts" in out
        rec = _show(run, "app1")
        assert rec["subject"] == "CN=dev1 app" and (run.state.parent / "app1.pem").exists()
        assert "--reuse-signer" in out  # the switch that would have authenticated it is named
        # with the switch: the pkiConf is verified with the signer validated earlier in the transaction
        out = run("request", "app2", "--domain", "plant", "--subject", "CN=dev1 app2", "--reuse-signer")
        assert "issued app2" in out and "NOT authenticated" not in out
        meta = Keystore.open(run.state).get("app2").record["meta"]
        assert meta["enroll"]["reuse_signer"] is True and "--reuse-signer" in meta["tolerated"][0]


def test_revocation_state_and_failed_revoke(lab, run):
    with start_cmp_server(lab, "plant", secrets={REF.encode(): SECRET.encode()}, http_500_for=("rr",)) as srv:
        _enroll(lab, srv, run=run)
        run("request", "app1", "--domain", "plant", "--subject", "CN=dev1 app")
        out = run("revoke", "app1", code=5)
        assert "HTTP 500" in out
        rec = _show(run, "app1")
        assert rec["revoked"] is None and "revoke: " in rec["last_error"]
    with start_cmp_server(lab, "plant", secrets={REF.encode(): SECRET.encode()}) as srv2:
        run("revoke", "app1", "--server", srv2.url)
        rec = _show(run, "app1")
        assert rec["revoked"] == "unspecified" and rec["revoked_at"] and rec["last_error"] is None
        assert "REVOKED" in run("status", "app1") and "REVOKED" in run("keystore", "list")
        listed = json.loads(run("--json", "keystore", "list"))["credentials"]
        assert [c["revoked"] for c in listed if c["name"] == "app1"] == ["unspecified"]
        out = run("renew", "app1", "--server", srv2.url, code=3)
        assert "was revoked" in out


def test_ca_update_root_rollover_with_root_ca_cert(tmp_path, run):
    """ca-update sends genm rootCaCert with the domain's current root; the new root is trusted only through
    the verified newWithOld link. The daemon (run --once) does the same on its CA check."""
    lab = LabCA.create(tmp_path / "lab2", domains=("plant",))
    root = tmp_path / "root2.pem"
    root.write_bytes(lab.domain("plant").root_cert.public_bytes(serialization.Encoding.PEM))
    lab.root_pem = str(root)
    with start_cmp_server(lab, "plant", secrets={REF.encode(): SECRET.encode()}) as srv:
        _enroll(lab, srv, run=run)
        old_root = lab.domain("plant").root_cert
        new = lab.rollover("plant")
        out = run("--json", "ca-update", "--domain", "plant")
        added = json.loads(out)["added"]
        from keystore.certs import fingerprint

        assert fingerprint(new.root_cert) in added
        trusted = {fingerprint(a) for a in Keystore.open(run.state).trust_anchors("plant")}
        assert {fingerprint(old_root), fingerprint(new.root_cert)} <= trusted
        assert "genm" in srv.core.requests


def test_daemon_asks_for_root_update(tmp_path, run):
    lab = LabCA.create(tmp_path / "lab3", domains=("plant",))
    root = tmp_path / "root3.pem"
    root.write_bytes(lab.domain("plant").root_cert.public_bytes(serialization.Encoding.PEM))
    lab.root_pem = str(root)
    with start_cmp_server(lab, "plant", secrets={REF.encode(): SECRET.encode()}) as srv:
        _enroll(lab, srv, run=run)
        new = lab.rollover("plant")
        run("run", "--once")
        from keystore.certs import fingerprint

        assert fingerprint(new.root_cert) in {fingerprint(a) for a in Keystore.open(run.state).trust_anchors("plant")}


def test_cert_template_command_without_template(lab, run):
    with start_cmp_server(lab, "plant", secrets={REF.encode(): SECRET.encode()}) as srv:
        _enroll(lab, srv, run=run)
        assert "no certificate request template" in run("cert-template", "--domain", "plant")
        assert json.loads(run("--json", "cert-template", "--domain", "plant")) == {"template": None}
        _enroll(lab, srv, "--cert-template", "--name", "tpl", run=run)  # absent template: request unchanged
        assert srv.core.requests[-3:-1] == ["genm", "ir"] or "genm" in srv.core.requests
