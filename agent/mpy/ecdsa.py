"""ECDSA P-256 with SHA-256: key generation, RFC 6979 deterministic signing, verification.

Invariants:
- Private keys come only from ``compat.urandom`` (the board CSPRNG or a configured seed source); without
  one, key generation raises ``compat.NoRandomError`` instead of using a guessable source.
- Nonces are derived from the key and the message hash (RFC 6979 section 3.2), never from the RNG, so a
  weak or repeating RNG cannot leak the key through a signature.
- ``verify`` returns False (never raises) for any out-of-range r/s, a point at infinity, or a wrong
  signature; ``public_key`` inputs are validated by ``ec.decode_point``.
"""
from . import compat, ec
from .hmac256 import hmac_sha256, sha256

N = ec.N


def generate_private():
    """A uniformly random scalar in [1, n-1] from the CSPRNG (rejection sampling)."""
    while True:
        d = compat.int_from_bytes(compat.urandom(32))
        if 1 <= d < N:
            return d


class PrivateKey:
    """A P-256 key pair. ``d`` is the secret scalar; ``public`` the affine point."""

    def __init__(self, d):
        if not isinstance(d, int) or not 1 <= d < N:
            raise ValueError("private scalar out of range")
        self.d = d
        self._pub = None

    @classmethod
    def generate(cls):
        return cls(generate_private())

    @property
    def public(self):
        if self._pub is None:
            self._pub = ec.mul_base(self.d)
        return self._pub

    def public_bytes(self):
        return ec.encode_point(self.public)

    def sign_digest(self, h):
        return sign_digest(self.d, h)

    def sign(self, msg):
        """DER-encoded ECDSA-SHA256 signature of msg."""
        from . import der

        r, s = sign_digest(self.d, sha256(msg))
        return der.ecdsa_sig_encode(r, s)


def _bits2int(b):
    # qlen = 256 = hlen for SHA-256, so no shift is needed
    return compat.int_from_bytes(b)


def rfc6979_k(d, h):
    """Yield candidate nonces for key d and hash h (RFC 6979 3.2, HMAC-SHA256)."""
    x = compat.int_to_bytes(d, 32)
    h1 = compat.int_to_bytes(_bits2int(h) % N, 32)
    v = b"\x01" * 32
    k = b"\x00" * 32
    k = hmac_sha256(k, v, b"\x00", x, h1)
    v = hmac_sha256(k, v)
    k = hmac_sha256(k, v, b"\x01", x, h1)
    v = hmac_sha256(k, v)
    while True:
        v = hmac_sha256(k, v)
        cand = _bits2int(v)
        if 1 <= cand < N:
            yield cand
        k = hmac_sha256(k, v, b"\x00")
        v = hmac_sha256(k, v)


def sign_digest(d, h):
    """(r, s) for the 32-byte hash h under private scalar d."""
    if len(h) != 32:
        raise ValueError("expected a SHA-256 digest")
    e = _bits2int(h) % N
    for k in rfc6979_k(d, h):
        pt = ec.mul_base(k)
        if pt is None:
            continue
        r = pt[0] % N
        if r == 0:
            continue
        s = ec.inv_mod(k, N) * (e + r * d) % N
        if s == 0:
            continue
        return r, s


def verify_digest(pub, h, r, s):
    """True if (r, s) is a valid signature of hash h by the validated public point pub."""
    if pub is None or not ec.is_on_curve(pub):
        return False
    if not (isinstance(r, int) and isinstance(s, int)):
        return False
    if not (1 <= r < N and 1 <= s < N) or len(h) != 32:
        return False
    e = _bits2int(h) % N
    w = ec.inv_mod(s, N)
    return ec.mul_add_x_equals(e * w % N, r * w % N, pub, r)


def verify(pub, msg, sig_der):
    """Verify a DER signature over msg (SHA-256). False for any malformed signature."""
    from . import der

    try:
        r, s = der.ecdsa_sig_decode(sig_der)
    except ValueError:
        return False
    return verify_digest(pub, sha256(msg), r, s)
