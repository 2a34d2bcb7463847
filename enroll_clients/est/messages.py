"""EST (RFC 7030, RFC 8951, RFC 9908) message encoding and decoding: pure and synchronous, bytes in, objects out.

Invariants:
- Nothing here does I/O; every function either returns a fully parsed value or raises ``ProtocolError`` (wire
  input) / ``ValueError`` (a caller's argument) whose text names what was wrong and where.
- Bodies are decoded by their first bytes, never trusted to their headers: base64 (RFC 7030 with or without
  ``Content-Transfer-Encoding``, RFC 8951), PEM or raw DER, because real servers send all three.
- Base64 is decoded strictly (no silently dropped characters): a corrupted body is an error, not a shorter DER.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import email.message
import email.parser
import email.policy
import email.utils
import hashlib
import html
import re
from typing import Any, Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ObjectIdentifier

from enroll_clients.base import ProtectionError, ProtocolError
from keystore.certs import fingerprint  # noqa: F401  (the one sha256:HEX helper, re-exported for EST callers)
from keystore.validator import issued_by, self_signed  # noqa: F401  (self_signed re-exported)

EST_PATH = "/.well-known/est"
OPERATIONS = ("cacerts", "simpleenroll", "simplereenroll", "serverkeygen", "csrattrs")
SERVER_TEXT_MAX_CHARS = 300

# Media types (RFC 7030 §3.2.4, §4.*): what we send and what we accept when servers deviate.
CT_PKCS10 = "application/pkcs10"
CT_PKCS7 = "application/pkcs7-mime"
CT_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
CT_PKCS8 = "application/pkcs8"
CT_CSRATTRS = "application/csrattrs"
CT_MULTIPART = "multipart/mixed"

_SEGMENT_RE = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@%]+$")
_B64_WS = re.compile(rb"[ \t\r\n]+")


# ---- URLs -----------------------------------------------------------------------------------------
def label_segments(label: str | None) -> tuple[str, ...]:
    """Split an EST label into path segments.

    RFC 7030 §3.2.2 defines one optional label segment; real servers (Trustpoint) use two
    (``<domain>/<profile>``), so ``"a/b"`` is accepted as two segments.

    Raises:
        ValueError: an empty segment, ``.``/``..``, or a character not allowed in a URI path segment.
    """
    if not label:
        return ()
    segs = tuple(label.strip("/").split("/"))
    for s in segs:
        if not s or s in (".", "..") or not _SEGMENT_RE.match(s) or s in OPERATIONS:
            raise ValueError(f"EST label {label!r}: segment {s!r} is not a valid label path segment "
                             "(RFC 3986 segment, not an EST operation name)")
    return segs


def path_segments(label: str | None, profile: str | None = None) -> tuple[str, ...]:
    """The EST path segments between ``/.well-known/est`` and the operation: ``<label>[/<profile>]``.

    ``label`` may itself hold two segments (``<domain>/<profile>``, Trustpoint style); then no separate
    ``profile`` may be given. A ``profile`` without a label is the only segment.

    Raises:
        ValueError: a bad segment, a profile with a ``/``, or a profile given twice.
    """
    segs = label_segments(label)
    if profile:
        prof = label_segments(profile)
        if len(prof) != 1:
            raise ValueError(f"EST profile {profile!r} must be a single path segment (no '/')")
        if len(segs) > 1:
            raise ValueError(f"EST label {label!r} already names a profile; give it once: --label "
                             f"{segs[0]} --profile {prof[0]} (path /.well-known/est/<label>/<profile>/...)")
        segs = segs + prof
    return segs


def build_url(server: str, operation: str, label: str | None = None, base_path: str | None = None,
              profile: str | None = None) -> str:
    """``https://host[:port][/prefix]/.well-known/est[/<label>][/<profile>]/<operation>``.

    ``server`` may already end in ``/.well-known/est`` (or in ``base_path`` when a server lives elsewhere);
    it is not repeated.

    Raises:
        ValueError: not an https URL, unknown operation, bad label or profile.
    """
    if operation not in OPERATIONS:
        raise ValueError(f"unknown EST operation {operation!r} (known: {', '.join(OPERATIONS)})")
    if not server.lower().startswith("https://"):
        raise ValueError(f"EST server URL {server!r} must start with https:// (RFC 7030 §3.3 requires TLS)")
    base = server.rstrip("/")
    prefix = "/" + (base_path if base_path is not None else EST_PATH).strip("/")
    if prefix == "/":
        prefix = ""
    if prefix and not base.endswith(prefix):
        base += prefix
    return "/".join((base,) + path_segments(label, profile) + (operation,))


def same_origin(a: str, b: str) -> bool:
    """True when both URLs have the same scheme, host and port (RFC 6454 origin)."""
    import urllib.parse

    def origin(u):
        p = urllib.parse.urlsplit(u)
        port = p.port or {"https": 443, "http": 80}.get(p.scheme.lower())
        return p.scheme.lower(), (p.hostname or "").lower(), port

    return origin(a) == origin(b)


# ---- fingerprints ---------------------------------------------------------------------------------
def parse_fingerprint(text: str) -> bytes:
    """Parse ``sha256:HEX`` (colons/spaces between hex pairs and any case allowed) into 32 bytes.

    Raises:
        ValueError: other algorithm or not 64 hex digits.
    """
    if not isinstance(text, str):
        raise TypeError("fingerprint must be a str like 'sha256:HEX'")
    algo, sep, hexpart = text.strip().partition(":")
    if not sep or algo.lower() != "sha256":
        raise ValueError(f"CA fingerprint {text!r}: expected 'sha256:' followed by 64 hex digits")
    digits = re.sub(r"[:\s]", "", hexpart)
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", digits):
        raise ValueError(f"CA fingerprint {text!r}: expected 64 hex digits after 'sha256:', got {len(digits)}")
    return bytes.fromhex(digits)


def match_fingerprint(certs: Iterable[x509.Certificate], wanted: str) -> x509.Certificate | None:
    """The certificate whose SHA-256 fingerprint equals ``wanted`` (``sha256:HEX``), or None."""
    digest = parse_fingerprint(wanted)
    for c in certs:
        if hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).digest() == digest:
            return c
    return None


# ---- bodies: base64 / PEM / DER -------------------------------------------------------------------
def encode_base64(der: bytes) -> bytes:
    """Base64 in 64-character lines ending in LF, as ``base64``/OpenSSL write it (RFC 7030's examples feed
    ``base64`` output to curl; some decoders, e.g. GNU ``base64 -d``, reject CR)."""
    b = base64.b64encode(der)
    return b"".join(b[i:i + 64] + b"\n" for i in range(0, len(b), 64))


def decode_base64(data: bytes, what: str = "body") -> bytes:
    """Strict base64: ASCII whitespace is ignored, anything else outside the alphabet is an error.

    Raises:
        ProtocolError: not valid base64, or empty.
    """
    compact = _B64_WS.sub(b"", data)
    if not compact:
        raise ProtocolError(f"{what}: empty body where base64 DER was expected")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        bad = re.search(rb"[^A-Za-z0-9+/=]", compact)
        where = f" (first bad byte {compact[bad.start():bad.start() + 1]!r} at offset {bad.start()})" if bad else ""
        raise ProtocolError(f"{what}: malformed base64{where}: {e}") from None


def decode_body(data: bytes, what: str = "body") -> bytes:
    """Return the DER inside an EST body that is base64 (RFC 7030/8951), PEM, or raw DER.

    Raw DER always starts with 0x30 (SEQUENCE); base64 of such DER always starts with ``M``, so the two cannot
    be confused.

    Raises:
        ProtocolError: empty, HTML, or malformed base64/PEM.
    """
    if not data:
        raise ProtocolError(f"{what}: empty body")
    if data[:1] == b"\x30":
        return data
    stripped = data.lstrip()
    if b"-----BEGIN" in data[:65536]:  # text may precede the block (openssl -text output)
        blocks = pem_blocks(data, what)
        if len(blocks) != 1:
            raise ProtocolError(f"{what}: expected one PEM block, found {len(blocks)}")
        return blocks[0][1]
    if looks_like_html(stripped):
        raise ProtocolError(f"{what}: got an HTML page instead of EST data: {server_text(data, 'text/html')!r}")
    return decode_base64(data, what)


def pem_blocks(data: bytes, what: str = "body") -> list[tuple[str, bytes]]:
    """All ``-----BEGIN X-----`` blocks as (label, DER).

    Raises:
        ProtocolError: an unterminated block or bad base64 inside.
    """
    out = []
    for m in re.finditer(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)(-----END \1-----|\Z)", data, re.S):
        if not m.group(3):
            raise ProtocolError(f"{what}: PEM block {m.group(1).decode()!r} has no END line")
        body = m.group(2)
        if b":" in body.split(b"\n\n", 1)[0] and b"\n\n" in body:  # RFC 1421 headers (Proc-Type …)
            raise ProtocolError(f"{what}: encrypted/legacy PEM with headers is not accepted")
        out.append((m.group(1).decode(), decode_base64(body, f"{what} (PEM {m.group(1).decode()})")))
    return out


def looks_like_html(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")) or b"<html" in head


def server_text(body: bytes, content_type: str | None = None, limit: int = SERVER_TEXT_MAX_CHARS) -> str:
    """A short, printable rendering of a server's error body for a person (HTML reduced to its text)."""
    text = body[:16384].decode("utf-8", "replace")
    if (content_type or "").lower().startswith("text/html") or looks_like_html(body):
        m = re.search(r"<title[^>]*>(.*?)</title>", text, re.S | re.I)
        title = html.unescape(m.group(1)).strip() if m else ""
        text = re.sub(r"(?is)<(script|style|head)\b.*?</\1>", " ", text)
        text = html.unescape(re.sub(r"<[^>]+>", " ", text))
        if title and not text.strip().startswith(title):
            text = title + ": " + text
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def media_type(content_type) -> tuple[str, dict[str, str]]:
    """Split a Content-Type header into (lower-case type/subtype, lower-case-key params).

    Never raises for a peer's header (str, or the ``email`` package's ``Header`` for a non-ASCII one): a value that
    does not parse gives its lower-cased text before any ``;`` and no parameters, so the caller's comparison with
    the type it expects refuses it by name.
    """
    if content_type is None:
        return "", {}
    text = str(content_type)
    if not text.strip():
        return "", {}
    try:
        msg = email.message.Message()
        msg["content-type"] = text
        params = {str(k).lower(): email.utils.collapse_rfc2231_value(v) for k, v in msg.get_params(failobj=[])[1:]}
        mtype = msg.get_content_type().lower() if "/" in text else text.strip().lower()
    except Exception:  # noqa: BLE001 - the email package raises many types on garbage; none may escape
        return text.split(";", 1)[0].strip().lower(), {}
    return mtype, params


# ---- certificates ---------------------------------------------------------------------------------
def encode_certs_only(certs: Sequence[x509.Certificate]) -> bytes:
    """PKCS#7 certs-only (degenerate SignedData), DER."""
    if not certs:
        raise ValueError("a certs-only PKCS#7 needs at least one certificate")
    return pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER)


def parse_certs_only(der: bytes, what: str = "PKCS#7 certs-only") -> tuple[x509.Certificate, ...]:
    """Certificates of a DER PKCS#7 certs-only message (or of a bare DER certificate, which some servers send).

    Every certificate returned is fully parsed (``keystore.certs.check_certificate``).

    Raises:
        ProtocolError: not PKCS#7/X.509, no certificate in it, or a certificate in it (named by index) that
            does not parse.
    """
    from keystore.certs import PARSE_ERRORS, check_certificate, load_der_certificate
    from keystore.errors import CorruptFileError

    try:
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except PARSE_ERRORS as e:
        if "no certificate" in str(e):
            raise ProtocolError(f"{what}: the PKCS#7 message contains no certificate") from None
        try:
            return (load_der_certificate(der, what),)
        except CorruptFileError as ce:
            if der[:1] == b"\x30" and "not a DER X.509" not in str(ce):
                raise ProtocolError(str(ce)) from None
            raise ProtocolError(f"{what}: neither PKCS#7 certs-only nor an X.509 certificate ({e})") from None
    if not certs:
        raise ProtocolError(f"{what}: the PKCS#7 message contains no certificate")
    try:
        return tuple(check_certificate(c, f"{what}: certificate {i}") for i, c in enumerate(certs))
    except CorruptFileError as e:
        raise ProtocolError(str(e)) from None


def parse_certs_body(body: bytes, content_type: str | None = None, what: str = "response"
                     ) -> tuple[x509.Certificate, ...]:
    """Certificates from an EST certs-only response body in any encoding servers use.

    Accepts base64 PKCS#7 (RFC 7030), raw DER PKCS#7 or certificate, and PEM (``PKCS7`` or one or more
    ``CERTIFICATE`` blocks).

    Raises:
        ProtocolError: HTML, malformed base64/PEM, no certificate.
    """
    mtype, _ = media_type(content_type)
    if mtype == "text/html" or looks_like_html(body.lstrip()[:512]):
        raise ProtocolError(f"{what}: got an HTML page instead of application/pkcs7-mime: "
                            f"{server_text(body, 'text/html')!r}")
    if body[:1] != b"\x30" and b"-----BEGIN" in body[:65536]:  # base64 never holds it; text may precede it
        blocks = pem_blocks(body, what)
        certs: list[x509.Certificate] = []
        for label, der in blocks:
            if label in ("PKCS7", "CMS"):
                certs.extend(parse_certs_only(der, what))
            elif label in ("CERTIFICATE", "X509 CERTIFICATE"):
                from keystore.certs import load_der_certificate
                from keystore.errors import CorruptFileError

                try:
                    certs.append(load_der_certificate(der, f"{what}: PEM CERTIFICATE {len(certs)}"))
                except CorruptFileError as e:
                    raise ProtocolError(str(e)) from None
        if not certs:
            raise ProtocolError(f"{what}: PEM body contains no certificate")
        return tuple(certs)
    return parse_certs_only(decode_body(body, what), what)


def _spki(key_or_cert) -> bytes:
    pub = key_or_cert.public_key() if hasattr(key_or_cert, "public_key") else key_or_cert
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def split_issued(certs: Sequence[x509.Certificate], public_key, what: str = "response"
                 ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
    """(the certificate for ``public_key``, the other certificates in order).

    Raises:
        ProtocolError: no certificate for our key (a certificate for another key is never accepted).
    """
    want = _spki(public_key)
    mine = [c for c in certs if _spki(c) == want]
    if not mine:
        subjects = "; ".join(c.subject.rfc4514_string() for c in certs) or "none"
        raise ProtocolError(f"{what}: no certificate in the response is for our public key "
                            f"(got certificates for: {subjects}); refusing a certificate for another key")
    ee = mine[0]
    return ee, tuple(c for c in certs if c is not ee)


def _same(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a.subject == b.subject and _spki(a) == _spki(b)


def verified_chain(cert: x509.Certificate, pool: Iterable[x509.Certificate], anchors: Sequence[x509.Certificate],
                   *, purpose: str = "credential", now: datetime.datetime | None = None,
                   what: str = "certificate") -> tuple[x509.Certificate, ...]:
    """Path from ``cert`` (excluded) to a trust anchor (included), decided by the validator (keystore.validator,
    ``purpose``: ``credential`` for an issued certificate, ``ca-cert`` for /cacerts, ``est-tls-server``). The
    keystore validates again against the domain's anchors before anything is stored.

    Raises:
        ProtectionError: no acceptable path, naming the certificate and the check that failed.
    """
    from keystore.errors import VerificationError
    from keystore.validator import CLOCK_FLOOR, Policy, validate

    if not anchors:
        raise ProtectionError(f"{what}: no trust anchor to check the certificate chain against")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    # RSA-1024 only exists with --allow-weak-keys (the keystore holds the key to that); a never-set clock is
    # judged by the keystore with the CA's time.
    kw = dict(min_rsa_bits=1024)
    policy = Policy.for_purpose(purpose, now, **kw) if now >= CLOCK_FLOOR else Policy.for_unknown_clock(purpose, **kw)
    try:
        return validate(cert, pool, anchors, policy, what=what)[1:]
    except VerificationError as e:
        text = str(e).replace("does not chain to the trust anchor(s)", "does not chain to the EST trust anchor(s)")
        if "EST trust anchor" not in text:
            text += f" (EST trust anchor(s): {'; '.join(a.subject.rfc4514_string() for a in anchors)})"
        raise ProtectionError(f"{text}; not accepted") from None


@dataclasses.dataclass(frozen=True)
class RolloverLinks:
    """Root CA key update certificates found in an EST /cacerts answer."""

    new_root: x509.Certificate | None = None
    new_with_old: x509.Certificate | None = None
    old_with_new: x509.Certificate | None = None


def rollover_links(certs: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]) -> RolloverLinks:
    """Find RFC 7030 §4.1.3 root key update certificates (NewWithNew, NewWithOld, OldWithNew) in /cacerts.

    Only returns links whose signatures verify and whose old side is one of ``anchors``.
    """
    for old in anchors:
        for new in certs:
            if _same(new, old) or not self_signed(new):
                continue
            nwo = next((c for c in certs if _spki(c) == _spki(new) and c.subject == new.subject
                        and issued_by(c, old)), None)
            if nwo is None:
                continue
            own = next((c for c in certs if _spki(c) == _spki(old) and c.subject == old.subject
                        and issued_by(c, new)), None)
            return RolloverLinks(new, nwo, own)
    return RolloverLinks()


# ---- CSR ------------------------------------------------------------------------------------------
def encode_csr(csr: x509.CertificateSigningRequest) -> bytes:
    """Body of /simpleenroll, /simplereenroll, /serverkeygen: base64 DER PKCS#10 (RFC 7030 §4.2.1)."""
    return encode_base64(csr.public_bytes(serialization.Encoding.DER))


def decode_csr(body: bytes) -> x509.CertificateSigningRequest:
    """Parse a PKCS#10 request body (base64, PEM or DER) — the lab server's side.

    Raises:
        ProtocolError: malformed encoding or not a CSR.
    """
    der = decode_body(body, "PKCS#10 request")
    try:
        return x509.load_der_x509_csr(der)
    except ValueError as e:
        raise ProtocolError(f"PKCS#10 request does not parse: {e}") from None


# ---- /serverkeygen multipart/mixed (RFC 7030 §4.4.2) -----------------------------------------------
@dataclasses.dataclass(frozen=True)
class ServerKeygenResponse:
    """A decoded /serverkeygen answer: the private key and its certificates."""

    private_key: Any
    certificates: tuple[x509.Certificate, ...]
    key_der: bytes = dataclasses.field(repr=False, default=b"")


def encode_serverkeygen(private_key, certs: Sequence[x509.Certificate], boundary: str = "estServerKeyGenBoundary"
                        ) -> tuple[str, bytes]:
    """(Content-Type, body) of a /serverkeygen response: PKCS#8 part then certs-only part, both base64."""
    if not re.fullmatch(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}", boundary):
        raise ValueError(f"invalid multipart boundary {boundary!r}")
    key_der = private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    crlf = b"\r\n"
    b = boundary.encode()
    # RFC 2046 §5.1.1: the CRLF before each "--boundary" belongs to the delimiter, not to the part's content.
    body = (b"--" + b + crlf
            + b"Content-Type: application/pkcs8" + crlf + b"Content-Transfer-Encoding: base64" + crlf + crlf
            + encode_base64(key_der) + crlf
            + b"--" + b + crlf
            + b"Content-Type: application/pkcs7-mime; smime-type=certs-only" + crlf
            + b"Content-Transfer-Encoding: base64" + crlf + crlf
            + encode_base64(encode_certs_only(certs)) + crlf
            + b"--" + b + b"--" + crlf)
    return f"multipart/mixed; boundary={boundary}", body


def _part_bytes(part: email.message.Message, what: str) -> bytes:
    cte = str(part.get("Content-Transfer-Encoding") or "").strip().lower()
    payload = part.get_payload(decode=False)
    if isinstance(payload, list):
        raise ProtocolError(f"{what}: a nested multipart where a key or certificate part was expected")
    if cte == "base64":
        try:
            return payload.encode("ascii", "surrogateescape") if isinstance(payload, str) else bytes(payload)
        except UnicodeEncodeError:
            raise ProtocolError(f"{what}: a non-ASCII character in a base64 part") from None
    raw = part.get_payload(decode=True)
    return raw if isinstance(raw, bytes) else b""


def parse_multipart(content_type: str, body: bytes, what: str = "multipart response"
                    ) -> list[tuple[str, dict[str, str], bytes]]:
    """Split a multipart/mixed body into (media type, params, raw part bytes) in order.

    Raises:
        ProtocolError: not multipart/mixed, no boundary, or a body that does not contain the boundary.
    """
    mtype, params = media_type(content_type)
    if mtype != CT_MULTIPART:
        raise ProtocolError(f"{what}: expected multipart/mixed, got Content-Type {content_type!r}")
    boundary = params.get("boundary")
    if not boundary:
        raise ProtocolError(f"{what}: multipart/mixed without a boundary parameter")
    if b"--" + boundary.encode("ascii", "replace") not in body:
        raise ProtocolError(f"{what}: body does not contain the multipart boundary {boundary!r}")
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("ascii", "replace")
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(header + body)
    if not msg.is_multipart():
        raise ProtocolError(f"{what}: multipart body does not parse")
    out = []
    for i, part in enumerate(msg.get_payload()):
        ptype, pparams = media_type(part.get("Content-Type") or "text/plain")
        out.append((ptype, pparams, _part_bytes(part, f"{what} part {i}")))
    if not out:
        raise ProtocolError(f"{what}: multipart body has no parts")
    return out


def parse_serverkeygen(content_type: str, body: bytes, what: str = "/serverkeygen response"
                       ) -> ServerKeygenResponse:
    """The private key and certificates of a /serverkeygen response (RFC 7030 §4.4.2).

    Raises:
        ProtocolError: no key part, no certificate part, more than one of either, or a part that does not parse.
        UnsupportedError: the key part is encrypted (``smime-type=server-generated-key``).
    """
    from enroll_clients.base import UnsupportedError

    parts = parse_multipart(content_type, body, what)
    key_parts, cert_parts = [], []
    for ptype, params, data in parts:
        smime = params.get("smime-type", "").lower()
        if ptype in (CT_PKCS8, "application/pkcs8-encrypted"):
            key_parts.append(data)
        elif ptype in (CT_PKCS7, "application/pkcs7") and smime == "server-generated-key":
            raise UnsupportedError(f"{what}: the server returned an encrypted private key (CMS EnvelopedData, "
                                   "smime-type=server-generated-key); only unencrypted PKCS#8 over TLS is supported")
        elif ptype in (CT_PKCS7, "application/pkcs7", "application/x-pkcs7-certificates", "application/pkix-cert"):
            cert_parts.append(data)
    types = ", ".join(p[0] for p in parts)
    if len(key_parts) != 1:
        raise ProtocolError(f"{what}: expected exactly one application/pkcs8 private-key part, found "
                            f"{len(key_parts)} (parts: {types})")
    if len(cert_parts) != 1:
        raise ProtocolError(f"{what}: expected exactly one application/pkcs7-mime certificate part, found "
                            f"{len(cert_parts)} (parts: {types})")
    key_der = decode_body(key_parts[0], f"{what} key part")
    from keystore.certs import PARSE_ERRORS

    try:
        key = serialization.load_der_private_key(key_der, None)
    except PARSE_ERRORS as e:  # ValueError, TypeError (encrypted), UnsupportedAlgorithm (unknown key type)
        raise ProtocolError(f"{what}: the application/pkcs8 part is not an unencrypted PKCS#8 key: {e}") from None
    certs = parse_certs_body(cert_parts[0], CT_PKCS7, f"{what} certificate part")
    return ServerKeygenResponse(key, certs, key_der)


# ---- /csrattrs (RFC 7030 §4.5, clarified by RFC 9908) ----------------------------------------------
OID_CHALLENGE_PASSWORD = ObjectIdentifier("1.2.840.113549.1.9.7")
OID_EXTENSION_REQUEST = ObjectIdentifier("1.2.840.113549.1.9.14")
OID_EC_PUBLIC_KEY = ObjectIdentifier("1.2.840.10045.2.1")
OID_RSA = ObjectIdentifier("1.2.840.113549.1.1.1")
OID_ED25519 = ObjectIdentifier("1.3.101.112")
OID_ED448 = ObjectIdentifier("1.3.101.113")
CURVES = {"1.2.840.10045.3.1.7": ("secp256r1", "p256"), "1.3.132.0.34": ("secp384r1", "p384"),
          "1.3.132.0.35": ("secp521r1", "p521")}
SIG_HASHES = {"1.2.840.10045.4.3.2": "sha256", "1.2.840.10045.4.3.3": "sha384", "1.2.840.10045.4.3.4": "sha512",
              "1.2.840.113549.1.1.11": "sha256", "1.2.840.113549.1.1.12": "sha384",
              "1.2.840.113549.1.1.13": "sha512", "2.16.840.1.101.3.4.2.1": "sha256",
              "2.16.840.1.101.3.4.2.2": "sha384", "2.16.840.1.101.3.4.2.3": "sha512"}
SIG_KEY = {"1.2.840.10045.4.3.2": "ec", "1.2.840.10045.4.3.3": "ec", "1.2.840.10045.4.3.4": "ec",
           "1.2.840.113549.1.1.11": "rsa", "1.2.840.113549.1.1.12": "rsa", "1.2.840.113549.1.1.13": "rsa"}


@dataclasses.dataclass(frozen=True)
class CsrAttrItem:
    """One AttrOrOID: ``values is None`` for a bare OID, else the DER of each value of the Attribute."""

    oid: str
    values: tuple[bytes, ...] | None = None


def _asn1():
    from pyasn1.type import constraint, namedtype, univ

    class Attribute(univ.Sequence):
        componentType = namedtype.NamedTypes(
            namedtype.NamedType("type", univ.ObjectIdentifier()),
            namedtype.NamedType("values", univ.SetOf(componentType=univ.Any())))

    class AttrOrOID(univ.Choice):
        componentType = namedtype.NamedTypes(
            namedtype.NamedType("oid", univ.ObjectIdentifier()),
            namedtype.NamedType("attribute", Attribute()))

    class CsrAttrs(univ.SequenceOf):
        componentType = AttrOrOID()
        subtypeSpec = constraint.ValueSizeConstraint(0, float("inf"))

    return univ, CsrAttrs, AttrOrOID, Attribute


def encode_csrattrs(items: Sequence[CsrAttrItem]) -> bytes:
    """DER CsrAttrs from items (values are DER of each attribute value, kept in the given order).

    Raises:
        ValueError: an invalid OID or a value that is not a single DER element.
    """
    from pyasn1.codec.der import decoder, encoder

    univ, CsrAttrs, AttrOrOID, Attribute = _asn1()
    seq = CsrAttrs()
    seq.clear()  # an empty SEQUENCE OF is a valid (empty) CsrAttrs, not an unset value
    for i, it in enumerate(items):
        choice = AttrOrOID()
        try:
            oid = univ.ObjectIdentifier(it.oid)
        except Exception as e:
            raise ValueError(f"csrattrs item {i}: invalid OID {it.oid!r}: {e}") from None
        if it.values is None:
            choice["oid"] = oid
        else:
            attr = Attribute()
            attr["type"] = oid
            vals = attr["values"]
            vals.clear()
            for j, v in enumerate(it.values):
                try:
                    _, rest = decoder.decode(v)
                except Exception as e:
                    raise ValueError(f"csrattrs item {i} value {j} is not DER: {e}") from None
                if rest:
                    raise ValueError(f"csrattrs item {i} value {j} has trailing bytes")
                vals.append(univ.Any(v))
            choice["attribute"] = attr
        seq.append(choice)
    return encoder.encode(seq)


def decode_csrattrs(der: bytes, what: str = "/csrattrs response") -> tuple[CsrAttrItem, ...]:
    """Items of a DER CsrAttrs (structure only).

    Raises:
        ProtocolError: not DER of ``SEQUENCE OF AttrOrOID``.
    """
    from pyasn1.codec.der import decoder, encoder
    from pyasn1.error import PyAsn1Error

    univ, CsrAttrs, _, _ = _asn1()
    try:
        seq, rest = decoder.decode(der, asn1Spec=CsrAttrs())
    except (PyAsn1Error, ValueError, TypeError, IndexError, OverflowError) as e:  # Overflow: a huge length
        raise ProtocolError(f"{what}: not a DER CsrAttrs (SEQUENCE OF AttrOrOID): {e}") from None
    if rest:
        raise ProtocolError(f"{what}: {len(rest)} trailing bytes after CsrAttrs")
    items = []
    for choice in seq:
        name = choice.getName()
        if name == "oid":
            items.append(CsrAttrItem(str(choice["oid"])))
        else:
            attr = choice["attribute"]
            items.append(CsrAttrItem(str(attr["type"]), tuple(bytes(v) for v in attr["values"])))
    if encoder.encode(seq) != der:
        raise ProtocolError(f"{what}: CsrAttrs is BER, not DER (RFC 7030 §4.5.2 requires DER)")
    return tuple(items)


@dataclasses.dataclass(frozen=True)
class CsrAttrs:
    """What an EST server asks to find in the CSR (RFC 7030 §4.5.2, RFC 9908), ready to apply.

    - ``challenge_password``: include a challengePassword attribute (RFC 7030 §3.5: the tls-unique value).
    - ``key_type``: agent key-type name (``p256``, ``p384``, ``p521``, ``rsa``/``rsa3072``…, ``ed25519``), or None.
    - ``curve``: named curve for EC keys; ``rsa_key_size`` for RSA; ``signature_hash``: ``sha256``… or None.
    - ``extensions``: requested extensions with values (unknown types as ``x509.UnrecognizedExtension``).
    - ``extension_oids``: extension/attribute types requested without a value (the client supplies it,
      e.g. macAddress in RFC 7030's own example).
    - ``other``: items we do not interpret, kept for the caller.
    """

    challenge_password: bool = False
    key_type: str | None = None
    curve: str | None = None
    rsa_key_size: int | None = None
    signature_hash: str | None = None
    extensions: tuple[x509.Extension, ...] = ()
    extension_oids: tuple[str, ...] = ()
    other: tuple[CsrAttrItem, ...] = ()
    items: tuple[CsrAttrItem, ...] = ()


def _der_oid(v: bytes) -> str | None:
    from pyasn1.codec.der import decoder
    from pyasn1.type import univ

    try:
        val, rest = decoder.decode(v, asn1Spec=univ.ObjectIdentifier())
        return None if rest else str(val)
    except Exception:
        return None


def _der_int(v: bytes) -> int | None:
    from pyasn1.codec.der import decoder
    from pyasn1.type import univ

    try:
        val, rest = decoder.decode(v, asn1Spec=univ.Integer())
        return None if rest else int(val)
    except Exception:
        return None


def _der_extensions(v: bytes, what: str) -> list[x509.Extension]:
    from pyasn1.codec.der import decoder
    from pyasn1.type import namedtype, univ

    class Ext(univ.Sequence):
        componentType = namedtype.NamedTypes(
            namedtype.NamedType("extnID", univ.ObjectIdentifier()),
            namedtype.DefaultedNamedType("critical", univ.Boolean(False)),
            namedtype.NamedType("extnValue", univ.OctetString()))

    try:
        exts, rest = decoder.decode(v, asn1Spec=univ.SequenceOf(componentType=Ext()))
    except Exception as e:
        raise ProtocolError(f"{what}: extensionRequest value is neither an OID nor Extensions: {e}") from None
    if rest:
        raise ProtocolError(f"{what}: trailing bytes in extensionRequest value")
    out = []
    for e in exts:
        oid = ObjectIdentifier(str(e["extnID"]))
        out.append(x509.Extension(oid, bool(e["critical"]), x509.UnrecognizedExtension(oid, bytes(e["extnValue"]))))
    return out


def _family(key_type: str | None) -> str | None:
    if not key_type:
        return None
    if key_type == "ec" or key_type.startswith("p"):
        return "ec"
    return "rsa" if key_type.startswith("rsa") else key_type


def interpret_csrattrs(items: Sequence[CsrAttrItem], what: str = "/csrattrs response") -> CsrAttrs:
    """Turn CsrAttrs items into a ``CsrAttrs`` the CSR builder can apply.

    Raises:
        ProtocolError: a key-type attribute whose value is not the expected OID/INTEGER, or conflicting key types.
    """
    challenge = False
    key_types: list[tuple[str | None, str | None, int | None]] = []
    sig_hash = None
    sig_key = None
    exts: list[x509.Extension] = []
    ext_oids: list[str] = []
    other: list[CsrAttrItem] = []
    for it in items:
        if it.oid == OID_CHALLENGE_PASSWORD.dotted_string:
            challenge = True
        elif it.oid == OID_EC_PUBLIC_KEY.dotted_string:
            if it.values is None:
                key_types.append(("ec", None, None))
            for v in it.values or ():
                curve = _der_oid(v)
                if curve not in CURVES:
                    raise ProtocolError(f"{what}: ecPublicKey attribute names an unsupported curve {curve or v.hex()}")
                key_types.append((CURVES[curve][1], CURVES[curve][0], None))
        elif it.oid == OID_RSA.dotted_string:
            if not it.values:
                key_types.append(("rsa", None, None))
            for v in it.values or ():
                size = _der_int(v)
                if size is None or not 1024 <= size <= 16384:
                    raise ProtocolError(f"{what}: rsaEncryption attribute value is not a key size INTEGER")
                key_types.append((f"rsa{size}", None, size))
        elif it.oid in CURVES and it.values is None:
            # A bare named-curve OID (RFC 7030 §4.5.2's own example lists secp384r1 so; libest's default
            # answer too): an EC key on that curve.
            key_types.append((CURVES[it.oid][1], CURVES[it.oid][0], None))
        elif it.oid in (OID_ED25519.dotted_string, OID_ED448.dotted_string) and it.values is None:
            key_types.append(("ed25519" if it.oid == OID_ED25519.dotted_string else "ed448", None, None))
        elif it.oid in SIG_HASHES and it.values is None:
            sig_hash = SIG_HASHES[it.oid]
            sig_key = SIG_KEY.get(it.oid, sig_key)
        elif it.oid == OID_EXTENSION_REQUEST.dotted_string and it.values is not None:
            for v in it.values:
                oid = _der_oid(v)
                if oid is not None:
                    ext_oids.append(oid)
                else:
                    exts.extend(_der_extensions(v, what))
        elif it.values is None:
            # RFC 7030 §4.5.2: a bare OID for an attribute/extension type the client should include.
            ext_oids.append(it.oid)
        else:
            other.append(it)
    distinct = {k for k, _, _ in key_types}
    if len(distinct) > 1:
        raise ProtocolError(f"{what}: the server asks for conflicting key types {sorted(distinct)}")
    key_type, curve, size = key_types[0] if key_types else (sig_key, None, None)
    if key_types and sig_key and _family(key_type) != sig_key:
        raise ProtocolError(f"{what}: signature algorithm ({sig_key}) does not fit the requested key type {key_type}")
    return CsrAttrs(challenge, key_type, curve, size, sig_hash, tuple(exts), tuple(ext_oids), tuple(other),
                    tuple(items))


def parse_csrattrs(body: bytes, what: str = "/csrattrs response") -> CsrAttrs:
    """Parse a /csrattrs response body (base64 DER, or raw DER) into ``CsrAttrs``; empty body = no attributes.

    Trailing NUL bytes and whitespace after base64 are ignored (a known libest deviation).

    Raises:
        ProtocolError: malformed base64 or DER, or an uninterpretable key-type attribute.
    """
    if body[:1] != b"\x30":
        # Base64 (not raw DER): trailing NUL bytes and whitespace are harmless (libest ends its default answer
        # in a NUL, as a C string); anything else outside the alphabet is still an error.
        body = body.rstrip(b"\x00 \t\r\n")
    if not body:
        return CsrAttrs()
    return interpret_csrattrs(decode_csrattrs(decode_body(body, what), what), what)


def apply_csrattrs(request, attrs: CsrAttrs):
    """A copy of ``request`` (a ``CertRequest``) with the server's requested extensions and key type applied.

    The caller (keystore) builds the CSR from the result; when ``attrs.challenge_password`` is set it adds the
    challengePassword attribute too.

    Raises:
        ValueError: the request already names a different key type than the server requires.
    """
    changes: dict[str, Any] = {}
    if attrs.key_type and attrs.key_type not in ("ec", "rsa"):
        if request.key_type and request.key_type != attrs.key_type:
            raise ValueError(f"the EST server requires key type {attrs.key_type}, the request asks for "
                             f"{request.key_type}")
        changes["key_type"] = attrs.key_type
    elif attrs.key_type and request.key_type and _family(request.key_type) != attrs.key_type:
        raise ValueError(f"the EST server requires an {attrs.key_type.upper()} key, the request asks for "
                         f"{request.key_type}")
    have = {e.oid for e in request.extensions}
    new = tuple(e for e in attrs.extensions if e.oid not in have)
    if new:
        changes["extensions"] = tuple(request.extensions) + new
    return dataclasses.replace(request, **changes) if changes else request


# ---- Retry-After (RFC 9110 §10.2.3) --------------------------------------------------------------
MAX_DELTA_SECONDS = 2 ** 31  # RFC 9111 1.2.2: a delta-seconds too large to represent counts as 2^31


def parse_retry_after(value: str | None, now: datetime.datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent or unparsable.
    Never raises for a peer's header value."""
    if value is None:
        return None
    value = value.strip()
    if value and value.isascii() and value.isdigit():  # delta-seconds = 1*DIGIT (ASCII digits only)
        return float(MAX_DELTA_SECONDS if len(value) > 10 else min(int(value), MAX_DELTA_SECONDS))
    when = _parse_http_date(value)
    if when is None:
        return None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return max(0.0, (when - now).total_seconds())


def http_date(value: str | None) -> datetime.datetime | None:
    """The server's clock from an HTTP ``Date`` header (RFC 9110 §6.6.1: IMF-fixdate, or the obsolete RFC 850 and
    asctime forms), as an aware UTC datetime; None when absent or unparseable (it is only a clock hint for boards
    without a trustworthy clock, never a reason to fail an exchange)."""
    if not value:
        return None
    return _parse_http_date(value.strip())


def _parse_http_date(value: str) -> datetime.datetime | None:
    try:
        t = email.utils.parsedate_to_datetime(value)
        if t is None:
            return None
        if t.tzinfo is None:  # asctime form carries no zone: it is GMT by definition
            t = t.replace(tzinfo=datetime.timezone.utc)
        return t.astimezone(datetime.timezone.utc)
    except (TypeError, ValueError, IndexError, OverflowError):  # garbage, a huge year, 9999-12-31 west of UTC
        return None

