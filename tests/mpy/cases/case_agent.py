"""Lifecycle and storage: verify-before-store, nothing stored on bad input, crash-safe generations."""
import os

from mpy import csr, store, x509
from mpy.agent import Agent
from mpy.errors import BadInput, Conflict, StorageError, Untrusted, WrongKey
from util import fresh_dir, raises, read


def _agent(ctx, sub, with_key=True, ca="ca_ec.der"):
    st = store.Store(fresh_dir(ctx["out"] + "/" + sub))
    a = Agent(st, {"device_id": "dev-1", "clock": "unset"})
    if ca:
        a.set_trust_anchor(read(ctx, ca))
    if with_key:  # the vector key plays the pending key so cryptography-made certificates match it
        st.put("pending", read(ctx, "dev.key"))
    return a, st


def _files(st):
    return sorted(f for f in os.listdir(st.root))


def test_csr_reuses_pending_key(ctx):
    a, st = _agent(ctx, "csr", with_key=False)
    c1 = a.make_csr(cn="dev-1")
    c2 = a.make_csr(cn="dev-1")
    k1 = a.pending_key().d
    a.make_csr(cn="dev-1", new_key=True)
    assert a.pending_key().d != k1
    assert st.latest("pending") == 2 and "pending.1" not in _files(st)
    assert c1 != b"" and c2 != b""
    raises(BadInput, Agent(st, {}).make_csr)  # no subject at all


def test_install_ec_and_rsa_and_pkcs7(ctx):
    a, st = _agent(ctx, "inst")
    info = a.install(read(ctx, "leaf_ec.der"))
    assert info["gen"] == 1 and info["cn"] == "dev-1"
    assert st.latest("pending") == 0
    key, cert = a.credential()
    assert key.d == csr.key_from_der(read(ctx, "dev.key")).d and cert == read(ctx, "leaf_ec.der")
    # renewal through an RSA plant CA with an intermediate, as PKCS#7
    b, st2 = _agent(ctx, "inst2", ca="ca_rsa.der")
    assert b.install(read(ctx, "chain.p7b"), 281)["gen"] == 1
    b.store.put("pending", read(ctx, "dev.key"))
    assert b.install(read(ctx, "leaf_rsa.der"), 287)["gen"] == 2
    assert "cert.1" not in _files(st2) and "cert.2" in _files(st2)


def test_bad_input_stores_nothing(ctx):
    a, st = _agent(ctx, "bad")
    a.install(read(ctx, "leaf_ec.der"))
    st.put("pending", read(ctx, "dev.key"))
    before = _files(st)
    live = st.credential()
    good = read(ctx, "leaf_ec.der")
    cases = [(BadInput, b"garbage"), (BadInput, good[:100]), (BadInput, b""),
             (WrongKey, read(ctx, "leaf_other.der")), (Untrusted, read(ctx, "leaf_ec_badsig.der")),
             (Untrusted, read(ctx, "leaf_rsa.der")), (Untrusted, read(ctx, "leaf_is_ca.der")),
             (BadInput, read(ctx, "chain.p7b")[:-3])]
    for exc, data in cases:
        raises(exc, a.install, data)
    assert _files(st) == before and st.credential() == live


def test_no_anchor_or_no_pending(ctx):
    a, st = _agent(ctx, "noca", ca=None)
    assert raises(Conflict, a.install, read(ctx, "leaf_ec.der")).reason == "no-trust-anchor"
    b, st = _agent(ctx, "nopend", with_key=False)
    e = raises(Conflict, b.install, read(ctx, "leaf_ec.der"))
    assert (e.code, e.reason) == ("4.09", "no-pending-key")
    e = raises(WrongKey, _agent(ctx, "other")[0].install, read(ctx, "leaf_other.der"))
    assert (e.code, e.reason) == ("4.03", "key-mismatch")


def test_trust_anchor_first_use_only(ctx):
    a, st = _agent(ctx, "tofu")
    assert a.set_trust_anchor(read(ctx, "ca_ec.der")) is False  # same one again: fine
    raises(Untrusted, a.set_trust_anchor, read(ctx, "ca_rsa.der"))
    raises(Untrusted, a.set_trust_anchor, read(ctx, "leaf_ec.der"), True)  # not a CA
    assert a.set_trust_anchor(read(ctx, "ca_rsa.der"), replace=True) is True
    assert x509.Certificate(st.get("ca")).key[0] == "rsa"


def test_validity_checked_when_clock_set(ctx):
    a, st = _agent(ctx, "clock")
    a.config["clock"] = "set"
    raises(Untrusted, a.install, read(ctx, "leaf_expired.der"))
    a.config["clock"] = "unset"
    a.install(read(ctx, "leaf_expired.der"))


def test_power_cut_during_commit_keeps_previous(ctx):
    """Fail each rename of a credential commit in turn: the previous credential stays live and whole."""
    for fail_at in (1, 2):
        a, st = _agent(ctx, "cut%d" % fail_at)
        a.install(read(ctx, "leaf_ec.der"))
        live = st.credential()
        st.put("pending", read(ctx, "dev.key"))
        calls = [0]
        real = st._rename

        def flaky(src, dst):
            calls[0] += 1
            if calls[0] == fail_at:
                raise OSError(5, "EIO (injected power cut)")
            real(src, dst)

        st._rename = flaky
        raises(StorageError, a.install, read(ctx, "leaf_ec.der"))
        st._rename = real
        assert st.credential() == live
        assert not [f for f in _files(st) if f.endswith(".tmp")]
        # the pending key survived, so the enrollment can simply be retried
        assert a.install(read(ctx, "leaf_ec.der"))["gen"] == live[0] + 1


def test_crash_leftovers_are_ignored(ctx):
    a, st = _agent(ctx, "left")
    a.install(read(ctx, "leaf_ec.der"))
    live = st.credential()
    # a crash after key.2 was renamed but before cert.2 existed, plus a half-written temp file
    with open(st.root + "/key.2", "wb") as f:
        f.write(b"\x30\x03partial")
    with open(st.root + "/cert.2.tmp", "wb") as f:
        f.write(b"\x30")
    assert st.credential() == live
    assert a.status()["gen"] == live[0]
