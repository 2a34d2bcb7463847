"""The fuzz targets: one per parser where bytes from a peer or a file become devagent objects.

Each target's ``run(data)`` feeds one input through the production entry point and checks the security property
that applies there (``engine.AcceptedMutant`` / ``engine.StateChanged``). ``allowed`` is the parser's contract:
the package's own error roots. Seeds are in ``tests/fuzz/corpus/<target>/`` (see ``corpus/README.md``).

| target | entry point | allowed |
|---|---|---|
| cmp_accept | ``Transaction.accept`` with the recorded binding of OpenSSL mock-server and MockCA responses | EnrollError |
| cmp_client | ``CmpClient`` enroll/request/renew/ca_certs/cert_req_template/revoke against a fuzzing server holding the keys (``cmp_target.py``) | EnrollError |
| est_certs | ``est.messages.parse_certs_body`` (certs-only in base64/PEM/DER) | ProtocolError |
| est_serverkeygen | ``est.messages.parse_serverkeygen`` (Content-Type + multipart body) | EnrollError |
| est_csrattrs | ``est.messages.parse_csrattrs`` -> ``apply_csrattrs`` -> ``keystore.csr.build_csr`` | ProtocolError |
| est_headers | ``parse_retry_after``, ``http_date``, ``media_type`` (header values) | nothing (never raise) |
| cmp_template | ``cmp.template.decode_template``/``describe_template``/``apply_template`` | EnrollError |
| opcua_trustlist | ``agent.opcua.trustlist.decode`` -> ``merge`` -> ``check`` | PushError |
| clm_import | ``devagent clm import`` in-process (CSV, JSON lines) (``clm_target.py``) | exit code != 1 |
| clm_migrate | ``inventory.json`` -> SQLite migration on first open (``devagent clm list``) | exit code != 1 |
| keystore_import | ``keystore.certs`` loaders + ``Keystore.import_idevid`` (PEM, DER, PKCS#7, PKCS#8, PKCS#12) | KeystoreError |
| cli_import | ``devagent keystore import-idevid`` / ``keystore trust --add`` in-process (click) | exit code != 1 |
| coap_device | a real ``devagent serve`` site on 127.0.0.1 fed raw datagrams (incl. Block1) | any CoAP answer but 5.00 |
| keystore_index | ``keystore.json`` read by ``devagent keystore list`` / ``status`` / ``keystore check`` in-process | exit code != 1 |
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
    """Scratch directory of the process: on tmpfs (/dev/shm) where there is one, so the fsyncs of accepted
    imports cost what they cost on a board's RAM disk, not the shared test machine's disk."""
    global _TMP
    if _TMP is None:
        shm = Path("/dev/shm")
        base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
        _TMP = Path(tempfile.mkdtemp(prefix="devagent-fuzz-", dir=base))
    return _TMP


_HASHES: dict = {}  # (path, inode, size, mtime_ns, ctime_ns) -> sha256 of a file seen before


def snapshot(root: Path) -> dict:
    """{relative path: sha256} of every file under root (what is stored). A file whose inode, size, mtime and
    ctime are those of a file already hashed is not read again (every write -- in place or by rename -- changes
    one of them; ctime cannot be set back from user space)."""
    out: dict = {}
    _scan(str(root), len(str(root)) + 1, out)
    if len(_HASHES) > 100_000:
        _HASHES.clear()
    return out


def _scan(d: str, strip: int, out: dict) -> None:
    try:
        entries = list(os.scandir(d))
    except FileNotFoundError:
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            _scan(e.path, strip, out)
        elif not e.name.endswith(".lock"):
            try:
                st = e.stat(follow_symlinks=False)
                k = (e.path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                h = _HASHES.get(k)
                if h is None:
                    with open(e.path, "rb") as f:
                        h = _HASHES[k] = hashlib.sha256(f.read()).hexdigest()
                out[e.path[strip:]] = h
            except FileNotFoundError:
                pass


def _diff(a: dict, b: dict) -> str:
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(changed[:5])


# ---- CMP: tests/fuzz/cmp_target.py ------------------------------------------------------------------
def _cmp():
    from tests.fuzz import cmp_target

    return cmp_target


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
    """/csrattrs body -> ``CsrAttrs`` -> applied to a request -> the CSR devagent would sign with it (the server's
    extensions and signature hash go into our CSR; ``agent.lifecycle._apply_server_attributes``)."""
    from enroll_clients.base import CertRequest
    from enroll_clients.est.messages import apply_csrattrs, parse_csrattrs
    from keystore.csr import build_csr

    attrs = parse_csrattrs(data)
    key, subject = _fixed_key()
    applied = apply_csrattrs(CertRequest(subject=subject), attrs)  # no key type of ours: nothing to conflict with
    build_csr(key, subject, (), extensions=applied.extensions, hash_name=attrs.signature_hash)


@functools.lru_cache(maxsize=1)
def _fixed_key():
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()), x509.Name.from_rfc4514_string("CN=fuzz-device,O=devagent fuzz")


HEADERS = ("Retry-After", "Date", "Content-Type")


def est_headers(data: bytes) -> None:
    """An EST server's header value (``data[0]`` picks it; httpx hands values over as latin-1 text). Contracts:
    ``parse_retry_after`` -> seconds >= 0 or None and ``http_date`` -> an aware datetime or None, never an
    exception (a bad header is ignored); ``media_type`` -> (type, params), never an exception (the caller then
    refuses the type by name)."""
    from enroll_clients.est.messages import http_date, media_type, parse_retry_after

    if not data:
        return
    header, value = HEADERS[data[0] % len(HEADERS)], data[1:].decode("latin-1")
    if header == "Retry-After":
        v = parse_retry_after(value)
        if v is not None and not (isinstance(v, float) and v >= 0):
            raise AssertionError(f"Retry-After {value!r} -> {v!r}")
    elif header == "Date":
        v = http_date(value)
        if v is not None and v.utcoffset() is None:
            raise AssertionError(f"Date {value!r} -> naive {v!r}")
    else:
        mtype, params = media_type(value)
        if not isinstance(mtype, str) or not isinstance(params, dict):
            raise AssertionError(f"Content-Type {value!r} -> {mtype!r}, {params!r}")


# ---- CMP certReqTemplate (RFC 9483 4.3.3) ----------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _template_keys():
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    return ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(public_exponent=65537, key_size=2048)


def cmp_template(data: bytes) -> None:
    """The genp certReqTemplate value (DER CertReqTemplateContent) -> ``template.decode_template`` ->
    ``describe_template`` (what ``devagent cert-template`` prints) -> ``apply_template`` to a request with a
    P-256 and with an RSA-2048 key (what ``--cert-template`` does before an ir/cr)."""
    from cryptography import x509

    from enroll_clients.base import EnrollError
    from enroll_clients.cmp import template as T

    t = T.decode_template(data)
    T.describe_template(t)
    if t is None:
        return
    _, subject = _fixed_key()
    sans = (x509.DNSName("fuzz-device.plant.example"),)
    refused = []
    for key in _template_keys():
        try:
            T.apply_template(t, subject, sans, (), key)
        except EnrollError as e:
            refused.append(e)
    if len(refused) == len(_template_keys()):
        raise refused[0]  # neither key satisfies the template: a refusal (the other outcome is an accepted one)


# ---- OPC UA TrustList (OPC 10000-12 7.8.2) -------------------------------------------------------------
OPCUA_NOW = "2026-06-01T00:00:00+00:00"  # inside the validity of the seed certificates (make_seeds)


def opcua_trustlist(data: bytes) -> None:
    """A TrustList written by a GDS: ``agent.opcua.trustlist.decode`` (UA Binary TrustListDataType) -> ``merge``
    into the current list -> ``check`` (what the device does before it applies a TrustList write)."""
    import datetime

    from agent.opcua import trustlist as TL

    mask, update = TL.decode(data)
    merged = TL.merge(_opcua_current(), mask, update)
    TL.check(merged, now=datetime.datetime.fromisoformat(OPCUA_NOW))


@functools.lru_cache(maxsize=1)
def _opcua_current():
    from agent.opcua import trustlist as TL

    return TL.decode((CORPUS / "opcua_trustlist" / "full").read_bytes())[1]


# ---- keystore import ----------------------------------------------------------------------------------
_KS = {}
IMPORT_KINDS = ("certificates", "private-key", "pkcs12", "idevid")


KEYSTORE_MAX_FILES = 40  # accepted imports and trust anchors pile up: start afresh beyond this


def _keystore():
    """The fuzz keystore (one per process), re-created once accepted inputs have filled it, so the cost of an
    input does not grow with the number of inputs before it."""
    from keystore.store import Keystore

    root = tmpdir() / "keystore"
    if "ks" in _KS and len(snapshot(root)) > KEYSTORE_MAX_FILES:
        _KS.pop("ks").close()
        shutil.rmtree(root)
    if "ks" not in _KS:
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
    r = invoke_cli(["--state-dir", str(root), *args])
    if r.exit_code == 1 or "internal error" in r.output:
        exc = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
        raise exc or RuntimeError(f"CLI internal error: {r.output.strip()[-200:]}")
    if r.exit_code != 0:
        after = snapshot(root)
        if after != before:
            raise StateChanged(f"refused CLI import changed {_diff(before, after)}")
        raise _CliRefused(r.exit_code)


def invoke_cli(args: list[str]):
    """The devagent CLI in-process through click's entry point (``CliRunner``, exceptions caught), with the board
    profile named (``_cli_env``); then click's cache of the runner's streams is emptied (``_click_stream_caches``)."""
    from click.testing import CliRunner

    from agent.cli import cli

    try:
        return CliRunner().invoke(cli, args, catch_exceptions=True, env=_cli_env())
    finally:
        for cache in _click_stream_caches():
            cache.clear()


@functools.lru_cache(maxsize=1)
def _click_stream_caches() -> tuple:
    """click (8.1 to 8.5 at least) remembers the text stream it made for each ``sys.stdin``/``stdout``/``stderr``
    it has seen in a ``WeakKeyDictionary`` (``click._compat._make_cached_stream_func``) whose value refers to its
    key, so the entry never goes: every in-process invocation kept the runner's output streams (~20 objects) for
    good. After ~85,000 ``keystore_index`` inputs (3 commands each) the heap held ~2 million objects, and the
    full garbage collection that some input's allocation triggers -- its cost is the whole heap's, not the
    input's -- took 1-1.7 s of CPU under load: the 4 "hangs" of the f5b92a9 long run (tests/fuzz/README.md).
    A process runs the CLI once; only this harness needs the caches emptied."""
    import weakref

    from click import _compat

    out = []
    for name in ("_default_text_stdin", "_default_text_stdout", "_default_text_stderr"):
        for cell in getattr(getattr(_compat, name, None), "__closure__", None) or ():
            if isinstance(cell.cell_contents, weakref.WeakKeyDictionary):
                out.append(cell.cell_contents)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _cli_env() -> dict:
    """The generic board profile of this CPU by name (DEVAGENT_PROFILE, the documented override): every input
    would otherwise re-read all board profiles for detection, which has nothing to do with the file under test."""
    import platform

    import board_profiles

    name = f"generic-{platform.machine()}"
    return {"DEVAGENT_PROFILE": name} if (Path(board_profiles.__file__).parent / f"{name}.toml").exists() else {}


class _CliRefused(Exception):
    """The CLI refused the input with a documented exit code (2 usage, 3 keystore, 4 rejected...)."""


# ---- keystore index (keystore.json) ------------------------------------------------------------------
INDEX_COMMANDS = (["--json", "keystore", "list"], ["--json", "status"], ["keystore", "check"])


def keystore_index(data: bytes) -> None:
    """A keystore whose index ``keystore.json`` is the input (the rest of the keystore -- master key, key files,
    certificates, trust anchors -- is the committed context), read by ``devagent keystore list``, ``status`` and
    ``keystore check`` in-process. Properties: a damaged index is a keystore error naming the file (exit 3),
    never exit 1; a command refused for it changes nothing stored."""
    d = tmpdir() / "ks-index"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(CORPUS / "keystore_index.context" / "keystore", d)
    for dirpath, _, files in os.walk(d):
        os.chmod(dirpath, 0o700)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o600)
    (d / "keystore.json").write_bytes(data)
    os.chmod(d / "keystore.json", 0o600)
    refused = 0
    for args in INDEX_COMMANDS:
        before = snapshot(d)
        r = _invoke(["--state-dir", str(d), *args])
        if r.exit_code != 0:
            refused += 1
            after = snapshot(d)
            for snap in (before, after):  # the audit log, and lock files made on use, are not stored content
                for k in [k for k in snap if k == "audit.log" or k.startswith("locks/")]:
                    del snap[k]
            if after != before:
                raise StateChanged(f"'{' '.join(args)}' refused (exit {r.exit_code}) and changed {_diff(before, after)}")
    if refused == len(INDEX_COMMANDS):
        raise _CliRefused(3)


def _invoke(args: list[str]):
    """The devagent CLI in-process (click's entry point); exit 1 ("internal error") raises what escaped."""
    r = invoke_cli(args)
    if r.exit_code == 1 or "internal error" in r.output:
        exc = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
        if exc is None:  # the CLI caught it and exited 1: re-run with -v is not needed, the cause is chained
            raise RuntimeError(f"CLI internal error: {r.output.strip()[-300:]}")
        raise exc
    return r


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


def _push_error():
    from agent.opcua.errors import PushError

    return (PushError,)


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
    from tests.fuzz import clm_target as clm

    coap, cmp = _coap(), _cmp()
    ts = [
        Target("cmp_accept", cmp.cmp_accept, _enroll_error(),
               "CMP responses (openssl cmp mock server, Siemens MockCA) -> accept()", prefix=1),
        Target("cmp_client", cmp.cmp_client, _enroll_error(), "CMP client flows against a key-holding fuzz server",
               prefix=1, teardown=cmp.close),
        Target("est_certs", est_certs, _protocol_error(), "EST certs-only bodies"),
        Target("est_serverkeygen", est_serverkeygen, _enroll_error(), "EST /serverkeygen multipart"),
        Target("est_csrattrs", est_csrattrs, _protocol_error(), "EST /csrattrs -> applied -> our CSR"),
        Target("est_headers", est_headers, (), "EST Retry-After / Date / Content-Type header values", prefix=1),
        Target("cmp_template", cmp_template, _enroll_error(), "CMP genp certReqTemplate -> decode/describe/apply"),
        Target("opcua_trustlist", opcua_trustlist, _push_error(), "OPC UA TrustList write -> decode/merge/check"),
        Target("clm_import", clm.clm_import, (clm.Refused,), "devagent clm import (CSV / JSON lines)", prefix=1),
        Target("clm_migrate", clm.clm_migrate, (clm.Refused,), "CLM inventory.json -> SQLite migration"),
        Target("keystore_import", keystore_import, _keystore_error(), "PEM/DER/PKCS#7/PKCS#8/PKCS#12 + import",
               prefix=1),
        Target("cli_import", cli_import, (_CliRefused,), "devagent keystore import-idevid / trust --add",
               seeds="cli_import", prefix=1),
        Target("coap_device", coap.run, coap.allowed(), "CoAP /csr /verify /status datagrams (real aiocoap site)",
               setup=coap.setup, teardown=coap.teardown),
        Target("keystore_index", keystore_index, (_CliRefused,), "keystore.json read by keystore list/status/check"),
        Target("toml_config", toml_config, _config_errors(), "agent.toml and board profile TOML", prefix=1),
        Target("mpy_parsers", mpy_parsers, _mpy_allowed(), "board DER/X.509/PKCS#7/CBOR/frame/CoAP (CPython)",
               prefix=1),
    ]
    return {t.name: t for t in ts}


def cleanup() -> None:
    _cmp().close()
    if _TMP is not None:
        shutil.rmtree(_TMP, ignore_errors=True)
