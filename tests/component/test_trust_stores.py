"""Trust stores by purpose (issue #13): domain PKI vs EST TLS vs CMP signer anchors vs pinned CMP servers, the
CLI that manages them, and that a failed enrollment leaves no anchor behind."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.cli import cli
from agent.lifecycle import server_trust
from keystore.errors import NotFoundError, VerificationError
from keystore.store import Keystore
from tests.certfactory import Spec, chain, key

PEM = serialization.Encoding.PEM


def write(path, *certs):
    path.write_bytes(b"".join(c.public_bytes(PEM) for c in certs))
    return path


@pytest.fixture
def ks(tmp_path):
    return Keystore.init(tmp_path / "state")


def test_stores_are_separate(ks):
    pki, tls, cmp_ = (chain(root=Spec(key=key("p256", i))).root for i in (31, 32, 33))
    srv = chain(leaf=Spec(key=key("p256", 34))).leaf  # an end-entity certificate: only the cmp-server store
    ks.add_trust_anchors("plant", [pki], source="t")
    ks.add_trust_anchors("plant", [tls], source="t", purpose="tls")
    ks.add_trust_anchors("plant", [cmp_, pki], source="t", purpose="cmp")
    ks.add_trust_anchors("plant", [srv], source="t", purpose="cmp-server")
    with pytest.raises(VerificationError):
        ks.add_trust_anchors("plant", [srv], source="t", purpose="tls")
    with pytest.raises(ValueError):
        ks.add_trust_anchors("plant", [pki], source="t", purpose="bogus")
    assert ks.trust_anchors("plant") == [pki]
    assert ks.trust_anchors("plant", "tls") == [tls]
    assert ks.trust_anchors("plant", "cmp") == [cmp_, pki]
    assert ks.trust_anchors("plant", "cmp-server") == [srv]
    assert {r["purpose"] for r in ks.trust_records("plant")} == {"pki", "tls", "cmp", "cmp-server"}
    # what authenticates the server, per protocol
    anchors, extra = server_trust(ks, "plant", "est")
    assert anchors == (tls,) and extra == {"ca_anchors": (pki,)}
    anchors, extra = server_trust(ks, "plant", "cmp")
    assert anchors == (cmp_, pki) and extra["server_certs"] == (srv,)
    assert extra["tls_verify"] == (tls,) and "domain plant's tls trust store" in extra["tls_trust_source"]
    assert set(extra) == {"server_certs", "tls_verify", "tls_trust_source"}  # https:// CMP: the tls store alone
    ks.remove_trust_anchor("plant", __import__("keystore.certs").certs.fingerprint(tls), "tls")
    assert "tls_verify" not in server_trust(ks, "plant", "cmp")[1]  # no tls store: the system store


def test_remove_from_one_store_or_all(ks):
    from keystore.certs import fingerprint

    root = chain(root=Spec(key=key("p256", 35))).root
    fp = fingerprint(root)
    ks.add_trust_anchors("plant", [root], source="t")
    ks.add_trust_anchors("plant", [root], source="t", purpose="cmp")
    assert ks.remove_trust_anchor("plant", fp[:20], "cmp") == ["cmp"]  # a prefix is enough
    assert ks.trust_anchors("plant") == [root] and ks.trust_anchors("plant", "cmp") == []
    files = sorted(p.name for p in (ks.root / "trust" / "plant").iterdir())
    assert files == [fp.split(":")[1][:32] + ".pem"]  # the cmp copy's file is gone
    assert ks.remove_trust_anchor("plant", fp) == ["pki"]
    assert not list((ks.root / "trust" / "plant").iterdir())
    with pytest.raises(NotFoundError, match="no trust anchor"):
        ks.remove_trust_anchor("plant", fp)


def test_cli_trust_purposes_add_list_remove(tmp_path):
    state = tmp_path / "state"
    run = lambda *a: CliRunner().invoke(cli, ["--state-dir", str(state), *a])  # noqa: E731
    assert run("keystore", "init").exit_code == 0
    root = chain(root=Spec(key=key("p256", 36))).root
    f = write(tmp_path / "site-ca.pem", root)
    r = run("keystore", "trust", "--domain", "plant", "--purpose", "tls", "--add", str(f))
    assert r.exit_code == 0, r.output
    r = run("--json", "keystore", "trust", "--domain", "plant")
    anchors = json.loads(r.output)["anchors"]
    assert [(a["purpose"], a["subject"]) for a in anchors] == [("tls", "CN=Test Root")]
    r = run("keystore", "trust", "--domain", "plant", "--purpose", "pki")
    assert "(none)" in r.output
    r = run("keystore", "trust", "--domain", "plant", "--remove", anchors[0]["fingerprint"])
    assert r.exit_code == 0, r.output
    assert json.loads(run("--json", "keystore", "trust", "--domain", "plant").output)["anchors"] == []
    r = run("keystore", "trust", "--domain", "plant", "--remove", "sha256:00")
    assert r.exit_code != 0 and "no trust anchor" in r.output


def test_failed_enrollment_leaves_no_trust_anchor_behind(tmp_path):
    """Main before #13: 'enroll --trust CA.pem' against a server that is down kept CA.pem as a domain anchor."""
    state = tmp_path / "state"
    run = lambda *a: CliRunner().invoke(cli, ["--state-dir", str(state), *a])  # noqa: E731
    assert run("keystore", "init").exit_code == 0
    ch = chain(root=Spec(key=key("p256", 37)))
    tls = chain(root=Spec(key=key("p256", 38), subject=x509.Name.from_rfc4514_string("CN=Site CA"))).root
    for proto in ("cmp", "est"):
        r = run("enroll", "--domain", "plant", "--protocol", proto, "--server",
                "http://127.0.0.1:1/pkix/" if proto == "cmp" else "https://127.0.0.1:1",
                "--trust", str(write(tmp_path / "root.pem", ch.root)),
                "--tls-trust", str(write(tmp_path / "tls.pem", tls)),
                "--ref", "r", "--secret", "pass:s", "--username", "u", "--password", "pass:p", "--timeout", "2")
        assert r.exit_code != 0, r.output
        ks = Keystore.open(state)
        assert ks.trust_records() == [], (proto, r.output)
        assert not (state / "trust" / "plant").exists() or not list((state / "trust" / "plant").iterdir())
