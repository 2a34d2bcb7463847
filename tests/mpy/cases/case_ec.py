"""P-256 / ECDSA cases: RFC 6979 A.2.5 vectors, edge cases, round trips."""
import hashlib

from mpy import compat, der, ec, ecdsa
from util import raises

D = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
UX = 0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6
UY = 0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299


def h(m):
    return hashlib.sha256(m).digest()


def test_rfc6979_public_key(ctx):
    assert ecdsa.PrivateKey(D).public == (UX, UY)


def test_rfc6979_sample(ctx):
    k = next(ecdsa.rfc6979_k(D, h(b"sample")))
    assert k == 0xA6E3C57DD01ABE90086538398355DD4C3B17AA873382B0F24D6129493D8AAD60
    r, s = ecdsa.sign_digest(D, h(b"sample"))
    assert r == 0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716
    assert s == 0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8


def test_rfc6979_test(ctx):
    k = next(ecdsa.rfc6979_k(D, h(b"test")))
    assert k == 0xD16B6AE827F17175E040871A1C7EC3500192C4C92677336EC2537ACAEE0008E0
    r, s = ecdsa.sign_digest(D, h(b"test"))
    assert r == 0xF1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367
    assert s == 0x019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083
    assert ecdsa.verify_digest((UX, UY), h(b"test"), r, s)


def test_sign_verify_roundtrip_and_tamper(ctx):
    key = ecdsa.PrivateKey.generate()
    sig = key.sign(b"hello board")
    assert ecdsa.verify(key.public, b"hello board", sig)
    assert not ecdsa.verify(key.public, b"hello board!", sig)
    other = ecdsa.PrivateKey.generate()
    assert not ecdsa.verify(other.public, b"hello board", sig)


def test_r_s_out_of_range(ctx):
    r, s = ecdsa.sign_digest(D, h(b"x"))
    pub = (UX, UY)
    n = ec.N
    for rr, ss in ((0, s), (r, 0), (n, s), (r, n), (r + n, s), (r, s + n)):
        assert not ecdsa.verify_digest(pub, h(b"x"), rr, ss)
    # s and n - s: both valid (malleability), as in every ECDSA
    assert ecdsa.verify_digest(pub, h(b"x"), r, n - s)


def test_malformed_signature_der(ctx):
    key = ecdsa.PrivateKey(D)
    sig = key.sign(b"m")
    for bad in (b"", sig[:-1], sig + b"\x00", b"\x30\x00", b"\x30\x80" + sig[2:], b"\x31" + sig[1:]):
        assert not ecdsa.verify(key.public, b"m", bad)


def test_point_at_infinity(ctx):
    assert ec.mul_base(0) is None
    assert ec.mul_base(ec.N) is None
    assert ec.mul(ec.N, ec.G) is None
    g1 = ec.mul_base(1)
    assert g1 == ec.G
    assert ec.mul_base(ec.N - 1) == (ec.GX, ec.P - ec.GY)
    # G + (-G) = infinity through the mixed-addition special case
    assert ec._to_affine(*ec._madd(ec.GX, ec.GY, 1, ec.GX, ec.P - ec.GY)) is None
    # G + G through addition equals doubling
    assert ec._to_affine(*ec._madd(ec.GX, ec.GY, 1, ec.GX, ec.GY)) == ec.mul_base(2)
    raises(ValueError, ec.encode_point, None)
    raises(ValueError, ec.decode_point, b"\x00")
    assert not ecdsa.verify_digest(None, h(b"x"), 1, 1)


def test_invalid_points_rejected(ctx):
    good = ec.encode_point(ec.G)
    bad_y = good[:-1] + bytes([good[-1] ^ 1])
    raises(ValueError, ec.decode_point, bad_y)
    raises(ValueError, ec.decode_point, good[:-1])
    raises(ValueError, ec.decode_point, b"\x05" + good[1:])
    big = b"\x04" + compat.int_to_bytes(ec.P, 32) + good[33:]
    raises(ValueError, ec.decode_point, big)
    raises(ValueError, ec.decode_point, b"\x02" + b"\xff" * 32)
    assert not ec.is_on_curve((ec.GX, ec.GY + 1))
    assert not ecdsa.verify_digest((ec.GX, ec.GY + 1), h(b"x"), 1, 1)


def test_compressed_points(ctx):
    for k in (1, 2, 3, D, ec.N - 1):
        pt = ec.mul_base(k)
        assert ec.decode_point(ec.encode_point(pt, compressed=True)) == pt
        assert ec.decode_point(ec.encode_point(pt)) == pt


def test_variable_base_matches_fixed_base(ctx):
    for k in (1, 2, 3, 15, 16, 17, 31, 0xFFFF, (1 << 128) - 1, 1 << 255, (1 << 255) + 1, D, ec.N - 2):
        assert ec.mul(k, ec.G) == ec.mul_base(k)
    for _ in range(5):
        k = compat.int_from_bytes(compat.urandom(32)) % ec.N
        assert ec.mul(k, ec.G) == ec.mul_base(k)
    q = ec.mul_base(D)
    assert ec.mul(7, q) == ec.mul_base(7 * D % ec.N)
    assert ec.mul_add(3, 5, q) == ec.mul_base((3 + 5 * D) % ec.N)
    # u1*G + u2*Q = infinity when u1 = -u2*D
    assert ec.mul_add(ec.N - D, 1, q) is None


def test_comb_widths_agree(ctx):
    w0 = ec.comb_width()
    try:
        for w in (2, 4, 5, 8):
            ec.set_comb_width(w)
            assert ec.mul_base(D) == (UX, UY)
        raises(ValueError, ec.set_comb_width, 9)
    finally:
        ec.set_comb_width(w0)


def test_der_signature_encoding(ctx):
    for r, s in ((1, 1), (127, 128), (ec.N - 1, 0x80 << 240)):
        assert der.ecdsa_sig_decode(der.ecdsa_sig_encode(r, s)) == (r, s)


def test_no_rng_refuses(ctx):
    saved = compat._os_urandom
    compat._os_urandom = None  # a board without os.urandom
    try:
        raises(compat.NoRandomError, ecdsa.PrivateKey.generate)
        compat.set_seed_source(lambda n: b"\x42" * n)
        assert ecdsa.PrivateKey.generate().d == compat.int_from_bytes(b"\x42" * 32)
        compat.set_seed_source(lambda n: b"")
        raises(compat.NoRandomError, ecdsa.PrivateKey.generate)
    finally:
        compat.set_seed_source(None)
        compat._os_urandom = saved


def test_cross_signature_out(ctx):
    """Write a signature for CPython's cryptography to verify; verify one made by cryptography."""
    from mpy import csr
    from util import read, write

    key = csr.key_from_der(read(ctx, "dev.key"))
    msg = read(ctx, "msg.bin")
    write(ctx, "sig.der", key.sign(msg))
    write(ctx, "pub.bin", key.public_bytes())
    assert ecdsa.verify(key.public, msg, read(ctx, "sig_crypto.der"))
    assert not ecdsa.verify(key.public, msg + b"x", read(ctx, "sig_crypto.der"))
