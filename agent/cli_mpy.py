"""`devagent mpy`: host-side tools for MicroPython boards running ``agent/mpy``.

- ``bridge``: the host acts as the CLM for a board on USB/UART. It asks the board for a CSR over the
  framed serial protocol (``agent/mpy/frame.py``), pre-checks it with ``cryptography``, enrolls it
  upstream through an *enroll strategy* (a callable ``csr -> [leaf, *intermediates]``: the project's
  EST/CMP clients via ``enroll_clients.client_for``, or a local CA for labs), pre-verifies the answer
  (CA signature, public key) and hands it to the board, which verifies it again before storing it.
- ``deploy``: stages the agent, its config and trust anchor and copies them with ``mpremote``.

The lead registers the group in the main CLI with ``cli.add_command(mpy)``.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import click

from agent.mpy import frame

MPY_DIR = Path(__file__).resolve().parent / "mpy"
BOARD_ROOT = "/devagent"
BOARD_PACKAGE = "mpy"  # imported on the board as `mpy` (the directory name; see agent/mpy/manifest.py)

EnrollStrategy = Callable[["object"], Sequence["object"]]


class BridgeError(Exception):
    """The bridge could not complete: board silent or refusing, upstream failure, bad certificate."""


class UpstreamError(BridgeError):
    """The upstream EST/CMP server refused or failed; nothing was sent to the board."""


class BoardError(BridgeError):
    """The board answered ERR: ``code`` (CoAP-style, "4.03"), ``reason`` (as in CoAP diagnostics), ``message``."""

    def __init__(self, code: str, message: str, reason: str = "unknown"):
        super().__init__(f"board refused ({code} {reason}): {message}")
        self.code = code
        self.reason = reason
        self.message = message


class BoardLink:
    """Request/response over a byte stream (a pyserial ``Serial`` or anything with read/write)."""

    def __init__(self, port, timeout_s: float = 10.0):
        self.port = port
        self.timeout_s = timeout_s
        self._seq = int(time.monotonic()) % 1000 * 1000

        def read(n: int) -> bytes:
            waiting = getattr(port, "in_waiting", 0)
            return port.read(max(1, min(n, waiting)))

        self._reader = frame.FrameReader(read, max_body=0xFFFF, chunk=4096)

    def send_raw(self, data: bytes) -> None:
        self.port.write(data)
        if hasattr(self.port, "flush"):
            self.port.flush()

    def call(self, kind: str, payload: bytes = b"", timeout_s: float | None = None) -> tuple[str, bytes]:
        """Send one request and wait for the reply with the same sequence number.

        Raises:
            BoardError: the board answered ERR for this request.
            BridgeError: no reply within the timeout.
        """
        self._seq += 1
        seq = self._seq
        self.send_raw(frame.encode(kind, seq, payload))
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while time.monotonic() < deadline:
            try:
                rkind, rseq, rpayload = self._reader.read()
            except frame.FrameError:
                continue  # line noise: keep waiting for our reply
            except frame.FrameTimeout:
                continue
            if rseq != seq:
                continue  # a late reply to an earlier attempt, or an ERR for a corrupt frame
            if rkind == "ERR":
                try:
                    err = json.loads(rpayload)
                except ValueError:
                    raise BoardError("?", rpayload[:200].decode(errors="replace")) from None
                if not isinstance(err, dict):
                    raise BoardError("?", str(err)[:200])
                raise BoardError(str(err.get("code")), str(err.get("message", err.get("error")))[:500],
                                 str(err.get("error", "unknown"))[:64])
            return rkind, rpayload
        raise BridgeError(f"no reply from the board to {kind} within {timeout_s or self.timeout_s:.0f} s")

    def hello(self, wait_s: float = 15.0) -> dict:
        """Ping until the board's agent answers (it may still be booting)."""
        deadline = time.monotonic() + wait_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                _, payload = self.call("HELLO", b"", timeout_s=min(1.0, max(0.1, deadline - time.monotonic())))
                return json.loads(payload)
            except BoardError:
                raise
            except (BridgeError, ValueError) as e:
                last = e
        raise BridgeError(f"the board's agent did not answer HELLO within {wait_s:.0f} s ({last})")


# ---- enroll strategies ----

def client_strategy(client, auth, server: str | None = None) -> EnrollStrategy:
    """Enroll through an ``enroll_clients.EnrollmentClient`` (EST or CMP) with ``ClientAuth`` auth.

    Returns the leaf and the intermediates (the chain the server sent, else its CA certificates), without
    self-signed roots: the board has its anchor, and a short PKCS#7 fits a small heap.
    Raises ``UpstreamError`` naming the protocol and server when the upstream refuses or fails.
    """
    import contextlib

    from enroll_clients.base import CertRequest, EnrollError

    def enroll(csr):
        sans = ()
        with contextlib.suppress(Exception):
            from cryptography import x509

            sans = tuple(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        try:
            result = asyncio.run(client.enroll(CertRequest(subject=csr.subject, csr=csr, sans=sans), auth))
        except EnrollError as e:
            where = server or getattr(getattr(client, "options", None), "server", "") or type(client).__name__
            raise UpstreamError(f"upstream enrollment at {where} failed: {e}; nothing was sent to the board") \
                from e
        chain = list(result.chain) or list(getattr(result, "ca_certs", ()) or ())
        return [result.certificate, *[c for c in chain if c.subject != c.issuer]]

    return enroll


def local_ca_strategy(ca_cert, ca_key, days: int = 365) -> EnrollStrategy:
    """Issue directly from a CA certificate and key held by the host (labs, tests)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    def enroll(csr):
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca_cert.subject)
             .public_key(csr.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        for ext in csr.extensions:
            if ext.oid in (x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, x509.oid.ExtensionOID.KEY_USAGE):
                b = b.add_extension(ext.value, critical=ext.critical)
        return [b.sign(ca_key, hashes.SHA256())]

    return enroll


def _preverify(csr, certs, ca_cert) -> None:
    """Host-side checks before anything goes to the board (the board checks again)."""
    from keystore.errors import VerificationError
    from keystore.validator import Policy, validate

    if not certs:
        raise BridgeError("upstream returned no certificate")
    leaf = certs[0]
    if leaf.public_key() != csr.public_key():
        raise BridgeError("upstream returned a certificate for another key")
    if ca_cert is not None:
        policy = Policy.for_purpose("clm-preverify", datetime.datetime.now(datetime.timezone.utc), min_rsa_bits=1024)
        try:
            validate(leaf, certs[1:], [ca_cert], policy, public_key=csr.public_key(), what="board certificate")
        except VerificationError as e:
            raise BridgeError(f"the certificate does not pass pre-verification against the trust anchor given "
                              f"with --ca-cert: {e}") from None


def _der(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.DER)


def run_bridge(link: BoardLink, enroll: EnrollStrategy, ca_cert=None, cn: str | None = None,
               serial: str | None = None, sans: Sequence[str] = (), new_key: bool = False,
               push_ca: bool = True, preverify: bool = True) -> dict:
    """One enrollment of the board on ``link``.

    Returns:
        The board's answer to CERT: {gen, cn, not_after}, plus "hello" (the board's status before).
    Raises:
        BoardError, BridgeError; upstream (EnrollError) errors propagate unchanged.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs7

    hello = link.hello()
    if push_ca and ca_cert is not None and not hello.get("has_ca"):
        link.call("CA", _der(ca_cert))  # trust on first use over the physical link
    req = {k: v for k, v in (("cn", cn), ("serial", serial)) if v}
    if sans:
        req["sans"] = list(sans)
    if new_key:
        req["new_key"] = True
    kind, der_csr = link.call("CSR", json.dumps(req).encode(), timeout_s=max(link.timeout_s, 30))
    if kind != "CSR":
        raise BridgeError(f"unexpected reply {kind} to CSR")
    try:
        csr = x509.load_der_x509_csr(der_csr)
    except ValueError as e:
        raise BridgeError(f"the board sent an unparsable CSR: {e}") from e
    if not csr.is_signature_valid:
        raise BridgeError("the board's CSR signature does not verify")
    certs = list(enroll(csr))
    if preverify:
        _preverify(csr, certs, ca_cert)
    if len(certs) == 1:
        payload = _der(certs[0])
    else:
        payload = pkcs7.serialize_certificates(certs, serialization.Encoding.DER)
    _, answer = link.call("CERT", payload, timeout_s=max(link.timeout_s, 30))
    info = json.loads(answer)
    info["hello"] = hello
    return info


# ---- deploy ----

def _load_cert(path: str):
    from cryptography import x509

    data = Path(path).read_bytes()
    return x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)


def stage(dest: Path, config: dict, ca_cert=None, main: str = "serial", compile_mpy: bool = False) -> Path:
    """Lay out what goes on the board under dest: lib/mpy/*, devagent/config.json, devagent/ca.1, main.py."""
    lib = dest / "lib" / BOARD_PACKAGE
    lib.mkdir(parents=True, exist_ok=True)
    for src in sorted(MPY_DIR.glob("*.py")):
        if src.name == "manifest.py":
            continue
        if compile_mpy:
            subprocess.run([_tool("mpy-cross"), "-o", str(lib / (src.stem + ".mpy")), str(src)], check=True)
        else:
            shutil.copyfile(src, lib / src.name)
    root = dest / BOARD_ROOT.strip("/")
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "config.json"
    fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    if ca_cert is not None:
        (root / "ca.1").write_bytes(_der(ca_cert))
    if main != "none":
        call = "serial_main" if main == "serial" else "coap_main"
        (dest / "main.py").write_text(f"# devagent board agent\nfrom {BOARD_PACKAGE} import run\n"
                                      f"run.{call}({BOARD_ROOT!r})\n")
    return dest


def _tool(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def deploy_commands(port: str, staged: Path, mpremote: str | None = None) -> list[list[str]]:
    """The mpremote invocations that copy a staged tree to the board (one chained command)."""
    mk = ("import os\nfor d in ('/lib', '/lib/%s', %r):\n try: os.mkdir(d)\n except OSError: pass\n"
          % (BOARD_PACKAGE, BOARD_ROOT))
    cmd = [mpremote or _tool("mpremote"), "connect", port, "exec", mk]
    for f in sorted((staged / "lib" / BOARD_PACKAGE).iterdir()):
        cmd += ["+", "fs", "cp", str(f), f":/lib/{BOARD_PACKAGE}/{f.name}"]
    for f in sorted((staged / BOARD_ROOT.strip("/")).iterdir()):
        cmd += ["+", "fs", "cp", str(f), f":{BOARD_ROOT}/{f.name}"]
    if (staged / "main.py").exists():
        cmd += ["+", "fs", "cp", str(staged / "main.py"), ":/main.py"]
    cmd += ["+", "reset"]
    return [cmd]


# ---- click ----

@click.group()
def mpy():
    """MicroPython boards: enroll over USB/UART (bridge) and install the agent (deploy)."""


@mpy.command()
@click.option("--port", required=True, help="Serial device of the board, e.g. /dev/ttyACM0 (any pyserial URL).")
@click.option("--baud", default=115200, show_default=True)
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False),
              help="Trust anchor (PEM/DER): pre-verifies the issued certificate; sent to a board that has none.")
@click.option("--push-ca/--no-push-ca", default=True, show_default=True)
@click.option("--cn", help="Subject CN (default: the board's config).")
@click.option("--serial-number", "serial", help="Subject serialNumber.")
@click.option("--san", multiple=True, help="SAN entry: dns:NAME, uri:URI, ip:A.B.C.D (repeatable).")
@click.option("--new-key", is_flag=True, help="Make the board generate a fresh key pair.")
@click.option("--upstream", type=click.Choice(["est", "cmp", "local"]), default="est", show_default=True)
@click.option("--server", help="EST/CMP server URL.")
@click.option("--ca-key", type=click.Path(exists=True, dir_okay=False), help="CA key (PEM) for --upstream local.")
@click.option("--username", help="EST HTTP Basic user.")
@click.option("--password", help="EST password as env:VAR, file:PATH, pass:TEXT or stdin (never a bare value).")
@click.option("--reference", help="CMP MAC reference (senderKID).")
@click.option("--secret", help="CMP MAC secret as env:VAR, file:PATH, pass:TEXT or stdin (never a bare value).")
@click.option("--timeout", "timeout_s", default=10.0, show_default=True, help="Seconds per board request.")
def bridge(port, baud, ca_cert, push_ca, cn, serial, san, new_key, upstream, server, ca_key, username, password,
           reference, secret, timeout_s):
    """Enroll the board on PORT: CSR from the board, certificate from upstream, verified on the board."""
    import serial as pyserial

    anchor = _load_cert(ca_cert) if ca_cert else None
    if upstream == "local":
        if not (anchor and ca_key):
            raise click.UsageError("--upstream local needs --ca-cert and --ca-key")
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        enroll = local_ca_strategy(anchor, load_pem_private_key(Path(ca_key).read_bytes(), None))
    else:
        if not server:
            raise click.UsageError(f"--upstream {upstream} needs --server")
        # The lab CA / EST / CMP path: clients come from enroll_clients (wired into the main CLI by the lead).
        from enroll_clients import ClientAuth, EnrollOptions, client_for
        from keystore.errors import SecretSourceError
        from keystore.secrets import resolve_secret

        try:
            password_b = resolve_secret(password, "--password")
            secret_b = resolve_secret(secret, "--secret")
        except SecretSourceError as e:
            raise click.UsageError(str(e)) from e
        client = client_for(upstream, EnrollOptions(server=server, trust_anchors=(anchor,) if anchor else ()))
        auth = ClientAuth(username=username, password=password_b,
                          reference=reference.encode() if reference else None, secret=secret_b)
        enroll = client_strategy(client, auth, f"{upstream.upper()} {server}")
    try:
        ser = pyserial.serial_for_url(port, baudrate=baud, timeout=0.2)
    except (pyserial.SerialException, ValueError) as e:
        raise click.ClickException(f"cannot open {port}: {e}") from e
    try:
        info = run_bridge(BoardLink(ser, timeout_s), enroll, anchor, cn, serial, san, new_key, push_ca)
    except BridgeError as e:
        raise click.ClickException(str(e)) from e
    except Exception as e:  # upstream EnrollError and friends: one clear line, traceback only with -v upstairs
        if type(e).__name__.endswith("Error"):
            raise click.ClickException(f"upstream enrollment failed: {e}") from e
        raise
    finally:
        ser.close()
    click.echo(f"board certificate installed: generation {info['gen']}, CN={info.get('cn')!r}, "
               f"valid until {info.get('not_after')}")


@mpy.command()
@click.option("--port", required=True, help="Board serial device for mpremote (e.g. /dev/ttyACM0, or 'auto').")
@click.option("--device-id", required=True)
@click.option("--cn", help="Subject CN for CSRs (default: the device id).")
@click.option("--serial-number", "serial")
@click.option("--san", multiple=True)
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False), help="Trust anchor to install.")
@click.option("--coap-secret", envvar="DEVAGENT_MPY_COAP_SECRET",
              help="Per-device commissioning secret, hex (>= 16 bytes); generated when absent.")
@click.option("--secret-file", type=click.Path(dir_okay=False),
              help="Write the (generated) commissioning secret here, mode 0600, for the CLM.")
@click.option("--main", "main", type=click.Choice(["serial", "coap", "none"]), default="serial", show_default=True,
              help="What the board runs at boot.")
@click.option("--clock", type=click.Choice(["auto", "set", "unset"]), default="auto", show_default=True,
              help="Whether the board clock can be trusted for validity checks.")
@click.option("--compile/--no-compile", "compile_mpy", default=False, help="Copy .mpy made by mpy-cross.")
@click.option("--mpremote", help="mpremote executable (default: the one next to this Python).")
@click.option("--dry-run", is_flag=True, help="Stage and print the mpremote command without running it.")
@click.option("--stage-dir", type=click.Path(file_okay=False), help="Keep the staged tree here.")
def deploy(port, device_id, cn, serial, san, ca_cert, coap_secret, secret_file, main, clock, compile_mpy, mpremote,
           dry_run, stage_dir):
    """Copy the agent, its config and trust anchor to a board with mpremote."""
    if coap_secret:
        try:
            raw = bytes.fromhex(coap_secret)
        except ValueError as e:
            raise click.UsageError("--coap-secret must be hex") from e
        if len(raw) < 16:
            raise click.UsageError("--coap-secret must be at least 16 bytes")
    else:
        raw = secrets.token_bytes(32)
    config = {"device_id": device_id, "cn": cn or device_id, "coap_secret": raw.hex(), "clock": clock}
    if serial:
        config["serial"] = serial
    if san:
        config["sans"] = list(san)
    anchor = _load_cert(ca_cert) if ca_cert else None
    tmp = None
    if stage_dir:
        dest = Path(stage_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="devagent-mpy-")
        dest = Path(tmp.name)
    try:
        stage(dest, config, anchor, main, compile_mpy)
        if secret_file:
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(raw.hex() + "\n")
        elif not coap_secret:
            click.echo(f"generated CoAP commissioning secret (record it for the CLM): {raw.hex()}")
        for cmd in deploy_commands(port, dest, mpremote):
            if dry_run:
                click.echo(" ".join(_quote(c) for c in cmd))
                continue
            p = subprocess.run(cmd)
            if p.returncode:
                raise click.ClickException(f"mpremote failed with exit code {p.returncode}")
        if not dry_run:
            click.echo(f"deployed devagent board agent to {port} (device {device_id})")
    finally:
        if tmp is not None:
            tmp.cleanup()


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)
