"""RSA PKCS#1 v1.5 signature verification with SHA-256 (RFC 8017 8.2.2), for RSA plant CAs.

The expected encoded message is rebuilt in full and compared byte for byte (no parsing of the decrypted
block), which rules out the Bleichenbacher-2006 family of lax-parser forgeries.
"""
from . import compat

MIN_BITS = 2048
_SHA256_DIGESTINFO = compat.unhexlify("3031300d060960864801650304020105000420")


def check_public(n, e):
    """Raises ValueError for a modulus below 2048 bits or an unusable exponent."""
    if compat.bit_length(n) < MIN_BITS:
        raise ValueError("RSA key below %d bits" % MIN_BITS)
    if e < 3 or e % 2 == 0 or e >= n:
        raise ValueError("bad RSA public exponent")


def verify_digest(n, e, digest, sig):
    """True if sig is a valid PKCS#1 v1.5 SHA-256 signature of digest under (n, e)."""
    k = (compat.bit_length(n) + 7) // 8
    if len(sig) != k or len(digest) != 32:
        return False
    s = compat.int_from_bytes(sig)
    if s >= n:
        return False
    em = compat.int_to_bytes(pow(s, e, n), k)
    t = _SHA256_DIGESTINFO + digest
    if k < len(t) + 11:
        return False
    expected = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
    return compat.consteq(em, expected)
