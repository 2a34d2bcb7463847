"""NIST P-256 arithmetic in pure Python, tuned for MicroPython boards.

Points are affine tuples ``(x, y)``; the point at infinity is ``None``. Internally Jacobian coordinates
(X, Y, Z) avoid a field inversion per step (infinity: Z == 0); an inversion is one C-level ``pow``.

- ``mul_base``: fixed-base comb (Lim-Lee) over a table of 2^w - 1 affine points built once, lazily; the
  width is chosen from free heap (w=6: 20 KB, w=5: 10 KB, w=4: 5 KB) or set by ``set_comb_width``.
- ``mul``: width-5 wNAF over an 8-point affine table of odd multiples of the variable point.
- ``decode_point`` rejects anything that is not a finite point on the curve, so a hostile public key
  cannot push the arithmetic off the curve (invalid-curve attacks).

Invariant: every public function takes and returns reduced integers; scalars are reduced mod n by callers.
Timing is not constant (Python big ints are not); signing uses deterministic nonces so the RNG never
touches a signature, but a board that can be timed closely by an attacker needs a secure element.
"""
from . import compat

P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5
G = (GX, GY)

_comb_w = 0
_comb_d = 0
_comb = None  # list of 2^w affine points; index 0 unused


def inv_mod(a, m):
    """Inverse of a modulo the prime m (Fermat; MicroPython's pow(a, -1, m) silently returns 0)."""
    a %= m
    if a == 0:
        raise ZeroDivisionError("inverse of 0")
    return pow(a, m - 2, m)


def is_on_curve(pt):
    if pt is None:
        return False
    x, y = pt
    if not (0 <= x < P and 0 <= y < P):
        return False
    return (y * y - (x * x * x - 3 * x + B)) % P == 0


def _dbl(X, Y, Z):
    # dbl-2001-b for a = -3
    if Z == 0 or Y == 0:
        return 0, 1, 0
    p = P
    zz = Z * Z % p
    yy = Y * Y % p
    m = 3 * (X - zz) * (X + zz) % p
    s = 4 * X * yy % p
    x3 = (m * m - 2 * s) % p
    return x3, (m * (s - x3) - 8 * yy * yy) % p, 2 * Y * Z % p


def _madd(X, Y, Z, x2, y2):
    # Jacobian + affine (madd-2004-hmv); handles infinity and P == +-Q
    if Z == 0:
        return x2, y2, 1
    p = P
    zz = Z * Z % p
    h = (x2 * zz - X) % p
    r = (y2 * zz * Z - Y) % p
    if h == 0:
        if r == 0:
            return _dbl(X, Y, Z)
        return 0, 1, 0
    hh = h * h % p
    hhh = h * hh % p
    v = X * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    return x3, (r * (v - x3) - Y * hhh) % p, Z * h % p


def _to_affine(X, Y, Z):
    if Z == 0:
        return None
    zi = inv_mod(Z, P)
    zi2 = zi * zi % P
    return X * zi2 % P, Y * zi2 * zi % P


def _batch_affine(pts):
    """Jacobian list -> affine list with one inversion (Montgomery's trick); no point may be infinity."""
    acc = []
    a = 1
    for _x, _y, Z in pts:
        acc.append(a)
        a = a * Z % P
    ai = inv_mod(a, P)
    out = [None] * len(pts)
    for i in range(len(pts) - 1, -1, -1):
        X, Y, Z = pts[i]
        zi = ai * acc[i] % P
        ai = ai * Z % P
        zi2 = zi * zi % P
        out[i] = (X * zi2 % P, Y * zi2 * zi % P)
    return out


def set_comb_width(w):
    """Choose the fixed-base table width (2..8); 0 picks from free heap. Frees any old table."""
    global _comb, _comb_w, _comb_d
    if w and not 2 <= w <= 8:
        raise ValueError("comb width must be 2..8")
    _comb = None
    _comb_w = w
    _comb_d = 0


def comb_width():
    return _comb_w


def _build_comb():
    global _comb, _comb_w, _comb_d
    w = _comb_w
    if not w:
        free = None
        gc = compat.gc
        if gc is not None and hasattr(gc, "mem_free"):
            gc.collect()
            free = gc.mem_free()
        # Measured table sizes on MicroPython: w=4 4.6 KB, w=5 9.7 KB, w=6 20 KB, w=8 83 KB.
        # Keep the table to roughly an eighth of the free heap.
        w = 6 if free is None or free > 160000 else (5 if free > 60000 else 4)
    d = (256 + w - 1) // w
    base = []  # 2^(i*d) G as Jacobian
    X, Y, Z = GX, GY, 1
    for i in range(w):
        base.append((X, Y, Z))
        if i + 1 < w:
            for _ in range(d):
                X, Y, Z = _dbl(X, Y, Z)
    base = _batch_affine(base)
    jac = [None] * (1 << w)
    for j in range(1, 1 << w):
        hi = 0
        while (j >> (hi + 1)) != 0:
            hi += 1
        rest = j ^ (1 << hi)
        bx, by = base[hi]
        if rest == 0:
            jac[j] = (bx, by, 1)
        else:
            X, Y, Z = jac[rest]
            jac[j] = _madd(X, Y, Z, bx, by)
    table = [None] + _batch_affine(jac[1:])
    _comb, _comb_w, _comb_d = table, w, d


def mul_base(k):
    """k*G in affine coordinates (None for k = 0 mod n)."""
    return _to_affine(*_mul_base_jac(k % N))


def _mul_base_jac(k):
    if _comb is None:
        _build_comb()
    w, d, table = _comb_w, _comb_d, _comb
    mask = (1 << d) - 1
    parts = []
    for i in range(w - 1, -1, -1):
        parts.append((k >> (i * d)) & mask)
    p = P
    X, Y, Z = 0, 1, 0
    for c in range(d - 1, -1, -1):
        if Z:  # inline doubling (the hot path: function calls cost as much as the arithmetic)
            zz = Z * Z % p
            yy = Y * Y % p
            m = 3 * (X - zz) * (X + zz) % p
            s = 4 * X * yy % p
            X = (m * m - 2 * s) % p
            Z = 2 * Y * Z % p
            Y = (m * (s - X) - 8 * yy * yy) % p
        idx = 0
        for part in parts:
            idx = (idx << 1) | ((part >> c) & 1)
        if idx:
            x2, y2 = table[idx]
            X, Y, Z = _madd(X, Y, Z, x2, y2)
    return X, Y, Z


def _wnaf(k, w):
    """Width-w NAF of k as (digits, count): digits[i] + 128 is the i-th digit, least significant first;
    digits are odd in (-2^(w-1), 2^(w-1)) or 0. A bytearray, not a growing list: one small allocation
    that cannot fail on a fragmented heap."""
    out = bytearray(258)
    full = 1 << w
    half = full >> 1
    i = 0
    while k:
        if k & 1:
            d = k & (full - 1)
            if d >= half:
                d -= full
            k -= d
        else:
            d = 0
        out[i] = d + 128
        i += 1
        k >>= 1
    return out, i


def _mul_jac(k, pt, w=5):
    # wNAF with the 2^(w-2) odd multiples P, 3P, ... as affine points (one batched inversion):
    # about 256/(w+1) additions instead of 64 for a plain 4-bit window.
    x, y = pt
    D = _dbl(x, y, 1)
    jac = [(x, y, 1)]
    for _ in range(1, 1 << (w - 2)):
        X, Y, Z = jac[-1]
        jac.append(_add(X, Y, Z, D[0], D[1], D[2]))
    for _x, _y, Z in jac:
        if Z == 0:  # only for points of tiny order, which P-256 (cofactor 1) does not have
            raise ValueError("point of small order")
    table = _batch_affine(jac)
    digits, count = _wnaf(k, w)
    p = P
    X, Y, Z = 0, 1, 0
    for i in range(count - 1, -1, -1):
        if Z:  # inline doubling (the hot path: a call costs as much as the arithmetic)
            zz = Z * Z % p
            yy = Y * Y % p
            m = 3 * (X - zz) * (X + zz) % p
            s = 4 * X * yy % p
            X = (m * m - 2 * s) % p
            Z = 2 * Y * Z % p
            Y = (m * (s - X) - 8 * yy * yy) % p
        d = digits[i] - 128
        if d:
            if d > 0:
                x2, y2 = table[d >> 1]
            else:
                x2, y2 = table[(-d) >> 1]
                y2 = p - y2
            X, Y, Z = _madd(X, Y, Z, x2, y2)
    return X, Y, Z


def mul(k, pt):
    """k*pt for a validated affine point (None for infinity)."""
    k %= N
    if pt is None or k == 0:
        return None
    return _to_affine(*_mul_jac(k, pt))


def _add(X1, Y1, Z1, X2, Y2, Z2):
    # Jacobian + Jacobian (add-2007-bl without the 2x scaling); handles infinity and P == +-Q
    if Z1 == 0:
        return X2, Y2, Z2
    if Z2 == 0:
        return X1, Y1, Z1
    p = P
    z1z1 = Z1 * Z1 % p
    z2z2 = Z2 * Z2 % p
    u1 = X1 * z2z2 % p
    u2 = X2 * z1z1 % p
    s1 = Y1 * Z2 * z2z2 % p
    s2 = Y2 * Z1 * z1z1 % p
    h = (u2 - u1) % p
    r = (s2 - s1) % p
    if h == 0:
        if r == 0:
            return _dbl(X1, Y1, Z1)
        return 0, 1, 0
    hh = h * h % p
    hhh = h * hh % p
    v = u1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    return x3, (r * (v - x3) - s1 * hhh) % p, Z1 * Z2 * h % p


def _mul_add_jac(u1, u2, pt):
    X, Y, Z = _mul_base_jac(u1 % N)
    u2 %= N
    if u2:
        X2, Y2, Z2 = _mul_jac(u2, pt)
        X, Y, Z = _add(X, Y, Z, X2, Y2, Z2)
    return X, Y, Z


def mul_add(u1, u2, pt):
    """u1*G + u2*pt (ECDSA verification), None for the point at infinity."""
    return _to_affine(*_mul_add_jac(u1, u2, pt))


def mul_add_x_equals(u1, u2, pt, r):
    """True if u1*G + u2*pt is finite and its x coordinate is r mod n, without a field inversion."""
    X, Y, Z = _mul_add_jac(u1, u2, pt)
    if Z == 0:
        return False
    zz = Z * Z % P
    x = r
    while x < P:  # x(R) mod n == r  <=>  x(R) in {r, r + n} (both < p)
        if X == x * zz % P:
            return True
        x += N
    return False


def encode_point(pt, compressed=False):
    if pt is None:
        raise ValueError("cannot encode the point at infinity")
    x, y = pt
    if compressed:
        return bytes([2 + (y & 1)]) + compat.int_to_bytes(x, 32)
    return b"\x04" + compat.int_to_bytes(x, 32) + compat.int_to_bytes(y, 32)


def decode_point(b):
    """SEC1 uncompressed or compressed point -> validated affine point.

    Raises:
        ValueError: wrong length or prefix, coordinate >= p, not on the curve, or the point at infinity.
    """
    if not isinstance(b, (bytes, bytearray)):
        raise ValueError("point must be bytes")
    if len(b) == 65 and b[0] == 4:
        x = compat.int_from_bytes(b[1:33])
        y = compat.int_from_bytes(b[33:65])
    elif len(b) == 33 and b[0] in (2, 3):
        x = compat.int_from_bytes(b[1:33])
        if x >= P:
            raise ValueError("point x coordinate out of range")
        a = (x * x * x - 3 * x + B) % P
        y = pow(a, (P + 1) // 4, P)
        if y * y % P != a:
            raise ValueError("point is not on P-256")
        if (y & 1) != (b[0] & 1):
            y = P - y
    elif len(b) == 1 and b[0] == 0:
        raise ValueError("point at infinity is not a valid public key")
    else:
        raise ValueError("bad P-256 point encoding (length %d)" % len(b))
    pt = (x, y)
    if not is_on_curve(pt):
        raise ValueError("point is not on P-256")
    return pt
