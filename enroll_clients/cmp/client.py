"""The CMP client (RFC 9483 lightweight CMP profile over RFC 4210/9810, 4211, 6712).

Steps, as in OpenSSL's apps/cmp.c: credentials (``ClientAuth`` -> ``Protector``), transport (``Transport``),
request template (``messages.cert_template`` + optional server certReqTemplate), then the exchange
(``_cert_exchange``: request -> [poll] -> response -> checks -> certConf/pkiConf or implicit confirm).

Invariants:
- Every response goes through ``Transaction.accept`` (protection, transactionID, nonces, time) before any
  field is used; an error that is not verifiably protected is reported (``CmpServerError.protected``
  False) and changes nothing.
- A certificate is returned only if its public key is the one we asked for; otherwise the client rejects it
  with a negative certConf (when confirmation is pending) and raises ``KeyMismatchError``.
- Keys are used only through ``key.sign``; nothing is stored.
"""
from __future__ import annotations

import asyncio
import datetime
import importlib
from typing import Sequence

from cryptography import x509

from enroll_clients.base import (
    CaCertsResult,
    CertRequest,
    ClientAuth,
    EnrollError,
    EnrollmentClient,
    EnrollResult,
    ProtocolError,
    UnsupportedError,
)
from enroll_clients.cmp.algs import MAC_SENDERS, OPERATION_FOR_BODY, mac_hash_name, owf_name
from keystore.certs import spki_der
from keystore.errors import VerificationError
from keystore.validator import check_root_update, issuer_chain
from enroll_clients.cmp.errors import STATUS_NAMES, CmpServerError, KeyMismatchError
from enroll_clients.cmp.transport import Transport

DEFAULT_CLOCK_SKEW_S = 300.0  # = messages.DEFAULT_CLOCK_SKEW_S (not imported here: messages loads pyasn1)
REPLY_TYPE = {"ir": "ip", "cr": "cp", "p10cr": "cp", "kur": "kup"}
CHECK_AFTER_MIN_S = 0.0
INCORRECT_DATA_BIT = 7


class _LazyModule:
    """A module imported on first attribute access. The ASN.1 layer (pyasn1, ~50-130 ms to import on x86,
    several times that on a Pi Zero 2 W) loads on the first CMP message, so building a client and
    ``devagent`` start-up do not pay for it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        module = importlib.import_module(self._name)
        return getattr(module, attr)


A = _LazyModule("enroll_clients.cmp.asn1")
M = _LazyModule("enroll_clients.cmp.messages")
T = _LazyModule("enroll_clients.cmp.template")


class PollingTimeoutError(EnrollError):
    """The server kept answering 'waiting' longer than ``max_wait_s``."""


class CmpClient(EnrollmentClient):
    """CMP over one ``Transport``.

    Args:
        transport: HTTP, file or in-memory transport.
        trust_anchors: CMP trust anchors for signature-protected responses.
        recipient: the CA's name for the header (NULL-DN if unknown, RFC 9483 3.1).
        implicit_confirm: ask for implicitConfirm (certConf is skipped only if the server grants it).
        mac: "pbm" (RFC 4210 PasswordBasedMac) or "pbmac1" (RFC 9481) for MAC-protected requests.
        mac_iterations: iteration count for our MAC (default 10000).
        max_clock_skew_s: with a trusted clock, responses whose messageTime differs more are rejected
            (default 300 s); None = the clock is not trusted (same as ``clock_trusted=False``).
        clock_trusted: check messageTime against our clock (never while it reads before the clock floor).
            The response signer's validity is always checked (docs/trust.md, purpose cmp-signer).
        server_certs: certificates trusted directly as the response signer (``--cmp-server-cert``, as
            OpenSSL's ``-srvcert``): accepted without a path to ``trust_anchors`` or an RA/CA role.
        ignore_keyusage: tolerated deviation: do not require digitalSignature in the signer's keyUsage.
        reuse_signer: tolerated deviation: a signed response without extraCerts is verified with the signer
            validated earlier in the transaction (a pkiConf without extraCerts).
        trusted_signer_fallback: tolerated deviation: a signed response without extraCerts is verified with a
            pinned certificate or CMP trust anchor named as its sender (a genp to an unprotected genm).
        max_wait_s: bound on polling (status waiting, pollRep checkAfter).
        profile: certProfile to put in generalInfo (RFC 9483 3.1), None for the server's default.
        old_root: our current root; ``ca_certs()`` then also asks for a root CA key update (rootCaCert).
        use_cert_template: ``enroll``/``request`` first ask the server for its certReqTemplate and apply it.
    """

    protocol = "cmp"

    def __init__(self, transport: Transport, *, trust_anchors: Sequence[x509.Certificate] = (),
                 recipient: x509.Name | None = None, implicit_confirm: bool = False, mac: str = "pbm",
                 mac_iterations: int | None = None, max_clock_skew_s: float | None = DEFAULT_CLOCK_SKEW_S,
                 clock_trusted: bool = True, server_certs: Sequence[x509.Certificate] = (),
                 ignore_keyusage: bool = False, reuse_signer: bool = False, trusted_signer_fallback: bool = False,
                 max_wait_s: float = 300.0, profile: str | None = None,
                 old_root: x509.Certificate | None = None, use_cert_template: bool = False, now=None, sleep=None,
                 mac_alg: str | None = None, mac_owf: str | None = None, mac_sender: str = "subject",
                 profile_in_general_info: bool = True, tolerate_nonce_reuse: bool = False,
                 unprotected_requests: bool = False, tls_client_auth: bool = False):
        if mac not in ("pbm", "pbmac1"):
            raise ValueError(f"unknown MAC {mac!r} (expected 'pbm' or 'pbmac1')")
        if mac_sender not in MAC_SENDERS:
            raise ValueError(f"unknown MAC sender {mac_sender!r} (one of {', '.join(MAC_SENDERS)})")
        self.transport = transport
        self.tls_client_auth = tls_client_auth
        self.trust_anchors = tuple(trust_anchors)
        self.recipient = recipient
        self.implicit_confirm = implicit_confirm
        self.mac = mac
        self.mac_iterations = mac_iterations
        self.mac_hash = mac_hash_name(mac_alg)
        self.mac_owf = owf_name(mac_owf) if mac_owf else None
        self.mac_sender = mac_sender
        self.max_clock_skew_s = max_clock_skew_s
        self.clock_trusted = clock_trusted
        self.server_certs = tuple(server_certs)
        self.ignore_keyusage = ignore_keyusage
        self.reuse_signer = reuse_signer
        self.trusted_signer_fallback = trusted_signer_fallback
        self.max_wait_s = max_wait_s
        self.profile = profile
        self.profile_in_general_info = profile_in_general_info
        self.tolerate_nonce_reuse = tolerate_nonce_reuse
        self.unprotected_requests = unprotected_requests
        self.old_root = old_root
        self.use_cert_template = use_cert_template
        self._now = now or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self._sleep = sleep or asyncio.sleep

    # --- public API (EnrollmentClient) -----------------------------------------------------------
    async def enroll(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        """Initial enrollment: ir (CRMF, POP by ``request.private_key``), or p10cr when only ``request.csr``
        is given. Protected by MAC (``auth.reference``+``auth.secret``) or by the IDevID signature
        (``auth.certificate``+``auth.private_key``, ``auth.chain`` in extraCerts)."""
        if request.server_keygen:
            raise UnsupportedError("central key generation over CMP is not supported by this client; "
                                   "generate the key on the device (the default)")
        if request.private_key is None and request.csr is not None:
            return await self._p10cr(request, auth)
        return await self._crmf("ir", request, auth)

    async def request(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        """Additional certificate: cr signed with an existing credential (normally the LDevID)."""
        if request.server_keygen:
            raise UnsupportedError("central key generation over CMP is not supported by this client")
        if request.private_key is None and request.csr is not None:
            return await self._p10cr(request, auth)
        return await self._crmf("cr", request, auth)

    async def renew(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        """kur for ``auth.certificate``: signed by the old certificate's key, POP by ``request.private_key``
        (the new key, or the old one to renew without rekeying); oldCertID names the old certificate."""
        if auth.certificate is None or auth.private_key is None:
            raise ValueError("renew (kur) needs auth.certificate and auth.private_key (the certificate to update)")
        if request.private_key is None:
            raise ValueError("renew (kur) needs request.private_key (the new key, or the old one)")
        return await self._crmf("kur", request, auth, controls=(M.old_cert_id_control(auth.certificate),))

    async def revoke(self, certificate: x509.Certificate, auth: ClientAuth, reason: str = "unspecified") -> None:
        """rr for ``certificate`` (normally signed by its own key via ``auth``). Returns once the server
        reports the revocation accepted (status accepted, revocationWarning or revocationNotification)."""
        txn = self._transaction(auth, sender=certificate.subject, operation=OPERATION_FOR_BODY["rr"])
        der = await _build(txn, "rr", M.rr_body(certificate, reason))
        resp = await self._send(txn, der, ("rp",), "revocation request (rr)")
        statuses = list(resp.body["status"])
        if len(statuses) != 1:
            raise ProtocolError(f"rp carries {len(statuses)} statuses for our one revocation request")
        status, fail, text = M.status_of(statuses[0])
        if status not in (0, 4, 5):
            raise CmpServerError("revocation request (rr) refused", status=status, fail_info=fail, text=text,
                                 protected=resp.protected)

    async def ca_certs(self, auth: ClientAuth | None = None, *,
                       old_root: x509.Certificate | None = None) -> CaCertsResult:
        """genm caCerts, plus rootCaCert when ``old_root`` (argument, else the client's) is given (RFC 9483
        4.3.1/4.3.2). The genp must be protected (MAC with ``auth.secret`` or a signature chaining to
        ``trust_anchors``). A new root is returned only after ``verify_root_update`` bound it to the old root."""
        old_root = old_root or self.old_root
        # One ITAV per genm (RFC 9483 4.3; OpenSSL refuses a genm with two), so two transactions.
        resp = await self._genm(auth, A.id_it_caCerts, None, "general message (genm caCerts)", "getcacerts")
        cas = M.decode_ca_certs(M.genp_values(resp.body).get(str(A.id_it_caCerts)))
        new_root = nwo = own = None
        server_time = resp.server_time
        if old_root is not None:
            resp = await self._genm(auth, A.id_it_rootCaCert, M.cert_to_asn1(old_root),
                                    "general message (genm rootCaCert)", "getrootupdate")
            update = M.decode_root_ca_key_update(M.genp_values(resp.body).get(str(A.id_it_rootCaKeyUpdate)))
            if update is not None:
                nwn, nwo, own = update
                try:
                    check_root_update([old_root], nwn, nwo, own)
                except VerificationError as e:
                    raise ProtocolError(str(e)) from None
                new_root = nwn
        return CaCertsResult(ca_certs=cas, new_root=new_root, new_with_old=nwo, old_with_new=own,
                             server_time=server_time)

    async def _genm(self, auth, info_type, value, what: str, operation: str, sender: x509.Name | None = None):
        # genm sender: with MAC the NULL-DN (RFC 9483 4.3 leaves it open) or, before an ir/cr, that request's
        # subject (servers that bind the senderKID to the sender, like the Siemens MockCA, want the same sender
        # throughout); with a signature our certificate's subject.
        txn = self._transaction(auth, sender=sender, operation=operation)
        return await self._send(txn, await _build(txn, "genm", M.genm_body([(info_type, value)])), ("genp",), what)

    async def cert_req_template(self, auth: ClientAuth | None = None, *, sender: x509.Name | None = None):
        """genm certReqTemplate (RFC 9483 4.3.3): the server's ``Template`` or None if it has none.
        ``sender``: header sender of a MAC-protected genm (default NULL-DN)."""
        resp = await self._genm(auth, A.id_it_certReqTemplate, None, "general message (genm certReqTemplate)",
                                "getcertreqtemplate", sender)
        return T.decode_template(M.genp_values(resp.body).get(str(A.id_it_certReqTemplate)))

    async def aclose(self) -> None:
        await self.transport.aclose()

    # --- internals --------------------------------------------------------------------------------
    def _protector(self, auth: ClientAuth | None) -> M.Protector:
        if auth is None or self.unprotected_requests:
            # Responses are still verified: with the MAC secret when we have one, else by signature.
            secret = auth.secret if auth is not None else None
            return M.Protector(unprotected=True, secret=secret, **self._acceptance())
        if not isinstance(auth, ClientAuth):
            raise TypeError(f"auth must be a ClientAuth, not {type(auth).__name__}")
        if auth.certificate is not None and auth.private_key is not None:
            return M.Protector(certificate=auth.certificate, private_key=auth.private_key, chain=tuple(auth.chain),
                               secret=auth.secret, **self._acceptance())
        if auth.secret is not None:
            if not auth.reference:
                raise ValueError("MAC protection needs auth.reference (sent as senderKID) with auth.secret")
            return M.Protector(reference=auth.reference, secret=auth.secret, mac_kind=self.mac,
                               mac_iterations=self.mac_iterations, mac_hash=self.mac_hash, mac_owf=self.mac_owf,
                               **self._acceptance())
        raise ValueError("no CMP credentials in auth: give reference+secret (MAC) or certificate+private_key")

    def _acceptance(self) -> dict:
        return dict(trust_anchors=self.trust_anchors, pinned=self.server_certs, ignore_keyusage=self.ignore_keyusage,
                    reuse_signer=self.reuse_signer, trusted_signer_fallback=self.trusted_signer_fallback)

    def _transaction(self, auth, sender: x509.Name | None = None, operation: str | None = None) -> M.Transaction:
        pr = self._protector(auth)
        if self.tls_client_auth and hasattr(self.transport, "use_client_credential"):
            if auth is None or auth.certificate is None:
                raise ValueError("TLS client authentication (--tls-client-auth) needs a certificate to present: "
                                 "the IDevID (enroll --idevid) or the domain's LDevID (request, renew, revoke, "
                                 "ca-update without --secret)")
            self.transport.use_client_credential(auth)
        if self.mac_sender == "null-dn" and not pr.uses_signature:
            sender = None  # NULL-DN; the server finds the secret by senderKID alone
        return M.Transaction(pr, sender=sender, recipient=self.recipient, max_clock_skew_s=self.max_clock_skew_s,
                             clock_trusted=self.clock_trusted, now=self._now, operation=operation,
                             tolerate_nonce_reuse=self.tolerate_nonce_reuse)

    def _general_info(self):
        gi = []
        if self.implicit_confirm:
            gi.append((A.id_it_implicitConfirm, A.Null("")))
        if self.profile and self.profile_in_general_info:
            v = A.CertProfileValue()
            v.setComponentByPosition(0, self.profile)
            gi.append((A.id_it_certProfile, v))
        return gi

    async def _send(self, txn: M.Transaction, der: bytes, expected, what: str) -> M.Response:
        rsp = await self.transport.exchange(der, operation=txn.operation)
        resp = txn.accept(rsp, expected)
        if resp.body_type == "error":
            content = resp.body
            status, fail, text = M.status_of(content["pKIStatusInfo"])
            code = int(content["errorCode"]) if content["errorCode"].isValue else None
            details = "; ".join(str(t) for t in content["errorDetails"]) if content["errorDetails"].isValue else ""
            raise CmpServerError(f"{what} refused by the CMP server ({self.transport.describe()})", status=status,
                                 fail_info=fail, text=text, protected=resp.protected, error_code=code,
                                 details=details, protection_problem=resp.protection_problem)
        return resp

    async def _crmf(self, body_type: str, request: CertRequest, auth: ClientAuth, controls=()) -> EnrollResult:
        key = request.private_key
        if key is None:
            raise ValueError(f"{body_type} needs request.private_key (keys are generated on the device)")
        subject, extensions = request.subject, tuple(request.extensions)
        if self.use_cert_template and body_type in ("ir", "cr"):
            tpl = await self.cert_req_template(auth, sender=subject)
            if tpl is not None:
                subject, extensions = T.apply_template(tpl, subject, request.sans, extensions, key)
                request = CertRequest(subject=subject, private_key=key, extensions=extensions,
                                      key_type=request.key_type, profile=request.profile)
        template = M.cert_template(subject, key.public_key(), request.sans, extensions)
        body = await asyncio.to_thread(M.cert_req_messages, template, key, controls=controls)  # POP signature
        sender = auth.certificate.subject if auth is not None and auth.certificate is not None else subject
        txn = self._transaction(auth, sender=sender, operation=OPERATION_FOR_BODY[body_type])
        return await self._cert_exchange(txn, body_type, body, key.public_key())

    async def _p10cr(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        csr = request.csr
        if not isinstance(csr, x509.CertificateSigningRequest):
            raise TypeError(f"request.csr must be an x509.CertificateSigningRequest, not {type(csr).__name__}")
        if not csr.is_signature_valid:
            raise ValueError("request.csr has an invalid signature (the CSR was altered or not signed by its key)")
        sender = auth.certificate.subject if auth is not None and auth.certificate is not None else csr.subject
        txn = self._transaction(auth, sender=sender, operation=OPERATION_FOR_BODY["p10cr"])
        return await self._cert_exchange(txn, "p10cr", M.p10cr_body(csr), csr.public_key())

    async def _cert_exchange(self, txn: M.Transaction, body_type: str, body, public_key) -> EnrollResult:
        what = f"certificate request ({body_type})"
        reply = REPLY_TYPE[body_type]
        der = await _build(txn, body_type, body, general_info=self._general_info())
        resp = await self._send(txn, der, (reply,), what)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        polls = 0
        while True:
            cert_resp = _single_response(resp.body, body_type)
            req_id = int(cert_resp["certReqId"])
            status, fail, text = M.status_of(cert_resp["status"])
            if status != 3:  # not waiting
                break
            # Polling (RFC 9483 4.4): pollReq -> pollRep(checkAfter) ... -> final response.
            check_after = 1.0
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise PollingTimeoutError(f"{what}: server still 'waiting' after {self.max_wait_s:g} s "
                                              f"({polls} polls); giving up (transaction {txn.tid.hex()})")
                await self._sleep(max(CHECK_AFTER_MIN_S, min(check_after, remaining)))
                polls += 1
                der = await _build(txn, "pollReq", M.poll_req_body(req_id))
                resp = await self._send(txn, der, ("pollRep", reply), f"polling request for {body_type}")
                if resp.body_type == reply:
                    break
                entries = list(resp.body)
                if len(entries) != 1 or int(entries[0]["certReqId"]) != req_id:
                    raise ProtocolError("pollRep does not answer our certReqId")
                check_after = float(int(entries[0]["checkAfter"]))
                if check_after < 0:
                    raise ProtocolError(f"pollRep checkAfter {check_after:g} is negative")
        if status not in (0, 1):
            raise CmpServerError(f"{what} refused by the CMP server ({self.transport.describe()})", status=status,
                                 fail_info=fail, text=text, protected=resp.protected)
        if not resp.protected:  # positive content must be protected (accept() guarantees it; belt and braces)
            raise ProtocolError(f"{what}: unprotected positive response")
        ckp = cert_resp["certifiedKeyPair"]
        if not ckp.isValue:
            raise ProtocolError(f"{what}: status {STATUS_NAMES[status]} but no certificate in the response")
        coe = ckp["certOrEncCert"]
        if coe.getName() != "certificate":
            raise UnsupportedError(f"{what}: the server returned an encrypted certificate (indirect POP), "
                                   "which this client does not request or support")
        cert = M.asn1_to_cert(coe.getComponent(), f"{reply} certifiedKeyPair certificate")
        ca_pubs = ()
        if resp.body["caPubs"].isValue:
            ca_pubs = tuple(M.asn1_to_cert(c, f"{reply} caPubs[{i}]") for i, c in enumerate(resp.body["caPubs"]))
        implicit = self.implicit_confirm and resp.implicit_confirm_granted
        if spki_der(cert) != spki_der(public_key):
            if not implicit:
                try:
                    cbody, pvno = M.cert_conf_body(cert, req_id, accept=False, reason="public key mismatch",
                                                   fail_bits=(INCORRECT_DATA_BIT,))
                    await self._send(txn, await _build(txn, "certConf", cbody, pvno=pvno), ("pkiconf",), "certConf")
                except EnrollError:
                    pass  # the rejection is what matters; the server's answer to it changes nothing here
            raise KeyMismatchError(
                f"{what}: public key mismatch: the certificate {cert.subject.rfc4514_string()} (serial "
                f"{cert.serial_number:x}) returned by {self.transport.describe()} is not for the key we "
                "requested; rejected")
        unconfirmed = None
        if not implicit:
            cbody, pvno = M.cert_conf_body(cert, req_id)
            der = await _build(txn, "certConf", cbody, pvno=pvno)
            try:
                await self._send(txn, der, ("pkiconf",), "certificate confirmation (certConf)")
            except CmpServerError:
                raise  # the CA answered our certConf with an error: it does not take the certificate
            except ProtocolError as e:
                # We confirmed a certificate that passed every check of ours; the CA has acted. Its pkiConf
                # failed a check (protection, binding): the confirmation is not authenticated, but discarding
                # the certificate now would orphan it on the CA. The caller stores it and says so.
                unconfirmed = f"the CA's pkiConf could not be verified: {e}"
        pool = list(resp.extra_certs) + list(ca_pubs)
        chain = issuer_chain(cert, pool)  # ordering only: the keystore validates before storing
        return EnrollResult(
            certificate=cert, chain=chain, ca_certs=ca_pubs, server_time=resp.server_time,
            info={"transaction_id": txn.tid.hex(), "status": STATUS_NAMES[status], "implicit_confirm": implicit,
                  "polls": polls, "body": body_type, "protection": "signature" if txn.protector.uses_signature else "mac",
                  "response_signer": resp.signer.subject.rfc4514_string() if resp.signer is not None else None,
                  "confirmation": ("implicit" if implicit else "unauthenticated" if unconfirmed else "pkiConf"),
                  "unconfirmed_reason": unconfirmed, "tolerated": list(txn.tolerated)})


async def _build(txn: M.Transaction, body_type: str, body, **kw) -> bytes:
    """``txn.request`` off the event loop: a signature may be a blocking TPM/PKCS#11 call, and a password-based
    MAC runs thousands of hash iterations."""
    return await asyncio.to_thread(txn.request, body_type, body, **kw)


def _single_response(body, body_type: str):
    responses = list(body["response"])
    if len(responses) != 1:
        raise ProtocolError(f"response carries {len(responses)} CertResponses for our one request")
    r = responses[0]
    req_id = int(r["certReqId"])
    allowed = (0, -1) if body_type == "p10cr" else (0,)
    if req_id not in allowed:
        raise ProtocolError(f"response certReqId {req_id} does not match our request (expected {allowed[0]})")
    return r
