"""Secret arguments as OpenSSL takes them: ``env:VAR``, ``file:PATH``, ``pass:TEXT`` (and ``stdin``).

A bare string is refused so that secrets do not end up in shell history or ``ps`` by accident.
"""
from __future__ import annotations

import os
import sys

from keystore.errors import SecretSourceError

FORMS = "env:VAR, file:PATH, pass:TEXT or stdin"


def resolve_secret(spec: str | None, what: str = "secret") -> bytes | None:
    """Return the secret bytes named by ``spec`` (None stays None).

    ``file:`` reads the first line without its newline; ``stdin`` reads one line from standard input.

    Raises:
        SecretSourceError: unknown form, unset variable, unreadable or empty file.
    """
    if spec is None:
        return None
    kind, sep, rest = spec.partition(":")
    if spec == "stdin":
        line = sys.stdin.readline()
        if not line:
            raise SecretSourceError(f"{what}: nothing on standard input")
        return line.rstrip("\r\n").encode()
    if not sep:
        raise SecretSourceError(f"{what}: give the secret as {FORMS} (a bare value is refused)")
    if kind == "pass":
        return rest.encode()
    if kind == "env":
        val = os.environ.get(rest)
        if val is None:
            raise SecretSourceError(f"{what}: environment variable {rest} is not set")
        return val.encode()
    if kind == "file":
        try:
            with open(rest, "rb") as f:
                line = f.readline()
        except OSError as e:
            raise SecretSourceError(f"{what}: cannot read {rest}: {e.strerror or e}") from e
        line = line.rstrip(b"\r\n")
        if not line:
            raise SecretSourceError(f"{what}: {rest} is empty")
        return line
    raise SecretSourceError(f"{what}: unknown secret source {kind!r}; use {FORMS}")
