"""Minimal CBOR (RFC 8949) for small request maps: unsigned/negative ints, byte and text strings,
arrays, maps, false/true/null. Definite lengths only; nesting depth bounded. Map keys are text strings, each
at most once (every map of the board's protocol is keyed by text; RFC 8949 5.6 leaves duplicates to the
protocol): a byte-string key is refused rather than kept next to text keys, where MicroPython compares the
two types (and warns) and a lookup by the text name would silently miss it.

Contract of ``loads``: bytes in, a value out, or ``CborError`` (a ValueError) naming what was wrong; no other
exception escapes for any input (checked by the fuzz suite, tests/fuzz, under CPython and MicroPython)."""

MAX_DEPTH = 8


class CborError(ValueError):
    """The bytes are not one well-formed CBOR item of the supported subset."""


def _head(major, n):
    if n < 24:
        return bytes([(major << 5) | n])
    for ai, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < (1 << (8 * size)):
            return bytes([(major << 5) | ai]) + n.to_bytes(size, "big")
    raise ValueError("integer too large for CBOR")


def dumps(v):
    if v is True:
        return b"\xf5"
    if v is False:
        return b"\xf4"
    if v is None:
        return b"\xf6"
    if isinstance(v, int):
        return _head(0, v) if v >= 0 else _head(1, -1 - v)
    if isinstance(v, (bytes, bytearray)):
        return _head(2, len(v)) + bytes(v)
    if isinstance(v, str):
        b = v.encode()
        return _head(3, len(b)) + b
    if isinstance(v, (list, tuple)):
        return _head(4, len(v)) + b"".join(dumps(x) for x in v)
    if isinstance(v, dict):
        return _head(5, len(v)) + b"".join(dumps(k) + dumps(x) for k, x in v.items())
    raise TypeError("cannot encode %s as CBOR" % type(v))


def _read(b, i, depth):
    if depth > MAX_DEPTH:
        raise CborError("CBOR nested too deeply")
    if i >= len(b):
        raise CborError("truncated CBOR")
    ib = b[i]
    major, ai = ib >> 5, ib & 31
    i += 1
    if ai < 24:
        n = ai
    elif ai <= 27:
        size = 1 << (ai - 24)
        if i + size > len(b):
            raise CborError("truncated CBOR")
        n = int.from_bytes(b[i:i + size], "big")
        i += size
    else:
        raise CborError("unsupported CBOR item (indefinite length or reserved)")
    if major == 0:
        return n, i
    if major == 1:
        return -1 - n, i
    if major in (2, 3):
        if i + n > len(b):
            raise CborError("truncated CBOR string")
        s = bytes(b[i:i + n])
        if major == 3:
            try:
                s = s.decode()
            except UnicodeError:
                raise CborError("CBOR text is not UTF-8") from None
        return s, i + n
    if major == 4:
        if n > len(b):
            raise CborError("CBOR array longer than input")
        out = []
        for _ in range(n):
            x, i = _read(b, i, depth + 1)
            out.append(x)
        return out, i
    if major == 5:
        if n > len(b):
            raise CborError("CBOR map longer than input")
        out = {}
        for _ in range(n):
            if i < len(b) and b[i] >> 5 != 3:
                raise CborError("CBOR map key must be a text string (major type %d at offset %d)" % (b[i] >> 5, i))
            k, i = _read(b, i, depth + 1)
            if k in out:
                raise CborError("duplicate CBOR map key %r" % k)
            out[k], i = _read(b, i, depth + 1)
        return out, i
    if major == 7 and ai in (20, 21, 22):
        return (False, True, None)[ai - 20], i
    raise CborError("unsupported CBOR major type %d" % major)


def loads(b):
    v, i = _read(b, 0, 0)
    if i != len(b):
        raise CborError("trailing bytes after CBOR item")
    return v
