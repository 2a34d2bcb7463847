"""One-off recorder of the CMP seed corpus: real responses of OpenSSL's ``openssl cmp`` mock server.

    .venv/bin/python -m tests.fuzz.record_cmp_seeds          # rewrites tests/fuzz/corpus/cmp_*/ and cmp.context/

devagent's own CMP message code builds each request (MAC- or signature-protected ir, cr, p10cr, kur, genm, rr,
certConf, pollReq) with one fixed transactionID and senderNonce, OpenSSL's socket-less mock server
(``-use_mock_srv``, ``tests/peers/openssl_cmp.py``) answers it, and the answers are stored:

- ``corpus/cmp_accept/<name>.der``: selector byte (context 0, binding 0) + the response DER, for
  ``Transaction.accept`` with that recorded binding (transactionID, senderNonce) -- mutants test the protection
  and binding checks;
- ``corpus/cmp_client/<name>.bin``: selector byte (context 0, operation index in ``cmp_target.OPS``) + the framed
  responses of one client exchange, which the ``cmp_client`` target re-binds to the real client's requests (the
  fuzzer plays a server that holds the keys);
- ``corpus/cmp.context/``: the TEST-ONLY PKI (root, the mock server's signer, the device key the mock server's
  fixed certificate is for) and ``context.json`` (reference, secret, the binding, ``recorded_at``).

The targets run at the clock of the recording (``recorded_at``, the median messageTime of the responses), so the
seeds stay valid after the 30-day test certificates expire. Run it again only to refresh the corpus; the fuzz
targets never run it. The Siemens MockCA's seeds (context 1) come from ``record_mockca_seeds``.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

HERE = Path(__file__).resolve().parent
CONTEXT = HERE / "corpus" / "cmp.context"
TID = bytes.fromhex("f0220000000000000000000000000001")
NONCE = bytes.fromhex("f0220000000000000000000000000002")

def recorded_at(responses) -> str:
    """The median messageTime of the responses (ISO, Z); all of them must lie within 240 s of it, so the
    targets' messageTime check (300 s) passes every seed at that clock."""
    import datetime

    from enroll_clients.cmp import asn1 as A

    headers = [A.der_decode(r, A.PKIMessage())["header"] for r in responses]
    times = sorted(h["messageTime"].asDateTime.astimezone(datetime.timezone.utc) for h in headers
                   if h["messageTime"].isValue)
    mid = times[len(times) // 2]
    if (times[-1] - times[0]).total_seconds() > 240:
        raise SystemExit(f"responses span {times[0]} .. {times[-1]}: record again (needs < 240 s)")
    return mid.strftime("%Y-%m-%dT%H:%M:%SZ")


def frames(*msgs: bytes) -> bytes:
    return b"".join(len(m).to_bytes(3, "big") + m for m in msgs)


def main() -> int:
    from enroll_clients.cmp import asn1 as A
    from enroll_clients.cmp import messages as M
    from keystore.csr import build_csr
    from tests.fuzz.cmp_target import OPS, selector
    from tests.peers import openssl_cmp as O

    op_byte = {op: selector(0, OPS.index(op)) for op in OPS}

    work = Path(tempfile.mkdtemp(prefix="cmp-seeds-"))
    try:
        pki = O.make_pki(work / "pki")
        if CONTEXT.exists():
            shutil.rmtree(CONTEXT)
        CONTEXT.mkdir(parents=True)
        for name in ("root", "server", "device_cert", "device_rsa_cert"):
            shutil.copy(pki.path(f"{name}.pem"), CONTEXT / f"{name}.pem")
        for name in ("server_key", "device_key", "device_rsa_key"):
            shutil.copy(pki.path(f"{name}.pem"), CONTEXT / f"{name}.pem")
        mac = M.Protector(reference=O.REF.encode(), secret=O.SECRET.encode(), mac_iterations=500)
        sig = M.Protector(certificate=pki.device_cert, private_key=pki.device_key)
        subject = pki.device_cert.subject

        def req(pr, body_type, body, **kw):
            return M.encode_message(pr, body_type, body, sender=subject, transaction_id=TID, sender_nonce=NONCE,
                                    general_info=kw.pop("gi", ()), **kw)

        implicit = [(A.id_it_implicitConfirm, A.Null(""))]
        crmf = M.cert_req_messages(M.cert_template(subject, pki.device_key.public_key()), pki.device_key)
        crmf_rsa = M.cert_req_messages(M.cert_template(subject, pki.device_rsa_key.public_key()), pki.device_rsa_key)
        kur = M.cert_req_messages(M.cert_template(subject, pki.device_key.public_key()), pki.device_key,
                                  controls=(M.old_cert_id_control(pki.device_cert),))
        csr = build_csr(pki.device_key, subject, [])
        ip_cert = x509.load_pem_x509_certificate((CONTEXT / "device_cert.pem").read_bytes())
        conf, conf_pvno = M.cert_conf_body(ip_cert, 0)
        cases = [  # name, request, mock-server options, client operation
            ("ir-mac-signed-rsp", req(mac, "ir", crmf, gi=implicit), dict(grant_implicitconf=True), "ir"),
            ("ir-mac-mac-rsp", req(mac, "ir", crmf, gi=implicit), dict(signed=False, grant_implicitconf=True), "ir"),
            ("ir-explicit-confirm", req(mac, "ir", crmf), dict(), "ir"),
            ("ir-rsa", req(mac, "ir", crmf_rsa, gi=implicit), dict(rsa=True, grant_implicitconf=True), None),
            ("ir-sig", req(sig, "ir", crmf, gi=implicit), dict(grant_implicitconf=True), None),
            ("cr-mac", req(mac, "cr", crmf, gi=implicit), dict(signed=False, grant_implicitconf=True), "cr"),
            ("p10cr-mac", req(mac, "p10cr", M.p10cr_body(csr), gi=implicit), dict(grant_implicitconf=True), "p10cr"),
            ("kur-sig", req(sig, "kur", kur, gi=implicit), dict(grant_implicitconf=True), "kur"),
            ("genm-cacerts", req(mac, "genm", M.genm_body([(A.id_it_caCerts, None)])), dict(), "genm"),
            ("genm-cacerts-mac", req(mac, "genm", M.genm_body([(A.id_it_caCerts, None)])), dict(signed=False), None),
            ("rr-sig", req(sig, "rr", M.rr_body(pki.device_cert, "superseded")), dict(), "rr"),
            ("certconf", req(mac, "certConf", conf, pvno=conf_pvno), dict(), None),
            ("pollreq", req(mac, "pollReq", M.poll_req_body(0)), dict(poll_count=2), None),
            ("ir-waiting", req(mac, "ir", crmf), dict(poll_count=2), None),
            ("error", req(mac, "ir", crmf), dict(send_error=True), None),
            ("error-unprotected", req(mac, "ir", crmf), dict(send_error=True, send_unprot_err=True), None),
            ("ir-unprotected", req(mac, "ir", crmf, gi=implicit), dict(send_unprotected=True,
                                                                        grant_implicitconf=True), None),
        ]
        accept_dir, client_dir = HERE / "corpus" / "cmp_accept", HERE / "corpus" / "cmp_client"
        for d in (accept_dir, client_dir):  # this context's seeds only (record_mockca_seeds writes mockca-*)
            d.mkdir(parents=True, exist_ok=True)
            for p in d.iterdir():
                if not p.name.startswith("mockca-"):
                    p.unlink()
        rsps = {}
        for name, request, opts, op in cases:
            rsp = O.socketless(pki, request, work, name=name, **opts)
            rsps[name] = rsp
            (accept_dir / f"{name}.der").write_bytes(bytes([selector(0, 0)]) + rsp)
            if op is not None:
                (client_dir / f"{name}.bin").write_bytes(bytes([op_byte[op]]) + frames(rsp))
            print(f"recorded {name}: {len(rsp)} bytes", file=sys.stderr)
        # an explicit-confirm exchange: ip, then the pkiConf answering our certConf
        (client_dir / "ir-explicit-confirm.bin").write_bytes(
            bytes([op_byte["ir"]]) + frames(rsps["ir-explicit-confirm"], rsps["certconf"]))
        (client_dir / "ir-polling.bin").write_bytes(
            bytes([op_byte["ir"]]) + frames(rsps["ir-waiting"], rsps["pollreq"], rsps["ir-mac-signed-rsp"]))
        (CONTEXT / "context.json").write_text(json.dumps({
            "comment": "TEST-ONLY PKI and binding of the recorded openssl cmp mock-server responses",
            "peer": "openssl cmp -use_mock_srv (OpenSSL's socket-less mock server)",
            "reference": O.REF, "secret": O.SECRET, "recorded_at": recorded_at(rsps.values()),
            "bindings": [{"seed": "every cmp_accept/*.der of this context", "transaction_id": TID.hex(),
                          "sender_nonce": NONCE.hex()}]}, indent=1) + "\n")
        _ = serialization  # (PEM files are copied as written by make_pki)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
