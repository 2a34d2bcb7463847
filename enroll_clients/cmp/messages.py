"""CMP messages: build requests and check responses. Pure and synchronous: bytes in, objects out.

A ``Transaction`` carries the state RFC 4210/9483 bind a transaction with (transactionID, the nonces, the
protection credentials) and is the only way to build requests and accept responses, so every response is
checked the same way, in this order, before any of its fields is used:

1. DER decodes to a PKIMessage with no trailing bytes; pvno is 2 or 3.
2. Protection verifies: MAC with our shared secret (PasswordBasedMac or PBMAC1), or a signature by
   extraCerts[0], with sender == that certificate's subject, where extraCerts[0] passes the validator's
   ``cmp-signer`` policy (keystore.validator, docs/trust.md): valid at our time, chaining to the CMP trust
   anchors, a CA certificate or an RA/CA certificate (id-kp-cmcRA / id-kp-cmcCA, RFC 9483 §3.1) — or the
   pinned server certificate (``Protector.pinned``, ``--cmp-server-cert``).
   Missing/invalid protection is tolerated only on error content (``Response.protected`` is then False and
   the caller reports the error without trusting it).
3. transactionID equals ours; recipNonce equals the senderNonce of our last request; senderNonce is present,
   at least 128 bits and not seen before in this transaction.
4. messageTime is within ``max_clock_skew_s`` (default 5 minutes) of our clock, when the clock is trusted
   (``clock_trusted`` and not before the validator's clock floor). ``now`` may return a
   ``keystore.validator.ClockReading`` (the daemon's CA-time estimate): an estimate is never checked against
   messageTime (it is made from the CA's times) but is the time the signer is validated at, with its uncertainty.
5. The body type is one the caller expects (or error).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Callable, Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enroll_clients.base import ProtectionError, ProtocolError
from enroll_clients.cmp import asn1 as A
from enroll_clients.cmp import protection as P
from keystore.certs import spki_der
from keystore.errors import VerificationError
from keystore.validator import CLOCK_FLOOR, ClockReading, Policy, validate

NONCE_BYTES = 16
DEFAULT_CLOCK_SKEW_S = 300.0  # messageTime tolerance with a trusted clock
# An estimate this uncertain (no usable clock at all) is no time to put into our messageTime: send the system clock.
_SEND_MAX_UNCERTAINTY_S = 86400.0
PVNO_CMP2000 = 2
PVNO_CMP2021 = 3

REQUEST_TYPES = ("ir", "cr", "p10cr", "kur", "rr", "genm", "certConf", "pollReq", "error")
REASONS = {"unspecified": 0, "keyCompromise": 1, "cACompromise": 2, "affiliationChanged": 3, "superseded": 4,
           "cessationOfOperation": 5, "certificateHold": 6, "removeFromCRL": 8, "privilegeWithdrawn": 9,
           "aACompromise": 10}


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# --- conversions between cryptography and pyasn1 ---------------------------------------------------
def cert_to_asn1(cert: x509.Certificate, spec=None):
    return A.der_decode(cert.public_bytes(Encoding.DER), spec if spec is not None else A.CMPCertificate())


def asn1_to_cert(value, where: str = "a certificate in the response") -> x509.Certificate:
    """The pyasn1 certificate ``value`` as a fully parsed ``x509.Certificate`` (``keystore.certs`` contract).

    Raises:
        ProtocolError: ``where`` (e.g. ``extraCerts[2]``) and what does not parse.
    """
    from keystore.certs import load_der_certificate
    from keystore.errors import CorruptFileError

    try:
        if value.tagSet != A.CMPCertificate.tagSet:  # e.g. certOrEncCert's [0] EXPLICIT certificate
            value = _fill(A.CMPCertificate(), value)
        der = A.der_encode(value)
    except Exception as e:  # pyasn1 raises PyAsn1Error subclasses; nothing from a peer may escape unwrapped
        raise ProtocolError(f"{where}: not an X.509 certificate ({type(e).__name__})") from None
    try:
        return load_der_certificate(der, where)
    except CorruptFileError as e:
        raise ProtocolError(f"response {e}") from None


def name_to_asn1(name: x509.Name):
    return A.der_decode(name.public_bytes(), A.Name())


def _rdns(name: x509.Name):
    # pyasn1-modules' rfc2459.Name names its only alternative '' (RDNSequence): use the position.
    return name_to_asn1(name).getComponentByPosition(0)


def name_der(value) -> bytes:
    """DER of a pyasn1 Name (possibly implicitly tagged), comparable with ``x509.Name.public_bytes()``."""
    return A.der_encode(value.getComponent())


def directory_name(name: x509.Name | None):
    """GeneralName directoryName; None -> NULL-DN (RFC 9483 3.1 'the NULL-DN')."""
    gn = A.GeneralName()
    dn = gn.setComponentByName("directoryName").getComponentByName("directoryName")
    dn.setComponentByPosition(0, _rdns(name if name is not None else x509.Name([])))
    return gn


def spki_to_asn1(public_key):
    return A.der_decode(spki_der(public_key), A.SubjectPublicKeyInfo())


def parse_generalized_time(value) -> datetime.datetime | None:
    """A GeneralizedTime (``YYYYMMDDHH[MM[SS]][.fff]`` then ``Z``, ``+HH[MM]``/``-HH[MM]`` or nothing: local time)
    in UTC; None if it is malformed. The forms and results of pyasn1's ``asDateTime``, without its
    ``datetime.strptime``, whose first call in a process costs ~3 ms (``_strptime``'s locale tables and regexes)."""
    text = str(value)
    tz = None
    if text.endswith("Z"):
        tz, text = datetime.timezone.utc, text[:-1]
    elif "+" in text or "-" in text:
        text, sign, off = text.partition("+" if "+" in text else "-")
        off = off + "00" if len(off) == 2 else off
        if len(off) != 4 or not off.isdigit():
            return None
        minutes = int(off[:2]) * 60 + int(off[2:])
        try:
            tz = datetime.timezone(datetime.timedelta(minutes=-minutes if sign == "-" else minutes))
        except ValueError:  # an offset of a day or more
            return None
    text, sep, frac = text.replace(",", ".").partition(".")
    if frac and not (frac.isdigit() and frac.isascii()):
        return None
    text += {10: "0000", 12: "00"}.get(len(text), "")
    if len(text) != 14 or not (text.isdigit() and text.isascii()):
        return None
    try:
        return datetime.datetime(int(text[:4]), int(text[4:6]), int(text[6:8]), int(text[8:10]), int(text[10:12]),
                                 int(text[12:]), int(frac.ljust(6, "0")[:6]) if sep else 0,
                                 tzinfo=tz).astimezone(datetime.timezone.utc)
    except (ValueError, OverflowError):
        return None


# --- protection credentials -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Protector:
    """How requests are protected and which responses are acceptable.

    MAC (``reference``+``secret``) or signature (``certificate``+``private_key``, ``chain`` sent as
    extraCerts after the protection certificate). ``trust_anchors`` are the CMP trust anchors for signed
    responses; ``secret`` also verifies MAC-protected responses.
    """

    reference: bytes | None = None
    secret: bytes | None = dataclasses.field(default=None, repr=False)
    mac_kind: str = "pbm"
    mac_iterations: int | None = None
    mac_hash: str = "sha256"  # HMAC hash of our MAC ("sha1" = OpenSSL's default PBM mac hmac-sha1)
    mac_owf: str | None = None  # PBM one-way function (default: see protection.new_mac_alg)
    certificate: x509.Certificate | None = None
    private_key: object = None
    chain: tuple[x509.Certificate, ...] = ()
    trust_anchors: tuple[x509.Certificate, ...] = ()
    # Server certificates trusted directly as response signers (--cmp-server-cert, like OpenSSL's -srvcert).
    pinned: tuple[x509.Certificate, ...] = ()
    # Tolerated deviation (--ignore-keyusage, OpenSSL's -ignore_keyusage): the signer's keyUsage is not checked.
    ignore_keyusage: bool = False
    # Tolerated deviation (--reuse-signer): a signed response without extraCerts (Trustpoint's pkiConf) is verified
    # with the signer certificate validated earlier in the same transaction.
    reuse_signer: bool = False
    # Tolerated deviation (--trusted-signer-fallback): a signed response without extraCerts (the MockCA's genp to
    # an unprotected genm) is verified with a pinned certificate or CMP trust anchor named as its sender.
    trusted_signer_fallback: bool = False
    unprotected: bool = False  # testing/diagnostics only: send without protection

    @property
    def uses_signature(self) -> bool:
        return self.certificate is not None and self.private_key is not None

    def check(self) -> None:
        if self.unprotected:
            return
        if self.uses_signature:
            if spki_der(self.certificate) != spki_der(self.private_key):
                raise ValueError("protection certificate and private key do not match")
            return
        if self.secret is None:
            raise ValueError("no CMP protection credentials: give a reference + shared secret (MAC) or a "
                             "certificate + private key (signature)")
        if self.mac_kind not in ("pbm", "pbmac1"):
            raise ValueError(f"unknown MAC {self.mac_kind!r} (expected 'pbm' or 'pbmac1')")


def new_mac_alg_for(pr: Protector):
    """A fresh MAC protectionAlg with the Protector's scheme, hash, OWF and iteration count."""
    return P.new_mac_alg(pr.mac_kind, iterations=pr.mac_iterations, hash_name=pr.mac_hash, owf=pr.mac_owf)


def sender_kid(pr: Protector) -> bytes | None:
    """senderKID: the reference for MAC (RFC 9483 3.1), the SubjectKeyIdentifier for signatures."""
    if pr.uses_signature:
        try:
            return pr.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            return None
    return pr.reference


def encode_message(pr: Protector, body_type: str, body_value, *, pvno: int = PVNO_CMP2000,
                   sender: x509.Name | None = None, recipient: x509.Name | None = None,
                   transaction_id: bytes | None = None, sender_nonce: bytes | None = None,
                   recip_nonce: bytes | None = None, general_info: Sequence[tuple] = (),
                   now: datetime.datetime | None = None, mac_alg=None, key_cache: dict | None = None,
                   extra_certs: Sequence[x509.Certificate] = (), protection_certs: bool = True) -> bytes:
    """DER of a PKIMessage of any type, protected per ``pr`` (requests here; responses in tests and the lab
    server). With signature protection, sender is the protection certificate's subject and extraCerts
    carry that certificate first, then ``pr.chain``. ``mac_alg``/``key_cache``: reuse one MAC protectionAlg
    and its derived key (within a transaction); default a fresh salt. ``extra_certs`` are appended to
    extraCerts (e.g. the issuing chain in a MAC-protected ip). ``protection_certs=False`` leaves the protection
    certificate and ``pr.chain`` out (servers do so in pkiConf/genp; used by the lab server and tests)."""
    if pr.uses_signature:
        sender = pr.certificate.subject
    msg = A.PKIMessage()
    h = msg.setComponentByName("header").getComponentByName("header")
    h["pvno"] = pvno
    h["sender"] = directory_name(sender)
    h["recipient"] = directory_name(recipient)
    if now is not None:
        h["messageTime"] = h["messageTime"].clone(now.strftime("%Y%m%d%H%M%SZ"))
    if not pr.unprotected:
        if pr.uses_signature:
            alg, sign = P.signature_alg_for(pr.private_key)
        else:
            alg = mac_alg if mac_alg is not None else new_mac_alg_for(pr)
        h["protectionAlg"] = _tagged(h, "protectionAlg", alg)
        kid = sender_kid(pr)
        if kid is not None:
            h["senderKID"] = h["senderKID"].clone(kid)
    if transaction_id is not None:
        h["transactionID"] = h["transactionID"].clone(transaction_id)
    if sender_nonce is not None:
        h["senderNonce"] = h["senderNonce"].clone(sender_nonce)
    if recip_nonce is not None:
        h["recipNonce"] = h["recipNonce"].clone(recip_nonce)
    if general_info:
        gi = h.setComponentByName("generalInfo").getComponentByName("generalInfo")
        for i, (oid, value) in enumerate(general_info):
            itav = gi.componentType.clone()
            itav["infoType"] = A.ObjectIdentifier(str(oid))
            if value is not None:
                itav["infoValue"] = A.Any(A.der_encode(value))
            gi.setComponentByPosition(i, itav)
    body = msg.setComponentByName("body").getComponentByName("body")
    if isinstance(body_value, A.Null):
        body.setComponentByName(body_type, body.componentType.getTypeByPosition(
            body.componentType.getPositionByName(body_type)).clone(""))
    else:
        _fill(body.setComponentByName(body_type).getComponentByName(body_type), body_value)
    if not pr.unprotected:
        data = _protected_part(msg)
        prot = sign(data) if pr.uses_signature else P.compute_mac(alg, pr.secret, data, key_cache)
        msg["protection"] = msg["protection"].clone(A.BitString.fromOctetString(prot))
    certs = ((pr.certificate,) + tuple(pr.chain) if pr.uses_signature and not pr.unprotected and protection_certs
             else ())
    certs += tuple(c for c in extra_certs if c not in certs)
    if certs:
        ec = msg.setComponentByName("extraCerts").getComponentByName("extraCerts")
        for i, c in enumerate(certs):
            ec.setComponentByPosition(i, cert_to_asn1(c))
    return A.der_encode(msg)


# --- responses ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Response:
    """A decoded CMP response: message, body type and body, and how its protection was checked."""

    msg: object  # pyasn1 PKIMessage
    body_type: str
    body: object
    protected: bool  # protection present and verified
    protection_problem: str = ""
    signer: x509.Certificate | None = None
    extra_certs: tuple[x509.Certificate, ...] = ()
    server_time: datetime.datetime | None = None
    implicit_confirm_granted: bool = False
    general_info: dict = dataclasses.field(default_factory=dict)
    skipped_extra_certs: tuple[str, ...] = ()  # extraCerts that did not parse (never used; see _extra_certs)


def decode_message(der: bytes):
    """PKIMessage from DER. Raises ProtocolError for anything that is not exactly one DER PKIMessage."""
    if not isinstance(der, (bytes, bytearray)):
        raise TypeError("CMP message must be bytes")
    if not der:
        raise ProtocolError("empty CMP response")
    try:
        msg = A.der_decode(bytes(der), A.PKIMessage())
    except ValueError as e:
        raise ProtocolError(f"response is not a CMP PKIMessage (truncated or garbage DER, {len(der)} bytes): {e}") from None
    # Strict DER: the protection is computed over re-encoded parts, so what we decoded must re-encode to the
    # very bytes received (this also rejects values pyasn1 decodes but cannot encode, e.g. a bad time).
    try:
        same = A.der_encode(msg) == bytes(der)
    except Exception:  # pyasn1 raises PyAsn1Error subclasses; nothing from a peer may escape unwrapped
        same = False
    if not same:
        raise ProtocolError("response is not a valid DER CMP PKIMessage (a value does not re-encode identically)")
    return msg


def _protected_part(msg) -> bytes:
    pp = A.ProtectedPart()
    pp["header"] = msg["header"]
    pp["body"] = msg["body"]
    return A.der_encode(pp)


def _extra_certs(msg, skipped: list | None = None) -> tuple[x509.Certificate, ...]:
    """The extraCerts that parse. extraCerts are unprotected hints: a certificate this client cannot load (e.g. a
    post-quantum or composite key, as the Siemens MockCA sends next to its classical chain) is skipped and noted
    in ``skipped``; only the signer (extraCerts[0] of a signature-protected message) must parse, so a skipped one
    can never be used. Raises ProtocolError for an unparsable signer certificate."""
    if not msg["extraCerts"].isValue:
        return ()
    h = msg["header"]
    signed = h["protectionAlg"].isValue and not P.is_mac_alg(h["protectionAlg"])
    out = []
    for i, c in enumerate(msg["extraCerts"]):
        try:
            out.append(asn1_to_cert(c, f"extraCerts[{i}]"))
        except ProtocolError as e:
            if i == 0 and signed:
                raise
            if skipped is not None:
                skipped.append(str(e))
    return tuple(out)


def _general_info(header) -> dict:
    out = {}
    if header["generalInfo"].isValue:
        for itav in header["generalInfo"]:
            out[str(itav["infoType"])] = bytes(itav["infoValue"]) if itav["infoValue"].isValue else None
    return out


def _is_error_content(body_type: str, body) -> bool:
    if body_type == "error":
        return True
    if body_type in ("ip", "cp", "kup"):
        return any(int(r["status"]["status"]) == 2 for r in body["response"])
    if body_type == "rp":
        return any(int(s["status"]) == 2 for s in body["status"])
    return False


class Transaction:
    """One CMP transaction: builds its requests and checks its responses (see the module docstring)."""

    def __init__(self, protector: Protector, *, sender: x509.Name | None = None, recipient: x509.Name | None = None,
                 max_clock_skew_s: float | None = DEFAULT_CLOCK_SKEW_S, clock_trusted: bool = True,
                 now: Callable[[], datetime.datetime] = _utcnow,
                 pvno: int = PVNO_CMP2000, transaction_id: bytes | None = None, operation: str | None = None,
                 tolerate_nonce_reuse: bool = False):
        protector.check()
        self.protector = protector
        self.operation = operation  # RFC 9483 6.1 operation label of this transaction (certConf/pollReq keep it)
        # Deviation switch (docs/cmp.md): a response may repeat a senderNonce of this transaction when its
        # recipNonce and transactionID match (the Siemens MockCA's pkiConf repeats the ip's).
        self.tolerate_nonce_reuse = tolerate_nonce_reuse
        self.tolerated: list[str] = []  # deviations accepted in this transaction, for the caller to report
        self.tid = transaction_id or os.urandom(NONCE_BYTES)
        self.pvno = pvno
        if protector.uses_signature:
            sender = protector.certificate.subject  # RFC 9483 3.1: sender = subject of the protection cert
        self.sender = sender
        self.recipient = recipient
        # max_clock_skew_s=None is the older spelling of "the clock is not trusted".
        self.clock_trusted = clock_trusted and max_clock_skew_s is not None
        self.max_clock_skew_s = DEFAULT_CLOCK_SKEW_S if max_clock_skew_s is None else float(max_clock_skew_s)
        self.now = now
        self.sender_nonce: bytes | None = None  # of our last request
        self.recip_nonce: bytes | None = None  # the server's last senderNonce
        self._seen_nonces: set[bytes] = set()
        self._signer: tuple | None = None  # (certificate, untrusted certs) of the last validated signed response
        self.last_request_type = ""
        self._key_cache: dict = {}
        # One MAC protectionAlg (salt) per transaction: the PBM/PBKDF2 key is derived once.
        self._mac_alg = None
        if not protector.unprotected and not protector.uses_signature:
            self._mac_alg = new_mac_alg_for(protector)

    # -- requests --
    def request(self, body_type: str, body_value, *, general_info: Sequence[tuple] = (), pvno: int | None = None) -> bytes:
        """DER of a protected request. ``general_info``: (oid, pyasn1 value or None) pairs."""
        if body_type not in REQUEST_TYPES:
            raise ValueError(f"not a CMP request type: {body_type}")
        self.sender_nonce = os.urandom(NONCE_BYTES)
        der = encode_message(self.protector, body_type, body_value, pvno=pvno or self.pvno, sender=self.sender,
                             recipient=self.recipient, transaction_id=self.tid, sender_nonce=self.sender_nonce,
                             recip_nonce=self.recip_nonce, general_info=general_info, now=self._send_time(),
                             mac_alg=self._mac_alg, key_cache=self._key_cache)
        self.last_request_type = body_type
        return der

    # -- responses --
    def accept(self, der: bytes, expected: Iterable[str]) -> Response:
        """Decode and check a response (module docstring, steps 1-5). Raises ProtocolError/ProtectionError."""
        msg = decode_message(der)
        h = msg["header"]
        pvno = int(h["pvno"])
        if pvno not in (PVNO_CMP2000, PVNO_CMP2021):
            raise ProtocolError(f"response pvno {pvno} is not supported (expected 2 or 3)")
        body_type = msg["body"].getName()
        body = msg["body"].getComponent()
        skipped: list[str] = []
        extra = _extra_certs(msg, skipped)
        resp = Response(msg=msg, body_type=body_type, body=body, protected=False, extra_certs=extra,
                        skipped_extra_certs=tuple(skipped))
        try:
            resp.signer = self._verify_protection(msg, extra)
            resp.protected = True
        except ProtectionError as e:
            if not _is_error_content(body_type, body):
                raise
            resp.protection_problem = str(e)
        # Binding to our request (checked on error content too: an unrelated error is no answer to us).
        if not h["transactionID"].isValue or bytes(h["transactionID"]) != self.tid:
            raise ProtocolError("response transactionID does not match our request (replayed or for another "
                                "transaction); discarded")
        if not h["recipNonce"].isValue or bytes(h["recipNonce"]) != self.sender_nonce:
            raise ProtocolError("response recipNonce does not match the senderNonce of our request (replay?); discarded")
        if not h["senderNonce"].isValue or len(bytes(h["senderNonce"])) < NONCE_BYTES:
            raise ProtocolError("response senderNonce missing or shorter than 128 bits")
        nonce = bytes(h["senderNonce"])
        if nonce in self._seen_nonces:
            if not self.tolerate_nonce_reuse:
                raise ProtocolError("response senderNonce repeats one already seen in this transaction (replay?); "
                                    "its recipNonce and transactionID match our request: if this server is known "
                                    "to reuse its senderNonce (e.g. in pkiConf), --tolerate-nonce-reuse accepts it")
            self.tolerated.append(f"{body_type} reused the server's senderNonce (recipNonce and transactionID "
                                  "match; --tolerate-nonce-reuse)")
        self._seen_nonces.add(nonce)
        self.recip_nonce = nonce
        if h["messageTime"].isValue:
            resp.server_time = parse_generalized_time(h["messageTime"])
            now = self._trusted_now()
            if resp.server_time is not None and now is not None:
                skew = abs((resp.server_time - now).total_seconds())
                if skew > self.max_clock_skew_s:
                    raise ProtocolError(f"response messageTime {resp.server_time:%Y-%m-%dT%H:%M:%SZ} is {skew:.0f} s "
                                        f"from our clock (tolerance {self.max_clock_skew_s:.0f} s)")
        resp.general_info = _general_info(h)
        resp.implicit_confirm_granted = str(A.id_it_implicitConfirm) in resp.general_info
        expected = tuple(expected)
        if body_type != "error" and body_type not in expected:
            raise ProtocolError(f"unexpected response type {body_type} to {self.last_request_type} "
                                f"(expected {' or '.join(expected)})")
        return resp

    def _verify_protection(self, msg, extra) -> x509.Certificate | None:
        h = msg["header"]
        if not h["protectionAlg"].isValue or not msg["protection"].isValue:
            raise ProtectionError("response is not protected")
        alg = h["protectionAlg"]
        data = _protected_part(msg)
        value = msg["protection"].asOctets()
        if P.is_mac_alg(alg):
            if self.protector.secret is None:
                raise ProtectionError("response is MAC-protected but no shared secret is configured to verify it")
            if not P.mac_equal(P.compute_mac(alg, self.protector.secret, data, self._key_cache), value):
                raise ProtectionError("response MAC does not verify with our shared secret (wrong secret, or the "
                                      "message was altered)")
            return None
        if extra:
            signer, untrusted = extra[0], tuple(extra[1:])
            P.verify_signature(signer.public_key(), alg, value, data)
        else:
            signer, untrusted = self._signer_without_extra_certs(msg, alg, value, data)
        s = h["sender"]
        if s.getName() != "directoryName" or name_der(s["directoryName"]) != signer.subject.public_bytes():
            raise ProtectionError("response sender is not the subject of its protection certificate")
        if not self.protector.trust_anchors and not self.protector.pinned:
            raise ProtectionError("signature-protected response, but no CMP trust anchor is configured "
                                  "(EnrollOptions.trust_anchors, or pin the server with --cmp-server-cert); cannot "
                                  "trust the signer")
        try:
            validate(signer, untrusted, self.protector.trust_anchors, self.signer_policy(),
                     what="CMP response signer")
        except VerificationError as e:
            hint = ""
            if e.reason == "bad-key-usage" and not self.protector.ignore_keyusage:
                hint = (" -- if this CA/RA is known to sign without digitalSignature in its keyUsage, "
                        "--ignore-keyusage accepts that (and nothing else)")
            raise ProtectionError(f"untrusted signer: {e} ({e.reason}){hint}") from None
        self._signer = (signer, untrusted)
        return signer

    def _signer_without_extra_certs(self, msg, alg, value: bytes, data: bytes):
        """(signer, untrusted) for a signed response that carries no extraCerts (RFC 9483 3.3 wants the signer
        first in extraCerts): only with a deviation switch, and only a certificate we already trust for it; the
        signature must verify with it and the validator's cmp-signer policy still applies afterwards."""
        body = msg["body"].getName()
        pr = self.protector
        if pr.reuse_signer and self._signer is not None:
            signer, untrusted = self._signer
            try:
                P.verify_signature(signer.public_key(), alg, value, data)
            except ProtectionError as e:
                raise ProtectionError(f"{body} without extraCerts: {e} -- --reuse-signer accepts only the signer "
                                      f"validated earlier in this transaction ({signer.subject.rfc4514_string()})"
                                      ) from None
            self.tolerated.append(f"{body} without extraCerts, verified with the signer certificate validated earlier "
                                  f"in this transaction (--reuse-signer)")
            return signer, untrusted
        if pr.trusted_signer_fallback:
            s = msg["header"]["sender"]
            sender = name_der(s["directoryName"]) if s.getName() == "directoryName" else None
            for c in tuple(pr.pinned) + tuple(pr.trust_anchors):
                if c.subject.public_bytes() != sender:
                    continue
                try:
                    P.verify_signature(c.public_key(), alg, value, data)
                except ProtectionError:
                    continue
                self.tolerated.append(f"{body} without extraCerts, verified with the trusted certificate "
                                      f"{c.subject.rfc4514_string()} (--trusted-signer-fallback)")
                return c, ()
            raise ProtectionError(f"signature-protected {body} without extraCerts: its signature verifies with no "
                                  "pinned certificate or CMP trust anchor named as its sender "
                                  "(--trusted-signer-fallback accepts only those)")
        hints = []
        if self._signer is not None:
            hints.append("--reuse-signer verifies it with the signer certificate validated earlier in this "
                         "transaction")
        hints.append("--trusted-signer-fallback verifies it with a CMP trust anchor or pinned certificate named as "
                     "its sender")
        raise ProtectionError(f"signature-protected {body} without extraCerts: the signer certificate must come "
                              "first in extraCerts (RFC 9483 3.3); if this server is known to leave it out, "
                              + "; ".join(hints))

    def _clock_usable(self, now: datetime.datetime) -> bool:
        return self.clock_trusted and now >= CLOCK_FLOOR

    def _trusted_now(self) -> datetime.datetime | None:
        """Our time when it may be held against messageTime (a trusted clock, after the floor), else None."""
        now = self.now()
        if isinstance(now, ClockReading):
            if not now.trusted:
                return None
            now = now.at
        return now if self._clock_usable(now) else None

    def _send_time(self) -> datetime.datetime:
        now = self.now()
        if isinstance(now, ClockReading):
            return now.at if now.uncertainty_s <= _SEND_MAX_UNCERTAINTY_S else _utcnow()
        return now

    def signer_policy(self) -> Policy:
        """The validator policy for the response signer (RFC 9483 §3.1, RFC 4210 §5.1.3.3): at our time when
        the clock is trusted; at the caller's estimate with its uncertainty (a ``ClockReading``, the daemon);
        else valid within ``max_clock_skew_s`` of our clock, or at some time after the clock floor when our clock
        has never been set."""
        now = self.now()
        kw = dict(pinned=self.protector.pinned, ignore_key_usage=self.protector.ignore_keyusage)
        if isinstance(now, ClockReading):
            if not now.trusted:
                return Policy.for_purpose("cmp-signer", now, **kw)
            now = now.at
        if self._clock_usable(now):
            return Policy.for_purpose("cmp-signer", now, **kw)
        if now < CLOCK_FLOOR:
            return Policy.for_unknown_clock("cmp-signer", **kw)
        return Policy.for_purpose("cmp-signer", now, clock="estimate", uncertainty_s=self.max_clock_skew_s, **kw)


def _tagged(seq, field: str, value):
    """``value`` copied into a fresh instance of ``seq``'s (EXPLICIT-tagged) ``field`` type."""
    return _fill(seq.getComponentByName(field).clone(), value)


def _fill(target, value):
    """Copy the content of ``value`` into ``target``, a differently tagged instance of the same type."""
    if isinstance(value, A.univ.SequenceOf):
        for i, v in enumerate(value):
            target.setComponentByPosition(i, v)
    else:
        for i in range(len(value.componentType)):
            c = value.getComponentByPosition(i, instantiate=False)
            if c is not None and c is not A.univ.noValue and c.isValue:
                target.setComponentByPosition(i, c)
    return target


# --- request bodies -------------------------------------------------------------------------------
def cert_template(subject: x509.Name | None, public_key=None, sans=(), extensions=(), *,
                  issuer: x509.Name | None = None, serial: int | None = None, empty_key_alg=None):
    tpl = A.CertTemplate()
    if serial is not None:
        tpl["serialNumber"] = tpl["serialNumber"].clone(serial)
    if issuer is not None:
        tpl["issuer"].setComponentByPosition(0, _rdns(issuer))
    if subject is not None:
        tpl["subject"].setComponentByPosition(0, _rdns(subject))
    if public_key is not None:
        spki = spki_to_asn1(public_key)
        tpl["publicKey"]["algorithm"] = spki["algorithm"]
        tpl["publicKey"]["subjectPublicKey"] = spki["subjectPublicKey"]
    elif empty_key_alg is not None:  # central key generation: algorithm only, empty key (RFC 9483 4.1.6)
        tpl["publicKey"]["algorithm"] = empty_key_alg
        tpl["publicKey"]["subjectPublicKey"] = A.BitString(hexValue="")
    exts = list(extensions)
    if sans and not any(isinstance(e.value, x509.SubjectAlternativeName) for e in exts):
        exts.append(x509.Extension(x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, False,
                                   x509.SubjectAlternativeName(list(sans))))
    if exts:
        ext_field = tpl["extensions"]
        for i, e in enumerate(exts):
            ext = A.Extension()
            ext["extnID"] = A.ObjectIdentifier(e.oid.dotted_string)
            if e.critical:
                ext["critical"] = True
            ext["extnValue"] = e.value.public_bytes()
            ext_field.setComponentByPosition(i, ext)
    return tpl


def old_cert_id_control(old_cert: x509.Certificate):
    """regCtrl oldCertID (RFC 4211 6.5) naming the certificate a kur replaces."""
    cid = A.CertId()
    cid["issuer"] = directory_name(old_cert.issuer)
    cid["serialNumber"] = old_cert.serial_number
    atv = A.AttributeTypeAndValue()
    atv["type"] = A.id_regCtrl_oldCertID
    atv["value"] = A.Any(A.der_encode(cid))
    return atv


def cert_req_messages(template, pop_key=None, *, cert_req_id: int = 0, controls=()):
    """CertReqMessages with one CertReqMsg; POP by signature with ``pop_key`` over the DER CertRequest
    (RFC 4211 4.1, no poposkInput since subject and publicKey are in the template). Without a key (central
    key generation) the POP is omitted (RFC 9483 4.1.6)."""
    req = A.CertRequest()
    req["certReqId"] = cert_req_id
    req["certTemplate"] = template
    if controls:
        ctl = req.setComponentByName("controls").getComponentByName("controls")
        for i, c in enumerate(controls):
            ctl.setComponentByPosition(i, c)
    msg = A.CertReqMsg()
    msg["certReq"] = req
    if pop_key is not None:
        alg, sign = P.signature_alg_for(pop_key)
        pop = msg.setComponentByName("pop").getComponentByName("pop")
        sk = pop.setComponentByName("signature").getComponentByName("signature")
        sk["algorithmIdentifier"] = alg
        sk["signature"] = A.BitString.fromOctetString(sign(A.der_encode(req)))
    msgs = A.CertReqMessages()
    msgs.setComponentByPosition(0, msg)
    return msgs


def p10cr_body(csr: x509.CertificateSigningRequest):
    return A.der_decode(csr.public_bytes(Encoding.DER), A.CertificationRequest())


def cert_conf_body(cert: x509.Certificate, cert_req_id: int, *, accept: bool = True, reason: str = "",
                   fail_bits: Sequence[int] = ()):
    """certConf for one certificate; certHash uses the certificate's own signature hash (RFC 9480 2.10).
    Returns (body, pvno) -- pvno 3 when hashAlg had to be given (EdDSA)."""
    digest, hash_cls, needs_alg = P.cert_hash(cert)
    cs = A.CertStatus()
    cs["certHash"] = digest
    cs["certReqId"] = cert_req_id
    if not accept:
        si = cs.setComponentByName("statusInfo").getComponentByName("statusInfo")
        si["status"] = 2
        if reason:
            st = si.setComponentByName("statusString").getComponentByName("statusString")
            st.setComponentByPosition(0, reason)
        if fail_bits:
            n = max(fail_bits) + 1
            si["failInfo"] = si["failInfo"].clone(tuple(1 if i in fail_bits else 0 for i in range(n)))
    pvno = PVNO_CMP2000
    if needs_alg:
        cs["hashAlg"] = _tagged(cs, "hashAlg", P.alg_id(P.hash_oid(hash_cls)))
        pvno = PVNO_CMP2021
    body = A.CertConfirmContent()
    body.setComponentByPosition(0, cs)
    return body, pvno


def poll_req_body(cert_req_id: int):
    body = A.PollReqContent()
    item = body.componentType.clone()
    item["certReqId"] = cert_req_id
    body.setComponentByPosition(0, item)
    return body


def rr_body(cert: x509.Certificate, reason: str):
    if reason not in REASONS:
        raise ValueError(f"unknown revocation reason {reason!r} (one of {', '.join(REASONS)})")
    rd = A.RevDetails()
    rd["certDetails"] = cert_template(None, issuer=cert.issuer, serial=cert.serial_number)
    ext = A.Extension()
    ext["extnID"] = A.id_ce_cRLReasons
    ext["extnValue"] = A.der_encode(A.ReasonFlags(REASONS[reason]))
    rd["crlEntryDetails"].setComponentByPosition(0, ext)
    body = A.RevReqContent()
    body.setComponentByPosition(0, rd)
    return body


def genm_body(items: Sequence[tuple]):
    """items: (oid, pyasn1 value or None)."""
    body = A.GenMsgContent()
    for i, (oid, value) in enumerate(items):
        itav = A.InfoTypeAndValue()
        itav["infoType"] = A.ObjectIdentifier(str(oid))
        if value is not None:
            itav["infoValue"] = A.Any(A.der_encode(value))
        body.setComponentByPosition(i, itav)
    return body


# --- response content -----------------------------------------------------------------------------
def status_of(si) -> tuple[int, tuple[str, ...], str]:
    from enroll_clients.cmp.errors import fail_info_names

    status = int(si["status"])
    fail = fail_info_names(si["failInfo"]) if si["failInfo"].isValue else ()
    text = "; ".join(str(t) for t in si["statusString"]) if si["statusString"].isValue else ""
    return status, fail, text


def genp_values(body) -> dict:
    """{infoType dotted string: DER of infoValue or None} from GenRepContent."""
    out = {}
    for itav in body:
        out[str(itav["infoType"])] = bytes(itav["infoValue"]) if itav["infoValue"].isValue else None
    return out


def decode_ca_certs(der: bytes | None) -> tuple[x509.Certificate, ...]:
    if der is None:
        return ()
    try:
        seq = A.der_decode(der, A.CaCertsValue())
    except ValueError as e:
        raise ProtocolError(f"genp caCerts value is malformed: {e}") from None
    return tuple(asn1_to_cert(c, f"genp caCerts[{i}]") for i, c in enumerate(seq))


def decode_root_ca_key_update(der: bytes | None):
    """(newWithNew, newWithOld, oldWithNew) or None when the server has no update (absent value)."""
    if der is None:
        return None
    try:
        v = A.der_decode(der, A.RootCaKeyUpdateContent())
    except ValueError as e:
        raise ProtocolError(f"genp rootCaKeyUpdate value is malformed: {e}") from None
    nwn = asn1_to_cert(v["newWithNew"], "genp rootCaKeyUpdate newWithNew")
    nwo = asn1_to_cert(v["newWithOld"], "genp rootCaKeyUpdate newWithOld") if v["newWithOld"].isValue else None
    own = asn1_to_cert(v["oldWithNew"], "genp rootCaKeyUpdate oldWithNew") if v["oldWithNew"].isValue else None
    return nwn, nwo, own


def encode_root_ca_key_update(new_with_new, new_with_old=None, old_with_new=None):
    v = A.RootCaKeyUpdateContent()
    v["newWithNew"] = cert_to_asn1(new_with_new)
    if new_with_old is not None:
        v["newWithOld"] = _tagged(v, "newWithOld", cert_to_asn1(new_with_old))
    if old_with_new is not None:
        v["oldWithNew"] = _tagged(v, "oldWithNew", cert_to_asn1(old_with_new))
    return v


def encode_ca_certs(certs):
    v = A.CaCertsValue()
    for i, c in enumerate(certs):
        v.setComponentByPosition(i, cert_to_asn1(c))
    return v
