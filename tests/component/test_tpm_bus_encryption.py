"""The keystore master key crosses the TPM bus only encrypted.

A TCP relay between the TSS (TCTI ``swtpm:``) and swtpm records every byte in both directions, as a probe on the
SPI bus of a TPM HAT would. Sealing (TPM2_Create) and unsealing (TPM2_Unseal) the master key must never show it in
the capture. A control run unseals the same blob without the encrypted session and must show it, which proves the
capture sees what a probe would.
"""
from __future__ import annotations

import socket
import threading

from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.tsskey import TSSPrivKey

from keystore.backends import tpm as tpm_backend
from keystore.store import Keystore
from tests.peers.tpm import free_port_pair, swtpm  # noqa: F401  (pytest fixture)


class BusProbe:
    """Relay 127.0.0.1:P (commands) and P+1 (control) to swtpm's ports; ``captured`` holds all traffic."""

    def __init__(self, target_host: str, target_port: int):
        self.port = free_port_pair()
        self.captured = bytearray()
        self._lock = threading.Lock()
        self._listeners = []
        for off in (0, 1):
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", self.port + off))
            ls.listen(8)
            self._listeners.append(ls)
            threading.Thread(target=self._accept, args=(ls, (target_host, target_port + off)), daemon=True).start()

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def _accept(self, ls, target):
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            upstream = socket.create_connection(target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def take(self) -> bytes:
        with self._lock:
            out, self.captured = bytes(self.captured), bytearray()
        return out

    def close(self):
        for ls in self._listeners:
            ls.close()


def test_master_key_never_crosses_the_bus_in_clear(tmp_path, swtpm):  # noqa: F811
    swtpm.flush_all()
    probe = BusProbe(swtpm.host, swtpm.port)
    try:
        opts = {"tpm": {"tcti": probe.tcti}}
        root = tmp_path / "ks"
        ks = Keystore.init(root, backend_options=opts)
        master = ks._master_key()  # the secret that gets sealed
        assert len(master) >= 32
        soft_uri = ks.import_key(ec.generate_private_key(ec.SECP256R1()), label="app")
        probe.take()
        tpm_backend.move_master_key_to_tpm(ks)  # TPM2_Create with the secret + a test TPM2_Unseal
        ks.close()
        sealing = probe.take()
        ks2 = Keystore.open(root, backend_options=opts)
        ks2.private_key(soft_uri)  # unseals the master key to decrypt the software key
        ks2.close()
        unsealing = probe.take()
        assert len(sealing) > 500 and len(unsealing) > 200  # the probe saw the TPM traffic
        assert master not in sealing, "master key visible on the bus while sealing"
        assert master not in unsealing, "master key visible on the bus while unsealing"

        # Control: the same blob unsealed with a plain password session shows the secret to the probe.
        tss = TSSPrivKey.from_pem((root / "master.tss").read_bytes())
        tpm = tpm_backend._Tpm({"tcti": probe.tcti})
        try:
            with tpm.session("control unseal") as ectx:
                tr = tss.load(ectx)
                try:
                    assert bytes(ectx.unseal(tr)) == master
                finally:
                    ectx.flush_context(tr)
        finally:
            tpm.close()
        assert master in probe.take()
    finally:
        probe.close()
