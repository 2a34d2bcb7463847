"""Wire formats: CBOR, serial frames (garbage, CRC errors, resync), the serial request handler, and the
CoAP resources with HMAC authentication (good, forged, replayed, wrong format, bad certificates)."""
import json
import os

from mpy import cbor, coap, frame, serial_agent, store
from mpy.agent import Agent
from mpy.errors import Unauthorized
from util import fresh_dir, raises, read

SECRET = b"0123456789abcdef0123456789abcdef"


def _agent(ctx, sub):
    st = store.Store(fresh_dir(ctx["out"] + "/" + sub))
    a = Agent(st, {"device_id": "dev-1", "clock": "unset"})
    a.set_trust_anchor(read(ctx, "ca_ec.der"))
    return a, st


def test_cbor_roundtrip_and_errors(ctx):
    v = {"cn": "dev-1", "sans": ["a", "b"], "n": -500, "big": 1 << 40, "b": b"\x00\x01", "t": True, "z": None}
    assert cbor.loads(cbor.dumps(v)) == v
    for bad in (b"", b"\xa1", b"\x62a", b"\x5f", b"\xa1\x80\x01", b"\x01\x02", b"\x81" * 20 + b"\x01",
                b"\xa1\x43san\x01", b"\xa1\x01\x02", b"\xa2\x61a\x01\x61a\x02"):  # keys: text, once each
        raises(ValueError, cbor.loads, bad)


class Src:
    def __init__(self, data):
        self.data = data

    def read(self, n):
        b, self.data = self.data[:n], self.data[n:]
        return b


def test_frames_roundtrip_garbage_and_crc(ctx):
    f1 = frame.encode("CSR", 7, b"\x00payload\xff" * 50)
    f2 = frame.encode("HELLO", 8, b"")
    bad_crc = f1[:-3] + (b"0" if f1[-3:-2] != b"0" else b"1") + f1[-2:]
    stream = b"boot noise\r\n~zz" + bad_crc + b"~00" + f2 + b"\r\n" + f1
    r = frame.FrameReader(Src(stream).read)
    got = []
    errors = 0
    while True:
        try:
            got.append(r.read())
        except frame.FrameError:
            errors += 1
        except frame.FrameTimeout:
            break
    assert got == [("HELLO", 8, b""), ("CSR", 7, b"\x00payload\xff" * 50)], got
    assert errors >= 2
    # a truncated frame followed by a good one: the good one is still found
    r = frame.FrameReader(Src(f1[:40] + f2).read)
    seen = []
    for _ in range(5):
        try:
            seen.append(r.read())
        except frame.FrameError:
            pass
        except frame.FrameTimeout:
            break
    assert seen == [("HELLO", 8, b"")]
    raises(frame.FrameError, frame.decode_body, b"ONLYONE")
    raises(frame.FrameError, frame.decode_body, b"CSR x AAAA")


def _serve(a, data):
    out = []
    serial_agent.serve(a, Src(data).read, out.append)
    r = frame.FrameReader(Src(b"".join(out)).read)
    res = []
    while True:
        try:
            res.append(r.read())
        except frame.FrameTimeout:
            return res


def test_serial_handler(ctx):
    a, st = _agent(ctx, "ser")
    req = (frame.encode("HELLO", 1) + b"junk~ffff" + frame.encode("CSR", 2, json.dumps({"cn": "dev-1"}).encode())
           + frame.encode("CERT", 3, b"garbage") + frame.encode("CERT", 4, read(ctx, "leaf_other.der"))
           + frame.encode("CSR", 5, b"[1]") + frame.encode("NOPE", 6) + frame.encode("CA", 7, read(ctx, "ca_rsa.der")))
    res = _serve(a, req)
    kinds = [(k, s) for k, s, _ in res]
    assert kinds[0] == ("OK", 1) and json.loads(res[0][2])["agent"] == "devagent-mpy"
    assert ("ERR", 0) in kinds  # the corrupt frame
    csr_reply = [p for k, s, p in res if s == 2][0]
    assert csr_reply[:1] == b"\x30"
    errs = dict((s, json.loads(p)) for k, s, p in res if k == "ERR" and s)
    codes = dict((s, e["code"]) for s, e in errs.items())
    assert codes == {3: "4.00", 4: "4.03", 5: "4.00", 6: "4.00", 7: "4.03"}, codes
    # the same reason codes as the CoAP diagnostics
    assert errs[3]["error"] == "malformed-certificate" and errs[4]["error"] == "key-mismatch", errs
    assert "another key" in errs[4]["message"] or "pending key" in errs[4]["message"], errs[4]
    assert st.credential() is None


def _req(path, payload, cf, counter, secret=SECRET, dev="dev-1"):
    return coap.make_request(secret, dev, path, payload, cf, counter, mid=counter & 0xFFFF)


def test_coap_csr_and_auth(ctx):
    a, st = _agent(ctx, "coap")
    srv = coap.Server(a, SECRET, "dev-1")
    dg, tag = _req("csr", cbor.dumps({"subject": "CN=dev-1,serialNumber=SN1"}), 60, 100)
    m = coap.check_response(SECRET, srv.handle(dg, "p"), tag)
    assert coap.code_str(m.code) == "2.04" and m.content_format() == 286 and m.payload[:1] == b"\x30"
    assert srv.handle(dg, "p") == srv.handle(dg, "p")  # CON retransmission: same answer, not a replay error
    # replay from another peer, stale counter, forged tag, wrong secret, wrong device id, no auth
    for d in (_req("csr", cbor.dumps({"subject": "CN=dev-1,serialNumber=SN1"}), 60, 100)[0],
              _req("csr", b"\xa0", 60, 50)[0], _req("csr", b"\xa0", 60, 101, secret=b"x" * 32)[0],
              _req("csr", b"\xa0", 60, 102, dev="dev-2")[0],
              coap.encode(coap.Message(coap.CON, coap.POST, 9, b"", [(11, b"csr")], b"\xa0"))):
        m = coap.decode(srv.handle(d, "q"))
        assert coap.code_str(m.code) == "4.01", coap.code_str(m.code)
        assert not m.opt(coap.AUTH_OPTION)
    forged = bytearray(_req("csr", b"\xa0", 60, 103)[0])
    forged[-1] ^= 1  # payload changed after the tag was made
    assert coap.code_str(coap.decode(srv.handle(bytes(forged), "q")).code) == "4.01"
    # a forged response is caught by the client
    good, tag = _req("csr", b"\xa0", 60, 104)
    resp = bytearray(srv.handle(good, "p"))
    resp[-1] ^= 1
    raises(Unauthorized, coap.check_response, SECRET, bytes(resp), tag)
    assert srv.handle(b"\x00", "p") is None and srv.handle(b"", "p") is None


def test_coap_verify_codes(ctx):
    a, st = _agent(ctx, "coapv")
    srv = coap.Server(a, SECRET, "dev-1")
    st.put("pending", read(ctx, "dev.key"))
    n = [200]

    def call(path, payload, cf):
        n[0] += 1
        dg, tag = _req(path, payload, cf, n[0])
        m = coap.check_response(SECRET, srv.handle(dg, "p"), tag)
        return coap.code_str(m.code), m

    assert call("verify", read(ctx, "leaf_ec.der")[:50], 287)[0] == "4.00"
    code, m = call("verify", read(ctx, "leaf_other.der"), 287)
    assert code == "4.03" and coap.diagnostic(m)[0] == "key-mismatch", coap.diagnostic(m)
    assert m.content_format() == 60
    assert call("verify", read(ctx, "leaf_rsa.der"), 287)[0] == "4.03"
    assert call("verify", read(ctx, "leaf_ec.der"), 60)[0] == "4.15"
    assert call("csr", b"\xff\xff", 60)[0] == "4.00"
    assert call("nope", b"", None)[0] == "4.04"
    code, m = call("verify", read(ctx, "leaf_ec.der"), 287)
    ans = cbor.loads(m.payload)
    assert st.credential() is not None and code == "2.04" and ans["version"] == 1 and ans["stored"] == "ldevid"
    assert sorted(ans) == ["not_after", "stored", "verify_us", "version"] and ans["not_after"] > 1700000000
    # counter persisted: a new server instance (reboot) still refuses the old counter
    srv2 = coap.Server(a, SECRET, "dev-1")
    dg, _ = _req("csr", b"\xa0", 60, n[0])
    assert coap.code_str(coap.decode(srv2.handle(dg, "p")).code) == "4.01"
    # PKCS#7 certs-only through the same resource
    st.put("pending", read(ctx, "dev.key"))
    assert call("verify", read(ctx, "leaf.p7b"), 281)[0] == "2.04"
    raises(ValueError, coap.Server, a, b"short", "dev-1")


def test_coap_garbage_never_crashes(ctx):
    """Random datagrams and mutated valid requests: handle() answers or ignores, never raises."""
    from mpy import compat

    a, st = _agent(ctx, "coapfuzz")
    srv = coap.Server(a, SECRET, "dev-1")
    good, _ = _req("csr", cbor.dumps({"subject": "CN=dev-1"}), 60, 10)
    rnd = compat.urandom(2000)
    for i in range(120):
        if i % 2:
            dg = rnd[i * 8:i * 8 + (rnd[i] % 60)]
        else:
            b = bytearray(good)
            b[rnd[i] % len(b)] ^= rnd[1000 + i] or 1
            dg = bytes(b)
        out = srv.handle(dg, "f")
        if out is not None:
            m = coap.decode(out)
            assert m.code >> 5 in (2, 4, 5)
    assert coap.code_str(coap.decode(srv.handle(
        coap.encode(coap.Message(coap.CON, coap.POST, 5, b"", [(11, b"\xff\xfe"),
                                                              (coap.AUTH_OPTION, b"\x01" + bytes(40))], b"")),
        "f")).code) == "4.00"


def test_coap_shared_schema(ctx):
    """The /csr schema of `devagent serve` (docs/coap.md): accepted fields, refusals with the same
    {"error", "message"} diagnostic, and the announced-CA check at /verify."""
    a, st = _agent(ctx, "schema")
    srv = coap.Server(a, SECRET, "dev-1")
    n = [300]

    def call(path, payload, cf):
        n[0] += 1
        dg, tag = _req(path, payload, cf, n[0])
        m = coap.check_response(SECRET, srv.handle(dg, "p"), tag)
        return coap.code_str(m.code), m

    def refused(req, want_code, want_reason, word):
        before = sorted(os.listdir(st.root))
        code, m = call("csr", cbor.dumps(req), 60)
        reason, msg = coap.diagnostic(m)
        assert (code, reason) == (want_code, want_reason) and word in msg, (req, code, reason, msg)
        assert m.content_format() == 60
        assert [f for f in sorted(os.listdir(st.root)) if not f.startswith("ctr.")] == \
            [f for f in before if not f.startswith("ctr.")], req  # nothing stored but the counter

    refused({"subject": "CN=dev-1,O=Plant"}, "4.00", "bad-subject", "O is not supported")
    refused({"subject": "CN=a+serialNumber=1"}, "4.00", "bad-subject", "multi-valued")
    refused({"key_type": "rsa2048"}, "4.00", "unknown-key-type", "rsa2048")
    refused({"cn": "dev-1"}, "4.00", "schema", "cn")
    refused({"san": ["ftp:x"]}, "4.00", "bad-san", "ftp:x")
    refused({"san": ["ip:::1"]}, "4.00", "bad-san", "IPv4")
    refused({"san": "dns:x"}, "4.00", "schema", "san")
    refused({"name": "tls"}, "4.00", "bad-name", "ldevid")
    refused({"subject": 5}, "4.00", "schema", "subject")
    refused({"ca": [b"garbage"]}, "4.00", "malformed-ca", "entry 0")
    refused({"ca": [read(ctx, "leaf_ec.der")]}, "4.00", "malformed-ca", "not a CA")
    code, m = call("csr", b"\xa1", 60)
    assert (code, coap.diagnostic(m)[0]) == ("4.00", "malformed-cbor")
    code, m = call("csr", cbor.dumps({}), 0)
    assert (code, coap.diagnostic(m)[0]) == ("4.15", "unsupported-content-format")
    # every field at once: accepted; profile is for the CLM; domain is free when the board has none set
    req = {"subject": "serialNumber=SN1,CN=dev-1", "san": ["dns:dev-1.plant", "ip:10.0.0.5", "uri:urn:x:1",
                                                          "email:a@b.c"],
           "key_type": "p256", "name": "ldevid", "domain": "plant", "profile": "ldevid",
           "ca": [read(ctx, "ca_rsa.der")]}
    code, m = call("csr", cbor.dumps(req), 60)
    assert code == "2.04" and m.content_format() == 286 and m.payload[:1] == b"\x30", coap.diagnostic(m)
    assert m.opt(coap.TIMING_OPTION)  # the board's own time, as devagent serve reports it
    # the pending key is the vector key, so cryptography's leaf_ec matches it; but the CLM announced the RSA
    # CA and the path runs through the EC anchor: refused, nothing stored
    st.put("pending", read(ctx, "dev.key"))
    a._pending = None
    code, m = call("verify", read(ctx, "leaf_ec.der"), 287)
    assert (code, coap.diagnostic(m)[0]) == ("4.03", "unexpected-ca"), coap.diagnostic(m)
    assert st.credential() is None
    # announcing the right CA: accepted
    code, m = call("csr", cbor.dumps({"ca": [read(ctx, "ca_ec.der")]}), 60)
    assert code == "2.04"
    code, m = call("verify", read(ctx, "leaf_ec.der"), 287)
    assert code == "2.04" and cbor.loads(m.payload)["version"] == 1, coap.diagnostic(m)
    assert not st.latest("pendca") and not st.latest("pending")
    # a board configured for one domain refuses another with the serve reason
    b = Agent(st, {"device_id": "dev-1", "domain": "plant"})
    e = raises(Exception, b.csr_request, {"domain": "other"})
    assert (e.code, e.reason) == ("4.09", "no-trust-anchor") and "other" in str(e)
    # no trust anchor at all: 4.09 no-trust-anchor
    c = Agent(store.Store(fresh_dir(ctx["out"] + "/schema-noca")), {"device_id": "dev-1"})
    e = raises(Exception, c.csr_request, {})
    assert (e.code, e.reason) == ("4.09", "no-trust-anchor")


def test_coap_transport_limits(ctx):
    a, st = _agent(ctx, "limits")
    srv = coap.Server(a, SECRET, "dev-1")
    dg, _ = _req("csr", b"", None, 400)
    out = srv.handle(dg[:4] + b"\xb3csr" + b"\xd1\x0b\x0e" + dg[8:], "p")  # noise: must not crash
    assert out is None or coap.decode(out).code >> 5 in (4, 5)
    blk = coap.encode(coap.Message(coap.CON, coap.POST, 7, b"", [(11, b"verify"), (27, b"\x0e")], b"x"))
    m = coap.decode(srv.handle(blk, "p"))
    assert coap.code_str(m.code) == "4.02" and "block-wise" in coap.diagnostic(m)[1]
    big, _ = _req("verify", b"\x30" * (coap.MAX_DATAGRAM + 10), 287, 401)
    m = coap.decode(srv.handle(big, "p"))
    assert (coap.code_str(m.code), coap.diagnostic(m)[0]) == ("4.13", "too-large")
