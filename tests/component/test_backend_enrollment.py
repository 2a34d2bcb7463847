"""The enrollment suite once per key backend: software, TPM 2.0 (swtpm) and PKCS#11 (SoftHSM2).

For each backend a key generated *in that backend* goes through the production code paths against real peers:

- CMP ``ir`` + ``certConf`` against OpenSSL's ``openssl cmp`` mock server (in a network namespace), CMP signature
  protection with the backend key (zero-touch ``ir`` signed by an IDevID whose key is in the backend, ``kur`` and
  ``rr`` signed by the current certificate's key), and a rekey the mock server answers with its fixed certificate
  (must be rejected, nothing stored, the new backend key destroyed);
- the same lifecycle against the lab CMP server: ``ir``/``certConf``, ``cr`` signed by the LDevID, ``kur`` with
  rekey signed by the hardware-held current key, ``rr``, delete;
- EST ``simpleenroll`` with HTTP Basic and ``simplereenroll`` against the lab EST server; with a TPM/PKCS#11 key the
  TLS client certificate is a documented limitation: the renewal must fail with the client's clear error and
  store nothing;
- CoAP ``/csr`` + ``/verify`` through the real device service with its keys in the backend.

Every issued certificate is checked independently (``openssl verify``), and its public key is checked against the
key as the *peer* holds it: the TPM loads the blob over its own connection, the token's public-key object, or the
software key file. Deletion is checked on the peer too (blob gone, token objects gone).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent import lifecycle
from agent.lab.ca import LabCA
from agent.lab.cmp_server import start_cmp_server
from enroll_clients.base import CertRequest, ClientAuth, EnrollError, EnrollOptions
from enroll_clients.cmp import CallableTransport, CmpClient, HttpTransport
from enroll_clients.cmp import asn1 as A
from enroll_clients.cmp import client_from_options as cmp_client
from enroll_clients.cmp.errors import KeyMismatchError
from keystore.csr import parse_san, parse_subject
from keystore.store import Keystore
from tests.conftest import snapshot
from tests.peers import openssl_cmp as O
from tests.peers.est import EST_PASSWORD, EST_USER, est_lab, est_server  # noqa: F401  (pytest fixtures)
from tests.peers.pkcs11 import softhsm  # noqa: F401  (pytest fixture)
from tests.peers.tpm import swtpm, tpm_options  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.peer

BACKENDS = ("soft", "tpm", "pkcs11")
LAB_REF, LAB_SECRET = b"hw-ref", b"hw-secret"
SUBJECT = parse_subject("CN=device-0001,O=devagent test")
HW_TLS_LIMITATION = "non-exportable (TPM/PKCS#11) key is not supported"


# ---- the backend under test and its peer ---------------------------------------------------------------
@dataclasses.dataclass
class Hw:
    """A keystore whose new keys go to ``backend``, and independent access to the peer holding them."""

    backend: str
    ks: Keystore
    options: dict
    peer: object  # SwtpmServer | SoftHsmToken | None

    @property
    def hardware(self) -> bool:
        return self.backend != "soft"

    def peer_public_key(self, uri: str):
        """The key's public half as the peer itself reports it (not through the keystore's backend object)."""
        scheme, _, rest = uri.partition(":")
        assert scheme == {"soft": "file", "tpm": "tpm", "pkcs11": "pkcs11"}[self.backend], uri
        if scheme == "file":
            from keystore.backends.soft import Backend

            return Backend(self.ks.backend("soft").ctx).load(uri).public_key()
        if scheme == "tpm":
            from tpm2_pytss.internal.crypto import public_to_key
            from tpm2_pytss.tsskey import TSSPrivKey

            tss = TSSPrivKey.from_pem(self.blob(uri).read_bytes())
            ectx = self.peer.esapi()
            try:
                tr = tss.load(ectx)  # the TPM accepts the blob: the key lives in this TPM
                try:
                    public, _, _ = ectx.read_public(tr)
                finally:
                    ectx.flush_context(tr)
            finally:
                ectx.close()
            return public_to_key(public.publicArea)
        objs = self.token_objects(uri)
        assert sorted(o[0] for o in objs) == ["PRIVATE_KEY", "PUBLIC_KEY"], objs
        priv = dict(objs)["PRIVATE_KEY"]
        assert priv["extractable"] is False and priv["sensitive"] is True, priv
        return dict(objs)["PUBLIC_KEY"]["public"]

    def blob(self, uri: str) -> Path:
        return self.ks.root / "tpm" / f"{uri.split('/', 1)[1]}.tss"

    def token_objects(self, uri: str) -> list:
        """(class, attributes) of every token object carrying the URI's CKA_ID, read in a session of our own."""
        import pkcs11
        from pkcs11 import Attribute, KeyType, ObjectClass
        from pkcs11.util.ec import encode_ec_public_key

        from keystore.backends.pkcs11 import parse_uri

        key_id = parse_uri(uri)["id"]
        tok = pkcs11.lib(self.peer.module).get_token(token_label=self.peer.label)
        try:
            session = tok.open(user_pin=self.peer.pin)
        except pkcs11.UserAlreadyLoggedIn:  # login state is per process: the backend's session holds it
            session = tok.open()
        out = []
        with session as s:
            for o in s.get_objects({Attribute.ID: key_id}):
                if o.object_class == ObjectClass.PRIVATE_KEY:
                    out.append(("PRIVATE_KEY", {"extractable": o[Attribute.EXTRACTABLE],
                                                "sensitive": o[Attribute.SENSITIVE]}))
                elif o.object_class == ObjectClass.PUBLIC_KEY and o.key_type == KeyType.EC:
                    out.append(("PUBLIC_KEY", {"public": serialization.load_der_public_key(encode_ec_public_key(o))}))
                elif o.object_class == ObjectClass.PUBLIC_KEY:
                    n = int.from_bytes(o[Attribute.MODULUS], "big")
                    e = int.from_bytes(o[Attribute.PUBLIC_EXPONENT], "big")
                    out.append(("PUBLIC_KEY", {"public": rsa.RSAPublicNumbers(e, n).public_key()}))
                else:
                    out.append((o.object_class.name, {}))
        return out

    def key_exists(self, uri: str) -> bool:
        """Whether the peer still holds the key (file / blob, or any token object with its CKA_ID)."""
        scheme, _, rest = uri.partition(":")
        if scheme == "file":
            return (self.ks.root / rest).exists()
        if scheme == "tpm":
            return self.blob(uri).exists()
        return bool(self.token_objects(uri))


@pytest.fixture(params=BACKENDS)
def hw(request, tmp_path):
    backend = request.param
    peer, options = None, {}
    if backend == "tpm":
        peer = request.getfixturevalue("swtpm")
        peer.flush_all()
        options = {"tpm": dict(peer.options)}
    elif backend == "pkcs11":
        peer = request.getfixturevalue("softhsm")
        options = {"pkcs11": dict(peer.options)}
    ks = Keystore.init(tmp_path / "ks", backend_options=options)
    env = Hw(backend, ks, options, peer)
    yield env
    # A failed test must not leave keys on the shared token/TPM for the next one.
    for cred in ks.list():
        ks.delete(cred.name, force=True)
    for rec in ks.pending_keys():
        ks.discard_key(rec["uri"])
    ks.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return LabCA.create(tmp_path_factory.mktemp("hwlab"), domains=("plant", "mfg"))


@pytest.fixture(scope="module")
def lab_cmp(lab):
    """The lab CMP server with explicit confirmation (ir -> ip -> certConf -> pkiConf)."""
    srv = start_cmp_server(lab, "plant", secrets={LAB_REF: LAB_SECRET}, client_cas=(lab.domain("mfg").root_cert,),
                           grant_implicit_confirm=False)
    yield srv
    srv.stop()


# ---- independent checks ------------------------------------------------------------------------------
def openssl_verify(tmp_path: Path, cert: x509.Certificate, root: x509.Certificate, untrusted=(),
                   purpose: str | None = "sslclient", strict: bool = True) -> None:
    """``openssl verify`` (an independent implementation) must accept the certificate against the root."""
    pem = serialization.Encoding.PEM
    d = tmp_path / f"verify-{cert.serial_number:x}"
    d.mkdir()
    (d / "root.pem").write_bytes(root.public_bytes(pem))
    (d / "cert.pem").write_bytes(cert.public_bytes(pem))
    # -x509_strict only for the lab CA's certificates: the mock server's test PKI omits AKI on purpose-free certs
    args = ["openssl", "verify", "-CAfile", str(d / "root.pem")] + (["-x509_strict"] if strict else [])
    if purpose:
        args += ["-purpose", purpose]
    if untrusted:
        (d / "chain.pem").write_bytes(b"".join(c.public_bytes(pem) for c in untrusted))
        args += ["-untrusted", str(d / "chain.pem")]
    r = subprocess.run(args + [str(d / "cert.pem")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith(": OK"), r.stdout + r.stderr


def assert_key_is_backends(hw: Hw, cert: x509.Certificate, uri: str) -> None:
    """The certificate certifies the key the peer holds, and that key (signing in the backend) matches it."""
    assert uri.partition(":")[0] == {"soft": "file", "tpm": "tpm", "pkcs11": "pkcs11"}[hw.backend]
    assert cert.public_key() == hw.peer_public_key(uri)
    key = hw.ks.private_key(uri)
    challenge = b"proof of possession " + uri.encode()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        cert.public_key().verify(key.sign(challenge, ec.ECDSA(hashes.SHA256())), challenge, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        cert.public_key().verify(key.sign(challenge, padding.PKCS1v15(), hashes.SHA256()), challenge,
                                 padding.PKCS1v15(), hashes.SHA256())


def assert_stored_in_backend_then_delete(hw: Hw, ks, cert: x509.Certificate, name: str = "ldevid") -> None:
    """``name`` holds ``cert`` with no pending key left, its key is the backend's (``assert_key_is_backends``), and
    deleting the credential removes the key from the backend."""
    cred = ks.get(name)
    assert cred.certificate == cert and ks.pending_keys() == []
    probe = Hw(hw.backend, ks, hw.options, hw.peer)
    assert_key_is_backends(probe, cert, cred.key_uri)
    ks.delete(name)
    assert not probe.key_exists(cred.key_uri)


# ---- CMP against OpenSSL's mock server ----------------------------------------------------------------
class NetnsLoop:
    """An event loop on a thread inside the mock server's network namespace.

    Only the HTTP exchange runs there (the production ``HttpTransport``); the lifecycle, keystore and key backends
    stay in the test's namespace, where swtpm listens (signing from a thread inside the namespace failed with a
    TCTI I/O error even though the TPM connection had been opened outside it).
    """

    def __init__(self, pid: int):
        import threading

        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.error: BaseException | None = None

        def run():
            try:
                O._setns(pid)
            except BaseException as e:  # reported by the caller
                self.error = e
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True, name=f"netns-loop-{pid}")
        self.thread.start()
        ready.wait(10)
        if self.error is not None:
            raise self.error

    async def call(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def recording_client(srv, anchors, netns: NetnsLoop):
    """A CmpClient whose messages go over the real HTTP transport (in the mock server's namespace); it records
    the body type of every request it sends."""
    sent: list[str] = []
    http = HttpTransport(srv.url, timeout_s=10, retries=0)

    async def fwd(der):
        sent.append(A.der_decode(der, A.PKIMessage())["body"].getName())
        return await netns.call(http.exchange(der))

    return CmpClient(CallableTransport(fwd), trust_anchors=tuple(anchors)), http, sent


def test_cmp_openssl_mock_server(hw, tmp_path):
    O.require_tools()
    ks = hw.ks
    pki = O.make_pki(tmp_path / "pki")
    # The mock server answers every request with one fixed certificate: make it (and the IDevID) for keys that
    # were generated in the backend under test, as a CA would certify them.
    uri = ks.generate_key("p256", backend=hw.backend, label="ldevid-cmp")
    idev_uri = ks.generate_key("p256", backend=hw.backend, label="idevid")
    device_cert = O._cert(O._name("device-0001"), ks.public_key(uri), pki.root.subject, pki.root_key,
                          eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    idevid_cert = O._cert(O._name("device-0001 IDevID"), ks.public_key(idev_uri), pki.idevid_ca.subject,
                          pki.idevid_ca_key, days=3650)
    O._write_cert(tmp_path / "pki" / "device_cert.pem", device_cert)
    ks.import_idevid("idevid", idevid_cert, [pki.idevid_ca], key_uri=idev_uri, source="factory")
    ks.add_trust_anchors("cmp", [pki.root], source="test")
    mac = ClientAuth(reference=O.REF.encode(), secret=O.SECRET.encode())

    with O.MockServer(pki, signed=True) as srv:
        netns = NetnsLoop(srv.pid)

        async def flow():
            client, http, sent = recording_client(srv, [pki.root], netns)
            try:
                # ir (MAC) + certConf, POP signed in the backend
                cred = await lifecycle.enroll(ks, client, name="ldevid-cmp", domain="cmp", subject=SUBJECT,
                                              key=lifecycle.KeySpec(key_uri=uri), auth=mac)
                steps = {"ir": list(sent)}
                # zero-touch ir: the message signature is made by the IDevID key in the backend
                sent.clear()
                idev = ks.get("idevid")
                r = await client.enroll(
                    CertRequest(SUBJECT, ks.private_key(uri)),
                    ClientAuth(certificate=idev.certificate, private_key=ks.private_key(idev_uri), chain=idev.chain))
                steps["ir-idevid"] = (list(sent), r.info["protection"], r.certificate == device_cert)
                # kur signed with the current (backend-held) key; same key, since the mock's answer is fixed
                sent.clear()
                renewed = await lifecycle.renew(ks, "ldevid-cmp", client=client, rekey=False)
                steps["kur"] = list(sent)
                # a rekey: the mock server returns the old certificate, which our client must reject
                sent.clear()
                keys_before = {k["uri"] for k in ks.pending_keys()}
                try:
                    await lifecycle.renew(ks, "ldevid-cmp", client=client, rekey=True)
                except KeyMismatchError as e:
                    steps["rekey-error"] = str(e)
                steps["rekey"] = list(sent)
                steps["pending-after-rekey"] = {k["uri"] for k in ks.pending_keys()} - keys_before
                # rr signed with the current key
                sent.clear()
                await lifecycle.revoke(ks, "ldevid-cmp", client=client, reason="superseded")
                steps["rr"] = list(sent)
                return cred, renewed, steps
            finally:
                await netns.call(http.aclose())

        try:
            cred, renewed, steps = asyncio.run(flow())
        finally:
            netns.close()
        log = srv.log()

    assert steps["ir"] == ["ir", "certConf"], log
    assert steps["ir-idevid"] == (["ir", "certConf"], "signature", True), log
    assert steps["kur"] == ["kur", "certConf"], log
    assert "public key mismatch" in steps["rekey-error"] and steps["rekey"] == ["kur", "certConf"]
    assert steps["pending-after-rekey"] == set()
    assert steps["rr"] == ["rr"], log
    assert cred.key_uri == uri and cred.certificate == device_cert and renewed.key_uri == uri
    assert ks.get("ldevid-cmp").version == renewed.version  # the rejected rekey stored nothing
    assert ks.get("ldevid-cmp").record["meta"].get("revoked") == "superseded"
    openssl_verify(tmp_path, cred.certificate, pki.root, strict=False)
    openssl_verify(tmp_path, idevid_cert, pki.idevid_ca, purpose=None, strict=False)
    assert_key_is_backends(hw, cred.certificate, uri)
    assert_key_is_backends(hw, idevid_cert, idev_uri)
    # Only the two keys we made exist: the rejected rekey's key was destroyed on the peer.
    assert sorted(r["uri"] for r in ks._table("keys").all()) == sorted([uri, idev_uri])
    ks.delete("ldevid-cmp")
    assert not hw.key_exists(uri)
    ks.delete("idevid", force=True)
    assert not hw.key_exists(idev_uri)


# ---- CMP against the lab CMP server: the whole lifecycle -----------------------------------------------
@pytest.mark.parametrize("key_type", ["p256", "rsa2048"])
def test_cmp_lab_server_lifecycle(hw, lab, lab_cmp, tmp_path, key_type):
    ks = hw.ks
    dom = lab.domain("plant")
    ks.add_trust_anchors("plant", [dom.root_cert], source="test")
    opts = EnrollOptions(server=lab_cmp.url, trust_anchors=(dom.root_cert,), timeout_s=10)
    mac = ClientAuth(reference=LAB_REF, secret=LAB_SECRET)
    before = len(lab_cmp.core.requests)

    async def flow():
        client = cmp_client(opts)
        try:
            ldevid = await lifecycle.enroll(
                ks, client, name="ldevid-plant", domain="plant", subject=parse_subject(f"CN=dev-{hw.backend}"),
                sans=[parse_san("dns:dev.plant.example")], key=lifecycle.KeySpec(key_type, hw.backend), auth=mac)
            app = await lifecycle.request(ks, client, name="opcua", domain="plant", subject=parse_subject("CN=opc"),
                                          key=lifecycle.KeySpec(key_type, hw.backend))
            renewed = await lifecycle.renew(ks, "ldevid-plant", client=client, rekey=True)
            await lifecycle.revoke(ks, "opcua", client=client, reason="cessationOfOperation")
            return ldevid, app, renewed
        finally:
            await client.aclose()

    ldevid, app, renewed = asyncio.run(flow())
    assert lab_cmp.core.requests[before:] == ["ir", "certConf", "cr", "certConf", "kur", "certConf", "rr"]
    for cred in (ldevid, app, renewed):
        assert cred.key_type == key_type
        assert lab.issued("plant", cred.certificate.serial_number) == cred.certificate
        openssl_verify(tmp_path, cred.certificate, dom.root_cert, [dom.ca_cert])
        if cred is not ldevid:  # the superseded LDevID key was destroyed once the renewal was live
            assert_key_is_backends(hw, cred.certificate, cred.key_uri)
    assert renewed.version == 2 and renewed.key_uri != ldevid.key_uri
    assert renewed.certificate.subject == ldevid.certificate.subject
    assert not hw.key_exists(ldevid.key_uri), "rekey: the old key must be gone from the peer"
    assert lab.is_revoked(app.certificate.serial_number)
    assert not lab.is_revoked(renewed.certificate.serial_number)
    assert ks.pending_keys() == [] and ks.check() == []
    for name, uri in (("opcua", app.key_uri), ("ldevid-plant", renewed.key_uri)):
        assert hw.key_exists(uri)
        ks.delete(name)
        assert not hw.key_exists(uri), f"delete {name}: the key must be gone from the peer"


# ---- EST against the lab EST server -----------------------------------------------------------------------
def test_est_enroll_and_reenroll(hw, est_lab, est_server, tmp_path):  # noqa: F811
    from enroll_clients.est import client_from_options as est_client

    ks = hw.ks
    dom = est_lab.domain("plant")
    ks.add_trust_anchors("plant", [dom.root_cert], source="test")
    opts = EnrollOptions(server=est_server.url, trust_anchors=(dom.root_cert,), timeout_s=10)

    async def enroll():
        return await lifecycle.enroll(ks, est_client(opts), name="ldevid-est", domain="plant",
                                      subject=parse_subject(f"CN=est-{hw.backend}"),
                                      key=lifecycle.KeySpec("p256", hw.backend),
                                      auth=ClientAuth(username=EST_USER, password=EST_PASSWORD))

    async def renew():
        return await lifecycle.renew(ks, "ldevid-est", client=est_client(opts), rekey=True)

    cred = asyncio.run(enroll())
    openssl_verify(tmp_path, cred.certificate, dom.root_cert, [dom.ca_cert])
    assert_key_is_backends(hw, cred.certificate, cred.key_uri)
    if not hw.hardware:
        renewed = asyncio.run(renew())
        assert renewed.version == 2 and renewed.key_uri != cred.key_uri
        assert ("POST", "/.well-known/est/simplereenroll") in est_server.requests
        openssl_verify(tmp_path, renewed.certificate, dom.root_cert, [dom.ca_cert])
        assert_key_is_backends(hw, renewed.certificate, renewed.key_uri)
        assert not hw.key_exists(cred.key_uri)
        return
    # TLS client authentication with a TPM/PKCS#11 key is a documented limitation (docs/hardware-keys.md).
    files = {k: v for k, v in snapshot(ks.root).items() if k not in ("keystore.json", "audit.log")}
    keys = sorted(r["uri"] for r in ks._table("keys").all())
    with pytest.raises(EnrollError, match=r"non-exportable \(TPM/PKCS#11\) key is not supported"):
        asyncio.run(renew())
    assert {k: v for k, v in snapshot(ks.root).items() if k not in ("keystore.json", "audit.log")} == files
    assert sorted(r["uri"] for r in ks._table("keys").all()) == keys, "the pending rekey key must be discarded"
    after = ks.get("ldevid-est")
    assert after.version == 1 and after.certificate == cred.certificate and after.key_uri == cred.key_uri
    assert HW_TLS_LIMITATION in after.record["meta"]["last_error"]
    assert ks.pending_keys() == []
    assert hw.key_exists(cred.key_uri)  # the live credential's key is untouched
    ks.delete("ldevid-est")
    assert not hw.key_exists(cred.key_uri)


# ---- CoAP /csr + /verify through the device service ---------------------------------------------------------
def test_coap_csr_verify(hw, lab, tmp_path):
    from coap_services import codec
    from cryptography.hazmat.primitives.serialization import pkcs7

    from tests.peers.coap import DeviceEnv, DeviceThread, coap_call, device_env

    base = device_env(tmp_path / "coap", lab)

    class Env(DeviceEnv):  # the device service's keystore with this backend's options
        def keystore(self):
            return Keystore.open(self.state, backend_options=hw.options)

    env = Env(base.device_id, base.state, base.clm_dir)
    dom = lab.domain("plant")

    async def flow(dev):
        csr, _, _, _ = await dev.csr(codec.CsrRequest(subject="CN=coap-dev", san=("dns:coap-dev.plant",)))
        assert csr.is_signature_valid
        cert = lab.issue_from_csr("plant", csr)
        der = pkcs7.serialize_certificates([cert, dom.ca_cert], serialization.Encoding.DER)
        answer, _, _ = await dev.verify(der, codec.CF_PKCS7_CERTS)
        return csr, cert, answer

    with DeviceThread(env, key_backend=hw.backend) as dev:
        csr, cert, answer = coap_call(dev.uri, "oscore", env.context)(flow)
    assert answer["stored"] == "ldevid"
    ks = env.keystore()
    try:
        assert csr.public_key() == cert.public_key()
        openssl_verify(tmp_path, cert, dom.root_cert, [dom.ca_cert])
        assert_stored_in_backend_then_delete(hw, ks, cert)
    finally:
        ks.close()


# ---- bad input through the devagent command ------------------------------------------------------------------
def devagent(state: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real ``devagent`` entry point in a child process (PKCS#11 login state and SoftHSM2's configuration are
    per process, so an in-process run could reuse this process's login and never check the PIN)."""
    import os
    import sys

    e = {k: v for k, v in os.environ.items() if not k.startswith(("DEVAGENT_TPM_", "DEVAGENT_PKCS11_"))}
    e.update(env or {})
    config = state.parent / "agent.toml"  # empty: no site configuration or board profile leaks into the test
    config.touch()
    e["DEVAGENT_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "agent.cli", "--state-dir", str(state), *args], env=e,
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])


@pytest.fixture
def cli_state(tmp_path, lab):
    state = tmp_path / "state"
    root = tmp_path / "root.pem"
    root.write_bytes(lab.domain("plant").root_cert.public_bytes(serialization.Encoding.PEM))
    for args in (("keystore", "init"), ("keystore", "trust", "--domain", "plant", "--add", str(root))):
        r = devagent(state, *args)
        assert r.returncode == 0, r.stderr
    return state


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _enroll_args(backend: str) -> list[str]:
    # The server is never reached: the key is generated (and fails) before the first request is sent.
    return ["enroll", "--protocol", "cmp", "--server", f"http://127.0.0.1:{_closed_port()}/pkix/", "--domain",
            "plant", "--ref", "r", "--secret", "pass:s", "--subject", "CN=bad", "--key-backend", backend]


@pytest.mark.parametrize("case", ["tpm-down", "tcti-unknown", "tcti-no-device"])
def test_cli_tpm_unreachable(cli_state, case):
    tcti = {"tpm-down": f"swtpm:host=127.0.0.1,port={_closed_port()}", "tcti-unknown": "nosuchtcti:x",
            "tcti-no-device": "device:/dev/nonexistent-tpm"}[case]
    before = snapshot(cli_state)
    r = devagent(cli_state, *_enroll_args("tpm"), env={"DEVAGENT_TPM_TCTI": tcti})
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stderr.startswith("devagent: keystore error: TPM not reachable via TCTI"), r.stderr
    assert repr(tcti) in r.stderr
    if case == "tcti-unknown":
        assert "unknown TCTI name" in r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(cli_state) == before


def test_cli_tpm_handle_not_found(cli_state, swtpm, lab, tmp_path):  # noqa: F811
    mfg = lab.domain("mfg")
    cert = lab.issue("mfg", ec.generate_private_key(ec.SECP256R1()).public_key(), parse_subject("CN=x"))
    pem = tmp_path / "idevid.pem"
    pem.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, mfg.ca_cert, mfg.root_cert)))
    assert 0x81020099 not in swtpm.persistent_handles()
    before = snapshot(cli_state)
    r = devagent(cli_state, "keystore", "import-idevid", "idevid", "--key-uri", "tpm:handle/0x81020099",
                 "--cert", str(pem), env={"DEVAGENT_TPM_TCTI": swtpm.tcti})
    assert r.returncode == 3, r.stdout + r.stderr
    assert "no TPM key at persistent handle 0x81020099" in r.stderr and swtpm.tcti in r.stderr, r.stderr
    assert snapshot(cli_state) == before


@pytest.mark.parametrize("case", ["wrong-pin", "token-missing", "pin-unset", "module-missing"])
def test_cli_pkcs11_bad_input(cli_state, softhsm, case):  # noqa: F811
    env = {"DEVAGENT_PKCS11_MODULE": softhsm.module, "DEVAGENT_PKCS11_TOKEN_LABEL": softhsm.label,
           "DEVAGENT_PKCS11_PIN": "env:HW_TEST_PIN", "HW_TEST_PIN": softhsm.pin}
    expect = {"wrong-pin": f"wrong PIN for PKCS#11 token {softhsm.label!r}",
              "token-missing": f"no PKCS#11 token labelled 'no-such-token' in module {softhsm.module} "
                               f"(tokens present: {softhsm.label!r}",
              "pin-unset": "HW_TEST_PIN",
              "module-missing": "PKCS#11 module /nonexistent/libp11.so does not exist"}[case]
    if case == "wrong-pin":
        env["HW_TEST_PIN"] = "999999"
    elif case == "token-missing":
        env["DEVAGENT_PKCS11_TOKEN_LABEL"] = "no-such-token"
    elif case == "pin-unset":
        del env["HW_TEST_PIN"]
    else:
        env["DEVAGENT_PKCS11_MODULE"] = "/nonexistent/libp11.so"
    before, objects = snapshot(cli_state), softhsm.objects()
    r = devagent(cli_state, *_enroll_args("pkcs11"), env=env)
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stderr.startswith("devagent: keystore error: ") and expect in r.stderr, r.stderr
    assert "999999" not in r.stderr + r.stdout  # the PIN is never echoed
    assert "Traceback" not in r.stderr
    assert snapshot(cli_state) == before and softhsm.objects() == objects


def test_cli_enroll_with_hardware_key_succeeds(cli_state, hw, lab, lab_cmp):
    """The positive control for the bad-input cases above: the same command line, with the right settings."""
    env = {"soft": {}, "tpm": {"DEVAGENT_TPM_TCTI": getattr(hw.peer, "tcti", "")},
           "pkcs11": {"DEVAGENT_PKCS11_MODULE": getattr(hw.peer, "module", ""),
                      "DEVAGENT_PKCS11_TOKEN_LABEL": getattr(hw.peer, "label", ""),
                      "DEVAGENT_PKCS11_PIN": "env:DEVAGENT_TEST_PKCS11_PIN"}}[hw.backend]
    r = devagent(cli_state, "--json", "enroll", "--protocol", "cmp", "--server", lab_cmp.url, "--domain", "plant",
                 "--ref", LAB_REF.decode(), "--secret", f"pass:{LAB_SECRET.decode()}", "--subject", "CN=cli-hw",
                 "--key-backend", hw.backend, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    ks = Keystore.open(cli_state, backend_options=hw.options)
    try:
        cred = ks.get("ldevid-plant")
        probe = Hw(hw.backend, ks, hw.options, hw.peer)
        assert_key_is_backends(probe, cred.certificate, cred.key_uri)
        ks.delete("ldevid-plant")
        assert not probe.key_exists(cred.key_uri)
    finally:
        ks.close()


@pytest.mark.parametrize("backend", ["tpm", "mpy"])
def test_cli_enroll_key_backend_from_config(cli_state, tpm_options, swtpm, lab, lab_cmp, backend):  # noqa: F811
    """Without --key-backend, ``devagent enroll`` generates the key where ``key.backend`` of the effective
    configuration says (here DEVAGENT_KEY_BACKEND; a board profile such as cm4-tpm the same way): tpm -> the key is
    in the TPM. ``mpy`` (the MicroPython boards' profiles) is refused naming the key and its source, nothing
    stored. (It used to generate a software key whatever the configuration said.)"""
    env = {"DEVAGENT_KEY_BACKEND": backend, "DEVAGENT_KEY_TCTI": swtpm.tcti}
    before = snapshot(cli_state)
    r = devagent(cli_state, "--json", "enroll", "--protocol", "cmp", "--server", lab_cmp.url, "--domain", "plant",
                 "--ref", LAB_REF.decode(), "--secret", f"pass:{LAB_SECRET.decode()}", "--subject", "CN=cfg-hw",
                 env=env)
    if backend == "mpy":
        assert r.returncode == 7, r.stdout + r.stderr
        assert "key.backend = 'mpy' (from environment DEVAGENT_KEY_BACKEND)" in r.stderr, r.stderr
        assert "--key-backend" in r.stderr and "Traceback" not in r.stderr
        assert snapshot(cli_state) == before
        return
    assert r.returncode == 0, r.stdout + r.stderr
    ks = Keystore.open(cli_state, backend_options={"tpm": tpm_options})
    try:
        cred = ks.get("ldevid-plant")
        assert cred.key_uri.startswith("tpm:"), cred.key_uri
        assert cred.certificate.public_key() == ks.public_key(cred.key_uri)
        ks.delete("ldevid-plant")
    finally:
        ks.close()


@pytest.mark.parametrize("case", ["config", "option-wins", "invalid"])
def test_cli_enroll_key_algorithm_from_config(cli_state, lab, lab_cmp, case):
    """Without --key-type, ``devagent enroll`` generates a key of the type ``key.algorithm`` of the effective
    configuration says (here agent.toml ``[key] algorithm = "p384"``); --key-type still wins; a value that is no key
    type is refused naming the config file and the key (exit 7, as every configuration error), nothing stored. (It
    used to generate P-256 whatever the configuration said.)"""
    config = cli_state.parent / "agent.toml"  # the file devagent() points DEVAGENT_CONFIG at
    config.write_text(f'[key]\nalgorithm = "{"p999" if case == "invalid" else "p384"}"\n')
    before = snapshot(cli_state)
    r = devagent(cli_state, "--json", "enroll", "--protocol", "cmp", "--server", lab_cmp.url, "--domain", "plant",
                 "--ref", LAB_REF.decode(), "--secret", f"pass:{LAB_SECRET.decode()}", "--subject", "CN=cfg-alg",
                 *(("--key-type", "p256") if case == "option-wins" else ()))
    if case == "invalid":
        assert r.returncode == 7, r.stdout + r.stderr
        assert f"{config}: [key]: key.algorithm = 'p999': must be one of p256, p384" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert snapshot(cli_state) == before
        return
    assert r.returncode == 0, r.stdout + r.stderr
    ks = Keystore.open(cli_state)
    try:
        cred = ks.get("ldevid-plant")
        assert cred.key_type == ("p256" if case == "option-wins" else "p384"), cred.key_type
        key = cred.certificate.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert key.curve.name == ("secp256r1" if case == "option-wins" else "secp384r1")
        assert key == ks.public_key(cred.key_uri)
    finally:
        ks.close()


def _serve_delegated_enrollment(env, lab, subject: str, *serve_args):
    """One delegated enrollment against a ``devagent serve`` subprocess (OSCORE, domain "plant", the lab CA):
    /csr for ``subject``, the lab CA issues, /verify stores it as ``ldevid``; the server exits 0. -> (csr, cert)."""
    from coap_services import codec
    from cryptography.hazmat.primitives.serialization import pkcs7

    from tests.peers.coap import coap_call, serve_process

    dom = lab.domain("plant")

    async def flow(dev):
        csr, _, _, _ = await dev.csr(codec.CsrRequest(subject=subject))
        cert = lab.issue_from_csr("plant", csr)
        der = pkcs7.serialize_certificates([cert, dom.ca_cert], serialization.Encoding.DER)
        answer, _, _ = await dev.verify(der, codec.CF_PKCS7_CERTS)
        return csr, cert, answer

    proc = serve_process(env, *serve_args)
    try:
        csr, cert, answer = coap_call(proc.uri, "oscore", env.context)(flow)
    finally:
        rc = proc.stop()
    assert rc == 0 and answer["stored"] == "ldevid", proc.log()
    return csr, cert


def test_cli_serve_uses_configured_key_algorithm(lab, tmp_path, monkeypatch):
    """``devagent serve`` (a subprocess) generates the /csr key of a request that names no key type with
    ``key.algorithm`` of the effective configuration (agent.toml ``[key] algorithm = "p384"``, no --key-type), as
    enroll and request do; the CSR and the stored key are P-384. (Its --key-type defaulted to p256.)"""
    from tests.peers.coap import device_env

    for var in list(os.environ):
        if var.startswith("DEVAGENT_KEY_"):
            monkeypatch.delenv(var)
    config = tmp_path / "agent.toml"
    config.write_text('[key]\nalgorithm = "p384"\n')
    monkeypatch.setenv("DEVAGENT_CONFIG", str(config))
    env = device_env(tmp_path / "coap", lab)
    csr, cert = _serve_delegated_enrollment(env, lab, "CN=serve-alg")
    assert csr.public_key().curve.name == "secp384r1"
    ks = Keystore.open(env.state)
    try:
        cred = ks.get("ldevid")
        assert cred.key_type == "p384" and cred.certificate == cert
        assert ks.public_key(cred.key_uri) == cert.public_key()
    finally:
        ks.close()


def test_cli_serve_uses_configured_key_backend(hw, lab, tmp_path, monkeypatch):
    """``devagent serve`` (a subprocess) generates the /csr key with the key backend and its options from the
    effective configuration, as every other command: TPM by the config file's ``[key] backend`` and ``tcti`` (no
    --key-backend); PKCS#11 by ``--key-backend pkcs11`` with the module / token / PIN from ``DEVAGENT_KEY_PKCS11_*``.
    (It used to open its keystore with no options, the default TCTI device:/dev/tpmrm0 and no PKCS#11 module, so
    /csr failed on a configured board; and --key-backend defaulted to soft whatever the configuration said.)"""
    from tests.peers.coap import device_env

    for var in list(os.environ):  # only the [key] configuration may point at the peer
        if var.startswith(("DEVAGENT_TPM_", "DEVAGENT_PKCS11_", "DEVAGENT_KEY_")):
            monkeypatch.delenv(var)
    config = tmp_path / "agent.toml"
    config.write_text(f'[key]\nbackend = "tpm"\ntcti = "{hw.peer.tcti}"\n' if hw.backend == "tpm" else "")
    monkeypatch.setenv("DEVAGENT_CONFIG", str(config))
    if hw.backend == "pkcs11":
        monkeypatch.setenv("DEVAGENT_KEY_PKCS11_MODULE", hw.peer.module)
        monkeypatch.setenv("DEVAGENT_KEY_PKCS11_TOKEN", hw.peer.label)
        monkeypatch.setenv("DEVAGENT_KEY_PKCS11_PIN", hw.options["pkcs11"]["pin"])
    env = device_env(tmp_path / "coap", lab)
    _, cert = _serve_delegated_enrollment(env, lab, "CN=serve-hw",
                                          *(("--key-backend", hw.backend) if hw.backend != "tpm" else ()))
    ks = Keystore.open(env.state, backend_options=hw.options)
    try:
        assert_stored_in_backend_then_delete(hw, ks, cert)
    finally:
        ks.close()


def test_cli_clm_upstream_credential_in_tpm(cli_state, tpm_options, swtpm, lab, lab_cmp, tmp_path):  # noqa: F811
    """``devagent clm enroll --upstream cmp:URL --credential NAME`` (a subprocess): the CLM's own credential, its key
    in the TPM at the configured TCTI (``DEVAGENT_KEY_TCTI``), signs the CMP requests for a device. (The CLM used to
    load that credential from a keystore opened with no backend options: the default TCTI device:/dev/tpmrm0.) With
    the TCTI of no TPM the key cannot be opened: the command ends at start-up naming the credential and the TCTI."""
    from tests.peers.coap import DeviceThread, device_env

    tcti = {"DEVAGENT_KEY_TCTI": swtpm.tcti}
    r = devagent(cli_state, "enroll", "--protocol", "cmp", "--server", lab_cmp.url, "--domain", "plant", "--ref",
                 LAB_REF.decode(), "--secret", f"pass:{LAB_SECRET.decode()}", "--subject", "CN=clm-edge",
                 "--name", "clm-edge", "--key-backend", "tpm", env=tcti)
    assert r.returncode == 0, r.stdout + r.stderr
    root = tmp_path / "root.pem"  # written by cli_state
    env = device_env(tmp_path / "coap", lab)
    with DeviceThread(env) as dev:
        clm = ("clm", "--clm-dir", str(env.clm_dir))
        r = devagent(cli_state, *clm, "add-device", "dev1", "--uri", dev.uri, "--domain", "plant")
        assert r.returncode == 0, r.stdout + r.stderr
        down = f"swtpm:host=127.0.0.1,port={_closed_port()}"  # the same command with the TCTI of no TPM: named
        r = devagent(cli_state, "--json", *clm, "enroll", "dev1", "--upstream", f"cmp:{lab_cmp.url}", "--trust",
                     str(root), "--credential", "clm-edge", "--retries", "1", "--timeout", "20",
                     env={"DEVAGENT_KEY_TCTI": down})
        # The key is opened in the TPM once at start-up: the command ends there (exit 3, before the device is
        # leased), naming the credential, its key URI and the TCTI; it used to fail the device (exit 5).
        assert r.returncode == 3, r.stdout + r.stderr
        edge = Keystore.open(cli_state, backend_options={"tpm": tpm_options})
        uri = edge.get("clm-edge").key_uri
        edge.close()
        assert f"--credential: the key of credential clm-edge (key {uri}) cannot be used: " in r.stderr, r.stderr
        assert f"TPM not reachable via TCTI {down!r}" in r.stderr, r.stderr
        assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert r.stdout == ""  # no device was tried
        assert env.keystore().list() == []  # nothing reached the device's store
        r = devagent(cli_state, "--json", *clm, "enroll", "dev1", "--upstream", f"cmp:{lab_cmp.url}", "--trust",
                     str(root), "--credential", "clm-edge", "--retries", "1", "--timeout", "20", env=tcti)
        assert r.returncode == 0, r.stdout + r.stderr
    ks = env.keystore()
    try:
        cert = ks.get("ldevid").certificate
        cert.verify_directly_issued_by(lab.domain("plant").ca_cert)
        assert cert.public_key() == ks.public_key(ks.get("ldevid").key_uri)
    finally:
        ks.close()
    edge = Keystore.open(cli_state, backend_options={"tpm": tpm_options})
    try:
        assert edge.get("clm-edge").key_uri.startswith("tpm:")
        edge.delete("clm-edge")
    finally:
        edge.close()


@pytest.mark.parametrize("case", ["pkcs11-wrong-pin", "pkcs11-no-token", "soft-key-file-missing", "opcua-soft-missing"])
def test_cli_clm_run_checks_credential_key_at_start(cli_state, softhsm, lab, lab_cmp, tmp_path, case):  # noqa: F811
    """``devagent clm run --credential NAME`` (and ``--opcua-credential NAME``) whose key cannot be used (a PKCS#11
    key with the wrong PIN, its token gone, a software key whose file is missing) ends at start-up with an error
    naming the credential, its key URI and what failed (exit 3, a keystore error), before any device is leased:
    the device's record is unchanged (no lease taken, no failure counted) and nothing reached the device. (The
    key used to be found unusable per device, each device leased, failed and retried in turn.)"""
    from agent.inventory import open_inventory
    from tests.peers.coap import DeviceThread, device_env

    p11 = {"DEVAGENT_KEY_PKCS11_MODULE": softhsm.module, "DEVAGENT_KEY_PKCS11_TOKEN": softhsm.label,
           "DEVAGENT_KEY_PKCS11_PIN": softhsm.options["pin"]}
    opcua = case.startswith("opcua")
    make = ["--key-backend", "pkcs11"] if case.startswith("pkcs11") else []
    r = devagent(cli_state, "enroll", "--protocol", "cmp", "--server", lab_cmp.url, "--domain", "plant", "--ref",
                 LAB_REF.decode(), "--secret", f"pass:{LAB_SECRET.decode()}", "--subject", "CN=clm-edge",
                 "--name", "clm-edge", *(("--san", "uri:urn:plant:clm") if opcua else ()), *make, env=p11)
    assert r.returncode == 0, r.stdout + r.stderr
    ks = Keystore.open(cli_state, backend_options={"pkcs11": softhsm.options})
    uri = ks.get("clm-edge").key_uri
    ks.close()
    env_run = dict(p11)
    if case == "pkcs11-wrong-pin":
        env_run.update(DEVAGENT_KEY_PKCS11_PIN="env:S8_WRONG_PIN", S8_WRONG_PIN="000000")
        what = f"wrong PIN for PKCS#11 token {softhsm.label!r}"
    elif case == "pkcs11-no-token":
        empty = tmp_path / "no-tokens"
        (empty / "tokens").mkdir(parents=True)
        (empty / "softhsm2.conf").write_text(f"directories.tokendir = {empty}/tokens\nobjectstore.backend = file\n")
        env_run["SOFTHSM2_CONF"] = str(empty / "softhsm2.conf")
        what = f"no PKCS#11 token labelled {softhsm.label!r}"
    else:
        key_file = cli_state / uri.partition(":")[2]
        assert key_file.is_file(), uri
        key_file.unlink()
        what = f"is missing ({key_file})"
    root = tmp_path / "root.pem"  # written by cli_state
    env = device_env(tmp_path / "coap", lab)
    try:
        with DeviceThread(env) as dev:
            clm = ("clm", "--clm-dir", str(env.clm_dir))
            r = devagent(cli_state, *clm, "add-device", "dev1", "--uri", dev.uri, "--domain", "plant")
            assert r.returncode == 0, r.stdout + r.stderr
            inv = open_inventory(None, env.clm_dir)
            before = inv.get("dev1")
            inv.close()
            cred_opt = ("--opcua-credential", "clm-edge") if opcua else ("--credential", "clm-edge")
            r = devagent(cli_state, "--json", *clm, "run", "--once", "--upstream", f"cmp:{lab_cmp.url}", "--trust",
                         str(root), *cred_opt, "--retries", "1", "--timeout", "20", env=env_run)
            assert r.returncode == 3, r.stdout + r.stderr
            assert f"credential clm-edge (key {uri})" in r.stderr, r.stderr
            assert what in r.stderr, r.stderr
            assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
            inv = open_inventory(None, env.clm_dir)
            after = inv.get("dev1")
            inv.close()
            assert after == before  # never leased: no lease token taken, no attempt, no failure recorded
            assert env.keystore().list() == [] and env.keystore().pending_keys() == []
    finally:
        ks = Keystore.open(cli_state, backend_options={"pkcs11": softhsm.options})
        try:
            ks.delete("clm-edge", force=True)
        finally:
            ks.close()


# ---- blocking hardware calls stay off the event loop --------------------------------------------------------
def _hardware_lock(hw: Hw):
    """The lock a backend holds around every call into the TPM / token."""
    return hw.ks.backend("tpm")._tpm.lock if hw.backend == "tpm" else hw.ks.backend("pkcs11")._lock


def run_while_hardware_busy(lock, coro_fn):
    """Run ``coro_fn()`` while another thread holds the hardware; the event loop must stay responsive.

    If the coroutine called the TPM/token on the event loop thread, it would block there until the lock is
    released and the loop could not run the probe; the probe's event is the observation (no timing involved:
    the bounded wait only keeps a regression from hanging the suite).
    """
    import threading

    responsive = threading.Event()
    box: dict = {}

    async def main():
        task = asyncio.create_task(coro_fn())
        for _ in range(5):
            await asyncio.sleep(0)
        responsive.set()  # reached only if the task yielded instead of blocking the loop
        return await task

    def target():
        try:
            box["result"] = asyncio.run(main())
        except BaseException as e:  # handed to the test
            box["error"] = e

    lock.acquire()
    t = threading.Thread(target=target, daemon=True, name="loop-under-test")
    t.start()
    try:
        ok = responsive.wait(30)
    finally:
        lock.release()
    t.join(60)
    assert ok, "a blocking TPM/PKCS#11 call ran on the event loop thread"
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.mark.parametrize("hw", ["tpm", "pkcs11"], indirect=True)
def test_hardware_calls_do_not_block_the_event_loop(hw, lab, lab_cmp):
    ks = hw.ks
    dom = lab.domain("plant")
    ks.add_trust_anchors("plant", [dom.root_cert], source="test")
    opts = EnrollOptions(server=lab_cmp.url, trust_anchors=(dom.root_cert,), timeout_s=10)
    lock = _hardware_lock(hw)

    async def enroll():  # key generation + CSR/POP signature in the backend
        client = cmp_client(opts)
        try:
            return await lifecycle.enroll(ks, client, name="ldevid-plant", domain="plant", subject=SUBJECT,
                                          key=lifecycle.KeySpec("p256", hw.backend),
                                          auth=ClientAuth(reference=LAB_REF, secret=LAB_SECRET))
        finally:
            await client.aclose()

    cred = run_while_hardware_busy(lock, enroll)
    assert_key_is_backends(hw, cred.certificate, cred.key_uri)
    auth = lifecycle.auth_for(ks, cred)  # loaded now: below, the first hardware call is the rr signature

    async def revoke():  # CMP signature protection by the hardware key
        client = cmp_client(opts)
        try:
            await lifecycle.revoke(ks, "ldevid-plant", client=client, reason="superseded", auth=auth)
        finally:
            await client.aclose()

    run_while_hardware_busy(lock, revoke)
    assert lab.is_revoked(cred.certificate.serial_number)
