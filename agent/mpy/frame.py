"""Framed serial protocol between a host (the CLM bridge) and the board, over USB CDC or a UART.

One frame, all printable ASCII so it survives REPL consoles and logs interleaved on the same line:

    "~" LLLL BODY CCCCCCCC "\n"

LLLL is len(BODY) as 4 lowercase hex digits, BODY is ``KIND SP SEQ SP BASE64(payload)`` and CCCCCCCC
is the CRC-32 (IEEE, as binascii.crc32) of BODY in 8 hex digits. "~" never occurs in BODY, so a reader
resynchronises after garbage or a corrupt frame by scanning for the next "~"; bytes between frames
(boot messages, "\r") are ignored. KIND is an upper-case word, SEQ a decimal request number echoed in
the reply.
"""
from . import compat

SOF = b"~"
MAX_BODY = 8192
_HEX = b"0123456789abcdef"


class FrameError(ValueError):
    """A corrupt frame (bad length, CRC mismatch, bad body); the reader has already skipped it."""


class FrameTimeout(Exception):
    """No complete frame before the reader's source ran dry (timeout or end of file)."""


def encode(kind, seq, payload=b""):
    body = ("%s %d " % (kind, seq)).encode() + compat.b64encode(payload)
    if len(body) > 0xFFFF:
        raise ValueError("frame too large")
    return SOF + ("%04x" % len(body)).encode() + body + ("%08x" % compat.crc32(body)).encode() + b"\n"


def _hexval(b):
    for c in b:
        if c not in _HEX:
            return -1
    return int(b, 16)


def decode_body(body):
    parts = bytes(body).split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit():
        raise FrameError("malformed frame body")
    try:
        kind = parts[0].decode()
        payload = compat.b64decode(parts[2]) if parts[2] else b""
    except (ValueError, UnicodeError):
        raise FrameError("bad base64 payload") from None
    return kind, int(parts[1]), payload


class FrameReader:
    """Reads frames from ``read(n)`` (returns up to n bytes, b"" on timeout or end of file).

    It asks for at most ``chunk`` bytes at a time (1 by default, right for a blocking board console
    that would otherwise wait for bytes that never come) and gives up on a frame as soon as a new "~"
    shows up inside it, so a truncated frame never swallows the next good one.
    """

    def __init__(self, read, max_body=MAX_BODY, chunk=1):
        self._read = read
        self._buf = b""
        self.max_body = max_body
        self.chunk = chunk

    def _fill(self, n):
        while len(self._buf) < n:
            c = self._read(min(n - len(self._buf), self.chunk))
            if not c:
                return False
            start = len(self._buf)
            self._buf += bytes(c)
            j = self._buf.find(SOF, start if start else 1)
            if j > 0:  # a new frame starts inside this one: this one was cut short
                self._buf = self._buf[j:]
                raise FrameError("truncated frame")
        return True

    def read(self):
        """Next good frame as (kind, seq, payload).

        Raises:
            FrameError: a corrupt frame was skipped (report it and call again).
            FrameTimeout: the source ran dry; buffered partial data is kept.
        """
        while True:
            i = self._buf.find(SOF)
            if i < 0:
                self._buf = b""
                if not self._fill(1):
                    raise FrameTimeout("no frame")
                continue
            self._buf = self._buf[i:]
            if not self._fill(5):
                raise FrameTimeout("partial frame header")
            n = _hexval(self._buf[1:5])
            if n < 0 or n > self.max_body:
                self._buf = self._buf[1:]
                raise FrameError("bad frame length")
            if not self._fill(5 + n + 8):
                raise FrameTimeout("partial frame")
            body = self._buf[5:5 + n]
            crc = _hexval(self._buf[5 + n:13 + n])
            if crc != compat.crc32(body):
                self._buf = self._buf[1:]  # rescan: a good frame may start inside the bad one
                raise FrameError("frame CRC mismatch")
            self._buf = self._buf[13 + n:]
            return decode_body(body)
