"""TEST-ONLY CMP server (RFC 9483 lightweight profile over RFC 6712 HTTP) in front of the lab CA, on 127.0.0.1.

Handles ir, cr, p10cr, kur, rr, certConf, genm (caCerts, rootCaCert, certReqTemplate) for one ``LabCA``
domain. Requests must be protected: MAC with a shared secret found by senderKID (PasswordBasedMac or PBMAC1),
or a signature by extraCerts[0] chaining to the domain root or to ``client_cas`` (e.g. an IDevID
manufacturer CA). Responses use the request's kind of protection: the same secret (fresh salt), or a
signature by the domain's issuing CA with extraCerts [issuing CA, root]. Each CertReqMsg's POP signature is
checked; kur must be signed by the certificate it names in oldCertID; rr must be signed by the certificate
it revokes (or MAC-protected). implicitConfirm is granted when asked for (unless disabled); otherwise the
certificate waits for certConf, and a rejecting certConf revokes it.

Modes that reproduce deviations of real servers (each has a test in tests/interop/test_cmp_lab_modes.py):
``pbm_macs={"sha1"}`` (PBM accepted only with HMAC-SHA1, as Trustpoint), ``pkiconf_extra_certs=False`` (a
signed pkiConf without extraCerts, as Trustpoint), ``operation_paths=True`` (one URL per RFC 9483 6.1
operation: ``/.well-known/cmp/p/<domain>/<label>``; anything else is HTTP 500 "no suitable responder", as
Trustpoint), ``profile_in_path=True`` (``.../p/<domain>/<profile>/<label>``: the profile is read from the path
only, generalInfo certProfile ignored; without the segment the default profile is issued), ``http_500_for=("kur", "genm")`` (HTTP 500 without a CMP body for
request types it does not implement).

It reuses the client's ASN.1 codec (``enroll_clients.cmp.messages``); the interop test drives it with
``openssl cmp`` as the client, so a misreading shared by our client and server cannot pass unnoticed.
Invariant: binds 127.0.0.1 only.
"""
from __future__ import annotations

import dataclasses
import http.server
import logging
import os
import threading

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import load_der_public_key

from agent.lab.ca import LabCA, LabCAError
from enroll_clients.base import EnrollError
from enroll_clients.cmp import asn1 as A
from enroll_clients.cmp import messages as M
from enroll_clients.cmp import protection as P
from keystore.errors import VerificationError
from keystore.validator import Policy, validate

log = logging.getLogger("agent.lab.cmp_server")
CONTENT_TYPE = "application/pkixcmp"
MAX_BODY_BYTES = 256 * 1024
REPLY = {"ir": "ip", "cr": "cp", "kur": "kup", "p10cr": "cp"}
FAIL = {"badAlg": 0, "badMessageCheck": 1, "badRequest": 2, "badCertId": 4, "badDataFormat": 5, "badPOP": 9,
        "certRevoked": 10, "wrongIntegrity": 12, "badRecipientNonce": 13, "badCertTemplate": 19,
        "signerNotTrusted": 20, "transactionIdInUse": 21, "unsupportedVersion": 22, "notAuthorized": 23,
        "systemFailure": 25}
REASON_NAMES = {v: k for k, v in M.REASONS.items()}


class Refusal(Exception):
    def __init__(self, fail: str, text: str):
        super().__init__(text)
        self.fail = fail
        self.text = text


@dataclasses.dataclass
class _Pending:
    """An issued certificate waiting for the client's certConf."""

    cert: x509.Certificate
    cert_req_id: int


class CmpServerHandle:
    def __init__(self, httpd, thread, core):
        self._httpd = httpd
        self._thread = thread
        self.core = core
        self.port = httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/pkix/"
        # With operation_paths: the RFC 9483 6.1 base the client appends labels to.
        self.base_url = f"http://127.0.0.1:{self.port}/.well-known/cmp/p/{core.domain}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class CmpServerCore:
    """The CMP logic (bytes in, bytes out); HTTP is a thin layer around ``handle``."""

    def __init__(self, lab: LabCA, domain: str, *, secrets: dict[bytes, bytes] | None = None, client_cas=(),
                 grant_implicit_confirm: bool = True, profile: str = "ldevid", pbm_macs=None,
                 pkiconf_extra_certs: bool = True, operation_paths: bool = False, profile_in_path: bool = False,
                 http_500_for=()):
        self.lab = lab
        self.domain = domain
        self.pbm_macs = frozenset(pbm_macs) if pbm_macs else None  # e.g. {"sha1"}: HMAC-SHA1 only
        self.pkiconf_extra_certs = pkiconf_extra_certs
        self.operation_paths = operation_paths or profile_in_path
        self.profile_in_path = profile_in_path
        self.http_500_for = frozenset(http_500_for)
        self.paths: list[str] = []  # the URL path of each request (operation_paths mode)
        self.secrets = dict(secrets or {})
        self.client_cas = tuple(client_cas)
        self.grant_implicit_confirm = grant_implicit_confirm
        self.profile = profile
        self._pending: dict[bytes, _Pending] = {}
        self._lock = threading.Lock()
        self.requests: list[str] = []

    # -- protection --------------------------------------------------------------------------------
    def _verify_request(self, msg):
        """Returns ("mac", secret) or ("sig", signer cert); raises Refusal."""
        h = msg["header"]
        if not h["protectionAlg"].isValue or not msg["protection"].isValue:
            raise Refusal("badMessageCheck", "request is not protected")
        alg = h["protectionAlg"]
        data = M._protected_part(msg)
        value = msg["protection"].asOctets()
        if P.is_mac_alg(alg):
            if self.pbm_macs is not None:
                self._check_pbm_mac(alg)
            kid = bytes(h["senderKID"]) if h["senderKID"].isValue else b""
            secret = self.secrets.get(kid)
            if secret is None:
                raise Refusal("badMessageCheck", "unknown senderKID (reference)")
            try:
                ok = P.mac_equal(P.compute_mac(alg, secret, data), value)
            except EnrollError as e:
                raise Refusal("badAlg", str(e)) from None
            if not ok:
                raise Refusal("badMessageCheck", "MAC does not verify (wrong shared secret?)")
            return "mac", secret
        extra = M._extra_certs(msg)
        if not extra:
            raise Refusal("badMessageCheck", "signature without extraCerts")
        try:
            P.verify_signature(extra[0].public_key(), alg, value, data)
        except EnrollError as e:
            raise Refusal("badMessageCheck", str(e)) from None
        dom = self.lab.domain(self.domain)
        try:
            validate(extra[0], list(extra[1:]) + [dom.ca_cert], (dom.root_cert,) + self.client_cas,
                     Policy.for_purpose("credential", M._utcnow(), min_rsa_bits=1024), what="request signer")
        except VerificationError as e:
            old = self._old_generation()
            if old is None:
                raise Refusal("signerNotTrusted", str(e)) from None
            try:  # after a rollover, devices with certificates of the old hierarchy are still served
                validate(extra[0], list(extra[1:]) + [old[0]], (old[2],),
                         Policy.for_purpose("credential", M._utcnow(), min_rsa_bits=1024), what="request signer")
            except VerificationError:
                raise Refusal("signerNotTrusted", str(e)) from None
            return "sig-old", extra[0]
        return "sig", extra[0]

    def _old_generation(self):
        """(issuing CA cert, its key, root cert) of the previous generation after ``LabCA.rollover``, or None."""
        dom = self.lab.domain(self.domain)
        d = self.lab.dir / self.domain / "old"
        if dom.old_root_cert is None or not (d / "ca.pem").exists():
            return None
        from cryptography.hazmat.primitives import serialization

        return (x509.load_pem_x509_certificate((d / "ca.pem").read_bytes()),
                serialization.load_pem_private_key((d / "ca.key").read_bytes(), None),
                x509.load_pem_x509_certificate((d / "root.pem").read_bytes()))

    def _check_pbm_mac(self, alg) -> None:
        names = {str(A.id_hmac_sha1): "sha1", str(A.id_hmacWithSHA1): "sha1", str(A.id_hmacWithSHA256): "sha256",
                 str(A.id_hmacWithSHA384): "sha384", str(A.id_hmacWithSHA512): "sha512"}
        if str(alg["algorithm"]) != str(A.id_PasswordBasedMac):
            raise Refusal("badAlg", "only PasswordBasedMac is accepted")
        p = A.der_decode(bytes(alg["parameters"]), A.PBMParameter())
        mac = names.get(str(p["mac"]["algorithm"]), str(p["mac"]["algorithm"]))
        if mac not in self.pbm_macs:
            raise Refusal("badAlg", f"PBM MAC {mac} not supported (only {', '.join(sorted(self.pbm_macs))})")

    def _protector(self, prot):
        if prot[0] == "mac":
            return M.Protector(reference=b"lab-cmp", secret=prot[1])
        if prot[0] == "sig-old":  # answer a device of the old hierarchy with the key it can still verify
            ca, key, root = self._old_generation()
            return M.Protector(certificate=ca, private_key=key, chain=(root,))
        dom = self.lab.domain(self.domain)
        return M.Protector(certificate=dom.ca_cert, private_key=dom.ca_key, chain=(dom.root_cert,))

    # -- dispatch ------------------------------------------------------------------------------------
    def handle(self, der: bytes, profile: str | None = None) -> bytes:
        """One request in, one response out. ``profile``: read from the URL path (profile_in_path mode)."""
        try:
            msg = M.decode_message(der)
        except EnrollError as e:
            raise ValueError(str(e)) from None
        h = msg["header"]
        t = msg["body"].getName()
        self.requests.append(t)
        tid = bytes(h["transactionID"]) if h["transactionID"].isValue else os.urandom(16)
        nonce = bytes(h["senderNonce"]) if h["senderNonce"].isValue else None
        recipient = None
        if h["sender"].getName() == "directoryName":
            recipient = _name(h["sender"]["directoryName"])
        prot = None
        gi = ()
        try:
            if int(h["pvno"]) not in (2, 3):
                raise Refusal("unsupportedVersion", f"pvno {int(h['pvno'])}")
            if nonce is None or len(nonce) < 16 or not h["transactionID"].isValue:
                raise Refusal("badRequest", "transactionID and a 128-bit senderNonce are required")
            prot = self._verify_request(msg)
            body_type, body, gi = self._dispatch(t, msg, prot, tid, profile)
        except Refusal as r:
            body_type, body = "error", _error(r.fail, r.text)
        except LabCAError as e:
            body_type, body = "error", _error("badCertTemplate", str(e))
        protector = self._protector(prot) if prot else self._fallback_protector(msg)
        dom = self.lab.domain(self.domain)
        # RFC 9483 4.1.1: ip/cp/kup carry the issuing chain in extraCerts.
        chain = (dom.ca_cert, dom.root_cert) if body_type in ("ip", "cp", "kup") else ()
        return M.encode_message(protector, body_type, body, sender=dom.ca_cert.subject, recipient=recipient,
                                transaction_id=tid, sender_nonce=os.urandom(16), recip_nonce=nonce,
                                general_info=gi, now=M._utcnow(), extra_certs=chain,
                                protection_certs=self.pkiconf_extra_certs or body_type != "pkiconf")

    def _fallback_protector(self, msg):
        """For refusals before the request's protection was established: MAC if we know the reference."""
        h = msg["header"]
        kid = bytes(h["senderKID"]) if h["senderKID"].isValue else b""
        if h["protectionAlg"].isValue and P.is_mac_alg(h["protectionAlg"]) and kid in self.secrets:
            return M.Protector(reference=b"lab-cmp", secret=self.secrets[kid])
        dom = self.lab.domain(self.domain)
        return M.Protector(certificate=dom.ca_cert, private_key=dom.ca_key, chain=(dom.root_cert,))

    def _dispatch(self, t, msg, prot, tid, profile=None):
        body = msg["body"].getComponent()
        profile = profile or self.profile
        if t in ("ir", "cr", "kur"):
            return self._cert_request(t, msg, body, prot, tid, profile)
        if t == "p10cr":
            csr = x509.load_der_x509_csr(A.der_encode(M._fill(A.CertificationRequest(), body)))
            cert = self.lab.issue_from_csr(self.domain, csr, profile)
            return self._cert_response("p10cr", msg, cert, 0, prot, tid)
        if t == "certConf":
            return self._cert_conf(body, tid)
        if t == "rr":
            return self._revoke(body, prot)
        if t == "genm":
            return "genp", self._genm(body), ()
        raise Refusal("badRequest", f"{t} is not handled by this server")

    def _cert_request(self, t, msg, body, prot, tid, profile):
        if len(body) != 1:
            raise Refusal("badRequest", "exactly one CertReqMsg per message")
        crm = body[0]
        req = crm["certReq"]
        tpl = req["certTemplate"]
        if not tpl["publicKey"].isValue or not tpl["subject"].isValue:
            raise Refusal("badCertTemplate", "template needs subject and publicKey (no central key generation)")
        spki = M._fill(A.SubjectPublicKeyInfo(), tpl["publicKey"])
        try:
            pub = load_der_public_key(A.der_encode(spki))
        except ValueError as e:
            raise Refusal("badCertTemplate", f"public key: {e}") from None
        pop = crm["pop"]
        if not pop.isValue or pop.getName() != "signature":
            raise Refusal("badPOP", "POP by signature is required")
        sig = pop["signature"]
        if sig["poposkInput"].isValue:
            raise Refusal("badPOP", "poposkInput is not supported")
        try:
            P.verify_signature(pub, sig["algorithmIdentifier"], sig["signature"].asOctets(), A.der_encode(req))
        except EnrollError:
            raise Refusal("badPOP", "proof-of-possession signature does not verify") from None
        subject = _name(tpl["subject"])
        sans, exts = (), []
        if tpl["extensions"].isValue:
            for e in tpl["extensions"]:
                if str(e["extnID"]) == x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string:
                    sans = tuple(_load_san(bytes(e["extnValue"])))
        if t == "kur":
            if not prot[0].startswith("sig"):
                raise Refusal("wrongIntegrity", "kur must be signed with the certificate to update")
            old = prot[1]
            ok = False
            if req["controls"].isValue:
                for ctl in req["controls"]:
                    if str(ctl["type"]) == str(A.id_regCtrl_oldCertID):
                        cid = A.der_decode(bytes(ctl["value"]), A.CertId())
                        ok = (int(cid["serialNumber"]) == old.serial_number
                              and M.name_der(cid["issuer"]["directoryName"]) == old.issuer.public_bytes())
            if not ok:
                raise Refusal("badCertId", "oldCertID missing or not the signing certificate")
            if self.lab.is_revoked(old.serial_number):
                raise Refusal("certRevoked", "the certificate to update is revoked")
        cert = self.lab.issue(self.domain, pub, subject, sans, profile, extensions=exts)
        return self._cert_response(t, msg, cert, int(req["certReqId"]), prot, tid)

    def _cert_response(self, t, msg, cert, req_id, prot, tid):
        dom = self.lab.domain(self.domain)
        crm = A.CertRepMessage()
        cr = crm["response"].componentType.clone()
        cr["certReqId"] = req_id
        cr["status"]["status"] = 0
        coe = cr["certifiedKeyPair"]["certOrEncCert"]
        M._fill(coe.setComponentByName("certificate").getComponentByName("certificate"), M.cert_to_asn1(cert))
        if t == "ir" and prot[0] == "mac":  # RFC 9483 4.1.1: caPubs only where the MAC is the trust basis
            crm["caPubs"].setComponentByPosition(0, M.cert_to_asn1(dom.root_cert))
        crm["response"].setComponentByPosition(0, cr)
        gi = ()
        wants = str(A.id_it_implicitConfirm) in M._general_info(msg["header"])
        if wants and self.grant_implicit_confirm:
            gi = ((A.id_it_implicitConfirm, A.Null("")),)
        else:
            with self._lock:
                self._pending[tid] = _Pending(cert, req_id)
        return REPLY[t], crm, gi

    def _cert_conf(self, body, tid):
        with self._lock:
            pending = self._pending.pop(tid, None)
        if pending is None:
            raise Refusal("badRequest", "no certificate waiting for confirmation in this transaction")
        if len(body) != 1 or int(body[0]["certReqId"]) != pending.cert_req_id:
            raise Refusal("badCertId", "certConf does not name our certReqId")
        cs = body[0]
        digest, _, _ = P.cert_hash(pending.cert)
        if bytes(cs["certHash"]) != digest:
            raise Refusal("badCertId", "certHash does not match the issued certificate")
        if cs["statusInfo"].isValue and int(cs["statusInfo"]["status"]) == 2:
            self.lab.revoke(pending.cert.serial_number, "cessationOfOperation")
        return "pkiconf", A.Null(""), ()

    def _revoke(self, body, prot):
        if len(body) != 1:
            raise Refusal("badRequest", "exactly one RevDetails per rr")
        rd = body[0]["certDetails"]
        if not rd["serialNumber"].isValue or not rd["issuer"].isValue:
            raise Refusal("badCertId", "rr needs issuer and serialNumber")
        serial = int(rd["serialNumber"])
        cert = self.lab.issued(self.domain, serial)
        if cert is None or M.name_der(rd["issuer"]) != cert.issuer.public_bytes():
            raise Refusal("badCertId", "no such certificate issued here")
        if prot[0].startswith("sig") and prot[1] != cert:
            raise Refusal("notAuthorized", "rr must be signed by the certificate to revoke")
        if self.lab.is_revoked(serial):
            raise Refusal("certRevoked", "already revoked")
        reason = "unspecified"
        if body[0]["crlEntryDetails"].isValue:
            for e in body[0]["crlEntryDetails"]:
                if str(e["extnID"]) == str(A.id_ce_cRLReasons):
                    reason = REASON_NAMES.get(int(A.der_decode(bytes(e["extnValue"]), A.ReasonFlags())), reason)
        self.lab.revoke(serial, reason)
        rp = A.RevRepContent()
        si = rp["status"].componentType.clone()
        si["status"] = 0
        rp["status"].setComponentByPosition(0, si)
        return "rp", rp, ()

    def _genm(self, body):
        dom = self.lab.domain(self.domain)
        if len(body) != 1:
            raise Refusal("badRequest", "one InfoTypeAndValue per genm (RFC 9483 4.3)")
        oid = str(body[0]["infoType"])
        itav = A.InfoTypeAndValue()
        if oid == str(A.id_it_caCerts):
            itav["infoType"] = A.id_it_caCerts
            itav["infoValue"] = A.Any(A.der_encode(M.encode_ca_certs([dom.ca_cert, dom.root_cert])))
        elif oid == str(A.id_it_rootCaCert):
            itav["infoType"] = A.id_it_rootCaKeyUpdate
            if dom.new_with_old is not None:
                itav["infoValue"] = A.Any(A.der_encode(M.encode_root_ca_key_update(
                    dom.root_cert, dom.new_with_old, dom.old_with_new)))
        elif oid == str(A.id_it_certReqTemplate):
            itav["infoType"] = A.id_it_certReqTemplate
        else:
            raise Refusal("badRequest", f"infoType {oid} not supported")
        g = A.GenRepContent()
        g.setComponentByPosition(0, itav)
        return g


def _name(value) -> x509.Name:
    """x509.Name from a pyasn1 Name (string-valued attributes, which is what CMP subjects carry)."""
    from pyasn1.codec.der import decoder as generic

    rdns = []
    for rdn in value.getComponent():
        items = []
        for atv in rdn:
            v, _ = generic.decode(bytes(atv["value"]))
            items.append(x509.NameAttribute(x509.ObjectIdentifier(str(atv["type"])), str(v)))
        rdns.append(x509.RelativeDistinguishedName(items))
    return x509.Name(rdns)


def _load_san(value: bytes):
    """x509 GeneralNames from a subjectAltName extnValue (DNS, IP, URI, e-mail; others refused)."""
    import ipaddress

    try:
        names = A.der_decode(value, A.GeneralNames())
    except ValueError:
        raise Refusal("badCertTemplate", "malformed subjectAltName") from None
    out = []
    for gn in names:
        kind, v = gn.getName(), gn.getComponent()
        if kind == "dNSName":
            out.append(x509.DNSName(str(v)))
        elif kind == "iPAddress":
            out.append(x509.IPAddress(ipaddress.ip_address(bytes(v))))
        elif kind == "uniformResourceIdentifier":
            out.append(x509.UniformResourceIdentifier(str(v)))
        elif kind == "rfc822Name":
            out.append(x509.RFC822Name(str(v)))
        else:
            raise Refusal("badCertTemplate", f"subjectAltName {kind} not supported by the lab CA")
    return out


def _error(fail: str, text: str):
    e = A.ErrorMsgContent()
    si = e["pKIStatusInfo"]
    si["status"] = 2
    bit = FAIL[fail]
    si["failInfo"] = si["failInfo"].clone(tuple(1 if i == bit else 0 for i in range(bit + 1)))
    si["statusString"].setComponentByPosition(0, text[:200])
    return e


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status, body=b"", ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        core = self.server.core
        profile = None
        if core.operation_paths:
            core.paths.append(self.path)
            routed = self._route(core)
            if routed is None:  # Trustpoint answers a request on the wrong URL like this
                return self._send(500, b"no suitable responder\n")
            operation, profile = routed
        elif self.path.rstrip("/") not in ("", "/pkix"):
            return self._send(404, b"unknown CMP path; use /pkix/\n")
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != CONTENT_TYPE:
            return self._send(415, f"Content-Type must be {CONTENT_TYPE}\n".encode())
        n = int(self.headers.get("Content-Length") or 0)
        if not 0 < n <= MAX_BODY_BYTES:
            return self._send(413 if n else 411, b"bad Content-Length\n")
        der = self.rfile.read(n)
        if core.operation_paths and not _label_fits(der, operation):
            return self._send(500, b"no suitable responder\n")
        if core.http_500_for and _body_name(der) in core.http_500_for:
            return self._send(500, b"Internal Server Error\n")  # not implemented, and no CMP answer
        try:
            rsp = self.server.core.handle(der, profile)
        except ValueError as e:
            return self._send(400, f"not a CMP message: {e}\n".encode())
        except (LabCAError, InvalidSignature, EnrollError) as e:  # never echo internals beyond a short reason
            log.warning("CMP request failed: %s", e)
            return self._send(500, b"CMP server failure\n")
        self._send(200, rsp, CONTENT_TYPE)


    def _route(self, core):
        """(operation label, profile or None) from /.well-known/cmp/p/<domain>/[<profile>/]<label>, else None."""
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        head = [".well-known", "cmp", "p", core.domain]
        if parts[:4] != head:
            return None
        rest = parts[4:]
        if core.profile_in_path and len(rest) == 2:
            return rest[1], rest[0]
        if len(rest) != 1:  # with profile_in_path, no profile segment: the server's default profile
            return None
        return rest[0], None


# RFC 9483 6.1: the request types each operation label accepts (certConf/pollReq stay on their transaction's).
_LABEL_BODIES = {"initialization": {"ir"}, "certification": {"cr"}, "keyupdate": {"kur"}, "p10": {"p10cr"},
                 "revocation": {"rr"}, "getcacerts": {"genm"}, "getrootupdate": {"genm"},
                 "getcertreqtemplate": {"genm"}}


def _body_name(der: bytes) -> str | None:
    try:
        return M.decode_message(der)["body"].getName()
    except EnrollError:
        return None


def _label_fits(der: bytes, operation: str) -> bool:
    name = _body_name(der)
    if name in ("certConf", "pollReq", "error"):
        return operation in _LABEL_BODIES
    return name in _LABEL_BODIES.get(operation, ())


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def start_cmp_server(lab: LabCA, domain: str, *, port: int = 0, secrets: dict[bytes, bytes] | None = None,
                     client_cas=(), grant_implicit_confirm: bool = True, profile: str = "ldevid",
                     **modes) -> CmpServerHandle:
    """Start the lab CMP server on 127.0.0.1:``port`` (0 = any free port) in a thread; returns its handle.
    ``modes``: the deviation modes of ``CmpServerCore`` (module docstring)."""
    lab.domain(domain)  # fail early on an unknown domain
    core = CmpServerCore(lab, domain, secrets=secrets, client_cas=client_cas,
                         grant_implicit_confirm=grant_implicit_confirm, profile=profile, **modes)
    httpd = _Server(("127.0.0.1", port), _Handler)
    httpd.core = core
    t = threading.Thread(target=httpd.serve_forever, name="lab-cmp-server", daemon=True)
    t.start()
    return CmpServerHandle(httpd, t, core)
