"""Minimal strict DER encoder and decoder.

The decoder works on (buffer, start, end) index triples so large certificates are never copied piecewise,
and rejects anything that is not DER: indefinite or non-minimal lengths, lengths past the end of the
buffer, high tag numbers, non-minimal INTEGERs. Every failure is a ``DerError`` (a ValueError) that
names what was wrong; nothing here asserts on input.
"""
from . import compat

SEQUENCE = 0x30
SET = 0x31
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
UTF8 = 0x0C
PRINTABLE = 0x13
IA5 = 0x16
UTCTIME = 0x17
GENTIME = 0x18
BOOLEAN = 0x01


class DerError(ValueError):
    """Input is not the DER structure expected."""


# ---- encoding ----

def _len(n):
    if n < 0x80:
        return bytes([n])
    b = compat.int_to_bytes(n, (compat.bit_length(n) + 7) // 8)
    return bytes([0x80 | len(b)]) + b


def tlv(tag, content):
    return bytes([tag]) + _len(len(content)) + content


def seq(*parts):
    return tlv(SEQUENCE, b"".join(parts))


def set_of(*parts):
    return tlv(SET, b"".join(sorted(parts)))


def integer(x):
    if x < 0:
        raise ValueError("negative INTEGER not supported")
    n = compat.bit_length(x) // 8 + 1  # room for a leading 0 when the top bit is set
    return tlv(INTEGER, compat.int_to_bytes(x, n))


def oid(dotted):
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([arcs[0] * 40 + arcs[1]])
    for a in arcs[2:]:
        chunk = [a & 0x7F]
        a >>= 7
        while a:
            chunk.append(0x80 | (a & 0x7F))
            a >>= 7
        chunk.reverse()
        out.extend(bytes(chunk))
    return tlv(OID, bytes(out))


def octet_string(b):
    return tlv(OCTET_STRING, b)


def bit_string(b, unused=0):
    return tlv(BIT_STRING, bytes([unused]) + b)


def boolean(v):
    return tlv(BOOLEAN, b"\xff" if v else b"\x00")


def null():
    return b"\x05\x00"


def utf8(s):
    return tlv(UTF8, s.encode())


def printable(s):
    for c in s:
        if not (c.isalpha() or c.isdigit() or c in " '()+,-./:=?"):
            raise ValueError("%r is not a PrintableString" % s)
    return tlv(PRINTABLE, s.encode())


def ia5(s):
    b = s.encode()
    for c in b:
        if c > 127:
            raise ValueError("%r is not IA5 (ASCII)" % s)
    return tlv(IA5, b)


def ctx(n, content, constructed=True):
    """Context-specific [n] tag (EXPLICIT when constructed wraps a full TLV, IMPLICIT otherwise)."""
    return tlv((0xA0 if constructed else 0x80) | n, content)


def named_bits(bits):
    """BIT STRING with named bits set (e.g. KeyUsage); trailing zero bits dropped as DER requires."""
    if not bits:
        return bit_string(b"")
    top = max(bits)
    nbytes = top // 8 + 1
    buf = bytearray(nbytes)
    for b in bits:
        buf[b // 8] |= 0x80 >> (b % 8)
    return bit_string(bytes(buf), 7 - (top % 8))


# ---- decoding ----

def read(buf, off, end=None):
    """Read one TLV at off. Returns (tag, value_start, value_end).

    Raises:
        DerError: truncated, indefinite/non-minimal length, or high tag number.
    """
    if end is None:
        end = len(buf)
    if off + 2 > end:
        raise DerError("truncated DER (need a tag and length at offset %d)" % off)
    tag = buf[off]
    if tag & 0x1F == 0x1F:
        raise DerError("high tag numbers are not supported (offset %d)" % off)
    ln = buf[off + 1]
    p = off + 2
    if ln & 0x80:
        nb = ln & 0x7F
        if nb == 0:
            raise DerError("indefinite length is not DER (offset %d)" % off)
        if nb > 4:
            raise DerError("length too large (offset %d)" % off)
        if p + nb > end:
            raise DerError("truncated DER length (offset %d)" % off)
        ln = 0
        for i in range(nb):
            ln = (ln << 8) | buf[p + i]
        p += nb
        if ln < 0x80 or (nb > 1 and buf[off + 2] == 0):
            raise DerError("non-minimal length encoding (offset %d)" % off)
    if p + ln > end:
        raise DerError("truncated DER: %d bytes declared at offset %d, %d available" % (ln, off, end - p))
    return tag, p, p + ln


def expect(buf, off, tag, end=None, what="element"):
    t, s, e = read(buf, off, end)
    if t != tag:
        raise DerError("%s: expected tag 0x%02x, got 0x%02x" % (what, tag, t))
    return s, e


def items(buf, start, end):
    """List of (tag, value_start, value_end, tlv_start, tlv_end) for the children of a constructed value."""
    out = []
    off = start
    while off < end:
        t, s, e = read(buf, off, end)
        out.append((t, s, e, off, e))
        off = e
    return out


def decode_whole(buf, tag, what="structure"):
    """The value span of a single TLV that must fill buf exactly."""
    s, e = expect(buf, 0, tag, len(buf), what)
    if e != len(buf):
        raise DerError("%s: %d trailing bytes" % (what, len(buf) - e))
    return s, e


def to_int(buf, s, e):
    """Non-negative minimal INTEGER value."""
    if e <= s:
        raise DerError("empty INTEGER")
    if e - s > 1 and (buf[s] == 0 and buf[s + 1] < 0x80 or buf[s] == 0xFF and buf[s + 1] >= 0x80):
        raise DerError("non-minimal INTEGER")
    if buf[s] & 0x80:
        raise DerError("negative INTEGER where a non-negative one is required")
    return compat.int_from_bytes(bytes(buf[s:e]))


def to_oid(buf, s, e):
    if e <= s:
        raise DerError("empty OID")
    arcs = []
    v = 0
    first = True
    for i in range(s, e):
        c = buf[i]
        if v == 0 and c == 0x80:
            raise DerError("non-minimal OID arc")
        v = (v << 7) | (c & 0x7F)
        if not c & 0x80:
            if first:
                if v < 80:
                    arcs.extend((v // 40, v % 40))
                else:
                    arcs.extend((2, v - 80))
                first = False
            else:
                arcs.append(v)
            v = 0
    if buf[e - 1] & 0x80:
        raise DerError("truncated OID")
    return ".".join(str(a) for a in arcs)


def to_bits(buf, s, e):
    """BIT STRING -> (unused_bits, bytes)."""
    if e <= s:
        raise DerError("empty BIT STRING")
    unused = buf[s]
    if unused > 7 or (unused and e - s == 1):
        raise DerError("bad BIT STRING unused-bits count")
    return unused, bytes(buf[s + 1:e])


_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def to_time(buf, tag, s, e):
    """UTCTime / GeneralizedTime (RFC 5280 4.1.2.5: Z form, whole seconds) -> (Y, M, D, h, m, s).

    Raises:
        DerError: not ASCII digits in the DER form, or a field out of range (month 13, day 32, hour 24...).
    """
    t = bytes(buf[s:e])
    for c in t[:-1]:
        if c < 0x30 or c > 0x39:
            raise DerError("bad time %r: only digits before the Z" % t)
    if tag == UTCTIME and len(t) == 13 and t[-1:] == b"Z":
        y = int(t[0:2])
        y += 1900 if y >= 50 else 2000
        rest = t[2:12]
    elif tag == GENTIME and len(t) == 15 and t[-1:] == b"Z":
        y = int(t[0:4])
        rest = t[4:14]
    else:
        raise DerError("unsupported time encoding %r (need YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ)" % t)
    mo, d, h, mi, sec = int(rest[0:2]), int(rest[2:4]), int(rest[4:6]), int(rest[6:8]), int(rest[8:10])
    if not (1 <= mo <= 12 and 1 <= d <= _DAYS[mo - 1] and h <= 23 and mi <= 59 and sec <= 59):
        raise DerError("bad time %r: a field is out of range" % t)
    if mo == 2 and d == 29 and not (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)):
        raise DerError("bad time %r: February 29 in a common year" % t)
    return (y, mo, d, h, mi, sec)


def ecdsa_sig_encode(r, s):
    return seq(integer(r), integer(s))


def ecdsa_sig_decode(sig):
    """DER Ecdsa-Sig-Value -> (r, s). Raises DerError on anything malformed."""
    s0, e0 = decode_whole(sig, SEQUENCE, "ECDSA signature")
    rs, re_ = expect(sig, s0, INTEGER, e0, "ECDSA r")
    ss, se = expect(sig, re_, INTEGER, e0, "ECDSA s")
    if se != e0:
        raise DerError("ECDSA signature: trailing data")
    return to_int(sig, rs, re_), to_int(sig, ss, se)
