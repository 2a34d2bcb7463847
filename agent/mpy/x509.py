"""X.509 certificate parsing and checking, just enough for a board to accept its own certificate.

``Certificate(der)`` parses strictly (raises ``errors.BadInput``); ``check_issued`` verifies an ECDSA
P-256 or RSA PKCS#1 v1.5 (SHA-256) signature by the issuer; ``verify_for_key`` is the whole acceptance
check: the certificate chains to the trust anchor (optionally through intermediates from the same
bundle), carries our public key, is within its validity when the board clock is known to be set, and
has no critical extension we do not understand.
"""
from . import der, ecdsa, rsa
from .errors import BadInput, Untrusted, WrongKey
from .hmac256 import sha256

OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_P256 = "1.2.840.10045.3.1.7"
OID_RSA = "1.2.840.113549.1.1.1"
OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
OID_RSA_SHA256 = "1.2.840.113549.1.1.11"
OID_PKCS7_SIGNED = "1.2.840.113549.1.7.2"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_KEY_USAGE = "2.5.29.15"
OID_CN = "2.5.4.3"
# Extensions we understand well enough to honour if marked critical.
_KNOWN_EXTS = (OID_BASIC_CONSTRAINTS, OID_KEY_USAGE, "2.5.29.37", "2.5.29.17", "2.5.29.14", "2.5.29.35",
               "2.5.29.32", "2.5.29.31", "1.3.6.1.5.5.7.1.1")
KU_DIGITAL_SIGNATURE = 0
KU_KEY_CERT_SIGN = 5
MAX_CHAIN = 4


def _alg(buf, s, e):
    """AlgorithmIdentifier -> (oid, (param_tag, ps, pe) or None)."""
    kids = der.items(buf, s, e)
    if not kids or kids[0][0] != der.OID or len(kids) > 2:
        raise der.DerError("bad AlgorithmIdentifier")
    o = der.to_oid(buf, kids[0][1], kids[0][2])
    return o, (kids[1][:3] if len(kids) == 2 else None)


def parse_spki(buf, s, e):
    """SubjectPublicKeyInfo -> ("ec", point) or ("rsa", (n, e))."""
    kids = der.items(buf, s, e)
    if len(kids) != 2 or kids[0][0] != der.SEQUENCE or kids[1][0] != der.BIT_STRING:
        raise der.DerError("bad SubjectPublicKeyInfo")
    alg, param = _alg(buf, kids[0][1], kids[0][2])
    unused, key = der.to_bits(buf, kids[1][1], kids[1][2])
    if unused:
        raise der.DerError("public key BIT STRING has unused bits")
    if alg == OID_EC_PUBLIC_KEY:
        if param is None or param[0] != der.OID or der.to_oid(buf, param[1], param[2]) != OID_P256:
            raise der.DerError("EC key is not on P-256")
        from . import ec

        return "ec", ec.decode_point(key)
    if alg == OID_RSA:
        s0, e0 = der.decode_whole(key, der.SEQUENCE, "RSAPublicKey")
        ns, ne = der.expect(key, s0, der.INTEGER, e0, "RSA modulus")
        es, ee = der.expect(key, ne, der.INTEGER, e0, "RSA exponent")
        if ee != e0:
            raise der.DerError("RSAPublicKey: trailing data")
        n, ex = der.to_int(key, ns, ne), der.to_int(key, es, ee)
        rsa.check_public(n, ex)
        return "rsa", (n, ex)
    raise der.DerError("unsupported public key algorithm %s" % alg)


class Certificate:
    """A parsed certificate. Attributes: der, tbs, sig_alg, sig, serial, issuer, subject (raw Name DER),
    not_before, not_after ((Y, M, D, h, m, s) UTC), key (("ec", point) or ("rsa", (n, e))), is_ca
    (None without basicConstraints), key_usage (set of bit numbers or None), critical_unknown (OIDs)."""

    def __init__(self, data):
        try:
            self._parse(bytes(data))
        except ValueError as e:  # DerError and point/key validation
            raise BadInput("certificate: %s" % e, "malformed-certificate") from None
        except IndexError:
            raise BadInput("certificate: truncated", "malformed-certificate") from None

    def _parse(self, buf):
        self.der = buf
        s, e = der.decode_whole(buf, der.SEQUENCE, "Certificate")
        top = der.items(buf, s, e)
        if len(top) != 3 or top[0][0] != der.SEQUENCE or top[1][0] != der.SEQUENCE or top[2][0] != der.BIT_STRING:
            raise der.DerError("Certificate must be SEQUENCE {tbs, algorithm, signature}")
        self.tbs = buf[top[0][3]:top[0][4]]
        self.sig_alg, _ = _alg(buf, top[1][1], top[1][2])
        unused, self.sig = der.to_bits(buf, top[2][1], top[2][2])
        if unused:
            raise der.DerError("signature BIT STRING has unused bits")
        f = der.items(buf, top[0][1], top[0][2])
        i = 0
        if f and f[0][0] == 0xA0:
            i = 1
        if len(f) < i + 6:
            raise der.DerError("TBSCertificate has too few fields")
        if f[i][0] != der.INTEGER:
            raise der.DerError("serialNumber missing")
        self.serial = der.to_int(buf, f[i][1], f[i][2]) if not buf[f[i][1]] & 0x80 else -1
        inner_alg, _ = _alg(buf, f[i + 1][1], f[i + 1][2])
        if inner_alg != self.sig_alg:
            raise der.DerError("signature algorithm mismatch between TBS and outer")
        self.issuer = buf[f[i + 2][3]:f[i + 2][4]]
        v = der.items(buf, f[i + 3][1], f[i + 3][2])
        if f[i + 3][0] != der.SEQUENCE or len(v) != 2:
            raise der.DerError("bad Validity")
        self.not_before = der.to_time(buf, v[0][0], v[0][1], v[0][2])
        self.not_after = der.to_time(buf, v[1][0], v[1][1], v[1][2])
        if f[i + 4][0] != der.SEQUENCE or f[i + 5][0] != der.SEQUENCE:
            raise der.DerError("bad subject or subjectPublicKeyInfo")
        self.subject = buf[f[i + 4][3]:f[i + 4][4]]
        self.key = parse_spki(buf, f[i + 5][1], f[i + 5][2])
        self.is_ca = None
        self.key_usage = None
        self.critical_unknown = []
        for t, es, ee, _, _ in f[i + 6:]:
            if t == 0xA3:
                self._parse_exts(buf, es, ee)

    def _parse_exts(self, buf, s, e):
        s, e = der.expect(buf, s, der.SEQUENCE, e, "Extensions")
        for t, xs, xe, _, _ in der.items(buf, s, e):
            kids = der.items(buf, xs, xe)
            if t != der.SEQUENCE or len(kids) not in (2, 3) or kids[0][0] != der.OID:
                raise der.DerError("bad Extension")
            o = der.to_oid(buf, kids[0][1], kids[0][2])
            critical = len(kids) == 3 and kids[1][0] == der.BOOLEAN and buf[kids[1][1]] == 0xFF
            vs, ve = kids[-1][1], kids[-1][2]
            if kids[-1][0] != der.OCTET_STRING:
                raise der.DerError("extension value is not an OCTET STRING")
            if o == OID_BASIC_CONSTRAINTS:
                bs, be = der.expect(buf, vs, der.SEQUENCE, ve, "basicConstraints")
                bc = der.items(buf, bs, be)
                self.is_ca = bool(bc) and bc[0][0] == der.BOOLEAN and buf[bc[0][1]] == 0xFF
            elif o == OID_KEY_USAGE:
                ks, ke = der.expect(buf, vs, der.BIT_STRING, ve, "keyUsage")
                unused, bits = der.to_bits(buf, ks, ke)
                ku = set()
                for n in range(len(bits) * 8 - unused):
                    if bits[n // 8] & (0x80 >> (n % 8)):
                        ku.add(n)
                self.key_usage = ku
            elif critical and o not in _KNOWN_EXTS:
                self.critical_unknown.append(o)

    def common_name(self):
        """The first CN in the subject, or '' (for display only)."""
        try:
            buf = self.subject
            s, e = der.decode_whole(buf, der.SEQUENCE, "Name")
            for _, rs, re_, _, _ in der.items(buf, s, e):
                for _, as_, ae, _, _ in der.items(buf, rs, re_):
                    kids = der.items(buf, as_, ae)
                    if len(kids) == 2 and der.to_oid(buf, kids[0][1], kids[0][2]) == OID_CN:
                        return bytes(buf[kids[1][1]:kids[1][2]]).decode()
        except (ValueError, UnicodeError):
            pass
        return ""

    def fingerprint(self):
        return sha256(self.der)


def check_issued(cert, issuer):
    """True if issuer's key signed cert (names must match too)."""
    if cert.issuer != issuer.subject:
        return False
    kind, key = issuer.key
    h = sha256(cert.tbs)
    if cert.sig_alg == OID_ECDSA_SHA256 and kind == "ec":
        try:
            r, s = der.ecdsa_sig_decode(cert.sig)
        except ValueError:
            return False
        return ecdsa.verify_digest(key, h, r, s)
    if cert.sig_alg == OID_RSA_SHA256 and kind == "rsa":
        return rsa.verify_digest(key[0], key[1], h, cert.sig)
    return False


def certs_from_pkcs7(buf):
    """DER certificates from a certs-only PKCS#7 / CMS SignedData (RFC 8551 degenerate form).

    Raises:
        BadInput: not a SignedData ContentInfo or no certificates.
    """
    try:
        s, e = der.decode_whole(buf, der.SEQUENCE, "ContentInfo")
        kids = der.items(buf, s, e)
        if len(kids) != 2 or kids[0][0] != der.OID or kids[1][0] != 0xA0:
            raise der.DerError("bad ContentInfo")
        if der.to_oid(buf, kids[0][1], kids[0][2]) != OID_PKCS7_SIGNED:
            raise der.DerError("ContentInfo is not signedData")
        sd_s, sd_e = der.expect(buf, kids[1][1], der.SEQUENCE, kids[1][2], "SignedData")
        out = []
        for t, cs, ce, _, _ in der.items(buf, sd_s, sd_e):
            if t == 0xA0:  # [0] IMPLICIT SET OF CertificateChoices
                for ct, _, _, xs, xe in der.items(buf, cs, ce):
                    if ct == der.SEQUENCE:
                        out.append(bytes(buf[xs:xe]))
    except ValueError as e:
        raise BadInput("PKCS#7: %s" % e, "malformed-certificate") from None
    if not out:
        raise BadInput("PKCS#7 contains no certificates", "malformed-certificate")
    return out


def is_pkcs7(buf):
    """True if buf looks like a ContentInfo (first element an OID) rather than a Certificate."""
    try:
        s, e = der.expect(buf, 0, der.SEQUENCE, len(buf), "outer")
        t, _, _ = der.read(buf, s, e)
        return t == der.OID
    except ValueError:
        return False


def _time_ok(cert, now):
    return cert.not_before <= now <= cert.not_after


def verify_for_key(certs, anchor, our_key, now=None, path=None):
    """Find the certificate for our key among certs (DER list) and check it fully.

    Args:
        certs: DER certificates (leaf plus optional intermediates, any order).
        anchor: the trust anchor ``Certificate``.
        our_key: our public point (ec affine tuple).
        now: UTC tuple if the board clock is known to be set, else None (validity is then not checked).
        path: a list that receives the verified path (leaf, intermediates..., anchor) as ``Certificate``s.

    Returns:
        The leaf ``Certificate``.

    Raises:
        BadInput: unparsable; WrongKey: no certificate for our key; Untrusted: chain, validity, usage.
    """
    parsed = [Certificate(c) for c in certs]
    leaf = None
    for c in parsed:
        if c.key == ("ec", our_key):
            leaf = c
            break
    if leaf is None:
        raise WrongKey("the certificate is for another key: its public key is not this board's pending key")
    cur = leaf
    walked = [leaf]
    for _depth in range(MAX_CHAIN + 1):
        if cur.critical_unknown:
            raise Untrusted("certificate has an unsupported critical extension", "unknown-critical-extension")
        if now is not None and not _time_ok(cur, now):
            raise Untrusted("certificate is not valid at the current time",
                            "not-yet-valid" if now < cur.not_before else "expired")
        if cur is not leaf and (cur.is_ca is not True or
                                (cur.key_usage is not None and KU_KEY_CERT_SIGN not in cur.key_usage)):
            raise Untrusted("intermediate is not a CA certificate", "not-a-ca")
        if check_issued(cur, anchor):
            break
        nxt = None
        for c in parsed:
            if c is not cur and c is not leaf and check_issued(cur, c):
                nxt = c
                break
        if nxt is None:
            raise Untrusted("certificate does not chain to the trust anchor")
        cur = nxt
        walked.append(cur)
    else:
        raise Untrusted("chain too long")
    if anchor.is_ca is False:
        raise Untrusted("trust anchor is not a CA certificate", "not-a-ca")
    if now is not None and not _time_ok(anchor, now):
        raise Untrusted("trust anchor is not valid at the current time",
                        "not-yet-valid" if now < anchor.not_before else "expired")
    if leaf.is_ca:
        raise Untrusted("refusing a CA certificate as the device certificate", "is-ca")
    if leaf.key_usage is not None and KU_DIGITAL_SIGNATURE not in leaf.key_usage:
        raise Untrusted("certificate key usage lacks digitalSignature", "bad-key-usage")
    if path is not None:
        path.extend(walked)
        path.append(anchor)
    return leaf
