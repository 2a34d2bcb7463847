"""CoAP delegated enrollment authorization (issue #13 hole 1): which security context may touch what.

The device service is driven directly (the CoAP transport is exercised in test_coap_services / test_coap_e2e);
``peer`` is the claim the transport reports for an authenticated context (``:oscore-<peer>``, ``:dtls-<peer>``).
Every refusal leaves the keystore byte-for-byte unchanged (file snapshot). The certificates are real, from the
lab CA, so a refusal is never a side effect of a bad certificate.
"""
from __future__ import annotations

import asyncio

import pytest
from cryptography import x509

from coap_services import codec
from coap_services.authz import Grant, load_grants, write_grant
from coap_services.device import DeviceConfig, DeviceService
from coap_services.errors import CONFLICT, FORBIDDEN, SecurityConfigError, ServiceError
from keystore.store import Keystore
from tests.conftest import snapshot

A, B = ":oscore-clm", ":oscore-clm2"  # two provisioned contexts


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def ks(tmp_path, lab):
    k = Keystore.init(tmp_path / "state")
    k.add_trust_anchors("plant", [lab.domain("plant").root_cert], source="test")
    k.add_trust_anchors("other", [lab.domain("other").root_cert], source="test")
    return k


def service(ks, **grants):
    cfg = DeviceConfig(device_id="dev1", default_domain="plant")
    if not grants:  # the constructor as it was before grants existed (the hole 1 test runs on old main too)
        return DeviceService(ks, cfg)
    return DeviceService(ks, cfg, grants={g.peer: g for g in grants.values()})


def enroll(svc, lab, peer, name, domain="plant", profile=None):
    res = run(svc.csr(codec.CsrRequest(name=name, domain=domain, profile=profile), peer))
    csr = x509.load_der_x509_csr(res.csr_der)
    cert = lab.issue_from_csr(domain, csr, profile or "ldevid")
    return cert, [lab.domain(domain).ca_cert]


def store_cli_credential(ks, lab, name, domain):
    """A credential as `devagent enroll` stores it (protocol est)."""
    uri = ks.generate_key("p256", label=name)
    from keystore.csr import build_csr

    csr = build_csr(ks.private_key(uri), x509.Name.from_rfc4514_string(f"CN={name}"), [])
    cert = lab.issue_from_csr(domain, csr)
    return ks.store_certificate(name, cert, [lab.domain(domain).ca_cert], key_uri=uri, domain=domain,
                                protocol="est", server="https://est.example")


def refused(coro, reason):
    with pytest.raises(ServiceError) as e:
        run(coro)
    assert e.value.reason == reason, str(e.value)
    assert e.value.code == FORBIDDEN
    return e.value


def test_hole1_context_of_one_domain_cannot_replace_another_domains_credential(ks, lab):
    """Main before #13: a context serving domain 'plant' replaced 'ldevid-line2' of domain 'other' and its old key
    was destroyed. Now /csr is refused and nothing changes."""
    before_cred = store_cli_credential(ks, lab, "ldevid-line2", "other")
    svc = service(ks)  # no grant file: the context may manage the service's domain ('plant') only
    before = snapshot(ks.root)
    refused(svc.csr(codec.CsrRequest(name="ldevid-line2", domain="other"), A), "forbidden-domain")
    assert snapshot(ks.root) == before
    assert ks.get("ldevid-line2").certificate == before_cred.certificate
    assert ks.public_key(before_cred.key_uri)  # the old key still exists


def test_context_for_domain_a_cannot_create_in_domain_b(ks, lab):
    svc = service(ks, a=Grant("clm", ("plant",)))
    before = snapshot(ks.root)
    refused(svc.csr(codec.CsrRequest(name="new-cred", domain="other"), A), "forbidden-domain")
    assert snapshot(ks.root) == before
    cert, chain = enroll(svc, lab, A, "ldevid")  # its own domain works
    assert run(svc.verify([cert, *chain], A)).name == "ldevid"
    assert ks.get("ldevid").domain == "plant" and ks.get("ldevid").kind == "ldevid"


def test_verify_from_another_context_is_refused(ks, lab):
    svc = service(ks, a=Grant("clm", ("plant",)), b=Grant("clm2", ("plant",)))
    cert, chain = enroll(svc, lab, A, "ldevid")
    before = snapshot(ks.root)
    refused(svc.verify([cert, *chain], B), "other-context")
    assert snapshot(ks.root) == before
    assert not ks.exists("ldevid")
    assert run(svc.verify([cert, *chain], A)).version == 1  # the context that asked stores it


def test_a_context_replaces_only_what_it_delivered(ks, lab):
    svc = service(ks, a=Grant("clm", ("plant",)), b=Grant("clm2", ("plant",)))
    cert, chain = enroll(svc, lab, A, "ldevid")
    run(svc.verify([cert, *chain], A))
    before = snapshot(ks.root)
    refused(svc.csr(codec.CsrRequest(name="ldevid", domain="plant"), B), "other-context")
    assert snapshot(ks.root) == before
    cert2, chain2 = enroll(svc, lab, A, "ldevid")  # renewal by the same context
    assert run(svc.verify([cert2, *chain2], A)).version == 2


def test_cli_enrolled_credential_and_idevid_are_protected(ks, lab):
    store_cli_credential(ks, lab, "ldevid-plant", "plant")
    from tests.certfactory import chain as mkchain

    ch = mkchain()
    ks.import_idevid("idevid", ch.leaf, [*ch.inters, ch.root], private_key=ch.leaf_key)
    svc = service(ks)
    before = snapshot(ks.root)
    refused(svc.csr(codec.CsrRequest(name="ldevid-plant", domain="plant"), A), "cli-enrolled")
    refused(svc.csr(codec.CsrRequest(name="idevid", domain="plant"), A), "read-only")
    assert snapshot(ks.root) == before
    allowed = service(ks, a=Grant("clm", ("plant",), replace_cli=True))
    refused(allowed.csr(codec.CsrRequest(name="idevid", domain="plant"), A), "read-only")
    cert, chain = enroll(allowed, lab, A, "ldevid-plant")
    assert run(allowed.verify([cert, *chain], A)).version == 2


def test_names_restriction_and_app_kind(ks, lab):
    svc = service(ks, a=Grant("clm", ("plant",), ("ldevid", "opcua-app")))
    before = snapshot(ks.root)
    refused(svc.csr(codec.CsrRequest(name="something-else", domain="plant"), A), "forbidden-name")
    assert snapshot(ks.root) == before
    cert, chain = enroll(svc, lab, A, "opcua-app", profile="tls-client")
    run(svc.verify([cert, *chain], A))
    assert ks.get("opcua-app").kind == "app"
    refused(svc.csr(codec.CsrRequest(name="opcua-app", domain="plant"), A), "kind-mismatch")  # ldevid over app


def test_allowed_domain_without_anchor_is_a_conflict(ks, lab):
    svc = service(ks, a=Grant("clm", ("plant", "nowhere")))
    e = refused_code(svc.csr(codec.CsrRequest(name="x", domain="nowhere"), A))
    assert (e.code, e.reason) == (CONFLICT, "no-trust-anchor")


def test_oscore_and_dtls_of_one_provisioned_peer_are_one_principal(ks, lab):
    svc = service(ks)
    cert, chain = enroll(svc, lab, ":oscore-clm", "ldevid")
    assert run(svc.verify([cert, *chain], ":dtls-clm")).version == 1


def refused_code(coro):
    with pytest.raises(ServiceError) as e:
        run(coro)
    return e.value


def test_grant_files(tmp_path):
    write_grant(tmp_path, Grant("clm", ("plant", "line2"), None, True))
    assert load_grants(tmp_path) == {"clm": Grant("clm", ("plant", "line2"), None, True)}
    (tmp_path / "authz" / "clm.json").chmod(0o644)
    with pytest.raises(SecurityConfigError):
        load_grants(tmp_path)
    (tmp_path / "authz" / "clm.json").chmod(0o600)
    (tmp_path / "authz" / "clm.json").write_text("{not json")
    with pytest.raises(SecurityConfigError, match="not valid"):
        load_grants(tmp_path)
    with pytest.raises(ValueError):
        write_grant(tmp_path, Grant("clm", ("bad domain!",)))


def test_provision_writes_the_grant(tmp_path):
    from click.testing import CliRunner

    from agent.cli import cli

    r = CliRunner().invoke(cli, ["--state-dir", str(tmp_path / "s"), "--json", "coap", "provision", "dev1",
                                 "--domain", "plant", "--name", "ldevid", "--allow-replace-cli"])
    assert r.exit_code == 0, r.output
    assert load_grants(tmp_path / "s" / "coap") == {"clm": Grant("clm", ("plant",), ("ldevid",), True)}
    r = CliRunner().invoke(cli, ["--state-dir", str(tmp_path / "s2"), "coap", "provision", "dev1", "--domain", "x y"])
    assert r.exit_code != 0 and "domain" in r.output
