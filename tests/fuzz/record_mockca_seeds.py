"""One-off recorder of the Siemens MockCA's part of the CMP seed corpus (context 1 of ``tests/fuzz/cmp_target.py``).

    .venv/bin/python -m tests.fuzz.record_mockca_seeds   # rewrites corpus/cmp_*/mockca-* and cmp.context-mockca/

Starts the Siemens cmp-test-suite MockCA (``tests/peers/mockca.py``: its venv is built once into
~/.cache/devagent-peers) on 127.0.0.1 and runs devagent's real ``CmpClient`` against it over HTTP through a
transport that records every request and response:

- ir with PasswordBasedMac (implicit and explicit confirmation: ip, then certConf -> pkiConf), ir with PBMAC1
  (the MockCA answers with PBKDF2-SHA512, 262144 iterations), ir signed with a manufacturer IDevID (whose CA is
  one of the MockCA's trust anchors), cr signed with the LDevID, p10cr with the NULL-DN MAC sender, kur signed
  with the LDevID for a new key, genm caCerts / certReqTemplate / rootCaCert, an unprotected genm (the genp
  then has no extraCerts), rr signed with the LDevID;
- refusals: an ir with the wrong MAC secret, a kur for the same key (the MockCA refuses it), an unprotected ir.

The client runs with the switches this server needs (``tests/interop/test_cmp_mockca.py``): tolerate-nonce-reuse,
ignore-keyusage, trusted-signer-fallback. Written:

- ``corpus/cmp_accept/mockca-<flow>-<n>.der``: selector (context 1, binding i) + the n-th response of a flow; the
  binding (transactionID and senderNonce of the request it answered) is ``bindings[i]`` in context.json;
- ``corpus/cmp_client/mockca-<flow>.bin``: selector (context 1, operation) + the framed responses of the flow
  (PBMAC1 flows are left out: each client transaction would derive its 262144-iteration key afresh, ~0.5 s;
  PBMAC1 is fuzzed in ``cmp_accept``, whose derived keys are shared between inputs);
- ``corpus/cmp.context-mockca/``: context.json (secret, reference, recorded_at, bindings, switches), the MockCA's
  root (CMP trust anchor) and its TEST-ONLY signing key (``data/keys/private-key-ed25519.pem`` of the public
  cmp-test-suite sources), the device's TEST-ONLY keys, the LDevID the MockCA issued and the IDevID.

The fuzz targets never run this; record again only to refresh the corpus (e.g. after a MockCA update).
"""
from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enroll_clients.cmp.transport import Transport

HERE = Path(__file__).resolve().parent
CONTEXT = HERE / "corpus" / "cmp.context-mockca"
CN = "devagent-fuzz-device"
MOCKCA_KEY_PASSWORD = b"11111"  # cmp-test-suite resources/keyutils.load_private_key_from_file's default


class Recorder(Transport):
    """Passes each message to ``inner`` and keeps (request, response) under the current flow's name."""

    def __init__(self, inner: Transport):
        self.inner = inner
        self.flow = ""
        self.log: list[tuple[str, bytes, bytes]] = []

    async def exchange(self, request: bytes, *, operation: str | None = None) -> bytes:
        rsp = await self.inner.exchange(request, operation=operation)
        self.log.append((self.flow, request, rsp))
        return rsp

    def describe(self) -> str:
        return self.inner.describe()


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(*certs) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def main() -> int:
    from enroll_clients.base import CertRequest, ClientAuth, EnrollError
    from enroll_clients.cmp import CmpClient, HttpTransport
    from enroll_clients.cmp import asn1 as A
    from keystore.csr import build_csr
    from tests.fuzz.cmp_target import OPS, selector
    from tests.fuzz.record_cmp_seeds import frames, recorded_at
    from tests.peers import mockca as MC
    from tests.peers import openssl_cmp as O

    work = Path(tempfile.mkdtemp(prefix="mockca-seeds-"))
    try:
        pki = O.make_pki(work / "pki")  # only its manufacturer IDevID CA and IDevID are used
        ca = MC.MockCA(work, allow_same_key=True, trust_anchors=(pki.idevid_ca,)).start()
        try:
            ca_key = serialization.load_pem_private_key(
                (ca.src / "data" / "keys" / "private-key-ed25519.pem").read_bytes(),
                MOCKCA_KEY_PASSWORD)
            if ca_key.public_key().public_bytes_raw() != ca.root.public_key().public_bytes_raw():
                raise SystemExit("the MockCA's data/keys/private-key-ed25519.pem is not its root's key")
            rec = Recorder(HttpTransport(ca.url, retries=0))
            recipient = x509.Name.from_rfc4514_string(MC.RECIPIENT)
            switches = dict(tolerate_nonce_reuse=True, ignore_keyusage=True, trusted_signer_fallback=True)

            def client(**kw):
                return CmpClient(rec, trust_anchors=(ca.root,), recipient=recipient, **switches, **kw)

            def run(flow, coro, refused=False):
                rec.flow = flow
                try:
                    r = asyncio.run(coro)
                except EnrollError as e:
                    if not refused:
                        raise
                    print(f"{flow}: refused as expected: {str(e)[:100]}", file=sys.stderr)
                    return None
                if refused:
                    raise SystemExit(f"{flow}: expected a refusal")
                print(f"{flow}: ok", file=sys.stderr)
                return r

            key = ec.generate_private_key(ec.SECP256R1())
            new_key = ec.generate_private_key(ec.SECP256R1())
            subject = x509.Name.from_rfc4514_string(f"CN={CN}")
            secret = MC.SECRET.encode()
            mac = ClientAuth(reference=CN.encode(), secret=secret)
            null_dn = ClientAuth(reference=b"NULL-DN", secret=secret)
            req = CertRequest(subject=subject, private_key=key)
            ldevid = run("ir-pbm", client(implicit_confirm=True).enroll(req, mac)).certificate
            run("ir-pbm-certconf", client().enroll(req, mac))
            run("ir-pbmac1", client(implicit_confirm=True, mac="pbmac1").enroll(req, mac))
            idev = ClientAuth(certificate=pki.idevid, private_key=pki.idevid_key, chain=(pki.idevid_ca,))
            run("ir-idevid", client(implicit_confirm=True).enroll(req, idev))
            sig = ClientAuth(certificate=ldevid, private_key=key, chain=(ca.root,))
            app = run("cr-sig", client(implicit_confirm=True).request(req, sig)).certificate
            run("p10cr-null-dn", client(implicit_confirm=True, mac_sender="null-dn").enroll(
                CertRequest(subject=subject, csr=build_csr(key, subject, [])), null_dn))
            run("kur-sig", client(implicit_confirm=True).renew(CertRequest(subject=subject, private_key=new_key), sig))
            run("genm-cacerts", client(mac_sender="null-dn").ca_certs(null_dn))
            run("genm-template", client(mac_sender="null-dn").cert_req_template(null_dn))
            run("genm-rootca", client(mac_sender="null-dn").ca_certs(null_dn, old_root=ca.root))
            run("genm-unprotected", client().ca_certs(None))
            # the LDevID was updated by the kur (the MockCA counts it as revoked): revoke the cr's certificate
            run("rr-sig", client().revoke(app, ClientAuth(certificate=app, private_key=key, chain=(ca.root,)),
                                          "superseded"))
            run("ir-wrong-secret", client(implicit_confirm=True).enroll(
                req, ClientAuth(reference=CN.encode(), secret=b"not the secret")), refused=True)
            run("kur-same-key", client(implicit_confirm=True).renew(req, sig), refused=True)
            run("ir-unprotected", client(implicit_confirm=True, unprotected_requests=True).enroll(req, mac),
                refused=True)
        finally:
            ca.stop()
        log = rec.log
        when = recorded_at([r for _, _, r in log])

        accept_dir, client_dir = HERE / "corpus" / "cmp_accept", HERE / "corpus" / "cmp_client"
        for d in (accept_dir, client_dir):
            d.mkdir(parents=True, exist_ok=True)
            for p in d.glob("mockca-*"):
                p.unlink()
        bindings, by_flow = [], {}
        for flow, request, rsp in log:
            h = A.der_decode(request, A.PKIMessage())["header"]
            n = len(by_flow.setdefault(flow, []))
            by_flow[flow].append(rsp)
            name = f"mockca-{flow}-{n}"
            bindings.append({"seed": name, "transaction_id": bytes(h["transactionID"]).hex(),
                             "sender_nonce": bytes(h["senderNonce"]).hex()})
            (accept_dir / f"{name}.der").write_bytes(bytes([selector(1, len(bindings) - 1)]) + rsp)
        ops = {"ir-pbm": "ir", "ir-pbm-certconf": "ir", "ir-idevid": "ir-idevid", "cr-sig": "cr",
               "p10cr-null-dn": "p10cr", "kur-sig": "kur", "genm-cacerts": "genm", "genm-template": "template",
               "genm-rootca": "genm-root", "rr-sig": "rr", "ir-wrong-secret": "ir", "kur-same-key": "kur"}
        for flow, op in ops.items():
            (client_dir / f"mockca-{flow}.bin").write_bytes(bytes([selector(1, OPS.index(op))])
                                                            + frames(*by_flow[flow]))
        if CONTEXT.exists():
            shutil.rmtree(CONTEXT)
        CONTEXT.mkdir(parents=True)
        (CONTEXT / "root.pem").write_bytes(_pem(ca.root))
        (CONTEXT / "server_key.pem").write_bytes(_pem_key(ca_key))
        (CONTEXT / "device_key.pem").write_bytes(_pem_key(key))
        (CONTEXT / "device_cert.pem").write_bytes(_pem(ldevid))
        (CONTEXT / "device_chain.pem").write_bytes(_pem(ca.root))
        (CONTEXT / "kur_key.pem").write_bytes(_pem_key(new_key))
        (CONTEXT / "idevid.pem").write_bytes(_pem(pki.idevid))
        (CONTEXT / "idevid_key.pem").write_bytes(_pem_key(pki.idevid_key))
        (CONTEXT / "idevid_chain.pem").write_bytes(_pem(pki.idevid_ca))
        (CONTEXT / "context.json").write_text(json.dumps({
            "comment": "TEST-ONLY keys; responses of the Siemens MockCA (cmp-test-suite, shared/peers) to devagent's "
                       "CmpClient, recorded by tests/fuzz/record_mockca_seeds.py",
            "peer": "Siemens cmp-test-suite MockCA",
            "reference": CN, "secret": MC.SECRET, "recorded_at": when,
            "auth": {"cr": "device"},
            "accept": switches,
            "client": dict(switches, recipient=MC.RECIPIENT),
            "bindings": bindings}, indent=1) + "\n")
        print(f"recorded {len(log)} responses in {len(by_flow)} flows at {when}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
