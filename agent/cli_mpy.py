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
import select
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


class RejectedError(BridgeError):
    """The host's pre-verification refused the upstream's certificate; nothing was sent to the board."""


class LinkError(BridgeError):
    """The serial link failed: ``kind`` is "stuck" (the board stopped reading our request), "no-reply" (the
    request was sent in full, no answer within the timeout), "closed" (the board closed the port: process exited,
    USB unplugged) or "io" (the port reported an error, or could not be opened). ``port`` names the port."""

    def __init__(self, port: str, kind: str, message: str):
        super().__init__(f"{port}: {message}")
        self.port = port
        self.kind = kind
        self.detail = message


class BoardError(BridgeError):
    """The board answered ERR to ``request``: ``code`` (CoAP-style, "4.03"), ``reason`` (as in CoAP diagnostics),
    ``message``."""

    def __init__(self, code: str, message: str, reason: str = "unknown", request: str = "?"):
        super().__init__(f"board refused {request} ({code} {reason}): {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.request = request


RX_LIMIT = 4 * (0xFFFF + 14)  # bytes kept that the board sent while we were writing (four largest frames)
RX_CHUNK = 65536  # bytes read at once


def _port_name(port) -> str:
    for attr in ("port", "name"):
        v = getattr(port, attr, None)
        if isinstance(v, str) and v:
            return v
    return "the board's port"


class BoardLink:
    """Request/response with the board over an open serial port; every wait is bounded.

    ``port`` is an open pyserial port (a device, a pty, any pyserial URL) or anything with read/write.
    Where the port has a file descriptor (POSIX serial devices and ptys, ``socket://``) the link does its own
    non-blocking I/O with ``poll()``: pyserial waits in ``select()``, which fails with ValueError once the
    descriptor is >= FD_SETSIZE (1024, e.g. in a long-running process), and its ``write()`` without a
    ``write_timeout`` retries EAGAIN forever. Other ports (``loop://``, ``rfc2217://``) go through pyserial in
    chunks, each written with ``write_timeout`` set to the time left (where the port supports one).
    Either way, while a request is being written the link keeps reading what the board sends (so a board that
    is blocked writing to us can go back to reading), keeping at most ``RX_LIMIT`` bytes of it for the reply.
    A request that cannot be written by its deadline raises ``LinkError`` ("stuck"): the board drops an
    incomplete frame, so nothing is stored on it.
    """

    WRITE_CHUNK = 256  # pyserial path: bytes per write() between reads

    def __init__(self, port, timeout_s: float = 10.0, name: str | None = None):
        self.port = port
        self.name = name or _port_name(port)
        self.timeout_s = timeout_s
        self._seq = int(time.monotonic()) % 1000 * 1000
        self._rx = bytearray()
        self._deadline = 0.0  # of the request in progress; the frame reader's reads wait until then
        self._got = 0  # bytes received during the current request
        self._dropped = 0  # of them, dropped unread because the board sent more than RX_LIMIT while we wrote
        self._corrupt = ""  # the board's last complaint about a corrupt frame (ERR seq 0) during it
        self._fd = None
        try:
            fd = port.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
            fd = None
        self._write_timeout_ok = True  # rfc2217:// refuses any write_timeout (NotImplementedError)
        if isinstance(fd, int) and fd >= 0 and hasattr(select, "poll"):
            self._fd = fd
            os.set_blocking(fd, False)
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)
        else:
            try:
                port.write_timeout = timeout_s
            except (AttributeError, NotImplementedError, ValueError):
                self._write_timeout_ok = False
        self._reader = frame.FrameReader(self._pull, max_body=0xFFFF, chunk=4096)

    # ---- byte level ----

    def _closed(self, cause=None) -> LinkError:
        why = f" ({cause})" if cause else ""
        return LinkError(self.name, "closed", f"the board closed the connection{why}: its agent exited, it was "
                                              "reset or unplugged")

    def _io_error(self, e: Exception) -> LinkError:
        return LinkError(self.name, "io", f"serial I/O failed: {type(e).__name__}: {e}")

    def _wait(self, deadline: float, events: int) -> int:
        """poll() the descriptor until an event or the deadline; 0 on timeout."""
        left = deadline - time.monotonic()
        if left <= 0:
            return 0
        self._poll.modify(self._fd, events)
        try:
            ready = self._poll.poll(max(1, int(left * 1000 + 0.999)))
        except InterruptedError:
            return 0
        ev = ready[0][1] if ready else 0
        if ev & select.POLLNVAL:
            raise LinkError(self.name, "io", "the port's descriptor was closed under the link")
        if ev & (select.POLLERR | select.POLLHUP) and not ev & select.POLLIN:  # pending data is read first
            raise self._closed()
        return ev

    def _read_now(self, n: int) -> bytes:
        """What can be read without waiting (at most n bytes)."""
        if self._fd is not None:
            try:
                data = os.read(self._fd, n)
            except BlockingIOError:
                return b""
            except OSError as e:  # a pty whose other side is gone answers EIO
                raise self._closed(e) from e
            if not data:
                raise self._closed()
            self._got += len(data)
            return data
        try:
            waiting = self.port.in_waiting
            data = self.port.read(min(n, waiting)) if waiting else b""
        except (OSError, ValueError) as e:  # SerialException is an OSError
            raise self._io_error(e) from e
        self._got += len(data)
        return data

    def _recv(self, n: int, deadline: float) -> bytes:
        """Up to n bytes, waiting until the deadline at most; b"" when nothing came."""
        if self._fd is not None:
            if not self._wait(deadline, select.POLLIN):
                return b""
            return self._read_now(n)
        left = deadline - time.monotonic()
        if left <= 0:
            return b""
        try:
            wait = min(left, 0.2)
            if self.port.timeout != wait:  # pyserial reconfigures the port on every change
                self.port.timeout = wait
            waiting = getattr(self.port, "in_waiting", 0)
            data = self.port.read(max(1, min(n, waiting)))
        except (OSError, ValueError) as e:
            raise self._io_error(e) from e
        self._got += len(data)
        return data

    def _keep(self, data: bytes) -> None:
        self._rx += data
        if len(self._rx) > RX_LIMIT:  # a flooding board: keep the newest (the reader resynchronises on "~")
            self._dropped += len(self._rx) - RX_LIMIT
            del self._rx[:len(self._rx) - RX_LIMIT]

    def _pull(self, n: int) -> bytes:
        """The frame reader's source: what was kept, else what comes by the request's deadline (b"" then).

        Reads what is there in one go and hands it out as asked (the reader asks for 1 byte while it looks for a
        frame start), so a loaded host does one poll() and read() per burst, not per byte."""
        if not self._rx:
            self._rx += self._recv(RX_CHUNK, self._deadline)
        data = bytes(self._rx[:n])
        del self._rx[:n]
        return data

    def _send(self, data: bytes, deadline: float, what: str) -> None:
        start = time.monotonic()
        sent = 0
        while sent < len(data):
            if self._fd is not None:
                ev = self._wait(deadline, select.POLLIN | select.POLLOUT)
                if ev & select.POLLIN:
                    self._keep(self._read_now(RX_CHUNK))
                if ev & select.POLLOUT:
                    try:
                        sent += os.write(self._fd, data[sent:])
                    except BlockingIOError:
                        time.sleep(0.001)
                    except OSError as e:
                        raise self._closed(e) from e
                    continue
            else:
                left = deadline - time.monotonic()
                if left > 0:
                    try:
                        if self._write_timeout_ok:
                            self.port.write_timeout = left
                        chunk = data[sent:sent + self.WRITE_CHUNK]
                        n = self.port.write(chunk)
                        sent += len(chunk) if n is None else n
                        self._keep(self._read_now(RX_CHUNK))
                        continue
                    except (OSError, ValueError) as e:  # SerialTimeoutException is a SerialException
                        if "timeout" not in str(e).lower():
                            raise self._io_error(e) from e
            if time.monotonic() >= deadline:
                raise LinkError(self.name, "stuck",
                                f"the board stopped reading: {sent} of {len(data)} bytes of the {what} request "
                                f"written in {time.monotonic() - start:.1f} s (the board drops an incomplete "
                                f"request, nothing was stored)")

    def send_raw(self, data: bytes, timeout_s: float | None = None) -> None:
        """Write bytes to the board within ``timeout_s`` (default: the link's), reading what it sends meanwhile.

        Raises:
            LinkError: the board did not take the bytes in time ("stuck"), or the port failed.
        """
        self._send(bytes(data), time.monotonic() + (timeout_s or self.timeout_s), "raw")

    def call(self, kind: str, payload: bytes = b"", timeout_s: float | None = None) -> tuple[str, bytes]:
        """Send one request and wait for the reply with the same sequence number, all within the timeout.

        Raises:
            BoardError: the board answered ERR for this request.
            LinkError: the request could not be written in time, no reply came in time, or the port failed.
        """
        return self._exchange(kind, payload, timeout_s)

    def _exchange(self, kind, payload, timeout_s, earlier=()) -> tuple[str, bytes]:
        """``call``; a reply to one of the ``earlier`` sequence numbers (the same request sent before) counts."""
        self._seq += 1
        seq = self._seq
        timeout_s = timeout_s or self.timeout_s
        start = time.monotonic()
        self._deadline = start + timeout_s
        self._got, self._dropped, self._corrupt = 0, 0, ""
        self._send(frame.encode(kind, seq, payload), self._deadline, kind)
        while time.monotonic() < self._deadline:
            try:
                rkind, rseq, rpayload = self._reader.read()
            except frame.FrameError:
                continue  # line noise: keep waiting for our reply
            except frame.FrameTimeout:
                continue
            if rseq != seq and rseq not in earlier:
                if rseq == 0 and rkind == "ERR":  # the board could not parse a frame: maybe ours
                    self._corrupt = _err_text(rpayload)
                continue  # a late reply to an earlier attempt, or an ERR for a corrupt frame
            if rkind == "ERR":
                try:
                    err = json.loads(rpayload)
                except ValueError:
                    raise BoardError("?", rpayload[:200].decode(errors="replace"), request=kind) from None
                if not isinstance(err, dict):
                    raise BoardError("?", str(err)[:200], request=kind)
                raise BoardError(str(err.get("code")), str(err.get("message", err.get("error")))[:500],
                                 str(err.get("error", "unknown"))[:64], request=kind)
            return rkind, rpayload
        seen = ""
        if self._corrupt:
            seen = f"; the board reported a corrupt frame ({self._corrupt})"
        elif self._got:
            seen = (f"; {self._got} bytes came from the board meanwhile, none of them the reply (other output on "
                    f"this port: a REPL, log lines?)")
        if self._dropped:
            seen += f" ({self._dropped} bytes of it dropped unread while the request was written)"
        raise LinkError(self.name, "no-reply", f"no reply from the board to {kind} within {timeout_s:g} s{seen}")

    def hello(self, wait_s: float = 15.0) -> dict:
        """Ping until the board's agent answers (it may still be booting): one HELLO per second at most.

        Raises:
            LinkError: no answer within ``wait_s`` (or the port failed); BoardError, BridgeError.
        """
        deadline = time.monotonic() + wait_s
        last: LinkError | None = None
        sent: list[int] = []  # a late answer to an earlier HELLO is as good (a slow, loaded board)
        while time.monotonic() < deadline:
            try:
                _, payload = self._exchange("HELLO", b"", min(1.0, max(0.1, deadline - time.monotonic())),
                                            tuple(sent))
            except LinkError as e:
                if e.kind != "no-reply":
                    raise
                last = e
                sent.append(self._seq)
                continue
            try:
                info = json.loads(payload)
            except ValueError:
                info = None
            if not isinstance(info, dict):
                raise BridgeError(f"{self.name}: the board answered HELLO with {payload[:80]!r}, not a JSON object: "
                                  f"is it running the devagent agent?")
            return info
        raise LinkError(self.name, "no-reply", f"the board's agent did not answer HELLO within {wait_s:g} s "
                                               f"({last.detail if last else 'no attempt'}): is the board running "
                                               f"the devagent agent (main.py: run.serial_main)?")


def _err_text(payload: bytes) -> str:
    try:
        err = json.loads(payload)
        return f"{err.get('code')} {err.get('error')}: {err.get('message')}"[:200]
    except (ValueError, AttributeError):
        return payload[:120].decode(errors="replace")


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
        raise RejectedError("upstream returned no certificate; nothing was sent to the board")
    leaf = certs[0]
    if leaf.public_key() != csr.public_key():
        raise RejectedError("upstream returned a certificate for another key; nothing was sent to the board")
    if ca_cert is not None:
        policy = Policy.for_purpose("clm-preverify", datetime.datetime.now(datetime.timezone.utc), min_rsa_bits=1024)
        try:
            validate(leaf, certs[1:], [ca_cert], policy, public_key=csr.public_key(), what="board certificate")
        except VerificationError as e:
            raise RejectedError(f"the certificate does not pass pre-verification against the trust anchor given "
                                f"with --ca-cert: {e}; nothing was sent to the board") from None


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
        LinkError (the board stopped reading, did not answer in time, or the port failed), BoardError (the
        board refused), RejectedError (host pre-verification), UpstreamError, BridgeError (the board answered
        wrongly); errors of a custom enroll strategy propagate unchanged.
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
    try:
        _, answer = link.call("CERT", payload, timeout_s=max(link.timeout_s, 30))
    except LinkError as e:
        if e.kind != "no-reply":
            raise  # stuck or closed before the frame was complete: the board dropped it
        raise LinkError(e.port, e.kind, f"{e.detail}; the certificate was sent in full, so the board may have "
                                        f"stored it: the next bridge run shows the board's generation") from e
    try:
        info = json.loads(answer)
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise BridgeError(f"{link.name}: the board answered CERT with {answer[:80]!r} ({e})") from None
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

def exit_status(e: BridgeError) -> tuple[int, str]:
    """The exit code (README "Exit codes") and the label for a bridge failure."""
    from agent.cli import EXIT_INTERNAL, EXIT_NETWORK, EXIT_REJECTED, EXIT_SERVER, classify

    if isinstance(e, LinkError):
        return EXIT_NETWORK, "board link error"
    if isinstance(e, RejectedError):
        return EXIT_REJECTED, "certificate rejected"
    if isinstance(e, BoardError):
        return (EXIT_REJECTED, "certificate rejected by the board") if e.request == "CERT" else \
            (EXIT_SERVER, "the board refused")
    if isinstance(e, UpstreamError):  # as `devagent enroll` would exit: network 6, rejected 4, refused 5
        code, label = classify(e.__cause__) if e.__cause__ is not None else (EXIT_INTERNAL, "")
        return (code, label) if code != EXIT_INTERNAL else (EXIT_SERVER, "enrollment failed")
    return EXIT_SERVER, "the board answered wrongly"


def _fail(e: BridgeError):
    code, label = exit_status(e)
    click.echo(f"devagent: {label}: {e}", err=True)
    sys.exit(code)


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
@click.option("--timeout", "timeout_s", default=10.0, show_default=True,
              help="Seconds per board request (writing it and waiting for the answer; CSR and CERT: at least 30).")
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
        # BoardLink bounds every write: poll() on the descriptor, else pyserial's write_timeout
        ser = pyserial.serial_for_url(port, baudrate=baud, timeout=0.2)
    except (pyserial.SerialException, ValueError) as e:
        _fail(LinkError(port, "io", f"cannot open the port: {e}"))
    try:
        info = run_bridge(BoardLink(ser, timeout_s, name=port), enroll, anchor, cn, serial, san, new_key, push_ca)
    except BridgeError as e:
        _fail(e)
    except Exception as e:  # a strategy's own error: one clear line, no traceback
        if type(e).__name__.endswith("Error"):
            err = UpstreamError(f"upstream enrollment failed: {e}")
            err.__cause__ = e  # its exit code is the cause's (network 6, rejected 4, refused 5)
            _fail(err)
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
