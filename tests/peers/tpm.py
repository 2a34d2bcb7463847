"""A real TPM 2.0 for tests: swtpm on loopback, reusable by every suite that needs a TPM-backed key.

Plain helpers (usable outside pytest)::

    with swtpm_server() as tpm:          # starts swtpm, flushes all transient contexts, stops it on exit
        tpm.tcti                         # "swtpm:host=127.0.0.1,port=P"
        tpm.options                      # {"tcti": ...}: Keystore(root, backend_options={"tpm": tpm.options})
        tpm.flush_all()                  # flush transient/loaded/saved sessions (swtpm holds ~3 objects)
        tpm.evict_persistent(0x81010001) # remove a persistent handle if present

Pytest fixtures (import them into a test module or conftest: ``from tests.peers.tpm import swtpm, tpm_options``):

- ``swtpm``        session-scoped running simulator (``SwtpmServer``); flushes all contexts at start.
- ``tpm_options``  function-scoped: flushes transient objects, returns ``{"tcti": ...}`` for the keystore.

A missing ``swtpm`` binary is a test *failure* naming the apt-get command, never a skip: CI must have it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

SWTPM_HINT = "apt-get install -y swtpm swtpm-tools libtss2-tcti-swtpm0 tpm2-tools"
START_TIMEOUT_S = 10.0


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P such that P and P+1 are both free on ``host`` (swtpm's server and control ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            p = s.getsockname()[1]
        if p >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind((host, p))
                b.bind((host, p + 1))
        except OSError:
            continue
        return p
    raise RuntimeError("no two consecutive free TCP ports on loopback")


def require_binary(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; CI needs it: {hint}", pytrace=False)
    return path


class SwtpmServer:
    """A running ``swtpm socket`` bound to 127.0.0.1; ``tcti`` is what the keystore's TPM backend takes."""

    def __init__(self, state_dir: str, port: int, proc: subprocess.Popen, log_path: str):
        self.state_dir = state_dir
        self.port = port
        self.proc = proc
        self.log_path = log_path
        self.host = "127.0.0.1"

    @property
    def tcti(self) -> str:
        return f"swtpm:host={self.host},port={self.port}"

    @property
    def options(self) -> dict:
        return {"tcti": self.tcti}

    def esapi(self):
        """A new ESAPI context on this simulator (caller closes it; given the TCTI as a string, ESAPI loads the
        TCTI itself and its ``close`` finalizes both)."""
        from tpm2_pytss import ESAPI

        return ESAPI(self.tcti)

    def flush_all(self) -> None:
        """Flush every loaded transient object and session so tests start with a free TPM."""
        from tpm2_pytss.constants import TPM2_CAP, TPM2_HR

        with contextlib.closing(self.esapi()) as ectx:
            for first in (TPM2_HR.TRANSIENT, TPM2_HR.HMAC_SESSION, TPM2_HR.POLICY_SESSION):
                _, data = ectx.get_capability(TPM2_CAP.HANDLES, first, 64)
                for h in list(data.data.handles):
                    if (h & 0xFF000000) != first:
                        continue
                    with contextlib.suppress(Exception):
                        ectx.flush_context(ectx.tr_from_tpmpublic(h))

    def persistent_handles(self) -> list[int]:
        from tpm2_pytss.constants import TPM2_CAP, TPM2_HR

        with contextlib.closing(self.esapi()) as ectx:
            _, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HR.PERSISTENT, 64)
            return [int(h) for h in data.data.handles]

    def evict_persistent(self, handle: int) -> None:
        from tpm2_pytss.constants import ESYS_TR

        if handle not in self.persistent_handles():
            return
        with contextlib.closing(self.esapi()) as ectx:
            tr = ectx.tr_from_tpmpublic(handle)
            ectx.evict_control(ESYS_TR.RH_OWNER, tr, handle)

    def make_persistent_key(self, handle: int, key_type: str = "p256") -> None:
        """Create a signing key under the standard storage primary and make it persistent at ``handle``.

        This is what a manufacturer does before issuing the IDevID certificate (see docs/hardware-keys.md,
        which gives the same steps with tpm2-tools).
        """
        from tpm2_pytss.constants import ESYS_TR, TPM2_ECC
        from tpm2_pytss.tsskey import TSSPrivKey

        self.evict_persistent(handle)
        with contextlib.closing(self.esapi()) as ectx:
            if key_type.startswith("rsa"):
                k = TSSPrivKey.create_rsa(ectx, keyBits=int(key_type[3:]))
            else:
                k = TSSPrivKey.create_ecc(ectx, {"p256": TPM2_ECC.NIST_P256, "p384": TPM2_ECC.NIST_P384}[key_type])
            tr = k.load(ectx)
            try:
                ectx.evict_control(ESYS_TR.RH_OWNER, tr, handle)
            finally:
                ectx.flush_context(tr)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _wait_ready(host: str, port: int, proc: subprocess.Popen, log_path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"swtpm exited with status {proc.returncode}: {open(log_path).read()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"swtpm did not listen on {host}:{port} within {START_TIMEOUT_S} s")


@contextlib.contextmanager
def swtpm_server(state_dir: str | None = None):
    """Start swtpm (TPM 2.0, TCP on 127.0.0.1, free ports), yield a ``SwtpmServer``, stop it on exit."""
    binary = shutil.which("swtpm")
    if binary is None:
        raise FileNotFoundError(f"swtpm is not installed: {SWTPM_HINT}")
    os.environ.setdefault("TSS2_LOG", "all+NONE")  # harmless ESYS lookup errors would flood stderr
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="swtpm-"))
        log_path = os.path.join(state_dir, "swtpm.log")
        last = None
        for _ in range(5):
            port = free_port_pair()
            cmd = [binary, "socket", "--tpm2",
                   "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                   "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                   "--tpmstate", f"dir={state_dir}", "--flags", "not-need-init,startup-clear",
                   "--log", f"file={log_path},level=1"]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT)
            try:
                _wait_ready("127.0.0.1", port, proc, log_path)
            except RuntimeError as e:  # lost the port race: try another pair
                last = e
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                continue
            server = SwtpmServer(state_dir, port, proc, log_path)
            stack.callback(server.stop)
            server.flush_all()
            yield server
            return
        raise RuntimeError(f"could not start swtpm: {last}")


@pytest.fixture(scope="session")
def swtpm():
    """Session-scoped swtpm; a missing binary fails the test with the apt-get command."""
    require_binary("swtpm", SWTPM_HINT)
    with swtpm_server() as server:
        yield server


@pytest.fixture
def tpm_options(swtpm):
    """Backend options for ``Keystore(..., backend_options={"tpm": tpm_options})`` on a freshly flushed TPM."""
    swtpm.flush_all()
    yield dict(swtpm.options)
    swtpm.flush_all()
