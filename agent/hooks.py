"""Deployment targets and hook commands run after a successful renewal.

Targets write the live credential where services read it: PEM files (cert, key, chain, fullchain, or one bundle
with all of them), a PKCS#12 file, or an OPC UA server's PKI directory (own/certs, own/private, trusted/certs,
issuers/certs). Then the credential's hook commands run (``systemctl reload mosquitto``) with the credential's
details in ``DEVAGENT_*`` environment variables.

Invariants:
- Every file is written by ``keystore.fsutil.atomic_write`` (temp, fsync, rename, fsync dir): a reader sees the old
  or the new file, never a torn one.
- Files that belong together switch together. When a target has several files (a pem target with two or more of
  cert/key/chain/fullchain/bundle; an OPC UA target's own certificate and key), each new version is written
  complete into ``<dir>/.devagent/<credential>-<id>/archive/NNNN/`` and made live by renaming one symlink,
  ``live -> archive/NNNN``; the configured paths are symlinks through it (``device.crt -> .devagent/…/live/cert.pem``).
  At every instant all of a target's paths resolve into the same version. The previous version is kept for
  readers that are still reading it, older ones are securely deleted. Configured paths that are plain files from
  an earlier deployment are first turned into links to a copy of what they hold, so even that switch is atomic.
- The daemon redeploys at start when the deployed fingerprint differs from the live one, so a crash at any point
  of a deployment is repaired (an unfinished archive version is never made live and is removed later).
- Private keys are written 0600 (``key_mode``); keys that live in a TPM/PKCS#11 token cannot be written and
  the target says so.
- A failing target or hook raises ``DeployError``; the renewal itself stays committed and the daemon retries the
  deployment with backoff. Hook output is logged, never parsed.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import shlex
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from agent.config import CredentialPolicy, DeployTarget
from keystore import fsutil
from keystore.backends import scheme_of
from keystore.certs import fingerprint, pem
from keystore.errors import KeystoreError
from keystore.secrets import resolve_secret

log = logging.getLogger("devagent.hooks")
OPCUA_DIRS = ("own/certs", "own/private", "trusted/certs", "trusted/crl", "issuers/certs", "issuers/crl",
              "rejected/certs")
STORE_DIR = ".devagent"  # next to the configured files: <dir>/.devagent/<credential>-<id>/{live,archive/NNNN}
LIVE = "live"
ARCHIVE = "archive"
STORE_DIR_MODE = 0o755  # services read through it; the files inside carry their own modes (key 0600 or key_mode)
# File name inside a version directory for each role of a linked group.
LINKED_NAMES = {"cert": "cert.pem", "key": "key.pem", "chain": "chain.pem", "fullchain": "fullchain.pem",
                "bundle": "bundle.pem", "opcua-cert": "cert.der", "opcua-key": "key.pem"}


class DeployError(Exception):
    """A deployment target or hook command failed (message names which, and why)."""


@dataclasses.dataclass(frozen=True)
class FileOut:
    """One file a deploy target writes: path, content, mode and its role in the target."""

    path: Path
    data: bytes
    mode: int
    role: str  # cert, key, chain, fullchain, bundle, p12, opcua-cert, opcua-key, opcua-trusted, opcua-issuer


def _key_pem(ks, cred) -> bytes:
    try:
        return ks.backend(scheme_of(cred.key_uri)).export_pem(cred.key_uri, None)
    except KeystoreError as e:
        raise DeployError(f"credential {cred.name}: cannot deploy its private key: {e}. Let the service use the "
                          "key in place (TPM/PKCS#11 provider) and deploy only cert/chain") from e


def _safe_stem(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:64] or "ca"


def render(ks, cred, target: DeployTarget) -> list[FileOut]:
    """The files ``target`` needs for ``cred``, in write order (nothing is written here)."""
    chain = list(cred.chain)
    out: list[FileOut] = []
    if target.type == "pem":
        if target.chain:
            out.append(FileOut(Path(target.chain), pem(chain), target.cert_mode, "chain"))
        if target.key:
            out.append(FileOut(Path(target.key), _key_pem(ks, cred), target.key_mode, "key"))
        if target.cert:
            out.append(FileOut(Path(target.cert), pem([cred.certificate]), target.cert_mode, "cert"))
        if target.fullchain:
            out.append(FileOut(Path(target.fullchain), pem([cred.certificate, *chain]), target.cert_mode, "fullchain"))
        if target.bundle:
            out.append(FileOut(Path(target.bundle), _key_pem(ks, cred) + pem([cred.certificate, *chain]),
                               target.key_mode, "bundle"))
    elif target.type == "p12":
        try:
            password = resolve_secret(target.password, f"PKCS#12 password for {target.path}")
            data = ks.export(cred.name, "p12", password=password)
        except KeystoreError as e:
            raise DeployError(f"credential {cred.name}: PKCS#12 target {target.path}: {e}") from e
        out.append(FileOut(Path(target.path), data, target.key_mode, "p12"))
    elif target.type == "opcua":
        root = Path(target.pki_dir)
        der = serialization.Encoding.DER
        # Trust list: the domain's roots (all of them, so peers on either side of a CA rollover verify);
        # issuers: the CA certificates needed to build paths (our chain and the domain's issuing CAs).
        cas = {fingerprint(c): c for c in chain}
        if cred.domain:
            cas.update({fingerprint(c): c for c in ks.trust_anchors(cred.domain)})
        for fp, c in sorted(cas.items()):
            sub = "trusted/certs" if c.subject == c.issuer else "issuers/certs"
            name = f"{_safe_stem(c.subject.rfc4514_string())}_{fp[7:23]}.der"
            out.append(FileOut(root / sub / name, c.public_bytes(der), target.cert_mode, f"opcua-{sub.split('/')[0]}"))
        out.append(FileOut(root / "own/private" / f"{cred.name}.pem", _key_pem(ks, cred), target.key_mode, "opcua-key"))
        out.append(FileOut(root / "own/certs" / f"{cred.name}.der", cred.certificate.public_bytes(der),
                           target.cert_mode, "opcua-cert"))
    else:  # config validation keeps this unreachable
        raise DeployError(f"unknown deployment target type {target.type!r}")
    return out


def _prepare_dir(parent: Path, opcua_root: Path | None) -> None:
    if opcua_root is not None and not opcua_root.exists():
        for d in OPCUA_DIRS:
            fsutil.ensure_dir(opcua_root / d, 0o750)
    if not parent.exists():
        # Only directories we create get a mode; an existing one (/etc/mosquitto/certs) keeps its owner's choice.
        fsutil.ensure_dir(parent, 0o750)


def _write(f: FileOut, opcua_root: Path | None) -> None:
    _prepare_dir(f.path.parent, opcua_root)
    fsutil.atomic_write(f.path, f.data, mode=f.mode)


# ---- files that switch together: versioned directories behind one symlink ------------------------------------
def _group_paths(target: DeployTarget, name: str) -> dict[str, Path]:
    """role -> configured path of the files of ``target`` that must switch together ({} when there is one file)."""
    if target.type == "pem":
        paths = {r: Path(getattr(target, r)) for r in ("chain", "key", "cert", "fullchain", "bundle")
                 if getattr(target, r)}
        return paths if len(paths) >= 2 else {}
    if target.type == "opcua":
        root = Path(target.pki_dir)
        return {"opcua-key": root / "own/private" / f"{name}.pem", "opcua-cert": root / "own/certs" / f"{name}.der"}
    return {}


def store_dir(paths: dict[str, Path], name: str) -> Path:
    """The versioned store of one linked group: ``<common dir>/.devagent/<name>-<id>`` (id: from the paths)."""
    common = Path(os.path.commonpath([str(p.parent) for p in paths.values()]))
    ident = hashlib.sha256("\0".join(sorted(str(p) for p in paths.values())).encode()).hexdigest()[:8]
    return common / STORE_DIR / f"{name}-{ident}"


def _versions(store: Path) -> list[int]:
    adir = store / ARCHIVE
    if not adir.is_dir():
        return []
    return sorted(int(d.name) for d in adir.iterdir() if d.name.isdigit() and not d.is_symlink() and d.is_dir())


def _live_version(store: Path) -> int | None:
    try:
        v = Path(os.readlink(store / LIVE)).name
    except OSError:
        return None
    return int(v) if v.isdigit() else None


def _write_version(store: Path, files: list[FileOut]) -> int:
    n = max(_versions(store), default=0) + 1
    vdir = fsutil.ensure_dir(store / ARCHIVE / f"{n:04d}", STORE_DIR_MODE)
    for f in files:
        fsutil.atomic_write(vdir / LINKED_NAMES[f.role], f.data, mode=f.mode)
    return n


def _link_paths(store: Path, files: list[FileOut], opcua_root: Path | None) -> None:
    for f in files:
        rel = os.path.relpath(store / LIVE / LINKED_NAMES[f.role], f.path.parent)
        if os.path.islink(f.path) and os.readlink(f.path) == rel:
            continue
        _prepare_dir(f.path.parent, opcua_root)
        fsutil.atomic_symlink(rel, f.path)


def _switch_linked(files: list[FileOut], store: Path, opcua_root: Path | None) -> None:
    """Make ``files`` live together (see the module invariants). Order: adopt plain files from an earlier
    deployment (copy → live → link), write the new version completely, rename ``live`` onto it, link any configured
    path that is not linked yet, prune versions older than the previous one."""
    fsutil.ensure_dir(store.parent, STORE_DIR_MODE)
    fsutil.ensure_dir(store, STORE_DIR_MODE)
    fsutil.ensure_dir(store / ARCHIVE, STORE_DIR_MODE)
    previous = _live_version(store)
    plain = [f for f in files if f.path.is_file() and not f.path.is_symlink()]
    if previous is None and plain:
        # What services read now becomes version 1 first, so that the switch below is atomic for them too.
        old = [FileOut(f.path, f.path.read_bytes(), f.mode, f.role) for f in plain]
        previous = _write_version(store, old)
        fsutil.atomic_symlink(f"{ARCHIVE}/{previous:04d}", store / LIVE)
        _link_paths(store, old, opcua_root)
    n = _write_version(store, files)
    fsutil.atomic_symlink(f"{ARCHIVE}/{n:04d}", store / LIVE)
    _link_paths(store, files, opcua_root)
    for v in _versions(store):
        if v not in (n, previous):
            fsutil.remove_tree(store / ARCHIVE / f"{v:04d}")


def hook_env(cred, files: list[FileOut], event: str = "renewed", base_env: dict | None = None) -> dict[str, str]:
    """Environment for hook commands: the process environment plus the credential's details."""
    env = dict(os.environ if base_env is None else base_env)
    c = cred.certificate
    env.update({
        "DEVAGENT_EVENT": event,
        "DEVAGENT_CREDENTIAL": cred.name,
        "DEVAGENT_KIND": cred.kind,
        "DEVAGENT_DOMAIN": cred.domain or "",
        "DEVAGENT_VERSION": str(cred.version),
        "DEVAGENT_SUBJECT": c.subject.rfc4514_string(),
        "DEVAGENT_ISSUER": c.issuer.rfc4514_string(),
        "DEVAGENT_SERIAL": format(c.serial_number, "x"),
        "DEVAGENT_FINGERPRINT": fingerprint(c),
        "DEVAGENT_NOT_BEFORE": c.not_valid_before_utc.isoformat(),
        "DEVAGENT_NOT_AFTER": c.not_valid_after_utc.isoformat(),
        "DEVAGENT_KEY_URI": cred.key_uri,
        "DEVAGENT_KEY_TYPE": cred.key_type,
    })
    names = {"cert": "CERT_FILE", "key": "KEY_FILE", "chain": "CHAIN_FILE", "fullchain": "FULLCHAIN_FILE",
             "bundle": "BUNDLE_FILE", "p12": "P12_FILE", "opcua-cert": "OPCUA_CERT_FILE",
             "opcua-key": "OPCUA_KEY_FILE"}
    for f in files:
        if f.role in names:
            env.setdefault("DEVAGENT_" + names[f.role], str(f.path))
    return env


async def run_command(command: str, env: dict[str, str], timeout_s: float) -> None:
    """Run one hook command (split like a shell would, no shell) with a time limit.

    Raises:
        DeployError: not found, non-zero exit (with the tail of its output), or timeout (the process is killed).
    """
    argv = shlex.split(command)
    try:
        proc = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    except OSError as e:
        raise DeployError(f"hook {command!r}: cannot start: {e.strerror or e}") from e
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise DeployError(f"hook {command!r}: no exit after {timeout_s:g} s; killed") from None
    text = out.decode("utf-8", "replace").strip()
    if text:
        log.info("hook %r: %s", command, text[-2000:])
    if proc.returncode != 0:
        raise DeployError(f"hook {command!r} exited with status {proc.returncode}: {text[-300:] or '(no output)'}")


async def deploy(ks, cred, policy: CredentialPolicy, *, timeout_s: float = 120.0, event: str = "renewed") -> list[Path]:
    """Write every target of ``policy`` for ``cred``, then run its hooks in order. Returns the files written.

    Raises:
        DeployError: the first failure (files written before it stay: each is complete and belongs to ``cred``).
    """
    written: list[FileOut] = []
    for target in policy.deploy:
        files = render(ks, cred, target)
        root = Path(target.pki_dir) if target.type == "opcua" else None
        group = _group_paths(target, cred.name)
        linked = [f for f in files if group.get(f.role) == f.path]
        for f in files:
            if f in linked:
                continue
            try:
                await asyncio.to_thread(_write, f, root)
            except KeystoreError as e:
                raise DeployError(f"credential {cred.name}: {target.type} target: {e}") from e
            written.append(f)
        if linked:
            try:
                await asyncio.to_thread(_switch_linked, linked, store_dir(group, cred.name), root)
            except (KeystoreError, OSError) as e:
                raise DeployError(f"credential {cred.name}: {target.type} target: {e}") from e
            written.extend(linked)
    env = hook_env(cred, written, event)
    for command in policy.hooks:
        await run_command(command, env, timeout_s)
    return [f.path for f in written]


def _target_paths(policy: CredentialPolicy) -> list[Path]:
    paths = []
    for t in policy.deploy:
        paths += [Path(getattr(t, f)) for f in ("cert", "key", "chain", "fullchain", "bundle", "path") if getattr(t, f)]
        if t.type == "opcua":
            paths += [Path(t.pki_dir) / "own/private" / f"{policy.name}.pem",
                      Path(t.pki_dir) / "own/certs" / f"{policy.name}.der"]
    return paths


def _stores(policy: CredentialPolicy) -> list[Path]:
    return [store_dir(g, policy.name) for g in (_group_paths(t, policy.name) for t in policy.deploy) if g]


def remove_temp_files(policy: CredentialPolicy) -> list[str]:
    """Delete temp files an interrupted deployment left next to ``policy``'s targets and in their version stores
    (``.NAME.*.tmp``, the pattern of fsutil.atomic_write and atomic_symlink); they may hold a private key, so they
    are overwritten first (a temp symlink is only unlinked)."""
    removed = []
    dirs = {p.parent for p in _target_paths(policy)}
    dirs |= {Path(t.pki_dir) / sub for t in policy.deploy if t.type == "opcua" for sub in OPCUA_DIRS}
    for store in _stores(policy):
        dirs |= {store, store / ARCHIVE} | {store / ARCHIVE / f"{v:04d}" for v in _versions(store)}
    for d in sorted(dirs):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                fsutil.secure_delete(p)
                removed.append(str(p))
    return removed


def undeploy(policy: CredentialPolicy) -> list[str]:
    """Remove the files ``policy`` deploys (decommissioning): key files are overwritten before unlinking.

    Returns the paths removed. Shared CA files in an OPC UA trust list are left for the server's operator.
    """
    removed = remove_temp_files(policy)
    for p in _target_paths(policy):
        if p.exists() or p.is_symlink():
            fsutil.secure_delete(p)  # a link into a version store is only unlinked; the store goes below
            removed.append(str(p))
    for store in _stores(policy):
        if store.exists():
            fsutil.remove_tree(store)  # every version: key files are overwritten before unlinking
            removed.append(str(store))
            with contextlib.suppress(OSError):
                store.parent.rmdir()  # .devagent, when no other credential's store is in it
    return removed
