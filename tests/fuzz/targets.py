"""The fuzz targets: one per parser where bytes from a peer or a file become devagent objects.

Each target's ``run(data)`` feeds one input through the production entry point and checks the security property
that applies there (``engine.AcceptedMutant`` / ``engine.StateChanged``). ``allowed`` is the parser's contract:
the package's own error roots. Seeds are in ``tests/fuzz/corpus/<target>/`` (see ``corpus/README.md``).

| target | entry point | allowed |
|---|---|---|
| cmp_accept | ``Transaction.accept`` with the recorded binding of OpenSSL mock-server responses | EnrollError |
| cmp_client | ``CmpClient`` enroll/request/renew/ca_certs/revoke against a fuzzing server holding the keys | EnrollError |
| est_certs | ``est.messages.parse_certs_body`` (certs-only in base64/PEM/DER) | ProtocolError |
| est_serverkeygen | ``est.messages.parse_serverkeygen`` (Content-Type + multipart body) | EnrollError |
| est_csrattrs | ``est.messages.parse_csrattrs`` | ProtocolError |
| keystore_import | ``keystore.certs`` loaders + ``Keystore.import_idevid`` (PEM, DER, PKCS#7, PKCS#8, PKCS#12) | KeystoreError |
| cli_import | ``devagent keystore import-idevid`` / ``keystore trust --add`` in-process (click) | exit code != 1 |
| coap_device | a real ``devagent serve`` site on 127.0.0.1 fed raw datagrams (incl. Block1) | any CoAP answer but 5.00 |
| toml_config | ``agent.config.load_config`` and ``board_profiles.load_file`` | ConfigError, BoardProfileError |
| mpy_parsers | the board's DER/X.509/PKCS#7/CBOR/frame/CoAP parsers (also under MicroPython) | their own errors |
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tests.fuzz.engine import CORPUS, AcceptedMutant, StateChanged, Target

_TMP = None


def tmpdir() -> Path:
    global _TMP
    if _TMP is None:
        _TMP = Path(tempfile.mkdtemp(prefix="devagent-fuzz-"))
    return _TMP


def snapshot(root: Path) -> dict:
    """{relative path: sha256} of every file under root (what is stored)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if f.endswith(".lock"):
                continue
            try:
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
            except FileNotFoundError:
                pass
    return out


def _diff(a: dict, b: dict) -> str:
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(changed[:5])


# ---- CMP -------------------------------------------------------------------------------------------
CMP_CONTEXT = CORPUS / "cmp.context"
RESPONSE_TYPES = ("ip", "cp", "kup", "genp", "rp", "pkiconf", "pollRep")


@functools.lru_cache(maxsize=1)
def _cmp_ctx() -> dict:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    c = json.loads((CMP_CONTEXT / "context.json").read_text())
    ctx = {"ref": c["reference"].encode(), "secret": c["secret"].encode(), "tid": bytes.fromhex(c["transaction_id"]),
           "nonce": bytes.fromhex(c["sender_nonce"])}
    for name in ("root", "server", "device_cert", "device_rsa_cert"):
        ctx[name] = x509.load_pem_x509_certificate((CMP_CONTEXT / f"{name}.pem").read_bytes())
    for name in ("server_key", "device_key", "device_rsa_key"):
        ctx[name] = serialization.load_pem_private_key((CMP_CONTEXT / f"{name}.pem").read_bytes(), None)
    return ctx


@functools.lru_cache(maxsize=1)
def _seed_protected_parts() -> frozenset:
    from enroll_clients.cmp import messages as M

    out = set()
    for p in (CORPUS / "cmp_accept").iterdir():
        out.add(M._protected_part(M.decode_message(p.read_bytes()[1:])))
    return frozenset(out)


def cmp_accept(data: bytes) -> None:
    """A response through ``Transaction.accept`` bound to the recorded request. Property: an accepted,
    protected response carries exactly the protected content (header + body) of one of the recorded ones."""
    from enroll_clients.cmp import messages as M

    c = _cmp_ctx()
    # Recorded responses carry the messageTime of the recording: replay them with an untrusted clock (the
    # time check is tested in tests/unit/test_cmp_client.py; here the decoder and protection are fuzzed).
    txn = M.Transaction(M.Protector(reference=c["ref"], secret=c["secret"], trust_anchors=(c["root"],)),
                        transaction_id=c["tid"], clock_trusted=False)
    txn.sender_nonce = c["nonce"]  # the binding of the recorded request
    resp = txn.accept(data[1:], RESPONSE_TYPES)
    if resp.protected and M._protected_part(resp.msg) not in _seed_protected_parts():
        raise AcceptedMutant("a response whose protected part was changed passed the protection check")


OPS = ("ir", "cr", "p10cr", "kur", "genm", "rr")


def _frames(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i + 3 <= len(data) and len(out) < 8:
        n = int.from_bytes(data[i:i + 3], "big")
        out.append(data[i + 3:i + 3 + n])
        i += 3 + n
    return out


def _reprotect(rsp: bytes, request: bytes, index: int) -> bytes:
    """The fuzzed response bound to our real request and protected again with the keys the server holds
    (MAC with the shared secret, or the mock server's signing key): the fuzzer plays an authenticated server."""
    from enroll_clients.cmp import asn1 as A
    from enroll_clients.cmp import messages as M
    from enroll_clients.cmp import protection as P

    c = _cmp_ctx()
    try:
        msg = A.der_decode(rsp, A.PKIMessage())
        req = A.der_decode(request, A.PKIMessage())
        h = msg["header"]
        h["transactionID"] = h["transactionID"].clone(bytes(req["header"]["transactionID"]))
        h["recipNonce"] = h["recipNonce"].clone(bytes(req["header"]["senderNonce"]))
        h["senderNonce"] = h["senderNonce"].clone(hashlib.sha256(request + bytes([index])).digest()[:16])
        if h["protectionAlg"].isValue and msg["protection"].isValue:
            data = M._protected_part(msg)
            if P.is_mac_alg(h["protectionAlg"]):
                value = P.compute_mac(h["protectionAlg"], c["secret"], data)
            else:
                alg, sign = P.signature_alg_for(c["server_key"])
                h["protectionAlg"] = M._tagged(h, "protectionAlg", alg)
                value = sign(M._protected_part(msg))
            msg["protection"] = msg["protection"].clone(A.BitString.fromOctetString(value))
        return A.der_encode(msg)
    except Exception:  # noqa: BLE001 - a mutant we cannot re-bind goes to the client as it is
        return rsp


def cmp_client(data: bytes) -> None:
    """One client operation (``data[0]``) against a server that answers with the framed responses in ``data``,
    re-bound and re-protected. Property: a certificate returned is for the key we asked for."""
    from enroll_clients.base import CertRequest, ClientAuth
    from enroll_clients.cmp.client import CmpClient
    from enroll_clients.cmp.transport import CallableTransport
    from keystore.csr import build_csr

    if not data:
        return
    c = _cmp_ctx()
    op = OPS[data[0] % len(OPS)]
    responses = _frames(data[1:])
    state = {"i": 0}

    def server(request: bytes) -> bytes:
        i = state["i"]
        state["i"] += 1
        return _reprotect(responses[i], request, i) if i < len(responses) else b""

    async def nosleep(_s):
        return None

    client = CmpClient(CallableTransport(server), trust_anchors=(c["root"],), implicit_confirm=True,
                       mac_iterations=500, max_wait_s=5.0, sleep=nosleep)
    mac = ClientAuth(reference=c["ref"], secret=c["secret"])
    sig = ClientAuth(certificate=c["device_cert"], private_key=c["device_key"])
    key = c["device_key"]
    subject = c["device_cert"].subject

    async def go():
        if op == "ir":
            return await client.enroll(CertRequest(subject=subject, private_key=key), mac)
        if op == "cr":
            return await client.request(CertRequest(subject=subject, private_key=key), mac)
        if op == "p10cr":
            return await client.enroll(CertRequest(subject=subject, csr=_csr(key, subject)), mac)
        if op == "kur":
            return await client.renew(CertRequest(subject=subject, private_key=key), sig)
        if op == "genm":
            return await client.ca_certs(mac)
        return await client.revoke(c["device_cert"], sig, "superseded")

    result = asyncio.run(go())
    cert = getattr(result, "certificate", None)
    if cert is not None:
        from keystore.certs import same_public_key

        if not same_public_key(cert.public_key(), key.public_key()):
            raise AcceptedMutant("the client returned a certificate for another key")
    _ = build_csr


@functools.lru_cache(maxsize=4)
def _csr(key, subject):
    from keystore.csr import build_csr

    return build_csr(key, subject, [])


# ---- EST -------------------------------------------------------------------------------------------
def est_certs(data: bytes) -> None:
    from enroll_clients.est.messages import CT_CERTS_ONLY, parse_certs_body

    parse_certs_body(data, CT_CERTS_ONLY)


def est_serverkeygen(data: bytes) -> None:
    """Input: the Content-Type header value, a LF, then the body."""
    from enroll_clients.est.messages import parse_serverkeygen

    ct, _, body = data.partition(b"\n")
    parse_serverkeygen(ct.decode("latin-1"), body)  # httpx hands header values over as latin-1 text


def est_csrattrs(data: bytes) -> None:
    from enroll_clients.est.messages import parse_csrattrs

    parse_csrattrs(data)


# ---- keystore import ----------------------------------------------------------------------------------
_KS = {}
IMPORT_KINDS = ("certificates", "private-key", "pkcs12", "idevid")


def _keystore():
    if "ks" not in _KS:
        from keystore.store import Keystore

        root = tmpdir() / "keystore"
        _KS["root"] = root
        _KS["ks"] = Keystore.init(root)
    return _KS["ks"], _KS["root"]


@functools.lru_cache(maxsize=1)
def _import_ctx():
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    d = CORPUS / "keystore_import.context"
    key = serialization.load_pem_private_key((d / "idevid_key.pem").read_bytes(), None)
    leaves = {x509.load_pem_x509_certificate((d / "idevid.pem").read_bytes()).tbs_certificate_bytes}
    return key, leaves


def keystore_import(data: bytes) -> None:
    """``data[0]`` selects the loader. Kind ``idevid`` imports PEM ``leaf + chain`` with the fixed IDevID key.
    Properties: a refused input changes nothing stored; an accepted IDevID with a chain has the recorded
    leaf's signed content (TBSCertificate)."""
    from keystore.certs import load_certificates, load_pkcs12, load_private_key

    if not data:
        return
    kind = IMPORT_KINDS[data[0] % len(IMPORT_KINDS)]
    body = data[1:]
    if kind == "certificates":
        load_certificates(body, "fuzz input")
        return
    if kind == "private-key":
        load_private_key(body, "fuzz input")
        return
    if kind == "pkcs12":
        load_pkcs12(body, "fuzz input", b"fuzz")
        return
    ks, root = _keystore()
    key, leaves = _import_ctx()
    before = snapshot(root)
    try:
        certs = load_certificates(body, "fuzz input")
        ks.import_idevid("fuzz", certs[0], certs[1:], private_key=key, force=True, source="fuzz")
    except Exception:
        after = snapshot(root)
        if after != before:
            raise StateChanged(f"refused IDevID import changed {_diff(before, after)}") from None
        raise
    if len(certs) > 1 and certs[0].tbs_certificate_bytes not in leaves:
        raise AcceptedMutant("an IDevID whose signed content was changed was imported with its chain")


def cli_import(data: bytes) -> None:
    """``devagent keystore import-idevid --cert F --key K [--chain C]`` / ``keystore trust --add F`` in-process.
    Property: bad input never ends in exit 1 ("internal error"); a refusal changes nothing stored."""
    from click.testing import CliRunner

    from agent.cli import cli

    if not data:
        return
    ks, root = _keystore()
    d = tmpdir() / "cli"
    d.mkdir(exist_ok=True)
    f = d / "input"
    f.write_bytes(data[1:])
    ctx = CORPUS / "keystore_import.context"
    sel = data[0] % 4
    if sel == 0:
        args = ["keystore", "import-idevid", "cli", "--cert", str(f), "--key", str(ctx / "idevid_key.pem"), "--force"]
    elif sel == 1:
        args = ["keystore", "import-idevid", "cli", "--cert", str(ctx / "idevid.pem"), "--key", str(f), "--force"]
    elif sel == 2:
        args = ["keystore", "import-idevid", "cli", "--cert", str(ctx / "idevid.pem"), "--key",
                str(ctx / "idevid_key.pem"), "--chain", str(f), "--force"]
    else:
        args = ["keystore", "trust", "--domain", "fuzz", "--add", str(f)]
    before = snapshot(root)
    r = CliRunner().invoke(cli, ["--state-dir", str(root), *args], catch_exceptions=True)
    if r.exit_code == 1 or "internal error" in r.output:
        exc = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
        raise exc or RuntimeError(f"CLI internal error: {r.output.strip()[-200:]}")
    if r.exit_code != 0:
        after = snapshot(root)
        if after != before:
            raise StateChanged(f"refused CLI import changed {_diff(before, after)}")
        raise _CliRefused(r.exit_code)


class _CliRefused(Exception):
    """The CLI refused the input with a documented exit code (2 usage, 3 keystore, 4 rejected...)."""


# ---- TOML --------------------------------------------------------------------------------------------
def toml_config(data: bytes) -> None:
    """``data[0]`` even: agent.toml through ``load_config``; odd: a board profile through ``load_file``."""
    import board_profiles
    from agent.config import load_config

    if not data:
        return
    d = tmpdir() / "toml"
    d.mkdir(exist_ok=True)
    if data[0] % 2 == 0:
        p = d / "agent.toml"
        p.write_bytes(data[1:])
        load_config(env={}, config_path=p, profile_root=d, euid=0)
    else:
        p = d / "fuzz.toml"
        p.write_bytes(data[1:])
        board_profiles.load_file(p)


# ---- board parsers ---------------------------------------------------------------------------------
def _mpy():
    agent_dir = str(Path(__file__).resolve().parents[2] / "agent")
    if agent_dir not in sys.path:
        sys.path.insert(0, agent_dir)  # the board package is "mpy", as on a board
    from tests.fuzz import mpy_targets

    return mpy_targets


def mpy_parsers(data: bytes) -> None:
    _mpy().run(data)


def _mpy_allowed():
    return (_mpy().Refused,)


# ---- registry ---------------------------------------------------------------------------------------
def _enroll_error():
    from enroll_clients.base import EnrollError

    return (EnrollError,)


def _protocol_error():
    from enroll_clients.base import ProtocolError

    return (ProtocolError,)


def _keystore_error():
    from keystore.errors import KeystoreError

    return (KeystoreError,)


def _config_errors():
    from agent.config import ConfigError
    from board_profiles import BoardProfileError

    return (ConfigError, BoardProfileError)


def _coap():
    from tests.fuzz import coap_target

    return coap_target


def all_targets() -> dict[str, Target]:
    coap = _coap()
    ts = [
        Target("cmp_accept", cmp_accept, _enroll_error(), "CMP responses (openssl cmp mock server) -> accept()",
               prefix=1),
        Target("cmp_client", cmp_client, _enroll_error(), "CMP client flows against a key-holding fuzz server",
               prefix=1),
        Target("est_certs", est_certs, _protocol_error(), "EST certs-only bodies"),
        Target("est_serverkeygen", est_serverkeygen, _enroll_error(), "EST /serverkeygen multipart"),
        Target("est_csrattrs", est_csrattrs, _protocol_error(), "EST /csrattrs"),
        Target("keystore_import", keystore_import, _keystore_error(), "PEM/DER/PKCS#7/PKCS#8/PKCS#12 + import",
               prefix=1),
        Target("cli_import", cli_import, (_CliRefused,), "devagent keystore import-idevid / trust --add",
               seeds="cli_import", prefix=1),
        Target("coap_device", coap.run, coap.allowed(), "CoAP /csr /verify /status datagrams (real aiocoap site)",
               setup=coap.setup, teardown=coap.teardown),
        Target("toml_config", toml_config, _config_errors(), "agent.toml and board profile TOML", prefix=1),
        Target("mpy_parsers", mpy_parsers, _mpy_allowed(), "board DER/X.509/PKCS#7/CBOR/frame/CoAP (CPython)",
               prefix=1),
    ]
    return {t.name: t for t in ts}


def cleanup() -> None:
    if _TMP is not None:
        shutil.rmtree(_TMP, ignore_errors=True)
