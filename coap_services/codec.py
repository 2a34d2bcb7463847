"""CoAP payload codecs of the delegated-enrollment services: pure and synchronous, bytes in, objects out.

Wire schema (CBOR maps with text keys; documented in docs/coap.md). The MicroPython board agent (agent/mpy/coap.py)
speaks the same /csr and /verify schema and diagnostics with its own narrower limits, so one CLM drives both:

- ``POST /csr`` request (content-format 60, payload optional)::

      {? "subject": tstr, ? "san": [* tstr], ? "key_type": tstr, ? "name": tstr, ? "domain": tstr,
       ? "profile": tstr, ? "ca": [* bstr]}          ; "ca": DER CA certificates the device should expect

  response 2.04, content-format 286 (application/pkcs10), payload the DER CSR.
- ``POST /verify`` request: content-format 287 (DER certificate) or 281 (certs-only PKCS#7, DER); response 2.04
  with ``{"stored": tstr, "version": uint, "not_after": uint, "verify_us": uint}``.
- ``GET /status`` response (60): ``{"device": tstr, "state": "operational"/"not operational", "pending": uint,
  "credentials": [* {"name", "kind", "domain", "subject", "serial", "not_after": uint}]}``.
- Errors (4.xx/5.xx, content-format 60): ``{"error": reason, "message": tstr}``.

Device-side timings travel in the elective response option ``TIMING_OPTION`` (uint, microseconds), so the /csr
answer stays a plain PKCS#10 for any client, and a benchmark can reuse the production path.

Invariants: every decoder either returns a value that re-encodes to an equivalent payload or raises
``PayloadError`` naming the field; sizes and counts are bounded before anything expensive happens.
"""
from __future__ import annotations

import dataclasses
import io
import math

import cbor2

from coap_services.errors import BAD_REQUEST, UNSUPPORTED_CONTENT_FORMAT, PayloadError, REQUEST_ENTITY_TOO_LARGE

CF_LINK_FORMAT = 40
CF_CBOR = 60
CF_PKCS7_CERTS = 281  # application/pkcs7-mime; smime-type=certs-only
CF_PKCS10 = 286
CF_PKIX_CERT = 287
CONTENT_FORMAT_NAMES = {CF_CBOR: "application/cbor", CF_PKCS7_CERTS: "application/pkcs7-mime;smime-type=certs-only",
                        CF_PKCS10: "application/pkcs10", CF_PKIX_CERT: "application/pkix-cert",
                        CF_LINK_FORMAT: "application/link-format"}
# Other registered content-formats a client may send by mistake (IANA "CoAP Content-Formats"), for messages.
OTHER_CONTENT_FORMATS = {0: "text/plain;charset=utf-8", 16: "application/cose;cose-type=\"cose-encrypt0\"",
                         41: "application/xml", 42: "application/octet-stream", 47: "application/exi",
                         50: "application/json", 61: "application/cwt", 110: "application/senml+json",
                         112: "application/senml+cbor", 280: "application/pkcs7-mime;smime-type=server-generated-key",
                         284: "application/pkcs8", 285: "application/csrattrs"}


def content_format_name(cf: int) -> str:
    """``60 (application/cbor)``: the number and its registered media type, for messages to a person."""
    n = int(cf)
    name = CONTENT_FORMAT_NAMES.get(n) or OTHER_CONTENT_FORMATS.get(n)
    return f"{n} ({name})" if name else f"{n} (not a content-format this device knows)"

# Experimental-use option number (RFC 7252 §12.2: 65000-65535), elective (even) so any client may ignore it.
TIMING_OPTION = 65000

MAX_CSR_REQUEST_BYTES = 8192
MAX_VERIFY_BYTES = 16384
MAX_CA_CERTS = 4
MAX_CERT_BYTES = 4096
MAX_TEXT = 512
MAX_SAN = 16
TEXT_FIELDS = ("subject", "key_type", "name", "domain", "profile")


@dataclasses.dataclass(frozen=True)
class CsrRequest:
    """The paper's CSR_generation_request. Every field optional; the device fills in its defaults."""

    subject: str | None = None
    san: tuple[str, ...] = ()
    key_type: str | None = None
    name: str | None = None
    domain: str | None = None
    profile: str | None = None
    ca: tuple[bytes, ...] = ()


def _check_cf(content_format, allowed, what):
    # aiocoap hands over its ContentFormat enum (an int): name it by number and media type, not by enum name.
    if content_format is not None and int(content_format) not in allowed:
        names = " or ".join(content_format_name(c) for c in allowed)
        raise PayloadError("unsupported-content-format",
                           f"{what}: content-format {content_format_name(content_format)} is not accepted; "
                           f"use {names}", UNSUPPORTED_CONTENT_FORMAT)


MAX_CBOR_DEPTH = 16


def _scan_cbor(b: bytes, i: int, depth: int, what: str) -> int:
    """Walk one CBOR data item at ``b[i:]`` (RFC 8949 Appendix C) and return the offset after it, refusing any
    tag -- cbor2 decodes registered tags (epoch dates, bignums, ...) itself, before a tag hook sees them --
    and indefinite lengths, so a tag is named as such and not reported as some decoding failure."""
    if depth > MAX_CBOR_DEPTH:
        raise PayloadError("malformed-cbor", f"{what}: CBOR nested deeper than {MAX_CBOR_DEPTH} levels")
    if i >= len(b):
        raise PayloadError("malformed-cbor", f"{what}: CBOR item truncated at offset {i}")
    major, ai = b[i] >> 5, b[i] & 0x1F
    start = i
    i += 1
    if ai < 24:
        n = ai
    elif ai <= 27:
        size = 1 << (ai - 24)
        if i + size > len(b):
            raise PayloadError("malformed-cbor", f"{what}: CBOR item truncated at offset {start}")
        n = int.from_bytes(b[i:i + size], "big")
        i += size
    elif ai == 31 and major in (2, 3, 4, 5):
        raise PayloadError("malformed-cbor", f"{what}: indefinite-length CBOR item at offset {start} is not "
                           "accepted (deterministic encoding, RFC 8949 4.2)")
    else:
        raise PayloadError("malformed-cbor", f"{what}: reserved CBOR additional information {ai} at offset {start}")
    if major == 6:
        raise PayloadError("malformed-cbor", f"{what}: CBOR tag {n} not allowed in this payload (offset {start})")
    if major in (2, 3):
        if n > len(b) - i:
            raise PayloadError("malformed-cbor", f"{what}: CBOR string at offset {start} runs past the end")
        return i + n
    if major in (4, 5):
        if n > len(b) - i:
            raise PayloadError("malformed-cbor", f"{what}: CBOR container at offset {start} claims {n} entries")
        for _ in range(n * (2 if major == 5 else 1)):
            i = _scan_cbor(b, i, depth + 1, what)
    return i


def cbor_loads_strict(payload: bytes, what: str):
    """Decode exactly one CBOR item; trailing bytes, bad encodings, indefinite lengths and any tag are refused.

    Raises:
        PayloadError: ``malformed-cbor`` naming the fault ("CBOR tag 1 not allowed in this payload (offset 6)").
    """
    end = _scan_cbor(bytes(payload), 0, 0, what)
    if end != len(payload):
        raise PayloadError("malformed-cbor", f"{what}: {len(payload) - end} bytes after the CBOR item")
    try:
        fp = io.BytesIO(payload)
        value = cbor2.CBORDecoder(fp, tag_hook=_refuse_tag).decode()
        if fp.tell() != len(payload):
            raise PayloadError("malformed-cbor", f"{what}: {len(payload) - fp.tell()} bytes after the CBOR item")
        return value
    except PayloadError:
        raise
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as e:
        refused = _payload_error_in(e)
        if refused is not None:  # cbor2 wraps what the tag hook raised: report that, naming the tag
            raise PayloadError(refused.reason, f"{what}: {refused.message}") from None
        raise PayloadError("malformed-cbor", f"{what}: not well-formed CBOR ({type(e).__name__})") from e


def _payload_error_in(e: BaseException) -> PayloadError | None:
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, PayloadError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _refuse_tag(decoder, tag):
    # RFC 8949 3.4: no tag is defined in this schema; a tagged item is refused, naming the tag.
    raise PayloadError("malformed-cbor", f"CBOR tag {tag.tag} not allowed in this payload")


def encode_csr_request(req: CsrRequest) -> bytes:
    """CBOR payload for POST /csr (only the fields that are set)."""
    d: dict = {}
    for f in TEXT_FIELDS:
        v = getattr(req, f)
        if v is not None:
            d[f] = v
    if req.san:
        d["san"] = list(req.san)
    if req.ca:
        d["ca"] = [bytes(c) for c in req.ca]
    return cbor2.dumps(d, canonical=True)


def decode_csr_request(payload: bytes, content_format: int | None = None) -> CsrRequest:
    """Parse a POST /csr payload. An empty payload means "use the device's defaults".

    Raises:
        PayloadError: wrong content-format (4.15), too large (4.13), malformed CBOR or schema violation (4.00).
    """
    _check_cf(content_format, (CF_CBOR,), "POST /csr")
    if len(payload) > MAX_CSR_REQUEST_BYTES:
        raise PayloadError("too-large", f"POST /csr: payload of {len(payload)} bytes exceeds "
                           f"{MAX_CSR_REQUEST_BYTES}", REQUEST_ENTITY_TOO_LARGE)
    if not payload:
        return CsrRequest()
    d = cbor_loads_strict(payload, "POST /csr")
    if not isinstance(d, dict):
        raise PayloadError("schema", f"POST /csr: expected a CBOR map, got {type(d).__name__}")
    kw: dict = {}
    for f in TEXT_FIELDS:
        if f in d:
            v = d[f]
            if not isinstance(v, str) or not v or len(v) > MAX_TEXT:
                raise PayloadError("schema", f"POST /csr: {f!r} must be a non-empty text string of at most "
                                   f"{MAX_TEXT} characters")
            kw[f] = v
    if "san" in d:
        san = d["san"]
        if not isinstance(san, list) or len(san) > MAX_SAN or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_TEXT for s in san):
            raise PayloadError("schema", f"POST /csr: 'san' must be an array of at most {MAX_SAN} text strings "
                               "like \"dns:dev1.plant\" or \"ip:10.0.0.5\"")
        kw["san"] = tuple(san)
    if "ca" in d:
        ca = d["ca"]
        if not isinstance(ca, list) or len(ca) > MAX_CA_CERTS or not all(
                isinstance(c, bytes) and 0 < len(c) <= MAX_CERT_BYTES for c in ca):
            raise PayloadError("schema", f"POST /csr: 'ca' must be an array of at most {MAX_CA_CERTS} DER "
                               f"certificates (byte strings of at most {MAX_CERT_BYTES} bytes)")
        kw["ca"] = tuple(ca)
    unknown = sorted(str(k) for k in d if k not in (*TEXT_FIELDS, "san", "ca"))
    if unknown:
        raise PayloadError("schema", f"POST /csr: unknown field(s) {', '.join(unknown)[:200]}")
    return CsrRequest(**kw)


def decode_certificates(payload: bytes, content_format: int | None):
    """Parse a POST /verify payload into certificates (DER certificate 287 or DER certs-only PKCS#7 281).

    Raises:
        PayloadError: wrong content-format, too large, or not a certificate/PKCS#7.
    """
    from keystore.certs import load_certificates
    from keystore.errors import CorruptFileError

    _check_cf(content_format, (CF_PKIX_CERT, CF_PKCS7_CERTS), "POST /verify")
    if len(payload) > MAX_VERIFY_BYTES:
        raise PayloadError("too-large", f"POST /verify: payload of {len(payload)} bytes exceeds {MAX_VERIFY_BYTES}",
                           REQUEST_ENTITY_TOO_LARGE)
    if not payload:
        raise PayloadError("malformed-certificate", "POST /verify: empty payload, expected a DER certificate")
    if payload.lstrip().startswith(b"-----"):
        raise PayloadError("malformed-certificate", "POST /verify: PEM is not accepted; send DER (287) or "
                           "certs-only PKCS#7 (281)")
    try:
        certs = load_certificates(payload, "POST /verify payload")
    except CorruptFileError as e:
        kind = "certificate" if content_format == CF_PKIX_CERT else "certificate or certs-only PKCS#7"
        raise PayloadError("malformed-certificate", f"POST /verify: payload is not a DER {kind}") from e
    if content_format == CF_PKIX_CERT and len(certs) != 1:
        raise PayloadError("malformed-certificate", "POST /verify: content-format 287 carries exactly one "
                           "certificate; use 281 (certs-only PKCS#7) for a chain")
    return certs


def encode_diagnostic(reason: str, message: str, **extra) -> bytes:
    d = {"error": reason, "message": message}
    d.update({k: v for k, v in extra.items() if v is not None})
    return cbor2.dumps(d, canonical=True)


def decode_diagnostic(payload: bytes) -> dict:
    """Best-effort view of an error payload (never raises: a broken peer must not crash the CLM)."""
    try:
        d = cbor_loads_strict(payload, "diagnostic") if payload else {}
    except PayloadError:
        d = None
    if isinstance(d, dict) and isinstance(d.get("error"), str):
        return {"error": d["error"], "message": str(d.get("message", ""))[:1000]}
    text = payload[:200].decode("utf-8", "replace") if payload else ""
    return {"error": "unknown", "message": text}


def encode_map(d: dict) -> bytes:
    return cbor2.dumps(d, canonical=True)


def decode_map(payload: bytes, what: str) -> dict:
    d = cbor_loads_strict(payload, what)
    if not isinstance(d, dict):
        raise PayloadError("schema", f"{what}: expected a CBOR map")
    return d


def timing_us(seconds: float) -> int:
    """Duration in whole microseconds for ``TIMING_OPTION`` (non-negative, bounded to 32 bits)."""
    if not math.isfinite(seconds) or seconds < 0:
        return 0
    if seconds >= 0xFFFFFFFF / 1e6:
        return 0xFFFFFFFF
    return int(round(seconds * 1e6))


__all__ = ["CsrRequest", "encode_csr_request", "decode_csr_request", "decode_certificates",
           "encode_diagnostic", "decode_diagnostic", "BAD_REQUEST"]
