"""HMAC-SHA256 (RFC 2104) over hashlib.sha256; MicroPython has no hmac module."""
import hashlib

_BLOCK = 64


def _pads(key):
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key + bytes(_BLOCK - len(key))
    return bytes(c ^ 0x36 for c in key), bytes(c ^ 0x5C for c in key)


def hmac_sha256(key, *parts):
    """HMAC-SHA256(key, concatenation of parts) -> 32 bytes."""
    ipad, opad = _pads(key)
    h = hashlib.sha256(ipad)
    for p in parts:
        h.update(p)
    return hashlib.sha256(opad + h.digest()).digest()


def sha256(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()
