"""OPC UA Part 12 push management against devagent's device server, driven by an asyncua client acting as a GDS.

Real stacks on 127.0.0.1: asyncua's server (``devagent opcua serve`` or the same PushServer in-process) and
asyncua's client over Basic256Sha256 / Aes128_Sha256_RsaOaep SignAndEncrypt channels. Every certificate the
device stores is checked with ``openssl verify``; every refusal is a named Bad_* status with nothing stored (file
snapshot of the keystore and the PKI directory) and the server still serving.
"""
from __future__ import annotations

import asyncio
import datetime
import os
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.opcua.errors import PushClientError
from agent.opcua.trustlist import TrustList, thumbprint
from keystore.certs import fingerprint, pem, same_public_key
from tests.conftest import snapshot
from tests.peers.opcua import APP_URI, DOMAIN, CliDevice, device, gds_client, make_party, make_world

DER = Encoding.DER


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def full_trustlist(world, *extra_roots) -> TrustList:
    d = world.lab.domain(DOMAIN)
    return TrustList(trusted_certificates=tuple(c.public_bytes(DER) for c in (d.root_cert, *extra_roots)),
                     issuer_certificates=(d.ca_cert.public_bytes(DER),))


def openssl_verify(tmp_path, cert: x509.Certificate, trusted, untrusted=()) -> None:
    (tmp_path / "ca.pem").write_bytes(pem(trusted))
    (tmp_path / "leaf.pem").write_bytes(pem([cert]))
    args = ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "ca.pem")]
    if untrusted:
        (tmp_path / "untrusted.pem").write_bytes(pem(untrusted))
        args += ["-untrusted", str(tmp_path / "untrusted.pem")]
    r = subprocess.run([*args, str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr


def deployed_version_of(pki, rel: str) -> str:
    """Which archive version a configured path of the PKI directory resolves into."""
    real = os.path.realpath(pki / rel)
    return real.split("/archive/")[1].split("/")[0]


async def push_rsa(world, srv, *, regenerate=True, subject="CN=dev1,O=Plant", tl=None, client=None, profile="opcua"):
    """CreateSigningRequest -> lab CA -> UpdateCertificate -> TrustList -> ApplyChanges. Returns the certificate."""
    async with (client or gds_client(world, srv)) as c:
        csr = await c.create_signing_request("rsa", subject, regenerate=regenerate)
        cert = world.lab.issue_from_csr(DOMAIN, csr, profile)
        assert await c.update_certificate(cert, [world.lab.domain(DOMAIN).ca_cert]) is True
        assert await c.write_trust_list(tl or full_trustlist(world)) is True
        await c.apply_changes()
    return cert, csr


# ---- the device as a real process: `devagent opcua serve` -------------------------------------------------
def test_cli_serve_push_flow_rebinds_endpoint(tmp_path, lab):
    w = make_world(tmp_path / "w", lab)
    hook_log = tmp_path / "hook.log"
    # The PKI directory is the existing deploy target of agent.toml; its hook sees the new certificate.
    dev = CliDevice(w, pki_dir_option=False, config=f"""
[credential.opcua]
hooks = ["sh -c 'echo $DEVAGENT_EVENT $DEVAGENT_FINGERPRINT $DEVAGENT_OPCUA_PKI_DIRS >> {hook_log}'"]
[[credential.opcua.deploy]]
type = "opcua"
pki_dir = "{w.pki}"
""").start()
    try:
        async def scenario():
            async with gds_client(w, dev) as c:
                assert c.server_certificate.subject == c.server_certificate.issuer  # first start: self-signed
                assert APP_URI in c.server_certificate.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
                assert await c.read_property("ServerConfiguration_ServerCapabilities") == ["NA"]
                assert await c.read_property("ServerConfiguration_MaxTrustListSize") == 65536
                assert await c.read_property("ServerConfiguration_SupportedPrivateKeyFormats") == []
                types = await c.read_property(
                    "ServerConfiguration_CertificateGroups_DefaultApplicationGroup_CertificateTypes")
                assert [t.Identifier for t in types] == [12560, 23538, 23539]
            cert, _ = await push_rsa(w, dev)
            # A second client: the endpoint now presents the pushed certificate, verified against the domain CA.
            async with gds_client(w, dev.url) as c2:
                assert fingerprint(c2.server_certificate) == fingerprint(cert)
                last = await c2.read_property(
                    "ServerConfiguration_CertificateGroups_DefaultApplicationGroup_TrustList_LastUpdateTime")
                assert last.year >= 2024
            return cert

        cert = run(scenario())
        assert dev.proc.poll() is None  # same process, re-bound
    finally:
        assert dev.stop() == 0
    cred = w.ks.get("opcua")
    assert cred.certificate == cert and cred.kind == "app" and cred.domain == DOMAIN
    assert hook_log.read_text().split() == ["opcua-push", fingerprint(cert), str(w.pki)]
    assert cred.record["meta"]["via"] == "opcua-push"
    d = w.lab.domain(DOMAIN)
    openssl_verify(tmp_path, cred.certificate, [d.root_cert], [d.ca_cert])
    # PKI directory: own cert + key, trusted root, issuing CA, all through one live version
    pki = w.pki
    own = x509.load_der_x509_certificate((pki / "own/certs/opcua.der").read_bytes())
    assert own == cert
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key((pki / "own/private/opcua.pem").read_bytes(), None)
    assert same_public_key(key.public_key(), cert.public_key())
    assert oct((pki / "own/private/opcua.pem").stat().st_mode & 0o777) == "0o600"
    trusted = sorted(p.name for p in (pki / "trusted/certs").iterdir())
    assert trusted == [f"{thumbprint(d.root_cert.public_bytes(DER))}.der"]
    issuers = [x509.load_der_x509_certificate(p.read_bytes()) for p in (pki / "issuers/certs").iterdir()]
    assert issuers == [d.ca_cert]
    assert deployed_version_of(pki, "own/certs/opcua.der") == deployed_version_of(pki, "trusted/certs")
    openssl_verify(tmp_path, own, [x509.load_der_x509_certificate(p.read_bytes())
                                   for p in (pki / "trusted/certs").iterdir()], issuers)
    # devagent status shows it like any other credential
    r = subprocess.run([os.sys.executable, "-m", "agent.cli", "--state-dir", str(w.state), "--json", "status"],
                       capture_output=True, text=True, env=dict(os.environ, DEVAGENT_PROFILE="generic-x86_64",
                                                                DEVAGENT_CONFIG=str(w.base / "none.toml")))
    assert r.returncode == 0, r.stderr
    assert "opcua" in r.stdout and format(cert.serial_number, "x") in r.stdout
    audit = [e["action"] for e in w.ks.audit_entries()]
    assert "opcua-csr" in audit and "opcua-apply" in audit and "certificate-store" in audit


@pytest.mark.parametrize("algorithm, option, bits", [("rsa3072", None, 3072), ("rsa3072", "rsa2048", 2048),
                                                     ("p384", None, 2048)],
                         ids=["rsa-config", "option-wins", "ec-config"])
def test_cli_serve_rsa_key_type_follows_an_rsa_key_algorithm(tmp_path, lab, algorithm, option, bits):
    """`opcua serve --rsa-key-type` defaults to key.algorithm of agent.toml when it is an RSA type (as enroll's
    --key-type), the option wins over it, and an EC key.algorithm leaves the RSA application certificate at
    rsa2048 (the RSA security policies need an RSA key): the key of the endpoint's bootstrap certificate, seen by
    a GDS over Basic256Sha256, and of the CSR CreateSigningRequest regenerates."""
    w = make_world(tmp_path / "w", lab)
    dev = CliDevice(w, *(["--rsa-key-type", option] if option else []), pki_dir_option=False,
                    config=f'[key]\nalgorithm = "{algorithm}"\n').start()
    try:
        async def scenario():
            async with gds_client(w, dev) as c:
                assert c.server_certificate.subject == c.server_certificate.issuer  # the bootstrap certificate
                served = c.server_certificate.public_key().key_size
                csr = await c.create_signing_request("rsa", "CN=dev1,O=Plant", regenerate=True)
            return served, csr.public_key().key_size

        assert run(scenario()) == (bits, bits)
    finally:
        assert dev.stop() == 0


# ---- in-process device: the same PushServer, one per test --------------------------------------------------
def test_csr_with_and_without_regeneration_and_ecc_types(tmp_path, lab):
    w = make_world(tmp_path / "w", lab)

    async def scenario():
        async with device(w) as srv:
            cert, csr = await push_rsa(w, srv)
            async with gds_client(w, srv.url) as c:
                # regeneratePrivateKey FALSE: a CSR for the key in use
                same = await c.create_signing_request("rsa", "", regenerate=False)
                assert same_public_key(same.public_key(), cert.public_key())
                assert same.subject == cert.subject  # subject of the current certificate when none is sent
                assert same.is_signature_valid
                # TRUE: a new key, with the §7.6.4 subjectName form
                new = await c.create_signing_request("rsa", "CN=dev1b/O=Plant", regenerate=True)
                assert not same_public_key(new.public_key(), cert.public_key())
                assert new.subject.rfc4514_string() == "CN=dev1b,O=Plant"
                for kt in ("p256", "p384"):
                    e = await c.create_signing_request(kt, "CN=dev1,O=Plant")
                    ec = w.lab.issue_from_csr(DOMAIN, e, "opcua")
                    await c.update_certificate(ec, [w.lab.domain(DOMAIN).ca_cert], key_type=kt)
                await c.apply_changes()
            return cert

    cert = run(scenario())
    assert w.ks.get("opcua").certificate == cert  # the RSA slot was not updated in the second transaction
    for name, curve in (("opcua-p256", "secp256r1"), ("opcua-p384", "secp384r1")):
        c = w.ks.get(name)
        assert c.certificate.public_key().curve.name == curve
        openssl_verify(tmp_path, c.certificate, [w.lab.domain(DOMAIN).root_cert], [w.lab.domain(DOMAIN).ca_cert])
        assert (w.pki / f"own/certs/{name}.der").exists()
    # the unused RSA key made by the last regenerating CSR is pending, waiting for its certificate
    assert len([k for k in w.ks.pending_keys() if k["pending_for"].get("slot") == "opcua"]) == 1


def test_trustlist_replace_add_remove(tmp_path, lab):
    w = make_world(tmp_path / "w", lab)
    other_root = w.lab.domain("other").root_cert

    async def scenario():
        async with device(w) as srv:
            async with gds_client(w, srv) as c:
                before = await c.read_trust_list()
                assert len(before.trusted_certificates) == 2  # commissioned: the domain's keystore anchors
                # replace, then partial write (mask: only IssuerCertificates), then Add / Remove
                assert await c.write_trust_list(full_trustlist(w)) is True
                await c.apply_changes()
                assert await c.read_trust_list() == full_trustlist(w)
                assert await c.write_trust_list(TrustList(), mask=4) is True  # clear issuers only
                await c.cancel_changes()  # ... and change our mind: nothing happens
                assert await c.read_trust_list() == full_trustlist(w)
                await c.add_certificate(other_root)  # no transaction open: applied at once
                tl = await c.read_trust_list()
                assert other_root.public_bytes(DER) in tl.trusted_certificates
                await c.remove_certificate(thumbprint(other_root.public_bytes(DER)))
                assert await c.read_trust_list() == full_trustlist(w)
                masks = await c.read_trust_list(masks=1)
                assert masks.issuer_certificates == () and masks.trusted_certificates
            # a session that ends (CloseSession) without ApplyChanges: its transaction goes, others may write
            async with gds_client(w, srv) as gone:
                assert await gone.write_trust_list(TrustList(), mask=4) is True
            async with gds_client(w, srv) as c:
                assert await c.write_trust_list(full_trustlist(w)) is True
                await c.apply_changes()
                assert await c.read_trust_list() == full_trustlist(w)

    run(scenario())
    anchors = {fingerprint(a) for a in w.ks.trust_anchors(DOMAIN)}
    assert anchors == {fingerprint(w.lab.domain(DOMAIN).root_cert)}  # keystore follows the TrustList
    assert "trust-add" in [e["action"] for e in w.ks.audit_entries()]


def test_issuing_ca_rollover_and_renewal(tmp_path):
    w = make_world(tmp_path / "w")  # its own lab: the rollover must not touch the session's

    async def scenario():
        async with device(w) as srv:
            first, _ = await push_rsa(w, srv)
            old = w.lab.domain(DOMAIN)
            new = w.lab.rollover(DOMAIN)
            # Renewal under the new hierarchy: the TrustList gains the new root and issuing CA first (same
            # transaction; the old ones stay for clients not yet renewed, the GDS among them), then the
            # certificate from the new CA verifies against the staged list.
            tl = TrustList(trusted_certificates=(old.root_cert.public_bytes(DER), new.root_cert.public_bytes(DER)),
                           issuer_certificates=(old.ca_cert.public_bytes(DER), new.ca_cert.public_bytes(DER)))
            async with gds_client(w, srv.url, intermediates=[old.ca_cert], anchors=[old.root_cert]) as c:
                csr = await c.create_signing_request("rsa", "CN=dev1,O=Plant")
                cert = w.lab.issue_from_csr(DOMAIN, csr, "opcua")
                assert await c.write_trust_list(tl) is True
                assert await c.update_certificate(cert, [new.ca_cert]) is True
                await c.apply_changes()
            async with gds_client(w, srv.url, intermediates=[new.ca_cert], anchors=[new.root_cert]) as c2:
                assert fingerprint(c2.server_certificate) == fingerprint(cert)
            return first, cert, new

    first, cert, new = run(scenario())
    cred = w.ks.get("opcua")
    assert cred.certificate == cert and cred.version == 2
    openssl_verify(tmp_path, cert, [new.root_cert], [new.ca_cert])
    assert not same_public_key(first.public_key(), cert.public_key())


# ---- refusals: named status, nothing stored, still serving -------------------------------------------------
def expired_cert(w, csr):
    return w.lab.issue(DOMAIN, csr.public_key(), csr.subject, tuple(csr.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value), "opcua", lifetime_s=60,
        not_before=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2))


def wrong_uri_cert(w, csr):
    return w.lab.issue(DOMAIN, csr.public_key(), csr.subject, [x509.UniformResourceIdentifier("urn:someone:else")],
                       "opcua")


def other_key_cert(w, csr):
    return make_party(w.lab, DOMAIN, "CN=dev1,O=Plant", APP_URI).certificate


def untrusted_cert(w, csr):
    return w.lab.issue_from_csr("other", csr, "opcua")


def ldevid_profile_cert(w, csr):
    return w.lab.issue_from_csr(DOMAIN, csr, "ldevid")  # clientAuth only, no keyEncipherment


BAD_UPDATES = [
    (other_key_cert, "BadCertificateInvalid"),
    (wrong_uri_cert, "BadCertificateUriInvalid"),
    (expired_cert, "BadCertificateTimeInvalid"),
    (untrusted_cert, "BadCertificateUntrusted"),
    (ldevid_profile_cert, "BadCertificateUseNotAllowed"),
]


def test_bad_inputs_each_named_status_nothing_stored(tmp_path, lab):
    w = make_world(tmp_path / "w", lab)

    async def scenario():
        async with device(w, max_trust_list_size=8192, allow_none=True) as srv:
            await push_rsa(w, srv)  # a device in service: certificate and TrustList deployed
            async with gds_client(w, srv.url) as c:
                csr = await c.create_signing_request("rsa", "CN=dev1,O=Plant")
            seen = {}

            async def refused(label, expected, action, party=None, connect_error=False):
                before = snapshot(w.base)
                client = gds_client(w, srv.url, party=party)
                try:
                    if connect_error:
                        with pytest.raises(PushClientError) as ei:
                            await client.connect()
                    else:
                        async with client as cc:
                            with pytest.raises(PushClientError) as ei:
                                await action(cc)
                finally:
                    await client.close()
                assert ei.value.status == expected, (label, ei.value)
                after = snapshot(w.base)
                changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)
                           and not k.startswith("state/opcua/rejected/")}
                assert not changed, (label, changed)
                seen[label] = expected

            for make, status in BAD_UPDATES:
                cert = make(w, csr)
                await refused(make.__name__, status,
                              lambda cc, cert=cert: cc.update_certificate(cert, [w.lab.domain(DOMAIN).ca_cert]))

            async def raw_update(cc, blob):
                from asyncua import ua

                return await cc.call("ServerConfiguration", "ServerConfiguration_UpdateCertificate",
                                     ua.Variant(ua.NodeId(14156), ua.VariantType.NodeId),
                                     ua.Variant(ua.NodeId(12560), ua.VariantType.NodeId),
                                     ua.Variant(blob, ua.VariantType.ByteString),
                                     ua.Variant([], ua.VariantType.ByteString), ua.Variant("", ua.VariantType.String),
                                     ua.Variant(b"", ua.VariantType.ByteString))

            await refused("malformed DER", "BadCertificateInvalid", lambda cc: raw_update(cc, b"\x30\x82\x01garbage"))
            await refused("wrong role", "BadUserAccessDenied", lambda cc: cc.create_signing_request("rsa"),
                          party=w.operator)
            await refused("untrusted client", "BadCertificateUntrusted", None, party=w.stranger, connect_error=True)

            big = TrustList(trusted_certificates=tuple(
                make_party(w.lab, DOMAIN, f"CN=peer{i},O=Plant", f"urn:p{i}").certificate.public_bytes(DER)
                for i in range(12)))
            await refused("oversized TrustList", "BadEncodingLimitsExceeded", lambda cc: cc.write_trust_list(big))

            async def write_without_open(cc):
                from asyncua import ua

                await cc.tl("Write", ua.Variant(4242, ua.VariantType.UInt32), ua.Variant(b"x", ua.VariantType.ByteString))
            await refused("Write without Open", "BadInvalidArgument", write_without_open)

            async def close_update_without_write(cc):
                from asyncua import ua

                h = await cc.tl("Open", ua.Variant(6, ua.VariantType.Byte))
                await cc.tl("CloseAndUpdate", ua.Variant(h, ua.VariantType.UInt32))
            await refused("CloseAndUpdate without Write", "BadInvalidState", close_update_without_write)

            async def garbage_trustlist(cc):
                from asyncua import ua

                h = await cc.tl("Open", ua.Variant(6, ua.VariantType.Byte))
                await cc.tl("Write", ua.Variant(h, ua.VariantType.UInt32), ua.Variant(b"\x0f\x00", ua.VariantType.ByteString))
                await cc.tl("CloseAndUpdate", ua.Variant(h, ua.VariantType.UInt32))
            await refused("truncated TrustList", "BadDecodingError", garbage_trustlist)

            lockout = TrustList(trusted_certificates=(w.lab.domain("other").root_cert.public_bytes(DER),))
            await refused("TrustList without the caller's anchor", "BadRequestNotAllowed",
                          lambda cc: cc.write_trust_list(lockout))
            await refused("ApplyChanges with nothing pending", "BadInvalidState", lambda cc: cc.apply_changes())
            await refused("private key pushed", "BadNotSupported", lambda cc: cc.call(
                "ServerConfiguration", "ServerConfiguration_UpdateCertificate", *_update_with_key(csr, w)))

            # a second session racing the first: the first holds a transaction
            async with gds_client(w, srv.url) as first:
                await first.write_trust_list(full_trustlist(w))
                await refused("second session racing", "BadTransactionPending",
                              lambda cc: cc.write_trust_list(full_trustlist(w)))
                await refused("second session ApplyChanges", "BadTransactionPending", lambda cc: cc.apply_changes())
                await first.cancel_changes()

            # an anonymous client on the None endpoint (--allow-none: browsing only)
            from asyncua import Client

            before = snapshot(w.base)
            anon = Client(srv.url)
            await anon.connect()
            try:
                from asyncua import ua

                with pytest.raises(Exception) as ei:
                    await anon.get_node(ua.NodeId(12637)).call_method(ua.NodeId(12737), ua.Variant(
                        ua.NodeId(14156), ua.VariantType.NodeId), ua.Variant(ua.NodeId(12560), ua.VariantType.NodeId),
                        "", True, os.urandom(32))
                assert "BadUserAccessDenied" in type(ei.value).__name__ + str(ei.value)
            finally:
                await anon.disconnect()
            assert snapshot(w.base) == before
            seen["unauthenticated"] = "BadUserAccessDenied"

            # still serving, and the refused client certificate is in the rejected list
            async with gds_client(w, srv.url) as c:
                rejected = await c.get_rejected_list()
                assert w.stranger.certificate.public_bytes(DER) in rejected
                again = await c.create_signing_request("rsa", "CN=dev1,O=Plant")
                assert again.is_signature_valid
            return seen

    seen = run(scenario())
    assert len(seen) == len(BAD_UPDATES) + 13


def _update_with_key(csr, w):
    from asyncua import ua

    cert = w.lab.issue_from_csr(DOMAIN, csr, "opcua")
    return (ua.Variant(ua.NodeId(14156), ua.VariantType.NodeId), ua.Variant(ua.NodeId(12560), ua.VariantType.NodeId),
            ua.Variant(cert.public_bytes(DER), ua.VariantType.ByteString), ua.Variant([], ua.VariantType.ByteString),
            ua.Variant("PEM", ua.VariantType.String), ua.Variant(b"-----BEGIN PRIVATE KEY-----", ua.VariantType.ByteString))


def test_core_refusals_without_network(tmp_path, lab):
    """PushService itself (what the server's handlers call): the codes a stack-level test cannot reach easily."""
    from agent.opcua.errors import PushError
    from agent.opcua.push import Caller, PushService
    from tests.peers.opcua import push_config

    w = make_world(tmp_path / "w", lab)
    svc = PushService(w.ks, push_config(), w.state)
    admin = Caller("s1", encrypted=True, admin=True, who="gds")

    async def scenario():
        await svc.initialize()
        before = snapshot(w.base)
        cases = [
            (Caller("s2", encrypted=False, admin=True, who="gds on a None channel"),
             lambda c: svc.create_signing_request(c, None, None, "", True, os.urandom(32)),
             "BadSecurityModeInsufficient"),
            (Caller("s3", encrypted=True, admin=False, who="operator"), lambda c: svc.apply_changes(c),
             "BadUserAccessDenied"),
            (admin, lambda c: svc.create_signing_request(c, None, None, "", True, b"short"), "BadInvalidArgument"),
            (admin, lambda c: svc.create_signing_request(c, None, 4242, "", False, None), "BadInvalidArgument"),
            (admin, lambda c: svc.create_signing_request(c, 1, None, "", False, None), "BadInvalidArgument"),
            (admin, lambda c: svc.create_signing_request(c, None, None, "CN=a,,=b", False, None),
             "BadInvalidArgument"),
            (admin, lambda c: svc.open(c, 0x02), "BadInvalidArgument"),
            (admin, lambda c: svc.add_certificate(c, lab.domain("other").root_cert.public_bytes(DER), False),
             "BadCertificateInvalid"),
            (admin, lambda c: svc.add_certificate(c, b"\x30\x03\x02\x01", True), "BadCertificateInvalid"),
            (admin, lambda c: svc.remove_certificate(c, "00" * 20, True), "BadInvalidArgument"),
            (admin, lambda c: svc.read(c, 99, 10), "BadInvalidArgument"),
            (admin, lambda c: svc.apply_changes(c), "BadInvalidState"),
        ]
        for caller, call, status in cases:
            with pytest.raises(PushError) as e:
                await call(caller)
            assert e.value.status == status, (status, e.value)
        assert snapshot(w.base) == before
        # the TrustList open for writing blocks Add/Remove and a second writer
        h = await svc.open(admin, 0x06)
        with pytest.raises(PushError) as e:
            await svc.add_certificate(admin, lab.domain("other").root_cert.public_bytes(DER), True)
        assert e.value.status == "BadInvalidState"
        with pytest.raises(PushError) as e:
            await svc.open(Caller("s5", True, True, "gds2"), 0x06)
        assert e.value.status == "BadInvalidState"
        await svc.close(admin, h)
        handles = [await svc.open(admin, 0x01) for _ in range(16)]
        with pytest.raises(PushError) as e:
            await svc.open(admin, 0x01)
        assert e.value.status == "BadTooManyOperations"
        for h in handles:
            await svc.close(admin, h)
        assert snapshot(w.base) == before

    run(scenario())


def test_aes128_sha256_rsaoaep_channel(tmp_path, lab):
    w = make_world(tmp_path / "w", lab)

    async def scenario():
        async with device(w) as srv:
            async with gds_client(w, srv, policy="Aes128_Sha256_RsaOaep") as c:
                assert await c.read_property("ServerConfiguration_MaxTrustListSize") == 65536
                csr = await c.create_signing_request("p256", "CN=dev1,O=Plant")
                assert csr.is_signature_valid

    run(scenario())


def test_failing_hook_commits_reports_and_retries_at_start(tmp_path, lab):
    """A hook that fails: ApplyChanges answers Bad_InternalError, the keystore holds the new certificate, the
    journal stays; the server keeps serving and a restart (with the hook fixed) finishes the deployment."""
    w = make_world(tmp_path / "w", lab)
    flag = tmp_path / "hook-ok"

    async def scenario():
        hook = [f"sh -c 'test -e {flag}'"]
        async with device(w, hooks=hook) as srv:
            async with gds_client(w, srv) as c:
                csr = await c.create_signing_request("rsa", "CN=dev1,O=Plant")
                cert = w.lab.issue_from_csr(DOMAIN, csr, "opcua")
                await c.update_certificate(cert, [w.lab.domain(DOMAIN).ca_cert])
                with pytest.raises(PushClientError) as e:
                    await c.apply_changes()
                assert e.value.status == "BadInternalError"
            assert w.ks.get("opcua").certificate == cert and (w.state / "opcua/apply.json").exists()
            async with gds_client(w, srv.url) as c2:  # still serving, on the new certificate, no transaction left
                assert fingerprint(c2.server_certificate) == fingerprint(cert)
                assert await c2.write_trust_list(full_trustlist(w)) is True
                await c2.cancel_changes()
        flag.touch()
        async with device(w, hooks=hook):
            pass
        return cert

    cert = run(scenario())
    assert not (w.state / "opcua/apply.json").exists()
    assert x509.load_der_x509_certificate((w.pki / "own/certs/opcua.der").read_bytes()) == cert
    actions = [e["action"] for e in w.ks.audit_entries()]
    assert "opcua-deploy-failed" in actions
