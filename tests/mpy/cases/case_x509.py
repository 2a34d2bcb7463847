"""Certificate checking against certificates made by cryptography (P-256 and RSA-2048 CAs), and CSRs
written out for cryptography to verify."""
from mpy import csr, der, x509
from mpy.errors import BadInput, Untrusted, WrongKey
from util import raises, read, write



def _ctx(ctx):
    key = csr.key_from_der(read(ctx, "dev.key"))
    return key, x509.Certificate(read(ctx, "ca_ec.der")), x509.Certificate(read(ctx, "ca_rsa.der"))


def _now(ctx):
    leaf = x509.Certificate(read(ctx, "leaf_ec.der"))
    y, m, d, hh, mm, ss = leaf.not_before
    return (y, m, d + 1 if d < 28 else 28, hh, mm, ss) if d < 28 else (y, m + 1 if m < 12 else 12, 2, hh, mm, ss)


def test_parse_fields(ctx):
    leaf = x509.Certificate(read(ctx, "leaf_ec.der"))
    assert leaf.common_name() == "dev-1"
    assert leaf.sig_alg == x509.OID_ECDSA_SHA256
    assert leaf.is_ca is False and 0 in leaf.key_usage
    ca = x509.Certificate(read(ctx, "ca_rsa.der"))
    assert ca.key[0] == "rsa" and ca.is_ca is True and x509.KU_KEY_CERT_SIGN in ca.key_usage


def test_ec_issuer_verifies(ctx):
    key, ca_ec, _ = _ctx(ctx)
    leaf = x509.verify_for_key([read(ctx, "leaf_ec.der")], ca_ec, key.public, _now(ctx))
    assert leaf.common_name() == "dev-1"


def test_rsa_issuer_verifies(ctx):
    key, _, ca_rsa = _ctx(ctx)
    x509.verify_for_key([read(ctx, "leaf_rsa.der")], ca_rsa, key.public, _now(ctx))


def test_bad_signatures_rejected(ctx):
    key, ca_ec, ca_rsa = _ctx(ctx)
    raises(Untrusted, x509.verify_for_key, [read(ctx, "leaf_ec_badsig.der")], ca_ec, key.public, None)
    raises(Untrusted, x509.verify_for_key, [read(ctx, "leaf_rsa_badsig.der")], ca_rsa, key.public, None)
    # right key, wrong CA (and wrong algorithm family)
    raises(Untrusted, x509.verify_for_key, [read(ctx, "leaf_ec.der")], ca_rsa, key.public, None)
    raises(Untrusted, x509.verify_for_key, [read(ctx, "leaf_selfsigned.der")], ca_ec, key.public, None)


def test_certificate_for_another_key(ctx):
    key, ca_ec, _ = _ctx(ctx)
    e = raises(WrongKey, x509.verify_for_key, [read(ctx, "leaf_other.der")], ca_ec, key.public, None)
    assert "key" in str(e)


def test_validity_only_when_clock_set(ctx):
    key, ca_ec, _ = _ctx(ctx)
    expired = read(ctx, "leaf_expired.der")
    raises(Untrusted, x509.verify_for_key, [expired], ca_ec, key.public, _now(ctx))
    x509.verify_for_key([expired], ca_ec, key.public, None)  # clock unknown: not checked


def test_ca_flag_and_unknown_critical_rejected(ctx):
    key, ca_ec, _ = _ctx(ctx)
    raises(Untrusted, x509.verify_for_key, [read(ctx, "leaf_is_ca.der")], ca_ec, key.public, None)
    raises(Untrusted, x509.verify_for_key, [read(ctx, "leaf_unknown_crit.der")], ca_ec, key.public, None)


def test_pkcs7_chain_through_intermediate(ctx):
    key, _, ca_rsa = _ctx(ctx)
    certs = x509.certs_from_pkcs7(read(ctx, "chain.p7b"))
    assert len(certs) == 2 and x509.is_pkcs7(read(ctx, "chain.p7b"))
    assert not x509.is_pkcs7(read(ctx, "leaf_ec.der"))
    x509.verify_for_key(certs, ca_rsa, key.public, _now(ctx))
    # the leaf alone does not chain to the root
    raises(Untrusted, x509.verify_for_key, [read(ctx, "leaf_via_int.der")], ca_rsa, key.public, None)


def test_truncated_and_garbage(ctx):
    good = read(ctx, "leaf_ec.der")
    for bad in (b"", b"\x30", good[:10], good[:-1], good + b"\x00", b"\x30\x80\x00\x00", b"garbage" * 20,
                b"\x30\x84\xff\xff\xff\xff"):
        raises(BadInput, x509.Certificate, bad)
    for bad in (b"", read(ctx, "chain.p7b")[:-5], good):
        raises(BadInput, x509.certs_from_pkcs7, bad)
    # every truncation point gives a clear error, never a crash of another kind
    for n in range(0, len(good), 37):
        raises(BadInput, x509.Certificate, good[:n])


def test_der_strictness(ctx):
    raises(der.DerError, der.read, b"\x02\x81\x01\x00", 0)  # non-minimal length
    raises(der.DerError, der.read, b"\x1f\x01\x00", 0)  # high tag
    raises(der.DerError, der.to_int, b"\x00\x01", 0, 2)  # non-minimal INTEGER
    raises(der.DerError, der.to_int, b"\x80", 0, 1)  # negative
    assert der.to_oid(der.oid("1.2.840.10045.3.1.7"), 2, 10) == "1.2.840.10045.3.1.7"
    assert der.to_time(b"491231235959Z", der.UTCTIME, 0, 13) == (2049, 12, 31, 23, 59, 59)
    assert der.to_time(b"20500101000000Z", der.GENTIME, 0, 15)[0] == 2050
    raises(der.DerError, der.to_time, b"2050010100Z", der.GENTIME, 0, 11)


def test_csr_out(ctx):
    """CSRs for cryptography to verify: the vector key, and a fresh key made on this runtime."""
    key = csr.key_from_der(read(ctx, "dev.key"))
    write(ctx, "csr_dev.der", csr.build(key, cn="dev-1", serial="SN-0001",
                                        sans=["dev-1.plant.example", "uri:urn:dev:sn:0001", "ip:192.0.2.7"]))
    from mpy import ecdsa

    fresh = ecdsa.PrivateKey.generate()
    write(ctx, "csr_fresh.der", csr.build(fresh, cn="fresh"))
    write(ctx, "fresh.key", csr.key_to_der(fresh))
    raises(ValueError, csr.build, key, serial="bad_serial*")


def test_mutations_give_agent_errors_only(ctx):
    """Random byte flips in certificates and PKCS#7: every outcome is success or an AgentError."""
    from mpy import compat
    from mpy.errors import AgentError

    key, ca_ec, ca_rsa = _ctx(ctx)
    seeds = [(read(ctx, "leaf_ec.der"), ca_ec), (read(ctx, "leaf_rsa.der"), ca_rsa), (read(ctx, "chain.p7b"), ca_rsa)]
    rnd = compat.urandom(600)
    for i in range(150):
        data, anchor = seeds[i % 3]
        buf = bytearray(data)
        pos = (rnd[2 * i] << 8 | rnd[2 * i + 1]) % len(buf)
        buf[pos] ^= rnd[300 + i] or 1
        try:
            certs = x509.certs_from_pkcs7(bytes(buf)) if i % 3 == 2 else [bytes(buf)]
            x509.verify_for_key(certs, anchor, key.public, None)
        except AgentError:
            pass
