"""Fuzz targets of the board agent's parsers (agent/mpy), runnable under CPython and MicroPython.

The first byte of an input selects the parser (``PARSERS``, modulo their number); the rest is its input. Each
parser's contract names the only errors it may raise:

- ``x509``: ``x509.Certificate(der)`` -> ``errors.BadInput``;
- ``pkcs7``: ``x509.certs_from_pkcs7`` + ``Certificate`` of each -> ``BadInput``;
- ``der``: ``der.read``/``items`` over the whole tree, and ``to_int``/``to_oid``/``to_bits``/``to_time`` on each
  primitive of that type -> ``der.DerError``;
- ``cbor``: ``cbor.loads`` -> ``cbor.CborError``;
- ``frame``: ``frame.FrameReader`` over the bytes -> ``frame.FrameError`` / ``frame.FrameTimeout``;
- ``coap``: ``coap.decode`` -> ``BadInput``.

``run(data)`` returns normally or raises an allowed error; anything else escaping is a finding.
"""
from mpy import cbor, coap, der, frame, x509
from mpy.errors import BadInput

PARSERS = ("x509", "pkcs7", "der", "cbor", "frame", "coap")


def _walk(buf, s, e, depth):
    if depth > 32:
        raise der.DerError("nested too deeply")
    for t, vs, ve, _, _ in der.items(buf, s, e):
        if t & 0x20:
            _walk(buf, vs, ve, depth + 1)
        elif t == der.INTEGER:
            if ve > vs and not buf[vs] & 0x80:
                der.to_int(buf, vs, ve)
        elif t == der.OID:
            der.to_oid(buf, vs, ve)
        elif t == der.BIT_STRING:
            der.to_bits(buf, vs, ve)
        elif t in (der.UTCTIME, der.GENTIME):
            der.to_time(buf, t, vs, ve)


def _x509(b):
    x509.Certificate(b)


def _pkcs7(b):
    for c in x509.certs_from_pkcs7(b):
        x509.Certificate(c)


def _der(b):
    _walk(b, 0, len(b), 0)


def _cbor(b):
    cbor.loads(b)


def _frame(b):
    pos = [0]

    def read(n):
        chunk = b[pos[0]:pos[0] + n]
        pos[0] += len(chunk)
        return chunk

    reader = frame.FrameReader(read, chunk=7)
    for _ in range(64):
        try:
            reader.read()
        except frame.FrameError:
            continue


def _coap(b):
    m = coap.decode(b)
    m.path()
    m.content_format()


RUN = (_x509, _pkcs7, _der, _cbor, _frame, _coap)
ALLOWED = ((BadInput,), (BadInput,), (der.DerError,), (cbor.CborError,), (frame.FrameError, frame.FrameTimeout),
           (BadInput,))


def run(data):
    """One input: ``data[0]`` selects the parser. Raises the parser's own error, or returns."""
    if not data:
        return None
    i = data[0] % len(RUN)
    try:
        RUN[i](data[1:])
    except ALLOWED[i]:
        raise Refused() from None
    return None


class Refused(Exception):
    """The parser refused the input with one of its own errors (the contract's outcome for bad input)."""
