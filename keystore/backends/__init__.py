"""Key backends behind one interface; a key is named by a URI whose scheme picks the backend.

- ``file:keys/<id>.key``   software key, PKCS#8 encrypted with the keystore master key (``soft``)
- ``tpm:...``              TPM 2.0 key (``tpm``; only that module imports tpm2_pytss)
- ``pkcs11:...``           PKCS#11 token object, RFC 7512 (``pkcs11``)

Backends are imported lazily: a board without a TPM never imports tpm2_pytss.
"""
from __future__ import annotations

import abc
import importlib
from typing import Any

from keystore.errors import KeyBackendError

_MODULES = {"file": "keystore.backends.soft", "tpm": "keystore.backends.tpm", "pkcs11": "keystore.backends.pkcs11"}
BACKEND_NAMES = {"soft": "file", "software": "file", "file": "file", "tpm": "tpm", "pkcs11": "pkcs11"}


class KeyBackend(abc.ABC):
    """Where keys live. Implementations must never log or return private key bytes unless exportable."""

    scheme: str = ""
    exportable: bool = False

    def __init__(self, context: "BackendContext"):
        self.ctx = context

    @abc.abstractmethod
    def generate(self, key_type: str, label: str) -> str:
        """Generate a key of ``key_type`` inside the backend; return its URI."""

    def prepare(self, key_type: str, label: str) -> "NewKey":
        """Make a key without keeping it yet: its final URI (and, where the backend knows it before keeping the key,
        its public half), and ``keep()`` that makes it persistent. The keystore records the URI durably between the
        two, so that a crash never leaves a key (a file, a token object, a TPM handle) that no record names.
        Default: generate at once (no such guarantee)."""
        uri = self.generate(key_type, label)
        return NewKey(uri, self.cached_public_key(uri), lambda: self.cached_public_key(uri) or self.public_key(uri))

    @abc.abstractmethod
    def load(self, uri: str) -> Any:
        """Return a ``cryptography`` private-key object that signs inside the backend."""

    def public_key(self, uri: str):
        return self.load(uri).public_key()

    def open_key(self, uri: str) -> None:
        """Open the key where it lives, as a signature would, and sign nothing (a start-up check of a key that a
        long-lived process will sign with). Default: ``load`` (a software key is read and decrypted); hardware
        backends reach the key itself. Raises KeyBackendError (or NotFoundError) naming what failed."""
        self.load(uri)

    def cached_public_key(self, uri: str):
        """The public key if this backend object already knows it (generated or loaded here), else None: never
        touches the key itself."""
        return None

    @abc.abstractmethod
    def delete(self, uri: str) -> None:
        """Destroy the key (secure-delete, evict, or destroy the token object). Missing key: no error."""

    def import_key(self, private_key, label: str) -> str:
        raise KeyBackendError(f"the {self.scheme} backend cannot import private keys")

    def export_pem(self, uri: str, password: bytes | None) -> bytes:
        from keystore.errors import ExportRefusedError

        raise ExportRefusedError(f"the private key {uri} lives in {self.scheme} and is non-exportable")

    def key_file(self, uri: str) -> tuple[str, bytes] | None:
        """(path of an encrypted PEM, password) for TLS stacks that need a key file; None if impossible."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release sessions/contexts."""


class NewKey:
    """A key from ``KeyBackend.prepare``: ``uri``, ``public`` (None if unknown until kept), ``keep() -> public key``.

    ``syncs_first``: ``keep(sync_first=paths)`` makes the directory entries of ``paths`` durable itself before the
    key gets its name, fsyncing them together with its own file (``fsutil.atomic_write(..., sync_first=...)``): the
    keystore then leaves the index's directory fsync to it. Otherwise ``keep()`` takes no argument.

    ``stage``: an optional callable that writes the key's data under a temp name that names no key (a
    ``fsutil.StagedFile``, returned) before the record is written; the keystore fsyncs it together with the record's
    index write (``atomic_write(..., fsync_files=...)``), and ``keep`` then only renames it. ``discard_staged()``
    securely removes the staged file when the record could not be written."""

    __slots__ = ("uri", "public", "_keep", "syncs_first", "_stage", "staged")

    def __init__(self, uri: str, public, keep, *, syncs_first: bool = False, stage=None):
        self.uri, self.public, self._keep, self.syncs_first = uri, public, keep, syncs_first
        self._stage, self.staged = stage, None

    def stage(self):
        """Write the key's data under a temp name (see the class docstring); None if the backend does not stage."""
        if self._stage is not None and self.staged is None:
            self.staged = self._stage()
        return self.staged

    def discard_staged(self) -> None:
        if self.staged is not None:
            self.staged.discard()

    def keep(self, sync_first=(), meanwhile=None):
        """Make the key persistent. ``meanwhile``: a callable run once the key has its name; a backend that stages
        runs it while the key's last fsync is in flight (``fsutil.fsync_while``), others right after keeping.
        Returns what ``meanwhile`` returned, or without it the public key."""
        if self.syncs_first and self.staged is not None and meanwhile is not None:
            return self._keep(sync_first, meanwhile)
        pub = self._keep(sync_first) if self.syncs_first else self._keep()
        return meanwhile() if meanwhile is not None else pub


class HardwareKeyMixin:
    """What TPM and PKCS#11 key objects share: identity, the public half, and refusing to export.

    Subclasses set ``_where`` ("the TPM", "a PKCS#11 token") and implement ``sign``.
    """

    _where = "in a hardware module"
    _refusal = "non-exportable"

    def _init(self, backend, uri: str, public):
        self._backend = backend
        self._uri = uri
        self._public = public

    @property
    def uri(self) -> str:
        return self._uri

    def public_key(self):
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def _refuse(self):
        from keystore.errors import ExportRefusedError

        raise ExportRefusedError(f"the private key {self._uri} lives {self._where} and is {self._refusal}")

    def private_numbers(self):
        self._refuse()

    def private_bytes(self, encoding, format, encryption_algorithm):
        self._refuse()

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return f"<{type(self).__name__} {self._uri}>"


class BackendContext:
    """What backends may use: the keystore directory, its master key (lazily), and per-backend options."""

    def __init__(self, root, master_key_fn, options: dict | None = None):
        self.root = root
        self._master_key_fn = master_key_fn
        self.options = options or {}

    @property
    def master_key(self) -> bytes:
        return self._master_key_fn()


def scheme_of(uri: str) -> str:
    scheme, sep, _ = uri.partition(":")
    if not sep or scheme not in _MODULES:
        raise KeyBackendError(f"unknown key URI {uri!r}; expected file:, tpm: or pkcs11:")
    return scheme


def backend_class(scheme: str) -> type[KeyBackend]:
    try:
        mod = importlib.import_module(_MODULES[scheme])
    except KeyError:
        raise KeyBackendError(f"unknown key backend {scheme!r} (known: soft, tpm, pkcs11)") from None
    except ImportError as e:
        extra = {"tpm": "tpm2-pytss (pip install 'devagent[tpm]')",
                 "pkcs11": "python-pkcs11 (pip install 'devagent[pkcs11]')"}.get(scheme, str(e))
        raise KeyBackendError(f"the {scheme} key backend is not available: install {extra} ({e})") from e
    return mod.Backend
