"""PKCS#10 certification requests (RFC 2986) and SEC1 private-key encoding (RFC 5915).

The CSR carries subject CN and serialNumber, a subjectAltName (DNS names, URIs, IP addresses) and a
keyUsage extension request (digitalSignature, critical) and is signed ECDSA-SHA256 by the key itself.
"""
from . import compat, der, ec
from .ecdsa import PrivateKey
from .x509 import OID_CN, OID_EC_PUBLIC_KEY, OID_ECDSA_SHA256, OID_KEY_USAGE, OID_P256

OID_SERIAL_NUMBER = "2.5.4.5"
OID_ORG = "2.5.4.10"
OID_SAN = "2.5.29.17"
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"


def spki_ec(pub):
    alg = der.seq(der.oid(OID_EC_PUBLIC_KEY), der.oid(OID_P256))
    return der.seq(alg, der.bit_string(ec.encode_point(pub)))


def name(cn=None, serial=None, org=None):
    """An X.501 Name with one attribute per RDN, in the conventional O, CN, serialNumber order."""
    rdns = []
    if org:
        rdns.append(der.set_of(der.seq(der.oid(OID_ORG), der.utf8(org))))
    if cn:
        rdns.append(der.set_of(der.seq(der.oid(OID_CN), der.utf8(cn))))
    if serial:
        rdns.append(der.set_of(der.seq(der.oid(OID_SERIAL_NUMBER), der.printable(serial))))
    return der.seq(*rdns)


def name_rdns(rdns):
    """An X.501 Name from ``[(oid, value), ...]`` in ASN.1 order, one attribute per RDN (CN as UTF8String,
    serialNumber as PrintableString, as X.520 requires)."""
    out = []
    for o, v in rdns:
        if o == OID_SERIAL_NUMBER:
            out.append(der.set_of(der.seq(der.oid(o), der.printable(v))))
        elif o == OID_CN:
            out.append(der.set_of(der.seq(der.oid(o), der.utf8(v))))
        else:
            raise ValueError("unsupported subject attribute %s" % o)
    return der.seq(*out)


def _ip_bytes(s):
    parts = s.split(".")
    if len(parts) != 4:
        raise ValueError("only IPv4 addresses are supported in SAN: %r" % s)
    out = bytes(int(p) for p in parts)
    return out


def general_names(sans):
    """SAN entries: 'dns:x', 'uri:x', 'ip:a.b.c.d', 'email:x', or a bare DNS name."""
    out = []
    for s in sans:
        kind, _, val = s.partition(":") if ":" in s and s.split(":", 1)[0] in ("dns", "uri", "ip", "email") \
            else ("dns", "", s)
        if not val:
            raise ValueError("empty SAN entry %r" % s)
        if kind == "dns":
            out.append(der.tlv(0x82, der.ia5(val)[2:]))
        elif kind == "uri":
            out.append(der.tlv(0x86, der.ia5(val)[2:]))
        elif kind == "email":
            out.append(der.tlv(0x81, der.ia5(val)[2:]))
        else:
            out.append(der.tlv(0x87, _ip_bytes(val)))
    return der.seq(*out)


def _ext(oid_s, value, critical=False):
    parts = [der.oid(oid_s)]
    if critical:
        parts.append(der.boolean(True))
    parts.append(der.octet_string(value))
    return der.seq(*parts)


def build(key, cn=None, serial=None, sans=(), org=None, key_usage=(0,), rdns=None):
    """DER PKCS#10 request signed by key (an ``ecdsa.PrivateKey``). ``rdns`` ([(oid, value)] in ASN.1
    order, see ``name_rdns``) replaces cn/serial/org when given.

    Raises:
        ValueError: a subject field that cannot be encoded (e.g. serialNumber not PrintableString).
    """
    exts = []
    if sans:
        exts.append(_ext(OID_SAN, general_names(sans)))
    if key_usage:
        exts.append(_ext(OID_KEY_USAGE, der.named_bits(key_usage), critical=True))
    attrs = b""
    if exts:
        attrs = der.seq(der.oid(OID_EXTENSION_REQUEST), der.set_of(der.seq(*exts)))
    subject = name_rdns(rdns) if rdns is not None else name(cn, serial, org)
    info = der.seq(der.integer(0), subject, spki_ec(key.public), der.ctx(0, attrs))
    sig = key.sign(info)
    return der.seq(info, der.seq(der.oid(OID_ECDSA_SHA256)), der.bit_string(sig))


def key_to_der(key):
    """SEC1 ECPrivateKey with curve parameters and public key (what OpenSSL writes)."""
    return der.seq(der.integer(1), der.octet_string(compat.int_to_bytes(key.d, 32)),
                   der.ctx(0, der.oid(OID_P256)), der.ctx(1, der.bit_string(key.public_bytes())))


def key_from_der(buf):
    """Parse a SEC1 ECPrivateKey (P-256). Raises ValueError if malformed or inconsistent."""
    s, e = der.decode_whole(buf, der.SEQUENCE, "ECPrivateKey")
    kids = der.items(buf, s, e)
    if len(kids) < 2 or kids[0][0] != der.INTEGER or kids[1][0] != der.OCTET_STRING:
        raise der.DerError("bad ECPrivateKey")
    if der.to_int(buf, kids[0][1], kids[0][2]) != 1 or kids[1][2] - kids[1][1] != 32:
        raise der.DerError("unsupported ECPrivateKey version or size")
    key = PrivateKey(compat.int_from_bytes(buf[kids[1][1]:kids[1][2]]))
    for t, vs, ve, _, _ in kids[2:]:
        if t == 0xA0:
            os_, oe = der.expect(buf, vs, der.OID, ve, "curve")
            if der.to_oid(buf, os_, oe) != OID_P256:
                raise der.DerError("key is not on P-256")
        elif t == 0xA1:
            bs, be = der.expect(buf, vs, der.BIT_STRING, ve, "publicKey")
            _, pub = der.to_bits(buf, bs, be)
            if ec.decode_point(pub) != key.public:
                raise der.DerError("public key does not match the private key")
    return key
