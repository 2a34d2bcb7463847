"""Software keys: PKCS#8 ``EncryptedPrivateKeyInfo`` (PBES2, AES-256-CBC) under the keystore master key, files 0600.

URI: ``file:keys/<id>.key``, relative to the keystore directory so the keystore can be moved as a whole.

The password is the keystore's master key: 256 random bits (``secrets.token_hex(32)``), or the same sealed by the
TPM — never a person's password. Key stretching protects low-entropy passwords and adds nothing against a search
of 2**256, so new key files use PBKDF2-HMAC-SHA256 with one iteration (``_encrypt``) instead of OpenSSL's 2048,
which cost ~0.3 ms on every key generation and load on the CI host (several ms on a Pi Zero). The file is standard
PKCS#8 (RFC 5958, PBES2 of RFC 8018): OpenSSL and ``cryptography`` read it with the same password, and files of
earlier versions (2048 iterations) load unchanged. ``cryptography`` offers no iteration count for PKCS#8, so the
few DER bytes of the container are put together here; the primitives (PBKDF2, AES) are ``cryptography``'s.

Keys generated, imported or loaded by this backend object stay in its memory (``load`` and ``public_key`` do not
decrypt again); ``delete`` forgets them.
"""
from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from keystore import fsutil
from keystore.backends import KeyBackend, NewKey
from keystore.certs import load_private_key
from keystore.errors import CorruptFileError, KeyBackendError, NotFoundError, StorageError
from keystore.keytypes import generate_software_key

KEY_DIR = "keys"
PBKDF2_ITERATIONS = 1  # see the module docstring: the password is a 256-bit random key

# DER of the fixed parts of EncryptedPrivateKeyInfo (RFC 5958 §3) with PBES2 (RFC 8018 A.4, A.2, B.2.5, B.1.2).
_OID_PBES2 = bytes.fromhex("06092a864886f70d01050d")  # 1.2.840.113549.1.5.13
_OID_PBKDF2 = bytes.fromhex("06092a864886f70d01050c")  # 1.2.840.113549.1.5.12
_ALG_HMAC_SHA256 = bytes.fromhex("300c06082a864886f70d02090500")  # {hmacWithSHA256, NULL}
_OID_AES256_CBC = bytes.fromhex("060960864801650304012a")  # 2.16.840.1.101.3.4.1.42


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(octets)]) + octets
    return bytes([tag]) + length + body


def _integer(v: int) -> bytes:
    return _tlv(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big"))


def encrypt_pkcs8(key, password: bytes, iterations: int = PBKDF2_ITERATIONS) -> bytes:
    """PEM ``ENCRYPTED PRIVATE KEY`` of ``key`` under ``password``: PBES2 with PBKDF2-HMAC-SHA256 and AES-256-CBC."""
    plain = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    salt, iv = os.urandom(16), os.urandom(16)
    kek = PBKDF2HMAC(hashes.SHA256(), 32, salt, iterations).derive(password)
    padder = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES(kek), modes.CBC(iv)).encryptor()
    ct = enc.update(padder.update(plain) + padder.finalize()) + enc.finalize()
    kdf = _tlv(0x30, _OID_PBKDF2 + _tlv(0x30, _tlv(0x04, salt) + _integer(iterations) + _ALG_HMAC_SHA256))
    scheme = _tlv(0x30, _OID_AES256_CBC + _tlv(0x04, iv))
    alg = _tlv(0x30, _OID_PBES2 + _tlv(0x30, kdf + scheme))
    der = _tlv(0x30, alg + _tlv(0x04, ct))
    b64 = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n" + lines + b"\n-----END ENCRYPTED PRIVATE KEY-----\n"


class Backend(KeyBackend):
    scheme = "file"
    exportable = True

    def __init__(self, context):
        super().__init__(context)
        self._keys: dict[str, object] = {}  # uri -> private key object (see the module docstring)
        self._keydir_ok = False  # keys/ was made or checked by this object (see _prepared)

    def _path(self, uri: str) -> Path:
        # Checked by name, not resolved: a symlink in keys/ is refused when opened (O_NOFOLLOW), never followed.
        d, sep, name = uri.partition(":")[2].partition("/")
        if d != KEY_DIR or not sep or not name or "/" in name or name.startswith("."):
            raise KeyBackendError(f"key URI {uri!r} points outside the keystore's {KEY_DIR}/ directory")
        return Path(self.ctx.root) / KEY_DIR / name

    def _encrypt(self, key) -> bytes:
        return encrypt_pkcs8(key, self.ctx.master_key)

    def _store(self, key, label: str) -> str:
        nk = self._prepared(key)
        nk.keep()
        return nk.uri

    def _prepared(self, key) -> NewKey:
        uri = self.new_uri()
        nk: NewKey

        def stage():
            # The encrypted key under a temp name (.<id>.key.<random>.tmp), written before the record that names
            # the key and fsynced in the same batch as the record's index write (Keystore.generate_key). A temp
            # file names no key: a crash leaves garbage that gc securely deletes. keys/ is made (or its mode
            # tightened) once per backend object, and again if it has gone since (a wipe).
            data = self._encrypt(key)
            if not self._keydir_ok:
                fsutil.ensure_dir(Path(self.ctx.root) / KEY_DIR)
                self._keydir_ok = True
            try:
                return fsutil.stage_file(self._path(uri), data)
            except StorageError as e:
                if not isinstance(e.__cause__, FileNotFoundError):
                    raise
            fsutil.ensure_dir(Path(self.ctx.root) / KEY_DIR)
            return fsutil.stage_file(self._path(uri), data)

        def keep(sync_first=(), meanwhile=None):
            # sync_first (the index, whose record names this key): its directory is fsynced before the key file
            # gets its name — together with the key's temp file when it was not staged (fsynced) already.
            # meanwhile (staged only: NewKey.keep): runs while keys/ is fsynced after the rename; it may load the
            # key (from memory).
            if nk.staged is not None:
                self._keys[uri] = key
                try:
                    return nk.staged.commit(sync_first=sync_first, meanwhile=meanwhile)
                except BaseException:
                    self._keys.pop(uri, None)
                    raise
            fsutil.ensure_dir(Path(self.ctx.root) / KEY_DIR)
            fsutil.atomic_write(self._path(uri), self._encrypt(key), sync_first=sync_first)
            self._keys[uri] = key
            return key.public_key()

        nk = NewKey(uri, key.public_key(), keep, syncs_first=True, stage=stage)
        return nk

    def new_uri(self) -> str:
        """A fresh key URI (``file:keys/<16 hex>.key``); nothing is written."""
        return f"file:{KEY_DIR}/{secrets.token_hex(8)}.key"

    def encrypt(self, key) -> bytes:
        """The encrypted contents of ``key``'s file, as ``keep`` writes it (a held key's, written later by
        ``Keystore.store_certificate(key=HeldKey)``)."""
        return self._encrypt(key)

    def key_path(self, uri: str) -> Path:
        return self._path(uri)

    def adopt(self, uri: str, key) -> None:
        """Keep ``key`` in memory under ``uri``: its file was just committed by the keystore."""
        self._keys[uri] = key

    def prepare(self, key_type: str, label: str) -> NewKey:
        """The key exists in memory only until ``keep`` writes its encrypted file."""
        return self._prepared(generate_software_key(key_type))

    def generate(self, key_type: str, label: str) -> str:
        return self._store(generate_software_key(key_type), label)

    def import_key(self, private_key, label: str) -> str:
        return self._store(private_key, label)

    def load(self, uri: str):
        key = self._keys.get(uri)
        if key is not None:
            return key
        p = self._path(uri)
        try:
            data = fsutil.read_private(p, "private key file")
        except FileNotFoundError:
            raise NotFoundError(f"private key {uri} is missing ({p})") from None
        try:
            # Our own encrypted key: RSA validation was done when it was generated or imported.
            key = load_private_key(data, str(p), self.ctx.master_key, trusted=True)
        except CorruptFileError as e:
            raise CorruptFileError(f"{e} — the key file is corrupt or was not encrypted with this keystore's "
                                   "master key") from e
        self._keys[uri] = key
        return key

    def cached_public_key(self, uri: str):
        key = self._keys.get(uri)
        return key.public_key() if key is not None else None

    def delete(self, uri: str) -> None:
        self._keys.pop(uri, None)
        # The overwrite is fsynced; the unlink is not: if a power cut undoes it, the file holds random bytes that
        # no index entry references, and gc removes it.
        fsutil.secure_delete(self._path(uri), sync_dir=False)

    def export_pem(self, uri: str, password: bytes | None) -> bytes:
        enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        return self.load(uri).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)

    def key_file(self, uri: str):
        return str(self._path(uri)), self.ctx.master_key
