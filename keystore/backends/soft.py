"""Software keys: PKCS#8 encrypted (PBES2/AES-256) with the keystore master key, files 0600.

URI: ``file:keys/<id>.key``, relative to the keystore directory so the keystore can be moved as a whole.
"""
from __future__ import annotations

import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from keystore import fsutil
from keystore.backends import KeyBackend
from keystore.certs import load_private_key
from keystore.errors import CorruptFileError, KeyBackendError, NotFoundError
from keystore.keytypes import generate_software_key

KEY_DIR = "keys"


class Backend(KeyBackend):
    scheme = "file"
    exportable = True

    def _path(self, uri: str) -> Path:
        # Checked by name, not resolved: a symlink in keys/ is refused when opened (O_NOFOLLOW), never followed.
        d, sep, name = uri.partition(":")[2].partition("/")
        if d != KEY_DIR or not sep or not name or "/" in name or name.startswith("."):
            raise KeyBackendError(f"key URI {uri!r} points outside the keystore's {KEY_DIR}/ directory")
        return Path(self.ctx.root) / KEY_DIR / name

    def _encrypt(self, key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.BestAvailableEncryption(self.ctx.master_key))

    def _store(self, key, label: str) -> str:
        fsutil.ensure_dir(Path(self.ctx.root) / KEY_DIR)
        name = f"{secrets.token_hex(8)}.key"
        fsutil.atomic_write(Path(self.ctx.root) / KEY_DIR / name, self._encrypt(key))
        return f"file:{KEY_DIR}/{name}"

    def generate(self, key_type: str, label: str) -> str:
        return self._store(generate_software_key(key_type), label)

    def import_key(self, private_key, label: str) -> str:
        return self._store(private_key, label)

    def load(self, uri: str):
        p = self._path(uri)
        try:
            data = fsutil.read_private(p, "private key file")
        except FileNotFoundError:
            raise NotFoundError(f"private key {uri} is missing ({p})") from None
        try:
            # Our own encrypted key: RSA validation was done when it was generated or imported.
            return load_private_key(data, str(p), self.ctx.master_key, trusted=True)
        except CorruptFileError as e:
            raise CorruptFileError(f"{e} — the key file is corrupt or was not encrypted with this keystore's "
                                   "master key") from e

    def delete(self, uri: str) -> None:
        fsutil.secure_delete(self._path(uri))

    def export_pem(self, uri: str, password: bytes | None) -> bytes:
        enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        return self.load(uri).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)

    def key_file(self, uri: str):
        return str(self._path(uri)), self.ctx.master_key
