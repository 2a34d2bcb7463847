"""Keystore errors. ``str(err)`` is for a person: what was wrong, where, and what to do."""
from __future__ import annotations


class KeystoreError(Exception):
    """Root of every keystore error."""


class KeystoreNotInitializedError(KeystoreError):
    """No keystore at the path (run ``devagent keystore init``)."""


class KeystorePermissionError(KeystoreError):
    """A secret file or directory is readable by others, or cannot be accessed."""


class KeystoreLockError(KeystoreError):
    """Another process holds the keystore lock for too long."""


class StorageError(KeystoreError):
    """Writing to disk failed (ENOSPC, EIO, ...); nothing was changed."""


class NotDurableError(StorageError):
    """The new content is in place (``os.replace`` succeeded: readers see it) but its directory could not be
    fsynced, so it may not survive a power cut. Unlike every other ``StorageError``, something *was* changed.
    ``path`` is the file that was replaced."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


class CorruptFileError(KeystoreError):
    """A file (PEM, DER, PKCS#12, index) could not be parsed."""


class NotFoundError(KeystoreError):
    """No credential, key or trust anchor by that name."""


class KeyGoneError(NotFoundError):
    """The key was destroyed: the credential that used it was renewed or deleted (by another devagent process).
    Read the credential again to get its current key."""


class AlreadyExistsError(KeystoreError):
    """A credential by that name exists already."""


class ReadOnlyError(KeystoreError):
    """The credential is read-only (IDevID) and the operation needs ``--force``."""


class KeyBackendError(KeystoreError):
    """A key backend (software, TPM, PKCS#11) failed or is unreachable."""


class ExportRefusedError(KeyBackendError):
    """The private key cannot leave its backend (TPM/PKCS#11 keys are non-exportable)."""


class UnsupportedKeyTypeError(KeystoreError, ValueError):
    """Unknown or disallowed key type."""


class SecretSourceError(KeystoreError, ValueError):
    """A secret argument was not ``env:VAR``, ``file:PATH`` or ``pass:TEXT``, or could not be read."""


class VerificationError(KeystoreError):
    """A certificate was rejected (``keystore.validator``). ``reason`` is a stable machine-readable code, listed
    with its meaning in docs/trust.md."""

    REASONS = (
        "key-mismatch",
        "untrusted",
        "bad-signature",
        "expired",
        "not-yet-valid",
        "not-a-ca",
        "bad-key-usage",
        "bad-eku",
        "is-ca",
        "unknown-critical-extension",
        "malformed",
        "subject-mismatch",
        "path-length",
        "name-constraints",
        "policy",
        "weak-key",
        "bad-algorithm",
        "not-authorized",
        "root-update",
    )

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
