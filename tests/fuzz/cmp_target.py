"""The CMP fuzz targets: ``cmp_accept`` (one response through ``Transaction.accept``) and ``cmp_client`` (a whole
client operation against a fuzzing server that holds the server's keys).

Both replay real responses recorded from independent servers, one *context* per server:

| context | recorded by | server |
|---|---|---|
| 0 ``corpus/cmp.context/`` | ``python -m tests.fuzz.record_cmp_seeds`` | OpenSSL's ``openssl cmp -use_mock_srv`` |
| 1 ``corpus/cmp.context-mockca/`` | ``python -m tests.fuzz.record_mockca_seeds`` | the Siemens MockCA (cmp-test-suite) |

A context is its TEST-ONLY PKI (the CMP trust anchor, the server's signing key, the device's keys and
certificates), the MAC secret, the time of the recording, the transaction bindings of the recorded requests and
the deviation switches that server needs (``context.json``). The first byte of an input picks the context
(``byte >> 6``) and, within it, the binding (``cmp_accept``) or the client operation (``cmp_client``)
(``byte & 63``), so the mutator, which rarely touches that byte, keeps a seed with its context.

The clock of both targets is the recording's (``recorded_at``): the messageTime check (clock trusted) and the
response signer's validity are checked as on the day the responses were received, so the seeds stay valid after
their certificates expire.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import hashlib
import json

from tests.fuzz.engine import CORPUS, AcceptedMutant

CONTEXT_DIRS = ("cmp.context", "cmp.context-mockca")
RESPONSE_TYPES = ("ip", "cp", "kup", "genp", "rp", "pkiconf", "pollRep")
OPS = ("ir", "cr", "p10cr", "kur", "genm", "rr", "template", "ir-idevid", "genm-root")
# How each operation is protected unless the context says otherwise (context.json "auth"): MAC with the shared
# secret, the device's certificate (LDevID) or the manufacturer's IDevID.
AUTH = {"ir": "mac", "cr": "mac", "p10cr": "mac", "kur": "device", "genm": "mac", "rr": "device", "template": "mac",
        "ir-idevid": "idevid", "genm-root": "mac"}


def selector(context: int, index: int) -> int:
    """The first byte of a seed: context number and binding/operation index."""
    if not 0 <= context < 4 or not 0 <= index < 64:
        raise ValueError("context 0..3, index 0..63")
    return context << 6 | index


@dataclasses.dataclass
class Context:
    name: str
    peer: str
    reference: bytes
    secret: bytes
    recorded_at: datetime.datetime
    bindings: list  # (transaction_id, sender_nonce) of each recorded request, in seed order
    auth: dict  # operation -> "mac" | "device" | "idevid" (overrides AUTH)
    accept: dict  # deviation switches for Transaction/Protector (tolerate_nonce_reuse, ignore_keyusage, ...)
    client: dict  # CmpClient keyword arguments (the same switches, recipient)
    root: object
    server_key: object
    device_cert: object
    device_key: object
    device_chain: tuple
    kur_key: object
    idevid: object
    idevid_key: object
    idevid_chain: tuple
    # Derived MAC keys by (MAC algorithm OID, DER parameters), shared by the inputs of one process: a mutant with
    # other parameters derives afresh, one with the recorded parameters gets the very key it would derive.
    accept_key_cache: dict = dataclasses.field(default_factory=dict)
    server_key_cache: dict = dataclasses.field(default_factory=dict)

    def now(self) -> datetime.datetime:
        return self.recorded_at


def _load(name: str) -> Context:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    d = CORPUS / name
    c = json.loads((d / "context.json").read_text())

    def cert(f):
        return x509.load_pem_x509_certificate((d / f).read_bytes()) if (d / f).exists() else None

    def certs(f):
        return tuple(x509.load_pem_x509_certificates((d / f).read_bytes())) if (d / f).exists() else ()

    def key(f):
        return serialization.load_pem_private_key((d / f).read_bytes(), None) if (d / f).exists() else None

    client = dict(c.get("client", {}))
    if client.get("recipient"):
        client["recipient"] = x509.Name.from_rfc4514_string(client["recipient"])
    device_key = key("device_key.pem")
    return Context(
        name=name, peer=c.get("peer", ""), reference=c["reference"].encode(), secret=c["secret"].encode(),
        recorded_at=datetime.datetime.fromisoformat(c["recorded_at"].replace("Z", "+00:00")),
        bindings=[(bytes.fromhex(b["transaction_id"]), bytes.fromhex(b["sender_nonce"])) for b in c["bindings"]],
        auth=dict(AUTH, **c.get("auth", {})), accept=dict(c.get("accept", {})), client=client, root=cert("root.pem"), server_key=key("server_key.pem"),
        device_cert=cert("device_cert.pem"), device_key=device_key, device_chain=certs("device_chain.pem"),
        kur_key=key("kur_key.pem") or device_key, idevid=cert("idevid.pem"), idevid_key=key("idevid_key.pem"),
        idevid_chain=certs("idevid_chain.pem"))


@functools.lru_cache(maxsize=1)
def contexts() -> tuple[Context, ...]:
    return tuple(_load(n) for n in CONTEXT_DIRS)


def _pick(b: int) -> tuple[Context, int]:
    ctxs = contexts()
    return ctxs[(b >> 6) % len(ctxs)], b & 63


@functools.lru_cache(maxsize=1)
def _seed_protected_parts() -> frozenset:
    from enroll_clients.cmp import messages as M

    out = set()
    for p in (CORPUS / "cmp_accept").iterdir():
        out.add(M._protected_part(M.decode_message(p.read_bytes()[1:])))
    return frozenset(out)


# ---- cmp_accept ----------------------------------------------------------------------------------------
def cmp_accept(data: bytes) -> None:
    """A response through ``Transaction.accept`` bound to the recorded request its first byte names, with the
    context's deviation switches and clock. Property: an accepted, protected response carries exactly the
    protected content (header + body) of one of the recorded ones."""
    from enroll_clients.cmp import messages as M

    if not data:
        return
    ctx, i = _pick(data[0])
    tid, nonce = ctx.bindings[i % len(ctx.bindings)]
    a = ctx.accept
    pr = M.Protector(reference=ctx.reference, secret=ctx.secret, trust_anchors=(ctx.root,),
                     ignore_keyusage=bool(a.get("ignore_keyusage")), reuse_signer=bool(a.get("reuse_signer")),
                     trusted_signer_fallback=bool(a.get("trusted_signer_fallback")))
    txn = M.Transaction(pr, transaction_id=tid, now=ctx.now, clock_trusted=True,
                        tolerate_nonce_reuse=bool(a.get("tolerate_nonce_reuse")))
    txn.sender_nonce = nonce  # the binding of the recorded request
    # The MockCA's PBMAC1 costs 262144 PBKDF2-SHA512 iterations per derivation: share derived keys between inputs
    # (keyed by the exact MAC parameters, see Context) so only mutated parameters pay for a derivation.
    txn._key_cache = ctx.accept_key_cache
    resp = txn.accept(data[1:], RESPONSE_TYPES)
    if resp.protected and M._protected_part(resp.msg) not in _seed_protected_parts():
        raise AcceptedMutant("a response whose protected part was changed passed the protection check")


# ---- cmp_client ----------------------------------------------------------------------------------------
def _frames(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i + 3 <= len(data) and len(out) < 8:
        n = int.from_bytes(data[i:i + 3], "big")
        out.append(data[i + 3:i + 3 + n])
        i += 3 + n
    return out


def _tlv(buf: bytes, off: int):
    """(tag, content start, end) of the DER TLV at ``off``, or None."""
    if off + 2 > len(buf):
        return None
    tag, ln, p = buf[off], buf[off + 1], off + 2
    if tag & 0x1F == 0x1F:
        return None
    if ln & 0x80:
        nb = ln & 0x7F
        if not 1 <= nb <= 4 or p + nb > len(buf):
            return None
        ln = int.from_bytes(buf[p:p + nb], "big")
        p += nb
    if p + ln > len(buf):
        return None
    return tag, p, p + ln


def _elements(der: bytes):
    """The TLVs (bytes) inside the outer SEQUENCE of a PKIMessage, or None."""
    outer = _tlv(der, 0)
    if outer is None or outer[0] != 0x30 or outer[2] != len(der):
        return None
    out, off = [], outer[1]
    while off < outer[2]:
        t = _tlv(der, off)
        if t is None:
            return None
        out.append(der[off:t[2]])
        off = t[2]
    return out


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _seq(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(content)) + content


def _reprotect(ctx: Context, rsp: bytes, request: bytes, index: int) -> bytes:
    """The fuzzed response bound to our real request and protected again with the keys the server holds (MAC with
    the shared secret, or the server's signing key): the fuzzer plays an authenticated server.

    Only the two headers are decoded (pyasn1): the body and extraCerts are passed on as the mutant has them, and
    the protection is computed over the DER of header + body as RFC 4210 5.1.3 defines ProtectedPart. A mutant
    whose outer structure or header does not decode goes to the client unchanged."""
    from enroll_clients.cmp import asn1 as A
    from enroll_clients.cmp import protection as P

    parts, req = _elements(rsp), _elements(request)
    if not parts or len(parts) < 2 or not req:
        return rsp
    try:
        h = A.der_decode(parts[0], A.PKIHeader())
        rh = A.der_decode(req[0], A.PKIHeader())
        h["transactionID"] = h["transactionID"].clone(bytes(rh["transactionID"]))
        h["recipNonce"] = h["recipNonce"].clone(bytes(rh["senderNonce"]))
        h["senderNonce"] = h["senderNonce"].clone(hashlib.sha256(request + bytes([index])).digest()[:16])
        protected = h["protectionAlg"].isValue and len(parts) > 2 and parts[2][:1] == b"\xa0"
        sign = None
        if protected and not P.is_mac_alg(h["protectionAlg"]):
            from enroll_clients.cmp import messages as M

            alg, sign = P.signature_alg_for(ctx.server_key)
            h["protectionAlg"] = M._tagged(h, "protectionAlg", alg)
        header = A.der_encode(h)
        if not protected:
            return _seq(0x30, header + b"".join(parts[1:]))
        data = _seq(0x30, header + parts[1])
        value = sign(data) if sign else P.compute_mac(h["protectionAlg"], ctx.secret, data, ctx.server_key_cache)
        prot = _seq(0xA0, _seq(0x03, b"\x00" + value))
        return _seq(0x30, header + parts[1] + prot + b"".join(parts[3:]))
    except Exception:  # noqa: BLE001 - a mutant we cannot re-bind goes to the client as it is
        return rsp


_RUNNER: list = []


def runner() -> asyncio.Runner:
    """One event loop (and its default thread pool) for every input of the process, as a daemon has one."""
    if not _RUNNER:
        _RUNNER.append(asyncio.Runner())
    return _RUNNER[0]


def close() -> None:
    while _RUNNER:
        _RUNNER.pop().close()


@functools.lru_cache(maxsize=8)
def _csr(key, subject):
    from keystore.csr import build_csr

    return build_csr(key, subject, [])


def cmp_client(data: bytes, observe=None) -> None:
    """One client operation (``OPS[data[0] & 63]``, in context ``data[0] >> 6``) against a server that answers
    with the framed responses in ``data``, re-bound and re-protected. Property: a certificate returned is for
    the key we asked for. ``observe(request, answer)``, if given, sees each exchange (tests/unit/test_cmp_asn1.py
    collects the client's requests with it)."""
    from enroll_clients.base import CertRequest, ClientAuth
    from enroll_clients.cmp.client import CmpClient
    from enroll_clients.cmp.transport import CallableTransport
    from keystore.certs import same_public_key

    if not data:
        return
    ctx, i = _pick(data[0])
    op = OPS[i % len(OPS)]
    responses = _frames(data[1:])
    state = {"i": 0}

    def server(request: bytes) -> bytes:
        n = state["i"]
        state["i"] += 1
        answer = _reprotect(ctx, responses[n], request, n) if n < len(responses) else b""
        if observe is not None:
            observe(request, answer)
        return answer

    async def nosleep(_s):
        return None

    kw = dict(ctx.client)
    client = CmpClient(CallableTransport(server), trust_anchors=(ctx.root,), implicit_confirm=True,
                       mac_iterations=500, max_wait_s=5.0, sleep=nosleep, now=ctx.now, **kw)
    kind = ctx.auth[op]
    if kind == "idevid" and ctx.idevid is not None:
        auth = ClientAuth(certificate=ctx.idevid, private_key=ctx.idevid_key, chain=ctx.idevid_chain)
    elif kind in ("device", "idevid"):
        auth = ClientAuth(certificate=ctx.device_cert, private_key=ctx.device_key, chain=ctx.device_chain)
    else:
        auth = ClientAuth(reference=ctx.reference, secret=ctx.secret)
    key = ctx.kur_key if op == "kur" else ctx.device_key
    subject = ctx.device_cert.subject

    async def go():
        if op in ("ir", "ir-idevid"):
            return await client.enroll(CertRequest(subject=subject, private_key=key), auth)
        if op == "cr":
            return await client.request(CertRequest(subject=subject, private_key=key), auth)
        if op == "p10cr":
            return await client.enroll(CertRequest(subject=subject, csr=_csr(key, subject)), auth)
        if op == "kur":
            return await client.renew(CertRequest(subject=subject, private_key=key), auth)
        if op in ("genm", "genm-root"):
            return await client.ca_certs(auth, old_root=ctx.root if op == "genm-root" else None)
        if op == "template":
            return await client.cert_req_template(auth)
        return await client.revoke(ctx.device_cert, auth, "superseded")

    result = runner().run(go())
    cert = getattr(result, "certificate", None)
    if cert is not None and not same_public_key(cert.public_key(), key.public_key()):
        raise AcceptedMutant("the client returned a certificate for another key")
