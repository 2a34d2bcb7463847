"""Deployment of push-managed state into an OPC UA application's PKI directory, all of it switching at once.

Layout of ``pki_dir`` (the de-facto standard of OPC UA stacks: open62541, UA-.NETStandard, asyncua's examples)::

    own/certs/<credential>.der     -> ../../.devagent/push/live/own/certs/<credential>.der
    own/private/<credential>.pem   -> ../../.devagent/push/live/own/private/<credential>.pem   (software keys only)
    trusted/certs                  -> ../.devagent/push/live/trusted/certs     (a directory link)
    trusted/crl                    -> ../.devagent/push/live/trusted/crl
    issuers/certs, issuers/crl     likewise
    rejected/certs                 a plain directory (the server writes certificates it refused)
    .devagent/push/archive/NNNN/   immutable versions; .devagent/push/live -> archive/NNNN

Invariants:
- A version directory is written completely (``keystore.fsutil.atomic_write`` for every file) before ``live`` is
  renamed onto it: at every instant each configured path resolves into one complete version, so the application
  sees the old certificate *and* the old trust list, or the new ones, never a mix. The previous version is kept for
  readers still in it; older ones are removed.
- The first deployment into a directory that holds plain ``trusted/``, ``issuers/`` directories (an earlier
  manual or ``type = "opcua"`` deployment) moves them into the archive once and links them; only that one-time
  adoption has a moment in which a directory is absent.
- Private keys: 0600; keys that live in a TPM or PKCS#11 token are not written (the application uses them in place).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from keystore import fsutil
from keystore.backends import scheme_of
from keystore.errors import KeystoreError

log = logging.getLogger("devagent.opcua")

STORE = ".devagent/push"
DIR_LINKS = ("trusted/certs", "trusted/crl", "issuers/certs", "issuers/crl")
DIR_MODE = 0o755


def render(ks, creds, tl) -> dict[str, tuple[bytes, int]]:
    """relative path -> (bytes, mode) of one version (pure apart from exporting software keys)."""
    from cryptography.hazmat.primitives import serialization

    from agent.opcua.trustlist import thumbprint

    out: dict[str, tuple[bytes, int]] = {}
    for cred in creds:
        out[f"own/certs/{cred.name}.der"] = (cred.certificate.public_bytes(serialization.Encoding.DER), 0o644)
        if scheme_of(cred.key_uri) == "file":
            out[f"own/private/{cred.name}.pem"] = (ks.backend("file").export_pem(cred.key_uri, None), 0o600)
    for field, sub, ext in (("trusted_certificates", "trusted/certs", "der"), ("trusted_crls", "trusted/crl", "crl"),
                            ("issuer_certificates", "issuers/certs", "der"), ("issuer_crls", "issuers/crl", "crl")):
        for der in getattr(tl, field):
            out[f"{sub}/{thumbprint(der)}.{ext}"] = (der, 0o644)
    return out


def _versions(store: Path) -> list[int]:
    a = store / "archive"
    return sorted(int(d.name) for d in a.iterdir() if d.name.isdigit()) if a.is_dir() else []


def live_version(pki_dir) -> int | None:
    try:
        name = Path(os.readlink(Path(pki_dir) / STORE / "live")).name
    except OSError:
        return None
    return int(name) if name.isdigit() else None


def switch(pki_dir, files: dict[str, tuple[bytes, int]]) -> int:
    """Write ``files`` as a new version under ``pki_dir`` and make it live (see the module invariants).

    Returns the version number. Raises KeystoreError (StorageError) on a write failure; the old version stays live.
    """
    root = fsutil.ensure_dir(pki_dir, 0o750)
    store = Path(root) / STORE
    fsutil.ensure_dir(store.parent, DIR_MODE)
    fsutil.ensure_dir(store, DIR_MODE)
    fsutil.ensure_dir(store / "archive", DIR_MODE)
    previous = live_version(root)
    n = max(_versions(store), default=0) + 1
    vdir = store / "archive" / f"{n:04d}"
    if vdir.exists():  # left by a crash before it was made live: never live, safe to redo
        fsutil.remove_tree(vdir)
    fsutil.ensure_dir(vdir, DIR_MODE)
    for sub in ("own/certs", "own/private", *DIR_LINKS):
        fsutil.ensure_dir(vdir / sub, 0o700 if sub == "own/private" else DIR_MODE)
    for rel, (data, mode) in sorted(files.items()):
        fsutil.atomic_write(vdir / rel, data, mode=mode)
    fsutil.fsync_dir(vdir)
    _adopt(root, store)
    fsutil.atomic_symlink(f"archive/{n:04d}", store / "live")
    # Links through "live": created once, then every later version is one rename away.
    for sub in DIR_LINKS:
        _mkdir(root / sub.split("/")[0], 0o750)
        rel = os.path.relpath(store / "live" / sub, (root / sub).parent)
        if not (os.path.islink(root / sub) and os.readlink(root / sub) == rel):
            fsutil.atomic_symlink(rel, root / sub)
    for rel in files:
        if rel.startswith("own/"):
            p = root / rel
            _mkdir(p.parent, 0o750)
            target = os.path.relpath(store / "live" / rel, p.parent)
            if not (os.path.islink(p) and os.readlink(p) == target):
                fsutil.atomic_symlink(target, p)
    _mkdir(root / "rejected/certs", 0o750)
    for v in _versions(store):
        if v not in (n, previous):
            fsutil.remove_tree(store / "archive" / f"{v:04d}")
    return n


def _mkdir(p: Path, mode: int) -> None:
    # Only directories we create get a mode; an existing one keeps what the application's operator chose.
    if not p.exists():
        fsutil.ensure_dir(p, mode)


def _adopt(root: Path, store: Path) -> None:
    """Move plain trusted/issuers directories of an earlier deployment into the archive (once)."""
    for sub in DIR_LINKS:
        p = root / sub
        if p.is_dir() and not p.is_symlink():
            dest = store / "adopted" / sub
            fsutil.ensure_dir(dest.parent, DIR_MODE)
            if dest.exists():
                fsutil.remove_tree(dest)
            os.replace(p, dest)
            log.warning("%s was a plain directory: moved to %s; it is now managed by push (TrustList)", p, dest)


async def deploy(ks, creds, tl, pki_dirs, hooks=(), *, timeout_s: float = 120.0) -> list[int]:
    """Switch every PKI directory, then run the hook commands (``agent.hooks.run_command``) with the RSA slot's
    details in the DEVAGENT_* variables of ``agent.hooks.hook_env``. Raises ``agent.hooks.DeployError``."""
    import asyncio

    from agent.hooks import DeployError, hook_env, run_command

    files = await asyncio.to_thread(render, ks, creds, tl)
    versions = []
    for d in pki_dirs:
        try:
            versions.append(await asyncio.to_thread(switch, d, files))
        except (KeystoreError, OSError) as e:
            raise DeployError(f"OPC UA PKI directory {d}: {e}") from e
    if hooks and creds:
        env = hook_env(creds[0], [], "opcua-push")
        env["DEVAGENT_OPCUA_PKI_DIRS"] = os.pathsep.join(str(d) for d in pki_dirs)
        for command in hooks:
            await run_command(command, env, timeout_s)
    return versions
