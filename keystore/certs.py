"""Parsing of certificates, keys and PKCS#12 from untrusted bytes, with errors that name the source.

Pure functions: bytes in, ``cryptography`` objects out. This is the one boundary where certificate and key bytes
from files and network peers become objects (the CMP and EST message decoders, CoAP /csr and /verify, the CLI's
``--cert``/``--chain``/``--trust``/``--key``/``--p12`` and keystore import all come through here).

Contract: each loader returns objects whose every part the rest of devagent reads later parses -- version,
names, validity, every extension, the public key and the signature algorithm -- or raises ``CorruptFileError``
naming the source and what did not parse. ``cryptography`` parses those parts lazily and raises ``ValueError``,
``UnsupportedAlgorithm``, ``InvalidVersion``, ``DuplicateExtension`` or ``UnsupportedGeneralNameType`` on first
access; ``check_certificate`` touches each of them once here so none of those escapes later, deep inside a path
builder or a protocol check.
"""
from __future__ import annotations

import collections
import hashlib
import threading

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from keystore.errors import CorruptFileError

PEM_CERT = b"-----BEGIN CERTIFICATE-----"
PEM_PKCS7 = (b"-----BEGIN PKCS7-----", b"-----BEGIN CMS-----")


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:HEX`` of the DER certificate."""
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def spki_der(obj) -> bytes:
    """DER SubjectPublicKeyInfo of a public key, a certificate, a CSR or a private key."""
    if hasattr(obj, "public_key"):
        obj = obj.public_key()
    return obj.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def same_public_key(a, b) -> bool:
    return spki_der(a) == spki_der(b)


# What cryptography raises for malformed or unsupported content of a certificate, key or PKCS#7/#12 structure.
PARSE_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.InvalidVersion,
                x509.UnsupportedGeneralNameType)


def _describe_error(e: BaseException) -> str:
    if isinstance(e, x509.DuplicateExtension):
        return f"duplicate extension {e.oid.dotted_string}"
    if isinstance(e, x509.InvalidVersion):
        return f"invalid X.509 version {e.parsed_version}"
    if isinstance(e, x509.UnsupportedGeneralNameType):
        return f"unsupported GeneralName type ({e})"
    if isinstance(e, UnsupportedAlgorithm):
        return f"unsupported algorithm ({e})"
    return str(e) or type(e).__name__


def check_certificate(cert: x509.Certificate, source: str = "certificate") -> x509.Certificate:
    """Parse every lazily decoded part of ``cert`` once; returns ``cert``.

    Raises:
        CorruptFileError: ``source``: which part does not parse (bad version, name, extension, duplicate
            extension, unsupported public key or signature algorithm).
    """
    part = "version"
    try:
        cert.version  # noqa: B018 (each access parses; that is the point)
        part = "subject/issuer name"
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        part = "validity"
        cert.not_valid_before_utc, cert.not_valid_after_utc  # noqa: B018
        part = "extensions"
        for ext in cert.extensions:
            ext.value  # noqa: B018
        part = "public key"
        cert.public_key()
        part = "signature algorithm"
        cert.signature_algorithm_oid  # noqa: B018
        cert.signature_hash_algorithm  # noqa: B018 (None for EdDSA; raises for an unknown algorithm)
    except PARSE_ERRORS as e:
        raise CorruptFileError(f"{source}: certificate {part} does not parse: {_describe_error(e)}") from None
    unused = _signature_unused_bits(cert.public_bytes(serialization.Encoding.DER))
    if unused:
        # cryptography reads the signature bytes and ignores the count, so the same signed certificate could be
        # stored (and fingerprinted) in a second encoding the CA never issued
        raise CorruptFileError(f"{source}: certificate signature value is a BIT STRING with {unused} unused bit(s), "
                               "not whole octets")
    return cert


# Certificates that passed check_certificate, by their exact DER: the same bytes parse to the same certificate, so a
# certificate seen again (the CA certificates a CLM sends with every /csr and /verify, a server's chain on every
# renewal) is the object already checked, with every part it parsed, instead of a new one whose parts parse again
# wherever they are read. Bounded (least recently used first out); only successes are kept; public data only.
_SEEN_MAX = 32
_seen: collections.OrderedDict[bytes, x509.Certificate] = collections.OrderedDict()
_seen_lock = threading.Lock()


def _seen_before(der: bytes) -> x509.Certificate | None:
    with _seen_lock:
        hit = _seen.get(der)
        if hit is not None:
            _seen.move_to_end(der)
        return hit


def forget_checked() -> None:
    """Empty the cache of checked certificates, so the next load of each certificate parses and checks it as a new
    process would (the keystore benchmark's load rounds: at 10 credentials every certificate would stay cached, at
    1,000 almost none would, and the two figures would not measure the same work)."""
    with _seen_lock:
        _seen.clear()


def _checked(cert: x509.Certificate, der: bytes, source: str) -> x509.Certificate:
    """``cert`` (parsed from ``der``) checked, or the certificate with the same DER checked before."""
    hit = _seen_before(der)
    if hit is not None:
        return hit
    check_certificate(cert, source)
    with _seen_lock:
        _seen[der] = cert
        if len(_seen) > _SEEN_MAX:
            _seen.popitem(last=False)
    return cert


def _der_header(buf: bytes, i: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER TLV at ``buf[i]`` (the certificate already parsed: trusted)."""
    tag, n = buf[i], buf[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        n, i = int.from_bytes(buf[i:i + k], "big"), i + k
    return tag, i, i + n


def _signature_unused_bits(der: bytes) -> int:
    """The unused-bits octet of a DER certificate's signatureValue (after tbsCertificate and signatureAlgorithm)."""
    _, i, _ = _der_header(der, 0)
    for _ in range(2):
        i = _der_header(der, i)[2]
    tag, start, end = _der_header(der, i)
    return der[start] if tag == 0x03 and end > start else 0


def load_der_certificate(der: bytes, source: str = "certificate") -> x509.Certificate:
    """One DER X.509 certificate, fully checked (``check_certificate``).

    Raises:
        CorruptFileError: not a DER certificate, or a part of it does not parse; names ``source``.
    """
    if not isinstance(der, (bytes, bytearray, memoryview)):
        raise TypeError(f"{source}: certificate must be bytes, not {type(der).__name__}")
    der = bytes(der)
    hit = _seen_before(der)  # before parsing: the bytes alone say it was checked
    if hit is not None:
        return hit
    try:
        cert = x509.load_der_x509_certificate(der)
    except PARSE_ERRORS as e:
        raise CorruptFileError(f"{source}: not a DER X.509 certificate: {_describe_error(e)}") from None
    return _checked(cert, der, source)


def load_certificates(data: bytes, source: str = "input") -> list[x509.Certificate]:
    """Load one or more certificates from PEM (certificates or PKCS#7, text before the first block allowed),
    DER certificate, or DER PKCS#7.

    Every certificate returned passed ``check_certificate``.

    Raises:
        CorruptFileError: naming ``source`` (and the certificate's index when there are several) and what was
            found instead.
    """
    if not data:
        raise CorruptFileError(f"{source}: empty, expected a certificate")
    try:
        # PEM may follow text (`openssl x509 -text`, `openssl pkcs7 -print_certs` write subject/issuer lines
        # first); DER starts with a SEQUENCE tag and is never taken for PEM.
        if data[:1] != b"\x30" and b"-----BEGIN" in data:
            if any(m in data for m in PEM_PKCS7):
                from cryptography.hazmat.primitives.serialization import pkcs7  # lazy: it loads email (S/MIME)

                certs = pkcs7.load_pem_pkcs7_certificates(data)
            else:
                if PEM_CERT not in data:
                    kind = data[data.index(b"-----BEGIN"):].split(b"\n", 1)[0].decode("ascii", "replace")
                    raise CorruptFileError(f"{source}: expected a PEM certificate, found {kind}")
                certs = x509.load_pem_x509_certificates(data)
        else:
            try:
                certs = [x509.load_der_x509_certificate(data)]
            except ValueError:
                from cryptography.hazmat.primitives.serialization import pkcs7

                certs = pkcs7.load_der_pkcs7_certificates(data)
    except CorruptFileError:
        raise
    except PARSE_ERRORS as e:
        raise CorruptFileError(f"{source}: not a valid certificate or PKCS#7 certs-only structure "
                               f"(PEM or DER): {_describe_error(e)}") from None
    if not certs:
        raise CorruptFileError(f"{source}: contains no certificate")
    der = serialization.Encoding.DER
    if len(certs) == 1:
        return [_checked(certs[0], certs[0].public_bytes(der), source)]
    return [_checked(c, c.public_bytes(der), f"{source}: certificate {i}") for i, c in enumerate(certs)]


def load_certificate_file(path: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CorruptFileError(f"cannot read {path}: {e.strerror or e}") from e
    return load_certificates(data, path)


def load_private_key(data: bytes, source: str, password: bytes | None = None, *, trusted: bool = False):
    """Load a private key from PEM or DER (PKCS#8, traditional), optionally encrypted.

    ``trusted`` skips RSA key validation (~100 ms for RSA-2048): only for keys this keystore generated and
    encrypted itself, never for imported files.

    Raises:
        CorruptFileError: malformed, wrong password, or not a private key.
    """
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return serialization.load_pem_private_key(data, password, unsafe_skip_rsa_key_validation=trusted)
        return serialization.load_der_private_key(data, password, unsafe_skip_rsa_key_validation=trusted)
    except TypeError as e:
        raise CorruptFileError(f"{source}: {'key is encrypted; give its password' if password is None else e}") from e
    except PARSE_ERRORS as e:
        hint = " (or the password is wrong)" if password is not None else ""
        raise CorruptFileError(f"{source}: not a valid private key{hint}: {_describe_error(e)}") from None


MAX_PKCS12_ITERATIONS = 1_000_000  # OpenSSL writes 2048, current tools up to 600000 (PBKDF2-SHA256)


def _max_iteration_count(data: bytes) -> int:
    """The largest key-derivation iteration count in a PKCS#12 file (MacData, PBES2/PBKDF2 and PKCS#12 PBE
    parameters: a SEQUENCE { salt OCTET STRING, iterations INTEGER, ... }), found by a bounded DER walk over
    everything that is not ciphertext. 0 when there is none or the DER does not walk."""
    best = 0
    todo = [(0, len(data), 0)]
    steps = 0
    while todo and steps < 20000:
        start, end, depth = todo.pop()
        kids = []
        off = start
        while off < end and steps < 20000:
            steps += 1
            if off + 2 > end:
                return best
            tag, ln, hdr = data[off], data[off + 1], 2
            if ln & 0x80:
                nb = ln & 0x7F
                if nb == 0 or nb > 4 or off + 2 + nb > end:
                    return best
                ln = int.from_bytes(data[off + 2:off + 2 + nb], "big")
                hdr += nb
            vs, ve = off + hdr, off + hdr + ln
            if ve > end:
                return best
            kids.append((tag, vs, ve))
            if depth < 24 and (tag & 0x20 or (tag == 0x04 and ve - vs > 2 and data[vs] == 0x30)):
                todo.append((vs, ve, depth + 1))
            off = ve
        for (t1, _, _), (t2, vs, ve) in zip(kids, kids[1:], strict=False):
            if t1 == 0x04 and t2 == 0x02 and ve - vs <= 8:
                best = max(best, int.from_bytes(data[vs:ve], "big"))
    return best


def load_pkcs12(data: bytes, source: str, password: bytes | None):
    """Return (key, certificate, [additional certificates]) from a PKCS#12 file.

    Raises:
        CorruptFileError: malformed, wrong password, missing key/certificate, or a key-derivation iteration
            count above ``MAX_PKCS12_ITERATIONS`` (a crafted file would otherwise hold the CPU for minutes).
    """
    iterations = _max_iteration_count(bytes(data))
    if iterations > MAX_PKCS12_ITERATIONS:
        raise CorruptFileError(f"{source}: PKCS#12 asks for {iterations} key-derivation iterations (more than "
                               f"{MAX_PKCS12_ITERATIONS}); refusing it rather than spending minutes on it")
    try:
        from cryptography.hazmat.primitives.serialization import pkcs12

        key, cert, extra = pkcs12.load_key_and_certificates(data, password)
    except PARSE_ERRORS as e:
        raise CorruptFileError(f"{source}: cannot open PKCS#12 (wrong password or corrupt file): "
                               f"{_describe_error(e)}") from None
    if key is None:
        raise CorruptFileError(f"{source}: PKCS#12 holds no private key")
    if cert is None:
        raise CorruptFileError(f"{source}: PKCS#12 holds no certificate")
    check_certificate(cert, f"{source}: PKCS#12 certificate")
    extra = [check_certificate(c, f"{source}: PKCS#12 additional certificate {i}") for i, c in enumerate(extra or [])]
    return key, cert, extra


def pem(certs) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


NAME_OVERRIDES = {x509.oid.NameOID.SERIAL_NUMBER: "serialNumber"}


def dn(name: x509.Name) -> str:
    """RFC 4514 string with readable attribute names (serialNumber instead of 2.5.4.5)."""
    return name.rfc4514_string(NAME_OVERRIDES)


def describe(cert: x509.Certificate) -> dict:
    """A JSON-friendly summary of a certificate (no secrets)."""
    return {
        "subject": dn(cert.subject),
        "issuer": dn(cert.issuer),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "fingerprint": fingerprint(cert),
    }
