"""The TPM backend's connection lifecycle against a real TPM 2.0 simulator (swtpm on loopback).

No TPM connection may outlive the keystore that opened it: a daemon, the CLM or ``coap serve`` open keystores
(and unseal master keys) again and again, and each leaked connection holds an fd of /dev/tpmrm0, one of tabrmd's
few connections (27 by default), a socket, or, with the ``cmd`` TCTI, a child process. The ``swtpm`` TCTI itself
connects per command, so these tests reach swtpm through tpm2-tss's ``cmd`` TCTI (``cmd:tpm2_send
--tcti=swtpm:...``, the form tpm2-tss documents), which holds a child process and two pipes for as long as the
connection is open: what the process holds is then visible in /proc/self.
"""
from __future__ import annotations

import contextlib
import gc
import os
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from keystore import fsutil
from keystore.backends.tpm import TpmUnavailableError
from keystore.store import Keystore
from tests.peers.tpm import SWTPM_HINT, free_port_pair, require_binary, swtpm, tpm_options  # noqa: F401

pytestmark = pytest.mark.peer

ROUNDS = 4
ECDSA = ec.ECDSA(hashes.SHA256())


def held() -> tuple[int, frozenset[str]]:
    """What a ``cmd`` TCTI connection holds in this process: pipe fds and ``tpm2_send`` child processes (only
    these, so that sockets and threads of other peers running in the same test process do not count)."""
    fsutil.drain_closes()  # the keystore's deferred closes (fsutil.close_later) are not TPM connections
    pipes = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd of the listdir itself is gone by now
            pipes += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
    kids = set()
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
            kids.update(f.read().split())
    senders = set()
    for pid in kids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"tpm2_send" in f.read():  # the cmd TCTI runs it through sh -c
                senders.add(pid)
    return pipes, frozenset(senders)


@pytest.fixture
def cmd_tcti(tpm_options):  # noqa: F811
    require_binary("tpm2_send", SWTPM_HINT)
    return {"tcti": f"cmd:tpm2_send --tcti={tpm_options['tcti']}"}


def use_tpm_key(tmp_path: Path, name: str, opts: dict) -> Keystore:
    """A new keystore that generates a TPM key and signs with it twice (load, saved context)."""
    ks = Keystore.init(tmp_path / name, backend_options={"tpm": opts})
    uri = ks.generate_key("p256", backend="tpm", label=name)
    key = ks.private_key(uri)
    for data in (b"first", b"second"):
        key.public_key().verify(key.sign(data, ECDSA), data, ECDSA)
    return ks


def test_closed_keystores_release_their_tpm_connection(tmp_path, cmd_tcti):
    use_tpm_key(tmp_path, "warm", cmd_tcti).close()  # libraries loaded, caches filled
    before = held()
    for i in range(ROUNDS):
        use_tpm_key(tmp_path, f"ks{i}", cmd_tcti).close()
    assert held() == before, f"{ROUNDS} opened and closed TPM keystores left fds / child processes behind"


def test_dropped_keystore_releases_its_tpm_connection(tmp_path, cmd_tcti):
    use_tpm_key(tmp_path, "warm", cmd_tcti).close()
    before = held()
    for i in range(ROUNDS):
        ks = use_tpm_key(tmp_path, f"ks{i}", cmd_tcti)
        del ks  # never closed: the connection goes with the last reference
    gc.collect()
    assert held() == before


def test_failed_tpm_use_releases_the_connection_at_once(tmp_path, cmd_tcti):
    use_tpm_key(tmp_path, "warm", cmd_tcti).close()
    dead = {"tcti": f"cmd:tpm2_send --tcti=swtpm:host=127.0.0.1,port={free_port_pair()}"}  # nothing listens
    ks = Keystore.init(tmp_path / "dead", backend_options={"tpm": dead})
    before = held()
    for _ in range(ROUNDS):
        with pytest.raises(TpmUnavailableError, match="TPM not reachable via TCTI 'cmd:tpm2_send"):
            ks.generate_key("p256", backend="tpm", label="x")
        assert held() == before, "a TPM connection that failed stays open until the keystore is closed"
    assert not list((tmp_path / "dead").glob("tpm/*")) and not ks.list()
    ks.close()


def test_unsealing_the_master_key_releases_its_connection(tmp_path, cmd_tcti):
    root = tmp_path / "sealed"
    ks = Keystore.init(root, backend_options={"tpm": cmd_tcti})
    soft = ks.generate_key("p256", backend="soft", label="soft")
    ks.seal_master_key("tpm")
    ks.close()
    before = held()
    for _ in range(ROUNDS):
        ks = Keystore.open(root, backend_options={"tpm": cmd_tcti})
        ks.private_key(soft).sign(b"data", ECDSA)  # decrypting the software key unseals the master key
        ks.close()
    assert held() == before, "each unseal of the sealed master key left a TPM connection open"


def test_close_waits_for_a_key_operation_in_progress(tmp_path, tpm_options):  # noqa: F811
    """Closing the backend (Keystore.close from another thread, a lost connection) never cuts off a signature:
    every signature made while another thread keeps closing the connection verifies."""
    ks = Keystore.init(tmp_path / "ks", backend_options={"tpm": tpm_options})
    try:
        key = ks.private_key(ks.generate_key("p256", backend="tpm", label="k"))
        backend = ks.backend("tpm")
        done = threading.Event()
        errors: list[BaseException] = []

        def closer():
            while not done.is_set():
                backend.close()

        t = threading.Thread(target=closer, daemon=True)
        t.start()
        try:
            for i in range(8):
                data = b"%d" % i
                try:
                    key.public_key().verify(key.sign(data, ECDSA), data, ECDSA)
                except BaseException as e:  # noqa: BLE001 - collected and reported below
                    errors.append(e)
        finally:
            done.set()
            t.join(30)
        assert not errors, errors
    finally:
        ks.close()
