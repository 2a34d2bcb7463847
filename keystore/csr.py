"""PKCS#10 (RFC 2986) certificate signing requests, built only here.

The key may be a software, TPM or PKCS#11 key: anything with ``cryptography``'s private-key interface.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from keystore.keytypes import signature_hash

SAN_FORMS = "dns:NAME, ip:ADDR, uri:URI, email:ADDR"


# Attribute names accepted in subjects: RFC 4514's and cryptography's short names, OpenSSL's long names.
_ATTRS = {
    "cn": NameOID.COMMON_NAME, "commonname": NameOID.COMMON_NAME,
    "o": NameOID.ORGANIZATION_NAME, "organizationname": NameOID.ORGANIZATION_NAME,
    "ou": NameOID.ORGANIZATIONAL_UNIT_NAME, "organizationalunitname": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "c": NameOID.COUNTRY_NAME, "countryname": NameOID.COUNTRY_NAME,
    "l": NameOID.LOCALITY_NAME, "localityname": NameOID.LOCALITY_NAME,
    "st": NameOID.STATE_OR_PROVINCE_NAME, "stateorprovincename": NameOID.STATE_OR_PROVINCE_NAME,
    "street": NameOID.STREET_ADDRESS, "streetaddress": NameOID.STREET_ADDRESS,
    "dc": NameOID.DOMAIN_COMPONENT, "domaincomponent": NameOID.DOMAIN_COMPONENT,
    "uid": NameOID.USER_ID, "userid": NameOID.USER_ID,
    "serialnumber": NameOID.SERIAL_NUMBER, "emailaddress": NameOID.EMAIL_ADDRESS,
    "title": NameOID.TITLE, "gn": NameOID.GIVEN_NAME, "givenname": NameOID.GIVEN_NAME,
    "sn": NameOID.SURNAME, "surname": NameOID.SURNAME, "initials": NameOID.INITIALS,
    "pseudonym": NameOID.PSEUDONYM, "dnqualifier": NameOID.DN_QUALIFIER,
    "generationqualifier": NameOID.GENERATION_QUALIFIER, "postalcode": NameOID.POSTAL_CODE,
    "businesscategory": NameOID.BUSINESS_CATEGORY,
}
_ATTR_NAMES = "CN, O, OU, C, L, ST, street, DC, UID, serialNumber, emailAddress, title, GN, SN, or a dotted OID"
_HINT = "write it as RFC 4514, e.g. CN=dev1,O=Plant (OpenSSL's /O=Plant/CN=dev1 is accepted too)"


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is not escaped with a backslash (the escape is kept for the value parser)."""
    out, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if ch == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def _unescape(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _attribute(item: str) -> x509.NameAttribute:
    """One ``TYPE=value``; ValueError with the bare reason (the caller names the subject)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep:
        raise ValueError(f"{item!r} is not TYPE=value")
    if not key:
        raise ValueError(f"attribute type missing before '=' in {item!r}")
    if all(p.isdigit() for p in key.split(".")) and key.count(".") >= 1:
        oid = x509.ObjectIdentifier(key)
    else:
        oid = _ATTRS.get(key.lower())
        if oid is None:
            raise ValueError(f"unknown attribute type {key!r} (known: {_ATTR_NAMES})")
    value = _unescape(value)
    if not value:
        raise ValueError(f"empty value for {key}")
    try:
        return x509.NameAttribute(oid, value)
    except ValueError as e:  # e.g. a country name that is not 2 letters
        raise ValueError(f"{key}={value!r}: {e}") from None


def _parse_openssl_subject(dn: str) -> x509.Name:
    """``/C=DE/O=Plant/CN=dev1`` as ``openssl req -subj`` takes it: most significant RDN first, ``+`` joins a
    multi-valued RDN, ``\\`` escapes."""
    parts = _split_unescaped(dn[1:], "/")
    if parts and parts[-1] == "":
        parts = parts[:-1]  # a trailing slash is harmless
    if not parts:
        raise ValueError(f"malformed subject {dn!r}: no attribute after '/'; {_HINT}")
    rdns = []
    for part in parts:
        if not part.strip():
            raise ValueError(f"malformed subject {dn!r}: empty component between '/'; {_HINT}")
        try:
            rdns.append(x509.RelativeDistinguishedName([_attribute(a) for a in _split_unescaped(part, "+")]))
        except ValueError as e:
            raise ValueError(f"malformed subject {dn!r}: {e}; {_HINT}") from None
    return x509.Name(rdns)


def _explain_rfc4514(dn: str) -> str:
    """Why ``dn`` is not RFC 4514, found component by component (cryptography's own error has no text)."""
    for comp in _split_unescaped(dn, ","):
        if not comp.strip():
            return "empty component between commas"
        for a in _split_unescaped(comp, "+"):
            try:
                _attribute(a.strip())
            except ValueError as e:
                return str(e)
    return "not a valid RFC 4514 distinguished name"


def parse_subject(dn: str) -> x509.Name:
    """Parse a subject DN: RFC 4514 (``CN=dev1,O=Plant,serialNumber=123``, the documented form), OpenSSL's
    ``/O=Plant/CN=dev1`` (as ``openssl req -subj`` takes it), or a bare common name.

    Raises:
        ValueError: malformed DN, saying which component is wrong and why.
    """
    dn = dn.strip()
    if not dn:
        raise ValueError("empty subject")
    if dn.startswith("/"):
        return _parse_openssl_subject(dn)
    if "=" not in dn:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dn)])
    try:
        return x509.Name.from_rfc4514_string(dn, {"serialNumber": NameOID.SERIAL_NUMBER,
                                                  "emailAddress": NameOID.EMAIL_ADDRESS})
    except ValueError as e:
        raise ValueError(f"malformed subject {dn!r}: {str(e) or _explain_rfc4514(dn)}; {_HINT}") from None


_LDH_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
MAX_DNS_NAME = 253


def check_dns_name(value: str, item: str = "") -> str:
    """A SAN dNSName in the preferred name syntax (RFC 5280 4.2.1.6, RFC 1034 3.5 / RFC 1123 2.1): labels of
    letters, digits and inner hyphens, 1-63 characters each, at most 253 in all, no trailing dot; a ``*`` is
    allowed only as the whole leftmost label. Internationalised names go in as A-labels (``xn--...``).

    Raises:
        ValueError: naming the offending label -- before any key is generated for a request carrying it.
    """
    where = item or f"dns:{value}"
    if len(value) > MAX_DNS_NAME:
        raise ValueError(f"SAN {where[:80]!r}: DNS name of {len(value)} characters exceeds {MAX_DNS_NAME}")
    labels = value.split(".")
    for i, label in enumerate(labels):
        if i == 0 and label == "*" and len(labels) > 1:
            continue
        if not label:
            raise ValueError(f"SAN {where[:80]!r}: empty DNS label (leading, trailing or double dot)")
        if len(label) > 63:
            raise ValueError(f"SAN {where[:80]!r}: DNS label of {len(label)} characters exceeds 63")
        if not _LDH_LABEL.match(label):
            raise ValueError(f"SAN {where[:80]!r}: DNS label {label[:63]!r} is not letters, digits and inner "
                             "hyphens (use the A-label xn--... form for international names)")
    return value


def parse_san(item: str) -> x509.GeneralName:
    """Parse ``dns:``, ``ip:``, ``uri:`` or ``email:`` into a GeneralName.

    Raises:
        ValueError: unknown form or malformed value.
    """
    kind, sep, value = item.partition(":")
    kind = kind.lower()
    if not sep or not value:
        raise ValueError(f"malformed SAN {item!r}; use {SAN_FORMS}")
    if kind == "dns":
        return x509.DNSName(check_dns_name(value, item))
    if kind == "ip":
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError as e:
            raise ValueError(f"malformed IP address in SAN {item!r}") from e
    if kind == "uri":
        return x509.UniformResourceIdentifier(value)
    if kind == "email":
        return x509.RFC822Name(value)
    raise ValueError(f"unknown SAN type {kind!r} in {item!r}; use {SAN_FORMS}")


def build_csr(
    private_key,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName] = (),
    *,
    key_usage: x509.KeyUsage | None = None,
    extended_key_usage: Sequence[x509.ObjectIdentifier] = (),
    extensions: Iterable[x509.Extension] = (),
    challenge_password: bytes | None = None,
    hash_name: str | None = None,
) -> x509.CertificateSigningRequest:
    """Build and sign a CSR with ``private_key`` (signed inside its backend).

    Args:
        hash_name: ``sha256``, ``sha384`` or ``sha512`` to sign with (an EST server's /csrattrs may ask for one);
            None picks the key's default (SHA-384 for P-384, SHA-256 otherwise). Ignored for Ed25519/Ed448,
            whose signatures have no separate hash.

    Raises:
        ValueError: an unknown ``hash_name``.
    """
    b = x509.CertificateSigningRequestBuilder().subject_name(subject)
    seen = set()
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        seen.add(x509.SubjectAlternativeName.oid)
    if key_usage is not None:
        b = b.add_extension(key_usage, critical=True)
        seen.add(x509.KeyUsage.oid)
    if extended_key_usage:
        b = b.add_extension(x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False)
        seen.add(x509.ExtendedKeyUsage.oid)
    for ext in extensions:
        if ext.oid not in seen:
            b = b.add_extension(ext.value, critical=ext.critical)
            seen.add(ext.oid)
    if challenge_password is not None:
        b = b.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge_password)
    algorithm = signature_hash(private_key)
    if hash_name is not None and algorithm is not None:
        algorithm = hash_by_name(hash_name)
    return b.sign(private_key, algorithm)


SIGNATURE_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def hash_by_name(name: str) -> hashes.HashAlgorithm:
    """``sha256``/``sha384``/``sha512`` as a ``cryptography`` hash.

    Raises:
        ValueError: another name.
    """
    try:
        return SIGNATURE_HASHES[name.lower()]()
    except KeyError:
        raise ValueError(f"unsupported signature hash {name!r} (use {', '.join(SIGNATURE_HASHES)})") from None


def default_key_usage(key_type: str) -> x509.KeyUsage:
    """digitalSignature (+ keyEncipherment for RSA): what an LDevID/TLS credential needs."""
    rsa = key_type.startswith("rsa")
    return x509.KeyUsage(True, False, rsa, False, False, False, False, False, False)


def build_self_signed(
    private_key,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName] = (),
    *,
    key_usage: x509.KeyUsage,
    extended_key_usage: Sequence[x509.ObjectIdentifier] = (),
    lifetime_s: int = 365 * 24 * 3600,
) -> x509.Certificate:
    """A self-signed end-entity certificate for ``private_key`` (signed inside its backend): the certificate an
    application presents before its first managed one (e.g. an OPC UA server's first start, OPC 10000-6 §6.2.2),
    which an operator accepts once by its fingerprint."""
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    pub = private_key.public_key()
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(pub)
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(seconds=lifetime_s))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(key_usage, critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False))
    if extended_key_usage:
        b = b.add_extension(x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(private_key, signature_hash(private_key))
