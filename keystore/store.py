"""The devid keystore: IDevIDs, one LDevID per domain, application credentials, truststores, pending keys.

On-disk layout (directory 0700, files 0600; master.key 0400)::

    keystore.json                 tinydb index: metadata and key URIs only, never key bytes
    .lock                         flock serialising writers across processes
    master.key                    random 256-bit key encrypting software keys (or sealed by the TPM)
    keys/<id>.key                 software keys, encrypted PKCS#8
    creds/<name>/<NNNN>/cert.pem  immutable archive of versions (certificate, then chain.pem)
    trust/<domain>/<sha256>.pem   trust anchors per domain
    audit.log                     one JSON line per change: who, what, when (never secrets)

Invariants:
- Verify before store: a certificate is stored only if it carries our key, chains to the domain's trust
  anchor, and its validity and key usage are sane.
- A version's files are written and fsynced before the index points at them, and the index is replaced in
  one atomic write. A crash at any instant leaves the previous complete version live; files the index does
  not reference are garbage, removed under the lock by ``gc``.
- Old keys are destroyed only after the index no longer references them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import stat
import weakref
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tinydb import Query, TinyDB

from keystore import fsutil, lazy, owner
from keystore.backends import BACKEND_NAMES, BackendContext, KeyBackend, backend_class, scheme_of
from keystore.errors import (
    AlreadyExistsError,
    CorruptFileError,
    KeystoreError,
    KeyGoneError,
    KeystoreNotInitializedError,
    NotDurableError,
    NotFoundError,
    ReadOnlyError,
    StorageError,
    VerificationError,
)
from keystore.keylocks import KeyLocks, lock_name
from keystore.storage import IndexStorage, KeystoreLock, ReadOnlyDict

# Imported when first used (keystore/lazy.py): listing credentials and `devagent status` read the index only and
# never need cryptography, which costs more start-up time than the rest of the command.
x509 = lazy.module("cryptography.x509")
serialization = lazy.module("cryptography.hazmat.primitives.serialization")
base64 = lazy.module("base64")
getpass = lazy.module("getpass")
_secrets = lazy.module("secrets")
describe = lazy.attr("keystore.certs", "describe")
dn = lazy.attr("keystore.certs", "dn")
fingerprint = lazy.attr("keystore.certs", "fingerprint")
load_certificates = lazy.attr("keystore.certs", "load_certificates")
pem = lazy.attr("keystore.certs", "pem")
same_public_key = lazy.attr("keystore.certs", "same_public_key")
spki_der = lazy.attr("keystore.certs", "spki_der")
key_type_of = lazy.attr("keystore.keytypes", "key_type_of")
parse_key_type = lazy.attr("keystore.keytypes", "parse_key_type")
EKU_NAMES = lazy.attr("keystore.validator", "EKU_NAMES")
Policy = lazy.attr("keystore.validator", "Policy")
is_ca = lazy.attr("keystore.validator", "is_ca")
validate = lazy.attr("keystore.validator", "validate")

INDEX = "keystore.json"
MASTER_KEY = "master.key"
AUDIT_LOG = "audit.log"
WIPE_MARKER = "wipe-pending.json"  # present from the start of a wipe() until it is complete (see wipe)
FORMAT = 1
KINDS = ("idevid", "ldevid", "app")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEEP_VERSIONS = 3
# A domain's trust stores (docs/trust.md "Trust stores by purpose").
TRUST_PURPOSES = {"pki": "domain PKI: what issued certificates must chain to",
                  "tls": "EST server TLS anchors", "cmp": "CMP response signer anchors",
                  "cmp-server": "pinned CMP server certificates (like openssl cmp -srvcert)"}
PENDING_MAX_AGE_S = 24 * 3600.0  # [keystore] pending_max_age_s: a pending key older than this is discarded by gc
_log = logging.getLogger("devagent.keystore")
_USERS: dict[int, str] = {}  # euid -> user name for audit lines (one pwd lookup per process and uid)
_AUDIT_JSON = json.JSONEncoder(sort_keys=True, default=str)  # = json.dumps(..., sort_keys=True, default=str), built once


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def verification_policy(purpose: str, now, check_validity: bool, **kw) -> Policy:
    """The validator policy for a keystore decision: at ``now`` (a datetime = a trusted clock, or a
    ``keystore.validator.ClockReading`` = possibly an estimate with its uncertainty; default: the system clock),
    or, without a usable clock (``check_validity=False``), only "after the clock floor" (see
    ``Policy.for_unknown_clock``)."""
    if check_validity:
        return Policy.for_purpose(purpose, now or _now(), **kw)
    return Policy.for_unknown_clock(purpose, **kw)


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', not starting "
                         "with a punctuation character")
    return name


def _refuse_unfinished_wipe(root: Path) -> None:
    if (root / WIPE_MARKER).exists():
        raise KeystoreError(f"keystore {root}: a decommissioning wipe was interrupted and is not finished; run "
                            "'devagent decommission' again to finish it (nothing else may use this keystore)")


_SUMMARY_FIELDS = ("subject", "issuer", "serial", "not_before", "not_after", "fingerprint")


@dataclasses.dataclass(frozen=True)
class Credential:
    """A stored credential: its live certificate version, chain and key reference.

    ``certificate`` and ``chain`` are read from the version directory when first used (``Keystore.get`` reads them
    at once; ``Keystore.list`` only when a caller needs them): dates, subject, issuer, serial and fingerprint come
    from the index record, so listing and scheduling never parse a certificate.
    """

    name: str
    kind: str
    domain: str | None
    key_uri: str
    key_type: str
    version: int
    record: dict
    _files: object = dataclasses.field(default=None, repr=False, compare=False)  # () -> (certificate, chain)

    def _load(self) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        got = self.__dict__.get("_loaded")
        if got is None:
            got = self._files()
            self.__dict__["_loaded"] = got  # frozen: cache beside the fields, like functools.cached_property
        return got

    @property
    def certificate(self) -> x509.Certificate:
        return self._load()[0]

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return self._load()[1]

    def _record_time(self, field: str, cert_attr: str) -> datetime.datetime:
        v = self.record.get(field)
        if isinstance(v, str):
            with contextlib.suppress(ValueError):
                return datetime.datetime.fromisoformat(v)
        return getattr(self.certificate, cert_attr)

    @property
    def not_after(self) -> datetime.datetime:
        return self._record_time("not_after", "not_valid_after_utc")

    @property
    def not_before(self) -> datetime.datetime:
        return self._record_time("not_before", "not_valid_before_utc")

    @property
    def readonly(self) -> bool:
        return self.kind == "idevid"

    def seconds_left(self, now: datetime.datetime | None = None) -> float:
        return (self.not_after - (now or _now())).total_seconds()

    def summary(self, now: datetime.datetime | None = None) -> dict:
        """JSON-friendly view (stable keys, documented in README)."""
        rec = self.record
        if all(isinstance(rec.get(k), str) for k in _SUMMARY_FIELDS):
            d = {k: rec[k] for k in _SUMMARY_FIELDS}
        else:
            d = describe(self.certificate)
        chain = rec.get("chain_subjects")
        if not isinstance(chain, list):
            chain = [describe(c)["subject"] for c in self.chain]
        left = self.seconds_left(now)
        d.update(
            name=self.name, kind=self.kind, domain=self.domain, key_uri=self.key_uri, key_type=self.key_type,
            version=self.version, days_left=round(left / 86400, 2), expired=left <= 0,
            profile=rec.get("profile"), protocol=rec.get("protocol"),
            server=rec.get("server"), chain=list(chain),
            next_renewal=(rec.get("meta") or {}).get("next_renewal"),
            last_error=(rec.get("meta") or {}).get("last_error"),
            revoked=(rec.get("meta") or {}).get("revoked"),
            revoked_at=(rec.get("meta") or {}).get("revoked_at"),
        )
        return d


@dataclasses.dataclass(frozen=True)
class HeldKey:
    """A software key generated in memory only (``Keystore.generate_held_key``): nothing names it and nothing is
    written until ``store_certificate(..., key=held)`` writes its encrypted file in the certificate's commit, or
    ``Keystore.stage_held_key`` writes it earlier (unnamed, held by that Keystore object until the commit). It
    dies with the process that holds it, as a pending key whose owner is gone would be discarded anyway."""

    uri: str
    key_type: str
    private_key: object = dataclasses.field(repr=False)
    public_key: object = dataclasses.field(repr=False)
    label: str
    created: str
    encrypted: bytes = dataclasses.field(repr=False)  # the key file's contents, encrypted at generation (not at /verify)


@dataclasses.dataclass
class _Cleanup:
    """What a durable commit leaves to do (``Keystore._cleanup``): the superseded key to destroy (claimed by the
    exclusive lock ``claim``), the version directories of credential ``name`` to remove (``versions``, pruned by
    the commit; with ``sweep``, every entry of ``creds/<name>`` the index does not reference), and the lock file to
    make for a held key just stored (``lock``, its URI)."""

    name: str
    key: str | None
    claim: int | None
    versions: tuple[int, ...]
    lock: str | None = None
    sweep: bool = False


def _apply(lookup: dict, old: dict, new: dict, field: str) -> dict[str, tuple[str, dict]]:
    """``lookup`` (``{r[field]: (row id, r)}`` of table ``old``) made that of table ``new``, changing only the rows
    that differ: rows gone or renamed drop out, new or replaced rows are set (a replaced row keeps its place)."""
    out = dict(lookup)
    for k, r in old.items():
        n = new.get(k)
        if n is not r and (n is None or n[field] != r[field]) and out.get(r[field], (None,))[0] == k:
            del out[r[field]]
    for k, r in new.items():
        if old.get(k) is not r:
            out[r[field]] = (k, r)
    return out


class _View:
    """Lookups derived from one cached index document (rebuilt when the document changes)."""

    def __init__(self, doc: dict):
        self.doc = doc
        self._creds = self._keys = self._trust = self._users = self._retired = None

    def table(self, name: str) -> dict:
        return self.doc.get(name) or {}

    @classmethod
    def after_write(cls, old: "_View | None", doc: dict) -> "_View":
        """The view of ``doc``, a document a transaction of ours wrote over ``old``'s: the lookups ``old`` has
        built are carried over with only the records that changed applied (a record is replaced, never changed in
        place, so an unchanged record is the same object in both documents), instead of being built again from
        all N records: one keystore write no longer allocates three N-entry lookups (docs/keystore.md). The
        result equals a fresh ``_View(doc)``'s (tests/unit/test_keystore_view.py)."""
        new = cls(doc)
        if old is None:
            return new
        oc, nc = old.table("credentials"), new.table("credentials")
        ok, nk = old.table("keys"), new.table("keys")
        if old._creds is not None:
            new._creds = _apply(old._creds, oc, nc, "name")
        if old._keys is not None:
            new._keys = keys = _apply(old._keys, ok, nk, "uri")
            if old._retired is not None:
                gone = {r["uri"] for k, r in ok.items() if nk.get(k) is not r}
                retired = [u for u in old._retired if u not in gone]
                retired += [r["uri"] for k, r in nk.items() if ok.get(k) is not r and r.get("state") == "retired"
                            and keys.get(r["uri"], (None, None))[1] is r]
                new._retired = retired if len(retired) == len(set(retired)) else None
        if old._users is not None:
            users = dict(old._users)
            for k, r in oc.items():
                if nc.get(k) is not r:
                    names = [n for n in users.get(r["key_uri"], ()) if n != r["name"]]
                    if names:
                        users[r["key_uri"]] = names
                    else:
                        users.pop(r["key_uri"], None)
            for k, r in nc.items():
                if oc.get(k) is not r:
                    users[r["key_uri"]] = [*users.get(r["key_uri"], ()), r["name"]]
            new._users = users
        if old._trust is not None and old.table("trust") is new.table("trust"):
            new._trust = old._trust
        return new

    def creds(self) -> dict[str, tuple[str, dict]]:
        if self._creds is None:
            self._creds = {r["name"]: (k, r) for k, r in self.table("credentials").items()}
        return self._creds

    def keys(self) -> dict[str, tuple[str, dict]]:
        if self._keys is None:
            self._keys = {r["uri"]: (k, r) for k, r in self.table("keys").items()}
        return self._keys

    def retired(self) -> list[str]:
        if self._retired is None:
            self._retired = [u for u, (_, r) in self.keys().items() if r.get("state") == "retired"]
        return list(self._retired)

    def key_users(self) -> dict[str, list[str]]:
        if self._users is None:
            users: dict[str, list[str]] = {}
            for r in self.table("credentials").values():
                users.setdefault(r["key_uri"], []).append(r["name"])
            self._users = users
        return self._users

    def trust(self) -> dict[str, list[dict]]:
        if self._trust is None:
            t: dict[str, list[dict]] = {}
            for k in sorted(self.table("trust"), key=int):
                r = self.table("trust")[k]
                t.setdefault(r["domain"], []).append(r)
            self._trust = t
        return self._trust


class Keystore:
    """Open with ``Keystore.open(path)``; create with ``Keystore.init(path)``."""

    def __init__(self, root: str | os.PathLike, backend_options: dict | None = None, *,
                 pending_max_age_s: float = PENDING_MAX_AGE_S):
        self.root = Path(root)
        self.pending_max_age_s = pending_max_age_s  # gc discards pending keys older than this, whoever owns them
        self._lock = KeystoreLock(self.root)
        self._storage = IndexStorage(self.root / INDEX)
        storage = self._storage  # not self: no reference cycle keeps a dropped Keystore's files open
        self._db = TinyDB(storage=lambda *a, **k: storage)
        self._view_of: tuple[int, _View] | None = None
        self._view_epoch = -1  # the lock epoch in which _view_of was last validated under the lock (see _view)
        self._backend_options = backend_options or {}
        self._backends: dict[str, KeyBackend] = {}
        self._master: bytes | None = None
        self.unsynced: NotDurableError | None = None  # see _txn
        self._parsed: dict[tuple, list[x509.Certificate]] = {}  # see _certs_of
        self._locks = KeyLocks(self.root)  # who may still use a key: see keylocks.py and _destroy_now
        self._destroyed: set[str] = set()  # keys destroyed here whose retired records the next _txn drops
        self._deferred: list[_Cleanup] = []  # store_certificate(defer_cleanup=True) work for flush(), under _lock
        self._flushing = 0  # a thread is running the deferred work (close() waits for it: see flush)
        self._staged: dict[str, tuple[int, int]] = {}  # held key URI -> (st_dev, st_ino) of its staged file

    # ---- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def init(cls, root: str | os.PathLike, backend_options: dict | None = None, **kw) -> "Keystore":
        """Create a keystore (idempotent: an existing one is opened, never overwritten)."""
        root = Path(root)
        _refuse_unfinished_wipe(root)
        fsutil.ensure_dir(root)
        ks = cls(root, backend_options, **kw)
        with ks._lock:
            if not (root / MASTER_KEY).exists():
                fsutil.atomic_write(root / MASTER_KEY, _secrets.token_hex(32).encode() + b"\n", mode=0o400)
            if ks._storage.read() is None:
                ks._storage.write({"meta": {"1": {"format": FORMAT, "created": _now().isoformat(),
                                                  "master_key": "file"}}})
                ks.audit("keystore-init", path=str(root))
        return ks

    @classmethod
    def open(cls, root: str | os.PathLike, backend_options: dict | None = None, **kw) -> "Keystore":
        """Open an existing keystore, refusing one whose directory or master key others can read.

        Raises:
            KeystoreNotInitializedError, KeystorePermissionError, CorruptFileError.
        """
        root = Path(root)
        _refuse_unfinished_wipe(root)
        if not (root / INDEX).exists():
            raise KeystoreNotInitializedError(f"no keystore at {root}: run 'devagent keystore init' "
                                              "(or pass --state-dir / DEVAGENT_STATE_DIR)")
        fsutil.check_private(root, "keystore directory")
        ks = cls(root, backend_options, **kw)
        meta = ks.meta()
        if meta.get("format", 0) > FORMAT:
            raise KeystoreError(f"keystore {root} has format {meta['format']}, newer than this devagent ({FORMAT})")
        ks._migrate()
        return ks

    def _migrate(self) -> None:
        """Bring records of earlier versions up to date, once, in one atomic index write (a crash leaves the old
        or the new index): credential records get ``chain_subjects`` so that ``status`` and ``list`` read no
        certificate. A keystore this process cannot write is left as it is (everything falls back)."""
        old = [n for n, (_, r) in self._view().creds().items() if not isinstance(r.get("chain_subjects"), list)]
        if not old or not os.access(self.root / INDEX, os.W_OK):
            return
        try:
            with self._lock:
                with self._txn() as data:
                    for doc_id, rec in list(data["credentials"].items()):
                        if isinstance(rec.get("chain_subjects"), list):
                            continue
                        try:
                            chain = self._version_files(rec["name"], rec["version"])[1]
                        except (FileNotFoundError, KeystoreError):
                            continue  # check() reports it; nothing to migrate
                        data["credentials"][doc_id] = dict(rec, chain_subjects=[describe(c)["subject"]
                                                                                 for c in chain])
        except KeystoreError as e:  # e.g. locked by another process for long: try again next time
            _log.debug("index migration postponed: %s", e)

    def __enter__(self) -> "Keystore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """``with Keystore.open(root) as ks:`` closes ``ks`` however the block ends (an exception propagates)."""
        self.close()

    def close(self) -> None:
        """Finish deferred work (``flush``), release the holds on keys and the backends' sessions, close the index.
        Also ``with Keystore.open(...) as ks:``."""
        self.flush()  # a superseded key whose destruction was deferred goes now (its claim is held until then)
        self._locks.release_all()
        for b in self._backends.values():
            b.close()
        self._backends.clear()
        self._storage.close()
        self._view_of = None

    def _view(self) -> _View:
        """Lookups over the cached index, re-validated against the file on every call (see storage.py) — except
        while this thread holds the keystore lock and has validated (or written) the cache since it took it: no
        other process or thread can write the index meanwhile, so the file cannot have changed (a write of ours
        changes ``generation``; ``_txn`` then makes the view of what it wrote, which stays valid while we hold
        the lock)."""
        lk, hit = self._lock, self._view_of
        if hit is not None and hit[0] == self._storage.generation and hit[1].doc is self._storage.cached() \
                and self._view_epoch == lk.epoch and lk.owned_by_me():
            return hit[1]
        doc = self._storage.read() or {}
        gen = self._storage.generation
        if self._view_of is None or self._view_of[0] != gen or self._view_of[1].doc is not doc:
            self._view_of = (gen, _View(doc))
        self._view_epoch = lk.epoch if lk.owned_by_me() else -1
        return self._view_of[1]

    def meta(self) -> dict:
        return dict(self._view().table("meta").get("1") or {})

    # ---- master key and backends ----------------------------------------------------------------
    def _master_key(self) -> bytes:
        if self._master is None:
            provider = self.meta().get("master_key", "file")
            if provider == "file":
                p = self.root / MASTER_KEY
                try:
                    self._master = fsutil.read_private(p, "keystore master key").strip()
                except FileNotFoundError:
                    raise KeystoreError(f"keystore master key {p} is missing: software keys cannot be "
                                        "decrypted") from None
            else:
                from keystore.backends import tpm  # only when the master key is sealed to the TPM

                self._master = tpm.unseal_master_key(self.root, self.meta(), self._backend_options.get("tpm", {}))
        return self._master

    def seal_master_key(self, provider: str = "tpm") -> None:
        """Move the master key from ``master.key`` into the TPM (sealed object); crash-safe, see
        ``keystore.backends.tpm.move_master_key_to_tpm``."""
        if provider != "tpm":
            raise ValueError(f"unknown master key provider {provider!r} (only 'tpm')")
        from keystore.backends import tpm

        with self._lock:
            tpm.move_master_key_to_tpm(self, self._backend_options.get("tpm", {}))

    def backend(self, name_or_scheme: str) -> KeyBackend:
        scheme = BACKEND_NAMES.get(name_or_scheme, name_or_scheme)
        if scheme not in self._backends:
            me = weakref.ref(self)  # no cycle Keystore -> backend -> context -> Keystore (see __init__)
            ctx = BackendContext(self.root, lambda: me()._master_key(), self._backend_options.get(
                {"file": "soft"}.get(scheme, scheme), {}))
            self._backends[scheme] = backend_class(scheme)(ctx)
        return self._backends[scheme]

    def _backend_for(self, uri: str) -> KeyBackend:
        return self.backend(scheme_of(uri))

    # ---- index transactions -------------------------------------------------------------------
    @contextlib.contextmanager
    def _txn(self, sync_first=(), sync_dir: bool = True, fsync_files=None):
        """Read the whole index under the lock, let the caller mutate it, write it back in one replace (after the
        entries of ``sync_first`` are durable: see ``fsutil.atomic_write``). ``sync_dir=False``: the replace is
        not made durable here; the caller does it (``generate_key`` with the key file) before anything depends on
        it."""
        with self._lock:
            self._run_deferred()
            # _view: the index as validated under this hold of the lock (no second stat if it was already)
            base = self._view()
            data = IndexStorage.mutable(base.doc)
            for t in ("credentials", "keys", "trust", "meta"):
                data.setdefault(t, {})
            dropped = self._drop_destroyed(data)
            yield data
            try:
                self._storage.write(data, sync_first, sync_dir, fsync_files)
            except NotDurableError as e:
                self._not_synced(e)
            else:
                self.unsynced = None
                # What we just wrote is the index while we hold the lock: views of it need no stat until released.
                self._view_of = (self._storage.generation, _View.after_write(base, self._storage.cached() or {}))
                self._view_epoch = self._lock.epoch
            self._destroyed -= dropped

    def _not_synced(self, e: NotDurableError) -> None:
        """An index replace whose directory fsync failed: the change is live. Retry the sync once; if it still
        fails, remember it (``durable`` is False) so that nothing the previous index references is destroyed until
        a later sync succeeds (every index write and ``gc`` syncs the directory again)."""
        self.unsynced = self._retry_sync(e)
        if self.unsynced is not None:
            _log.warning("%s; it is live and is synced again by the next keystore write or 'devagent keystore "
                         "check'", self.unsynced)

    def _drop_destroyed(self, data: dict) -> set[str]:
        """Remove from a transaction what still names keys this object destroyed since its last write: their
        retired records, and their entries in the ``destroying`` list (see ``store_certificate``)."""
        dropped = set(self._destroyed)
        if not dropped:
            return dropped
        for uri in dropped:
            kid, rec = self._find_key(data, uri)
            if kid is not None and rec.get("state") == "retired":
                del data["keys"][kid]
        meta = data["meta"].get("1") or {}
        if set(meta.get("destroying") or ()) & dropped:
            rest = [u for u in meta["destroying"] if u not in dropped]
            data["meta"]["1"] = {k: v for k, v in dict(meta, destroying=rest).items() if k != "destroying" or rest}
        return dropped

    def _destroying(self) -> list[str]:
        """Keys a commit unrecorded to destroy right after it (``meta.destroying``): normally emptied by the next
        write; left over only by a crash in between, for gc."""
        return list(self._view().table("meta").get("1", {}).get("destroying") or ())

    @property
    def durable(self) -> bool:
        """False while this process's last index change is live but its directory fsync failed."""
        return self.unsynced is None

    @staticmethod
    def _find(table: dict, **match) -> tuple[str | None, dict | None]:
        for doc_id, doc in table.items():
            if all(doc.get(k) == v for k, v in match.items()):
                return doc_id, doc
        return None, None

    def _find_cred(self, data: dict, name: str) -> tuple[str | None, dict | None]:
        """The credential record named ``name`` in a transaction's ``data``."""
        return self._find_in(data["credentials"], "name", name, self._view().creds())

    def _find_key(self, data: dict, uri: str) -> tuple[str | None, dict | None]:
        return self._find_in(data["keys"], "uri", uri, self._view().keys())

    @staticmethod
    def _find_in(table: dict, field: str, value, by_value: dict) -> tuple[str | None, dict | None]:
        """Look ``value`` up through the cached view of the index the transaction started from; only records the
        transaction itself added or replaced (plain dicts, not the cache's read-only ones) can be missing from it."""
        hit = by_value.get(value)
        if hit is not None:
            row = table.get(hit[0])
            if row is not None and row.get(field) == value:
                return hit[0], row
        for k, row in table.items():
            if not isinstance(row, ReadOnlyDict) and row.get(field) == value:
                return k, row
        return None, None

    @staticmethod
    def _next_id(table: dict) -> str:
        return str(max(map(int, table), default=0) + 1)

    def _table(self, name: str):
        return self._db.table(name, cache_size=0)

    # ---- audit --------------------------------------------------------------------------------
    def audit(self, action: str, *, durable: bool = True, **details) -> None:
        """Append an audit record (who/what/when). Callers never pass secrets.

        ``durable=False``: the line is not fsynced on its own; the next durable line fsyncs the file and with it
        this one. Only for a line whose loss on a power cut loses nothing that survives it (see ``generate_key``).
        """
        fsutil.append_line(self.root / AUDIT_LOG, self._audit_line(action, **details), sync=durable)

    @staticmethod
    def _audit_line(action: str, **details) -> bytes:
        uid = os.geteuid()
        user = _USERS.get(uid)
        if user is None:
            try:
                user = getpass.getuser()
            except Exception:
                user = str(uid)
            _USERS[uid] = user
        entry = {"ts": _now().isoformat(), "uid": uid, "user": user, "pid": os.getpid(),
                 "action": action, **details}
        return _AUDIT_JSON.encode(entry).encode()

    def audit_entries(self) -> list[dict]:
        out = []
        try:
            lines = (self.root / AUDIT_LOG).read_text().splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line after a crash
        return out

    # ---- keys ---------------------------------------------------------------------------------
    def generate_key(self, key_type: str, *, backend: str = "soft", label: str = "", pending_for: dict | None = None,
                     allow_weak: bool = False, pending: bool = True, meanwhile=None) -> str:
        """Generate a key in ``backend`` and record it as pending (not yet certified), owned by this process (see
        keystore/owner.py: ``gc`` discards it once the owner is gone). Returns its URI.

        ``pending=False`` records a key that is in use without a credential of the keystore (an OPC UA server's
        self-signed bootstrap certificate): state ``active``, never discarded by ``gc``; its user discards it.

        The record is durable before the key is kept anywhere under its name (``KeyBackend.prepare``): a crash at
        any point leaves at most a pending record that ``gc`` cleans up through the backend — never a key file, TPM
        handle or token object that nothing names. (A software key's bytes are written and fsynced under a temp
        name, which names no key, in one batch with the record's index write: docs/keystore.md "Generating a key".)

        ``meanwhile``: a callable ``meanwhile(uri)`` run once the key has its name (and is held by nothing yet),
        while its last fsync (a software key's directory entry) is in flight; ``generate_key`` returns only after
        both, so what the caller builds meanwhile (the device's CSR) is sent only for a durable key. If it raises,
        the key generation is undone as if a write had failed (the key destroyed, the record removed) and its
        exception propagates.
        """
        kt = parse_key_type(key_type, allow_weak=allow_weak)
        be = self.backend(backend)
        with self._lock:
            nk = be.prepare(kt, label)
            uri = nk.uri
            rec = {"uri": uri, "key_type": kt, "backend": be.scheme, "created": _now().isoformat(),
                   "state": "pending" if pending else "active", "label": label, "pending_for": pending_for or {},
                   "owner": owner.current(), **self._public_fields(nk.public)}
            self._locks.create(uri)
            before = self._storage.read() if not self._destroyed else None
            # A software key is written first under a temp name, which names no key (NewKey.stage), and its data
            # is fsynced in one batch with the index temp file that records it; after the index replace, the
            # index's directory fsync makes the record durable and only then does the key file get its name and
            # its directory fsync (NewKey.syncs_first). docs/keystore.md "Generating a key" gives the argument.
            try:
                staged = nk.stage()
                with self._txn(sync_dir=not nk.syncs_first, fsync_files=staged) as data:
                    data["keys"][self._next_id(data["keys"])] = rec
            except BaseException:
                nk.discard_staged()  # the record was not written: the temp file goes (securely), and the lock file
                with contextlib.suppress(OSError):
                    os.unlink(self._locks.path(uri))
                raise
            try:
                nk.keep(sync_first=(self.root / INDEX,),
                        meanwhile=(lambda: meanwhile(uri)) if meanwhile is not None else None)
            except BaseException:
                # Not kept (or partly), or meanwhile failed: destroy whatever exists under the URI, then forget the
                # record (by writing back the index as it was, when this write changed nothing else: a failed key
                # generation then leaves the keystore byte for byte as it found it).
                self._locks.release(uri, explicit=False, everything=True)  # a hold meanwhile took
                nk.discard_staged()
                with contextlib.suppress(KeystoreError, OSError):
                    be.delete(uri)
                with contextlib.suppress(KeystoreError):
                    if before is not None:
                        self._storage.write(IndexStorage.mutable(before))
                    else:
                        with self._txn() as data:
                            kid, _ = self._find_key(data, uri)
                            if kid is not None:
                                del data["keys"][kid]
                    with contextlib.suppress(OSError):
                        os.unlink(self._locks.path(uri))
                raise
        # A pending key's line is not fsynced on its own (one fsync less per key generation): it becomes durable
        # with the next durable line (the key's certificate-store, key-discard or pending-key-discard line, or any
        # other). A power cut before that loses it only together with the key's use: a pending key never
        # survives a reboot (its owner is gone: gc discards it, and that fsynced line names the key, its type, when
        # it was made, by whom and for what). A key in use without a credential (pending=False) is durable at once.
        self.audit("key-generate", key_uri=uri, key_type=kt, label=label, durable=not pending)
        return uri

    def generate_held_key(self, key_type: str, *, label: str = "", allow_weak: bool = False) -> HeldKey:
        """Generate a software key in memory: no record, no file, no fsync, no lock, no audit line yet. Its URI is
        allocated (``file:keys/<id>.key``) and its file is written only by ``store_certificate(..., key=...)``, in
        the certificate's commit batch, which records it ``active`` with the credential in one index write (and
        writes its ``key-generate`` audit line then), unless ``stage_held_key`` wrote it before (the commit then
        leaves it out of its batch). A held key that is never stored leaves no trace (a staged one's file is
        deleted by ``discard_held_key``, or by ``gc`` once its process is gone).

        Software backend only: a TPM handle or a token object exists the moment it is made, so it must be named by
        a durable record first (``generate_key``)."""
        from keystore.keytypes import generate_software_key

        kt = parse_key_type(key_type, allow_weak=allow_weak)
        key = generate_software_key(kt)
        be = self.backend("soft")
        uri = be.new_uri()
        return HeldKey(uri, kt, key, key.public_key(), label, _now().isoformat(), be.encrypt(key))

    def stage_held_key(self, key: HeldKey) -> None:
        """Write a held key's encrypted file under its final name ``keys/<id>.key`` now, fsynced with ``keys/``
        (one batch), so that ``store_certificate(..., key=key)`` by this object later leaves it out of its commit
        batch (the device stages it after its /csr answer, while the CLM is talking to the CA). Nothing names the
        file until that commit: this object holds the key's lock (shared) meanwhile, and ``gc`` — of any process —
        leaves an unnamed key file whose lock is held alone; once this process is gone (killed) its lock goes with
        it and ``gc`` securely deletes the file. ``discard_held_key`` deletes it when the key is dropped unstored.
        Idempotent.

        Raises:
            StorageError: a write or fsync failed; nothing stays (the file securely deleted, the hold and lock file
                gone); ``store_certificate`` then writes the file itself, as for a key never staged.
            ValueError: the key is stored already.
        """
        with self._lock:
            if key.uri in self._staged:
                return
            if self._view().keys().get(key.uri) is not None:
                raise ValueError(f"held key {key.uri} is already stored")
            path = self.backend("soft").key_path(key.uri)
            dirs: list[Path] = []
            files = None
            try:
                dirs = fsutil.make_dirs(path.parent, self.root)
                try:
                    self._locks.create(key.uri)
                except OSError as e:
                    raise StorageError(f"cannot create the lock file {self._locks.path(key.uri)} of held key "
                                       f"{key.uri}: {e.strerror or e}") from e
                if not self._locks.hold(key.uri, explicit=False):
                    raise StorageError(f"cannot lock {self._locks.path(key.uri)} to stage held key {key.uri}")
                files = fsutil.write_new_files([(path, key.encrypted)])
                st = os.fstat(files.files[0][1])
                fsutil.sync_entries([path, *dirs], files)
            except BaseException:
                if files is not None:
                    files.close()
                    with contextlib.suppress(OSError, KeystoreError):
                        fsutil.secure_delete(path, sync_dir=False)
                self._locks.release(key.uri, explicit=False, everything=True)
                with contextlib.suppress(OSError):
                    os.unlink(self._locks.path(key.uri))
                for d in dirs[::-1]:
                    with contextlib.suppress(OSError):
                        d.rmdir()
                raise
            files.close()
            self._staged[key.uri] = (st.st_dev, st.st_ino)

    def staged(self, key: HeldKey) -> bool:
        """True while ``key``'s file is staged by this object (``stage_held_key``) and not yet stored or
        discarded."""
        return key.uri in self._staged

    def discard_held_key(self, key: HeldKey) -> None:
        """A held key dropped without being stored (superseded, pushed out by a bound, shutdown): a staged file
        is securely deleted, its hold and lock file go. A key never staged here needs nothing (nothing was
        written); a key stored meanwhile is left alone (the index names it)."""
        with self._lock:
            ident = self._staged.pop(key.uri, None)
            if ident is None:
                return
            if self._view().keys().get(key.uri) is None:
                path = self.backend("soft").key_path(key.uri)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    st = None
                try:
                    if st is not None and (st.st_dev, st.st_ino) == ident:
                        # Not fsynced after the unlink: a power cut that undoes it leaves overwritten garbage (gc).
                        fsutil.secure_delete(path, sync_dir=False)
                finally:  # a failed delete: unheld, the file is an unnamed leftover that gc securely deletes
                    self._locks.release(key.uri, explicit=False, everything=True)
                    with contextlib.suppress(OSError):
                        os.unlink(self._locks.path(key.uri))
            else:
                self._locks.release(key.uri, explicit=False)

    def import_key(self, private_key, *, label: str = "", state: str = "pending") -> str:
        """Store an externally generated private key (server-side keygen, IDevID import) as a software key."""
        kt = key_type_of(private_key)
        be = self.backend("soft")
        with self._lock:
            uri = be.import_key(private_key, label)
            try:
                rec = {"uri": uri, "key_type": kt, "backend": "file", "created": _now().isoformat(),
                       "state": state, "label": label, "pending_for": {},
                       **({"owner": owner.current()} if state == "pending" else {})}
                rec.update(self._public_fields(private_key.public_key()))
                self._locks.create(uri)
                with self._txn() as data:
                    data["keys"][self._next_id(data["keys"])] = rec
            except BaseException:
                be.delete(uri)
                raise
        self.audit("key-import", key_uri=uri, key_type=kt, label=label)
        return uri

    def register_key(self, uri: str, *, label: str = "", state: str = "pending") -> str:
        """Record a key that already exists in a backend (e.g. a TPM persistent handle holding the IDevID key)."""
        pub = self._backend_for(uri).public_key(uri)
        with self._txn() as data:
            self._locks.create(uri)
            _, existing = self._find_key(data, uri)
            if existing is None:
                data["keys"][self._next_id(data["keys"])] = {
                    "uri": uri, "key_type": key_type_of(pub), "backend": scheme_of(uri),
                    "created": _now().isoformat(), "state": state, "label": label, "pending_for": {},
                    "origin": "external",  # not created by devagent: wipe() forgets it, never destroys it
                    **self._public_fields(pub)}
        return uri

    @staticmethod
    def _public_fields(pub) -> dict:
        """What the index keeps of a key's public half (SubjectPublicKeyInfo, base64 DER): enough to check that a
        certificate carries the key without asking the backend (which would decrypt a software key)."""
        if pub is None:
            return {}
        return {"public_key": base64.b64encode(spki_der(pub)).decode()}

    def private_key(self, uri: str):
        """The key as a ``cryptography`` private-key object. This Keystore object holds the key from now on (see
        ``hold_key``) until ``release_key`` or ``close``: no other process destroys it meanwhile.

        Raises:
            KeyGoneError: the key was destroyed (its credential renewed or deleted by another process).
        """
        self._hold(uri, explicit=False)
        return self._backend_for(uri).load(uri)

    def open_key(self, uri: str) -> None:
        """Open the key where it lives, as a signature would, and sign nothing: a software key is read and
        decrypted, a TPM key loaded under its parent (or its persistent handle opened), a PKCS#11 token logged in
        to and the private key object found. For a long-lived process to find an unusable key (TPM unreachable,
        wrong PIN, token or key file gone) at its start, not at its first signature. Holds the key like
        ``private_key``.

        Raises:
            KeystoreError: (KeyBackendError, NotFoundError, ...) naming what failed.
        """
        self._hold(uri, explicit=False)
        self._backend_for(uri).open_key(uri)

    def hold_key(self, uri: str, *, credential: str | None = None) -> None:
        """Declare that a flow of this process uses ``uri`` (to sign, or through a TLS stack reading its file) until
        ``release_key``: no process destroys the key meanwhile — a renewal that supersedes it retires it, and it is
        destroyed once nobody holds it (keylocks.py). Holds are counted per Keystore object.

        ``credential``: the name of the credential whose record gave ``uri`` (a ``Credential`` read earlier). Such
        a key was in the index, so if the index no longer names it at all, it was destroyed (a renewal or delete by
        another process, and a later write that forgot it) — not a key that is merely not recorded yet (a
        ``--key-uri`` before its first certificate), which is used without a hold.

        Raises:
            KeyGoneError: the key was destroyed already.
        """
        self._hold(uri, explicit=True, credential=credential)

    def release_key(self, uri: str) -> None:
        """End one ``hold_key`` (and the hold ``private_key`` took). A retired key nobody holds any more is
        destroyed now."""
        if self._locks.release(uri, explicit=True):
            hit = self._view().keys().get(uri)
            if hit is not None and hit[1].get("state") == "retired":
                with self._lock:
                    if self._destroy_now(uri):
                        self._destroyed.add(uri)

    @contextlib.contextmanager
    def holding(self, uri: str):
        """``hold_key`` for the duration of a ``with`` block."""
        self.hold_key(uri)
        try:
            yield
        finally:
            self.release_key(uri)

    def _hold(self, uri: str, *, explicit: bool, credential: str | None = None) -> None:
        if self._locks.hold(uri, explicit=explicit):
            return
        with self._lock:  # no destroyer is at work while we hold the keystore lock: the index is the truth now
            if self._locks.hold(uri, explicit=explicit):
                return
            view = self._view()
            hit = view.keys().get(uri)
            gone = (hit is not None and hit[1].get("state") == "retired") or uri in self._destroying()
            if hit is None and uri not in view.key_users() and not gone:
                if credential is None:
                    return  # not a key of this keystore's index (e.g. --key-uri before it is recorded): no hold
                # It was a credential's key, and the index has forgotten it: destroyed, its record and its entry
                # in meta.destroying dropped by later writes (the caller read the credential before that).
                gone = True
            if gone:
                raise KeyGoneError(f"key {uri} was destroyed: the credential that used it"
                                   f"{f' ({credential})' if credential else ''} was renewed or deleted by another "
                                   "devagent process")
            self._locks.create(uri)  # a keystore from before lock files, or a lock file a power cut lost
            if not self._locks.hold(uri, explicit=explicit):
                raise KeyGoneError(f"key {uri} is being destroyed by another devagent process")

    def _destroy_now(self, uri: str) -> bool:
        """Under the keystore lock, for a key the index no longer needs (retired, or a pending key being discarded):
        destroy it if no process holds it. False: in use (here by a flow, or by another process); it stays retired
        and whoever finds it free later destroys it."""
        fd = self._claim(uri)
        if fd is None:
            return False
        self._finish_destroy(uri, fd)
        return True

    def _claim(self, uri: str, *, ours_too: bool = False) -> int | None:
        """The exclusive lock that lets us destroy ``uri`` (nobody can hold it meanwhile), or None if in use.
        ``ours_too``: this object's own holds do not count (an explicit delete by this process)."""
        if self._locks.in_use(uri) and not ours_too:
            return None
        self._locks.release(uri, explicit=False, everything=ours_too)  # nothing here uses it now
        return self._locks.try_exclusive(uri)

    def _finish_destroy(self, uri: str, fd: int) -> None:
        try:
            self._backend_for(uri).delete(uri)
        except BaseException:
            self._locks.release_exclusive(fd)
            raise
        self._locks.remove(uri, fd)

    def public_key(self, uri: str):
        """The public half of a key: from the backend's memory, else from the index (a pending key's record keeps
        it; an active key's is its certificate's), and only else from the backend (a software key is then
        decrypted; a token or TPM is asked)."""
        be = self._backend_for(uri)
        pub = be.cached_public_key(uri)
        if pub is not None:
            return pub
        view = self._view()
        hit = view.keys().get(uri)
        spki = hit[1].get("public_key") if hit is not None else None
        if isinstance(spki, str):  # a pending key
            try:
                return serialization.load_der_public_key(base64.b64decode(spki))
            except ValueError:
                pass  # a damaged record: ask the backend
        for name in view.key_users().get(uri, ()):  # an active key: its certificate carries it
            with contextlib.suppress(FileNotFoundError, KeystoreError):
                return self._version_files(name, view.creds()[name][1]["version"])[0].public_key()
        return be.public_key(uri)

    def key_file(self, uri: str):
        """(path, password) of the key's encrypted PEM for TLS stacks that read a file, or None. Holds the key like
        ``private_key``."""
        self._hold(uri, explicit=False)
        return self._backend_for(uri).key_file(uri)

    def key_record(self, uri: str) -> dict | None:
        hit = self._view().keys().get(uri)
        return dict(hit[1]) if hit is not None else None

    def pending_keys(self) -> list[dict]:
        keys = self._view().table("keys")
        return [dict(keys[k]) for k in sorted(keys, key=int) if keys[k].get("state") == "pending"]

    def pending_summary(self, rec: dict, now: datetime.datetime | None = None) -> dict:
        """A pending key for ``keystore list``: URI, type, age, what it is for, and its owner (running or gone)."""
        now = now or _now()
        try:
            age = round((now - datetime.datetime.fromisoformat(rec["created"])).total_seconds(), 1)
        except (KeyError, TypeError, ValueError):
            age = None
        pf = rec.get("pending_for") or {}
        o = rec.get("owner")
        state = {True: "running", False: "gone", None: "unknown"}[owner.alive(o)] if o else None
        return {"key_uri": rec["uri"], "key_type": rec.get("key_type"), "created": rec.get("created"), "age_s": age,
                "for": pf.get("name") or pf.get("credential"), "op": pf.get("op") or pf.get("source"),
                "owner": dict(o, state=state) if isinstance(o, dict) else None}

    def discard_key(self, uri: str) -> None:
        """Destroy a key that no credential references (a pending key after a failed enrollment)."""
        with self._lock:
            for name in self._view().key_users().get(uri, ()):
                raise KeystoreError(f"key {uri} is in use by credential {name}; delete the credential")
            # Destroyed first, unrecorded second: a crash in between leaves a record that gc finishes (the backend's
            # delete is idempotent), never a key (a token object, a TPM handle) that no record names.
            destroyed = self._destroy_now(uri)
            with self._txn() as data:
                doc_id, rec = self._find_key(data, uri)
                if doc_id is not None:
                    if destroyed:
                        del data["keys"][doc_id]
                    else:
                        data["keys"][doc_id] = dict(rec, state="retired", retired=_now().isoformat())
            self._destroyed.discard(uri)
        self.audit("key-discard", key_uri=uri, **({} if destroyed else {"retired": "in use by another process"}))

    # ---- trust anchors ------------------------------------------------------------------------
    def trust_anchors(self, domain: str, purpose: str = "pki") -> list[x509.Certificate]:
        """The anchors of ``domain`` for ``purpose`` (``TRUST_PURPOSES``; records older than purposes: pki)."""
        out = []
        for rec in self._view().trust().get(domain, ()):  # the cached index, in record order
            if rec.get("purpose", "pki") != purpose:
                continue
            p = self.root / rec["file"]
            try:
                out.extend(self._certs_of(p))
            except FileNotFoundError:
                raise CorruptFileError(f"trust anchor file {p} for domain {domain} is missing") from None
        return out

    def _certs_of(self, p: Path) -> list[x509.Certificate]:
        """Certificates in ``p``, parsed once per content (keyed by the file's inode, size, mtime_ns, ctime_ns)."""
        st = os.stat(p)
        key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        hit = self._parsed.get(key)
        if hit is None:
            hit = load_certificates(self._read_file(p), str(p))
            if len(self._parsed) > 256:
                self._parsed.clear()
            self._parsed[key] = hit
        return list(hit)

    def trust_records(self, domain: str | None = None, purpose: str | None = None) -> list[dict]:
        t = self._table("trust")
        recs = t.search(Query().domain == domain) if domain else t.all()
        out = [dict(r, purpose=r.get("purpose", "pki")) for r in recs]
        return [r for r in out if purpose is None or r["purpose"] == purpose]

    def add_trust_anchors(self, domain: str, certs: Sequence[x509.Certificate], *, source: str,
                          role: str = "root", verified_by: str = "operator", purpose: str = "pki") -> list[str]:
        """Add certificates to one of a domain's trust stores (the caller has established trust in them).

        ``purpose`` (``TRUST_PURPOSES``): ``pki`` (what issued certificates must chain to), ``tls`` (EST TLS
        server anchors), ``cmp`` (CMP response signer anchors) — CA certificates — or ``cmp-server`` (pinned CMP
        server certificates, any certificate). Returns the fingerprints added (existing ones are kept).
        """
        check_name(domain, "domain")
        if purpose not in TRUST_PURPOSES:
            raise ValueError(f"unknown trust purpose {purpose!r} (one of {', '.join(TRUST_PURPOSES)})")
        if not certs:
            raise ValueError("no certificate to add")
        for c in certs:
            if purpose != "cmp-server" and not is_ca(c):
                raise VerificationError("not-a-ca", f"{c.subject.rfc4514_string()} is not a CA certificate; "
                                        "a trust anchor must be a CA")
        added = []
        tdir = fsutil.ensure_dir(self.root / "trust")
        fsutil.ensure_dir(tdir / domain)
        with self._txn() as data:
            for c in certs:
                fp = fingerprint(c)
                if any(r.get("domain") == domain and r.get("fingerprint") == fp and r.get("purpose", "pki") == purpose
                       for r in data["trust"].values()):
                    continue
                prefix = "" if purpose == "pki" else f"{purpose}-"
                rel = f"trust/{domain}/{prefix}{fp.split(':')[1][:32]}.pem"
                fsutil.atomic_write(self.root / rel, pem([c]))
                data["trust"][self._next_id(data["trust"])] = {
                    "domain": domain, "fingerprint": fp, "subject": c.subject.rfc4514_string(),
                    "not_after": c.not_valid_after_utc.isoformat(), "file": rel, "role": role, "purpose": purpose,
                    "source": source, "verified_by": verified_by, "added": _now().isoformat()}
                added.append(fp)
        if added:
            self.audit("trust-add", domain=domain, fingerprints=added, source=source, verified_by=verified_by,
                       purpose=purpose)
        return added

    def remove_trust_anchor(self, domain: str, fp: str, purpose: str | None = None) -> list[str]:
        """Remove the anchor ``fp`` (``sha256:HEX``, or a unique prefix of its hex) from ``domain``'s store for
        ``purpose`` (every store when None), and its file. Returns the purposes it was removed from.

        Raises:
            NotFoundError: no such anchor (or the prefix is ambiguous).
        """
        want = fp.lower()
        want = want if want.startswith("sha256:") else "sha256:" + want.replace(":", "")
        removed, files = [], []
        with self._txn() as data:
            hits = {k: r for k, r in data["trust"].items() if r.get("domain") == domain
                    and r.get("fingerprint", "").startswith(want) and (purpose is None or
                                                                      r.get("purpose", "pki") == purpose)}
            if len({r["fingerprint"] for r in hits.values()}) > 1:
                raise NotFoundError(f"{fp} matches several trust anchors in domain {domain}; give more of the "
                                    "fingerprint")
            if not hits:
                raise NotFoundError(f"no trust anchor {fp} in domain {domain}"
                                    + (f" for purpose {purpose}" if purpose else "")
                                    + " (see 'devagent keystore trust --domain " + domain + "')")
            for k, r in hits.items():
                del data["trust"][k]
                removed.append(r.get("purpose", "pki"))
                if not any(o.get("file") == r["file"] for o in data["trust"].values()):
                    files.append(r["file"])
            fp = next(iter(hits.values()))["fingerprint"]
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                fsutil.secure_delete(self.root / f)
        self.audit("trust-remove", domain=domain, fingerprint=fp, purposes=removed)
        return removed

    def update_ca_certs(self, domain: str, certs: Sequence[x509.Certificate], *, source: str,
                        now: datetime.datetime | None = None, check_validity: bool = True) -> list[str]:
        """Add CA certificates that chain to the current anchors (issuing CA update; a new root needs
        a verified link or an operator's fingerprint: see agent.lifecycle.ca_update)."""
        anchors = self.trust_anchors(domain)
        policy = verification_policy("ca-cert", now, check_validity)
        for c in certs:
            validate(c, certs, anchors, policy, what="CA certificate")
        return self.add_trust_anchors(domain, certs, source=source, role="ca", verified_by="chain")

    # ---- credentials --------------------------------------------------------------------------
    def _version_files(self, name: str, version: int) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        """Certificate and chain of one version (its files never change once the index points at them).

        Raises:
            FileNotFoundError: the version directory is gone (pruned or deleted by another process).
        """
        vdir = self.root / "creds" / name / f"{version:04d}"
        cert = load_certificates(self._read_file(vdir / "cert.pem"), str(vdir / "cert.pem"))[0]
        try:
            raw = self._read_file(vdir / "chain.pem")
        except FileNotFoundError:
            raw = b""
        return cert, tuple(load_certificates(raw, str(vdir / "chain.pem"))) if raw.strip() else ()

    @staticmethod
    def _read_file(p: Path) -> bytes:
        with open(p, "rb") as f:
            return f.read()

    def _credential(self, rec: dict, loaded=None) -> Credential:
        name, version = rec["name"], rec["version"]

        def files():
            try:
                return self._version_files(name, version)
            except FileNotFoundError as e:
                now = self._view().creds().get(name)
                if now is None:
                    raise NotFoundError(f"credential {name} was deleted (by another devagent process) while it was "
                                        "being read") from None
                if now[1]["version"] != version:
                    raise NotFoundError(f"credential {name} was renewed (by another devagent process) while it was "
                                        f"being read: version {version} is gone, {now[1]['version']} is live; "
                                        "read it again") from None
                raise CorruptFileError(f"credential {name}: version {version} file missing: {e.filename}") from e

        cred = Credential(name, rec["kind"], rec.get("domain"), rec["key_uri"], rec["key_type"], version, rec, files)
        if loaded is not None:
            cred.__dict__["_loaded"] = loaded
        return cred

    def _record(self, name: str) -> dict:
        hit = self._view().creds().get(name)
        if hit is None:
            raise NotFoundError(f"no credential named {name!r} (see 'devagent keystore list')")
        return hit[1]

    def get(self, name: str) -> Credential:
        """The live version of credential ``name``, its certificate and chain read now.

        A version that another process replaced between reading the index and reading its files is read again
        from the new index (once); a credential deleted meanwhile is ``NotFoundError``.
        """
        for attempt in (0, 1):
            rec = self._record(name)
            try:
                return self._credential(rec, self._version_files(name, rec["version"]))
            except FileNotFoundError as e:
                if attempt or self._record(name) is rec:  # the index still says so: the file is really missing
                    raise CorruptFileError(f"credential {name}: version {rec['version']} file missing: "
                                           f"{e.filename}") from e
        raise AssertionError("unreachable")  # pragma: no cover

    def lookup(self, name: str) -> Credential | None:
        """The live version of credential ``name`` from the index alone (certificate and chain read when first
        used, as ``list`` gives them), or None: for callers that need the record's facts (kind, domain, key,
        protocol, meta), not the certificate."""
        hit = self._view().creds().get(name)
        return self._credential(hit[1]) if hit is not None else None

    def exists(self, name: str) -> bool:
        return name in self._view().creds()

    def list(self, kind: str | None = None, domain: str | None = None) -> list[Credential]:
        """Every credential (optionally of one kind / domain), sorted by name. Certificates are read when first
        used (see ``Credential``)."""
        out = []
        for _name, (_, rec) in sorted(self._view().creds().items()):
            if (kind and rec["kind"] != kind) or (domain and rec.get("domain") != domain):
                continue
            out.append(self._credential(rec))
        return out

    def find_domain_credential(self, domain: str) -> Credential | None:
        for c in self.list(kind="ldevid", domain=domain):
            return self.get(c.name)
        return None

    def store_certificate(
        self,
        name: str,
        certificate: x509.Certificate,
        chain: Iterable[x509.Certificate] = (),
        *,
        key_uri: str | None = None,
        key: HeldKey | None = None,
        kind: str = "ldevid",
        domain: str | None = None,
        profile: str | None = None,
        purpose: str | None = None,
        protocol: str | None = None,
        server: str | None = None,
        meta: dict | None = None,
        now: datetime.datetime | None = None,
        check_validity: bool = True,
        allow_new: bool = True,
        defer_cleanup: bool = False,
        path_check: Callable[[tuple[x509.Certificate, ...]], None] | None = None,
    ) -> Credential:
        """Verify ``certificate`` against our key and the domain's anchors, then make it the live version.

        A renewal of an existing credential adds a new version; the previous one stays live until this
        commit, and its key (if different) is destroyed afterwards.

        ``defer_cleanup``: return once the commit and its audit line are durable, and leave destroying the
        superseded key and removing versions beyond ``KEEP_VERSIONS`` to ``flush`` (a service answers its peer
        first, then flushes). Nothing waits on that work for crash safety: the commit already lists the key in
        ``meta.destroying`` and the pruned versions are unreferenced, so after a crash ``gc`` (or the next
        ``store_certificate``) finishes both. Until then this object keeps the key claimed (no process can use
        it), and every later write of this object, ``gc``, ``delete`` and ``close`` flush first.

        ``path_check``: called with the verified path ``(leaf, intermediates..., anchor)`` right after the
        validation, before anything is locked or written; whatever it raises propagates and nothing stored
        changes (the device's /verify passes its check of the CA certificates announced in the CSR request, so
        that this validation is the only one).

        ``key``: a ``HeldKey`` (``generate_held_key``) instead of ``key_uri``. Staged by this object
        (``stage_held_key``) and its file still the one written: the file is left out of the batch (it is durable
        already), the commit names it, and the staging hold is released after it; a failed store keeps the staged
        file. Otherwise its encrypted file is written under
        its final name ``keys/<id>.key`` with the version's files (nothing names it until the index replace, as
        ``fsutil.write_new_files``), its data and ``keys/`` directory fsyncs join the commit's one batch before the
        index replace, and that replace records the key ``active`` with the credential; its lock file is made after the
        commit (with ``defer_cleanup``, by ``flush``). If the store fails at
        any step, the key file is securely deleted and nothing stored changes; the caller still holds the key
        (it may try again). A crash before the replace leaves an unnamed key file that ``gc`` securely deletes.

        Raises:
            VerificationError: rejected (nothing written).
            ReadOnlyError: ``name`` is an IDevID.
            whatever ``path_check`` raises (nothing written).
        """
        check_name(name, "credential name")
        if (key is None) == (key_uri is None):
            raise ValueError("give exactly one of key_uri or key (a HeldKey)")
        if key is not None:
            key_uri = key.uri
        if kind not in KINDS or kind == "idevid":
            raise ValueError(f"kind must be 'ldevid' or 'app' (IDevIDs are imported), not {kind!r}")
        if domain is None:
            raise ValueError("a domain is required for LDevID and application credentials")
        chain = tuple(chain)
        current = self._view().creds().get(name)
        if current is not None and current[1]["kind"] == "idevid":
            raise ReadOnlyError(f"credential {name} is an IDevID and read-only")
        pub = key.public_key if key is not None else self.public_key(key_uri)
        anchors = self.trust_anchors(domain)
        krec = {"key_type": key.key_type} if key is not None else (self.key_record(key_uri) or {})
        policy = verification_policy(
            "credential", now, check_validity, eku={purpose} if purpose in EKU_NAMES else frozenset(),
            min_rsa_bits=1024 if krec.get("key_type") == "rsa1024" else 2048)  # rsa1024 exists only if allowed
        path = validate(certificate, chain, anchors, policy, public_key=pub, what=f"certificate for {name}")
        if path_check is not None:
            path_check(path)  # before the lock and any write: a refusal here changes nothing stored
        # Store the path the device presents: the chain as received minus anything not on the verified path
        # is dropped, so a peer cannot plant extra certificates.
        stored_chain = tuple(path[1:])
        desc = describe(certificate)  # once: the record's fields and the audit line's (a fingerprint is a DER dump)
        with self._lock:
            self._run_deferred()
            hit = self._view().creds().get(name)
            existing = hit[1] if hit is not None else None
            if existing is not None and existing["kind"] == "idevid":
                raise ReadOnlyError(f"credential {name} is an IDevID and read-only")
            if existing is None and not allow_new:
                raise NotFoundError(f"no credential named {name!r}")
            krec = self._view().keys().get(key_uri)
            if key is not None and krec is not None:
                raise ValueError(f"held key {key_uri} is already stored")
            if krec is not None and krec[1].get("state") == "retired":
                raise KeyGoneError(f"key {key_uri} was discarded before its certificate arrived (a pending key older "
                                   "than the keystore's bound, or one whose owner was taken for gone): nothing was "
                                   "stored; request a new certificate")
            self._reap_retired(exclude=existing["key_uri"] if existing else None)
            version = (existing["version"] + 1) if existing else 1
            cdir = self.root / "creds" / name
            vdir = cdir / f"{version:04d}"
            old_key = existing["key_uri"] if existing else None
            replaced = old_key if old_key and old_key != key_uri and self._view().key_users().get(old_key) == [name] \
                else None
            # Nobody holding the superseded key: claim it now, unrecord it in the commit and destroy it right after
            # (the commit lists it in meta.destroying for a crash in between). Held: the commit retires it.
            claim = self._claim(replaced) if replaced else None
            created: list[Path] = []
            key_file: Path | None = None
            key_dirs: list[Path] = []
            staged = key is not None and self._staged_intact(key_uri)
            try:
                # The version's files and directory entries are durable before the index names them: each
                # file fsynced, then each directory that gained an entry (the version directory; creds/<name>
                # for the new version directory; creds/ and the root for new directories) once.
                # Fsyncs with no order among them are issued together (fsutil.fsync_all): both files, the
                # directories that gained their entries and the index's temp file, all before the index replace.
                # The files are created under their final names (no temp file, no rename) and fsynced only in that
                # batch: nothing refers to the new version directory until the replace, so a file a crash or power
                # cut tears is garbage there (fsutil.write_new_files). The directory is new or cleared below, so
                # the names are free.
                created = fsutil.make_dirs(vdir, self.root)
                if vdir not in created:
                    # Left by a crash before an earlier commit: this version starts from a clean directory. The
                    # other entries of creds/<name> the index does not reference go after the commit (_cleanup's
                    # sweep, after the answer).
                    self._clear_version_dir(vdir)
                    created = fsutil.make_dirs(vdir, self.root)
                files = fsutil.write_new_files([(vdir / "chain.pem", pem(stored_chain)),
                                                (vdir / "cert.pem", pem([certificate]))])
                entries = [vdir / "chain.pem", vdir / "cert.pem", *created]
                if key is not None and not staged:
                    # A held key's file, created under its final name: no record names it until the index replace
                    # below, which records it active (a crash before: an unnamed, maybe torn keys/*.key, which gc
                    # securely deletes). The name is free unless a failed earlier try of this key could not delete
                    # its file (no record names it: checked above, under the lock): write_new_files clears it first.
                    # Its lock file is made after the commit (with defer_cleanup, after the answer): until then no
                    # process holds the key, and one that wants to finds the file missing and makes it under the
                    # keystore lock (Keystore._hold), as for a lock file a power cut lost.
                    try:
                        path_, blob = self.backend("soft").key_path(key_uri), key.encrypted
                        key_dirs = fsutil.make_dirs(path_.parent, self.root)
                        key_file = path_
                        kf = fsutil.write_new_files([(path_, blob)])
                    except BaseException:
                        files.close()
                        raise
                    files.files += kf.files
                    entries += [path_, *key_dirs]
                try:
                    # Once the index replace succeeded this version is live and its files stay, even if the
                    # directory fsync after it fails (below: retried and reported; see ``durable``).
                    drop = self._commit_certificate(name, version, kind, domain, profile, purpose, protocol, server,
                                                    meta, key_uri, pub, desc, stored_chain, replaced,
                                                    claim is not None, fsync_files=files, sync_first=entries,
                                                    sync_dir=False)
                finally:
                    files.close()
            except BaseException:
                # Not committed: the previous version is still live; remove what this attempt wrote.
                if claim is not None:
                    self._locks.release_exclusive(claim)
                with contextlib.suppress(OSError, KeystoreError):
                    fsutil.remove_tree(vdir, secret=False)
                    for d in created[::-1]:
                        if d != vdir:
                            d.rmdir()
                if key_file is not None:  # a held key's file: securely, it is (encrypted) key material
                    with contextlib.suppress(OSError, KeystoreError):
                        fsutil.secure_delete(key_file, sync_dir=False)
                for d in key_dirs[::-1]:
                    with contextlib.suppress(OSError):
                        d.rmdir()
                raise
            if key is not None:
                self.backend("soft").adopt(key_uri, key.private_key)
            if staged:  # named by the index now: the staging hold is no longer what keeps gc away
                del self._staged[key_uri]
                self._locks.release(key_uri, explicit=False)
            # Replaced. The audit lines are written now and fsynced together with the index's directory (the
            # commit): the two fsyncs have no order between them, so the store waits once for both. The lines say
            # only what is known before that sync; if it fails, a second (durable) line,
            # certificate-store-unsynced, names the error below.
            details = dict(name=name, kind=kind, domain=domain, version=version, serial=desc["serial"],
                           fingerprint=desc["fingerprint"], not_after=desc["not_after"])
            if not policy.clock_trusted:  # validity was judged at an estimated time: say which, how sure, and why
                details["checked_at"] = policy.reading.record()
            audit_error = self._audit_with_commit(key, details, rekeyed=bool(old_key and old_key != key_uri))
            # Committed. Destroy the superseded key and prune old versions (only once the commit is durable: a
            # power cut before the sync could bring back the previous index, which still needs both): now, or
            # with defer_cleanup after this call's audit line, when the caller flushes (see _cleanup).
            unsynced = self.unsynced
            cleanup = None
            if unsynced is None:
                cleanup = _Cleanup(name, replaced if claim is not None else None, claim, tuple(drop),
                                   key_uri if key is not None and not staged else None, sweep=True)
            else:
                if claim is not None:
                    self._locks.release_exclusive(claim)  # gc destroys it once a sync succeeds
                if key is not None and not staged:
                    self._locks.create(key_uri)
            if cleanup is not None and not defer_cleanup:
                self._cleanup(cleanup, deferred=False)
            elif cleanup is not None:
                self._deferred.append(cleanup)
            rec = self._record(name)
        if unsynced is not None:
            _log.warning("stored %s version %d (it is live), but %s; the next keystore write or 'devagent keystore "
                         "check' syncs it again, and the superseded key is kept until then", name, version, unsynced)
            # Its own action: a reader counting certificate-store lines counts each store once.
            self.audit("certificate-store-unsynced",
                       **{k: details[k] for k in ("name", "version", "serial", "fingerprint")},
                       sync_error=str(unsynced))
        if audit_error is not None:
            raise audit_error
        return self._credential(rec, (certificate, stored_chain))

    def _staged_intact(self, uri: str) -> bool:
        """Under the lock: ``uri``'s file was staged by this object and is still the file written then (same
        device and inode). If not (removed meanwhile, e.g. by a wipe), the staging is forgotten and the store
        writes the file as for a key never staged."""
        ident = self._staged.get(uri)
        if ident is None:
            return False
        try:
            st = os.lstat(self.backend("soft").key_path(uri))
            if (st.st_dev, st.st_ino) == ident and stat.S_ISREG(st.st_mode):
                return True
        except OSError:
            pass
        del self._staged[uri]
        self._locks.release(uri, explicit=False, everything=True)
        return False

    def _audit_with_commit(self, key: HeldKey | None, details: dict, rekeyed: bool) -> StorageError | None:
        """Under the lock, right after ``store_certificate``'s index replace (written with ``sync_dir=False``):
        append its audit lines (a held key's ``key-generate``, then ``certificate-store``) and fsync the audit
        file together with the index's directory (``fsutil.sync_parent_with``). A failed directory fsync is
        handled as ``_txn`` handles it (``unsynced``); a failed audit append or fsync is returned (raised once
        the store is finished: the version is live, and durable if the directory fsync succeeded)."""
        lines = []
        if key is not None:  # a held key's line, made durable with the certificate-store line
            lines.append(self._audit_line("key-generate", key_uri=key.uri, key_type=key.key_type, label=key.label,
                                          held_since=key.created))
        lines.append(self._audit_line("certificate-store", **details, rekeyed=rekeyed))
        log = self.root / AUDIT_LOG
        kept: list[int] = []
        audit_error = None
        try:
            fsutil.append_line(log, b"\n".join(lines), keep_open=kept)
        except StorageError as e:
            audit_error = e
        try:
            dir_err, *file_errs = fsutil.sync_parent_with(self.root / INDEX, [(str(log), fd) for fd in kept])
        finally:
            for fd in kept:
                os.close(fd)
        for e in file_errs:
            if e is not None:
                audit_error = StorageError(f"cannot append to {log}: {e.strerror or e}")
                audit_error.__cause__ = e
        if dir_err is not None:
            self._not_synced(fsutil.not_durable(self.root / INDEX, dir_err))
        else:
            self.unsynced = None
        return audit_error

    def _commit_certificate(self, name, version, kind, domain, profile, purpose, protocol, server, meta, key_uri,
                            pub, desc, chain, replaced, destroying, sync_first=(),
                            fsync_files=None, sync_dir=True) -> list[int]:
        """One atomic index write making ``version`` live (see module invariants); older versions beyond
        ``KEEP_VERSIONS`` leave the record in the same write. ``desc``: ``describe`` of the new certificate.
        Returns the versions to remove after the commit.
        ``sync_dir=False``: the caller fsyncs the index's directory (``_audit_with_commit``)."""
        with self._txn(sync_first, sync_dir=sync_dir, fsync_files=fsync_files) as data:
            now_s = _now().isoformat()
            doc_id, rec = self._find_cred(data, name)
            rec = dict(rec or {"name": name, "created": now_s, "versions": [], "meta": {}})
            versions = [v for v in rec.get("versions", []) if v != version] + [version]
            drop, versions = versions[:-KEEP_VERSIONS], versions[-KEEP_VERSIONS:]
            rec.update(
                kind=kind, domain=domain, profile=profile if profile is not None else rec.get("profile"),
                key_uri=key_uri, key_type=key_type_of(pub), version=version, versions=versions,
                updated=now_s, protocol=protocol or rec.get("protocol"), server=server or rec.get("server"),
                purpose=purpose or rec.get("purpose"), **desc, chain_subjects=[dn(c.subject) for c in chain])
            m = dict(rec.get("meta") or {})
            m.update(meta or {})
            m.pop("last_error", None)
            rec["meta"] = m
            data["credentials"][doc_id or self._next_id(data["credentials"])] = rec
            kid, krec = self._find_key(data, key_uri)
            if krec is None:
                kid = self._next_id(data["keys"])
                krec = {"uri": key_uri, "key_type": key_type_of(pub), "backend": scheme_of(key_uri),
                        "created": now_s, "label": name}
            # An active key's public half is its certificate's: the record no longer needs it.
            data["keys"][kid] = {k: v for k, v in dict(krec, state="active", pending_for={}, credential=name).items()
                                 if k != "public_key"}
            if replaced:
                self._unrecord(data, replaced, destroying, now_s, name)
        return drop

    def _unrecord(self, data: dict, uri: str, destroying: bool, now_s: str, name: str) -> None:
        """A key the index no longer needs, in a transaction: if it is about to be destroyed (claimed), its record
        goes and ``meta.destroying`` names it until the next write (a crash before the destruction leaves it for
        gc); else its record stays as ``retired`` until whoever finds it free destroys it. Either way a crash never
        leaves a key (a token object, a TPM handle) that nothing names."""
        kid, krec = self._find_key(data, uri)
        if destroying:
            if kid is not None:
                del data["keys"][kid]
            meta = dict(data["meta"].get("1") or {})
            meta["destroying"] = sorted(set(meta.get("destroying") or ()) | {uri})
            data["meta"]["1"] = meta
            return
        if kid is None:
            kid, krec = str(max((int(k) for k in data["keys"]), default=0) + 1), {"uri": uri,
                                                                                  "backend": scheme_of(uri)}
        data["keys"][kid] = dict(krec, state="retired", retired=now_s, credential=name)

    def _reap_retired(self, exclude: str | None = None) -> list[str]:
        """Under the lock: destroy retired keys nobody holds any more (their records go with the next write)."""
        done = []
        todo = self._view().retired() + self._destroying()
        for uri in todo:
            if uri != exclude and uri not in self._destroyed and self._destroy_now(uri):
                self._destroyed.add(uri)
                done.append(uri)
        return done

    @property
    def deferred(self) -> bool:
        """True while ``store_certificate(defer_cleanup=True)`` left work for ``flush``."""
        return bool(self._deferred)

    def flush(self) -> None:
        """Finish the work ``store_certificate(defer_cleanup=True)`` left: destroy the superseded keys (through
        their backends) and remove version directories beyond ``KEEP_VERSIONS``. A failure is logged and audited
        (``deferred-cleanup-failed``), never raised: the key stays listed in ``meta.destroying`` and the versions
        unreferenced, and ``gc`` finishes them. Idempotent; a no-op when nothing is deferred."""
        if not self._deferred and not self._flushing:
            return
        with self._lock:  # also waits for another thread's flush in progress (the lock is held while it runs)
            self._run_deferred()

    def _run_deferred(self) -> None:
        """Under the lock: run the deferred cleanups (see ``flush``)."""
        if not self._deferred:
            return
        self._flushing += 1
        try:
            while self._deferred:
                self._cleanup(self._deferred.pop(0), deferred=True)
        finally:
            self._flushing -= 1

    def _cleanup(self, job: "_Cleanup", *, deferred: bool) -> None:
        """Under the lock, after a durable commit: destroy the superseded key ``job.key`` (claimed by
        ``job.claim``) and remove the version directories ``job.versions`` of ``job.name`` — only those the index
        does not reference now (a deferred prune may run after the credential was deleted and enrolled anew); first,
        make the lock file of a held key just stored (``job.lock``), unless another process destroyed it meanwhile.
        No step needs an fsync of its own: the key's overwrite is fsynced by secure_delete; if a power cut
        undoes an unlink, what stays is garbage that gc removes. ``deferred=False``: errors propagate (as the
        synchronous store always did)."""
        if job.lock is not None:
            hit = self._view().keys().get(job.lock)
            if hit is not None and hit[1].get("state") == "active":  # not destroyed meanwhile by another process
                # A failure costs nothing: whoever holds the key next makes the file (Keystore._hold).
                with contextlib.suppress(OSError):
                    self._locks.create(job.lock)
        try:
            if job.key is not None:
                self._finish_destroy(job.key, job.claim)
                self._destroyed.add(job.key)  # the next index write drops it from meta.destroying
            if job.sweep:
                self._sweep_versions(job.name, (self._view().creds().get(job.name) or (None, None))[1])
            elif job.versions:
                hit = self._view().creds().get(job.name)
                keep = (set(hit[1].get("versions", [])) | {hit[1]["version"]}) if hit is not None else set()
                cdir = self.root / "creds" / job.name
                for v in job.versions:
                    if v not in keep:
                        fsutil.remove_tree(cdir / f"{v:04d}", secret=False)
        except (KeystoreError, OSError) as e:
            if not deferred:
                raise
            _log.error("after storing %s: could not finish destroying the superseded key %s or removing old "
                       "versions %s: %s; 'devagent keystore check' (gc) finishes it", job.name, job.key,
                       list(job.versions), e)
            with contextlib.suppress(KeystoreError):
                self.audit("deferred-cleanup-failed", name=job.name, key_uri=job.key, versions=list(job.versions),
                           error=str(e))

    def _clear_version_dir(self, vdir: Path) -> None:
        """Under the lock, before a commit writes the version directory ``vdir``: remove what a crash before an
        earlier commit left under that name (``make_dirs`` found it), so the version starts from a clean directory;
        the rest of ``creds/<name>`` is swept after the commit (``_sweep_versions``)."""
        try:
            st = os.lstat(vdir)
        except FileNotFoundError:
            return
        fsutil.remove_tree(vdir, secret=False) if stat.S_ISDIR(st.st_mode) else fsutil.secure_delete(vdir,
                                                                                                     sync_dir=False)

    def _sweep_versions(self, name: str, rec: dict | None) -> None:
        """Under the lock, after a commit (``_cleanup``): remove the version directories of ``name`` the index does
        not reference (pruned by the commit, or left by a crash before an earlier one)."""
        d = self.root / "creds" / name
        if not d.is_dir():
            return
        keep = (set(rec.get("versions", [])) | {rec["version"]}) if rec else set()
        for v in d.iterdir():
            if not v.name.isdigit() or int(v.name) not in keep:
                fsutil.remove_tree(v, secret=False) if v.is_dir() else fsutil.secure_delete(v, sync_dir=False)

    def _retry_sync(self, err: NotDurableError) -> NotDurableError | None:
        """Retry the directory fsync that failed after a replace; None if it succeeded now."""
        try:
            fsutil.sync_parent(err.path)
        except OSError:
            return err
        return None

    def _key_in_use(self, uri: str) -> bool:
        return uri in self._view().key_users()

    def set_meta(self, name: str, **fields) -> None:
        """Update daemon bookkeeping for a credential (next_renewal, last_error, failures...)."""
        with self._txn() as data:
            doc_id, rec = self._find_cred(data, name)
            if rec is None:
                raise NotFoundError(f"no credential named {name!r}")
            m = dict(rec.get("meta") or {})
            for k, v in fields.items():
                if v is None:
                    m.pop(k, None)
                else:
                    m[k] = v
            data["credentials"][doc_id] = dict(rec, meta=m)

    def import_idevid(self, name: str, certificate: x509.Certificate, chain: Sequence[x509.Certificate] = (), *,
                      private_key=None, key_uri: str | None = None, force: bool = False,
                      source: str = "") -> Credential:
        """Import the manufacturer's IDevID (read-only afterwards).

        Give either ``private_key`` (stored encrypted as a software key) or ``key_uri`` (a key that already
        lives in a TPM/PKCS#11 token). The chain must be consistent (each certificate signed by the next);
        its self-signed root, if present, becomes the ``idevid-<name>`` truststore.

        Raises:
            VerificationError("key-mismatch"): key and certificate do not belong together.
            AlreadyExistsError: the name is taken (``force`` replaces an IDevID).
        """
        check_name(name, "credential name")
        if (private_key is None) == (key_uri is None):
            raise ValueError("give exactly one of private_key or key_uri")
        pub = private_key.public_key() if private_key is not None else self.public_key(key_uri)
        if not same_public_key(certificate.public_key(), pub):
            raise VerificationError("key-mismatch", f"IDevID certificate {certificate.subject.rfc4514_string()} "
                                    "does not match the private key (public key mismatch)")
        key_type_of(pub)
        chain = list(chain)
        roots = [c for c in chain if c.subject == c.issuer]
        if chain:  # the manufacturer's chain must be consistent; its validity is judged where the IDevID is used
            validate(certificate, chain, roots or chain[-1:], Policy.for_unknown_clock("idevid"),
                     what=f"IDevID certificate {name}")
        existing = self._table("credentials").get(Query().name == name)
        if existing is not None and not (force and existing["kind"] == "idevid"):
            raise AlreadyExistsError(f"credential {name} exists already" + (
                "; use --force to replace an IDevID" if existing["kind"] == "idevid" else ""))
        if private_key is not None:
            key_uri = self.import_key(private_key, label=name, state="active")
        else:
            self.register_key(key_uri, label=name, state="active")
        with self._lock:
            version = (existing["version"] + 1) if existing else 1
            vdir = fsutil.ensure_dir(self.root / "creds" / name / f"{version:04d}")
            fsutil.atomic_write(vdir / "chain.pem", pem(chain))
            fsutil.atomic_write(vdir / "cert.pem", pem([certificate]))
            old_key = existing["key_uri"] if existing else None
            with self._txn() as data:
                doc_id, _ = self._find(data["credentials"], name=name)
                now_s = _now().isoformat()
                rec = {"name": name, "kind": "idevid", "domain": None, "key_uri": key_uri,
                       "key_type": key_type_of(pub), "version": version, "versions": [version], "created": now_s,
                       "updated": now_s, "source": source, "meta": {}, **describe(certificate),
                       # as _commit_certificate writes it: else the next open's _migrate rewrites the index
                       "chain_subjects": [describe(c)["subject"] for c in chain]}
                data["credentials"][doc_id or self._next_id(data["credentials"])] = rec
                kid, krec = self._find(data["keys"], uri=key_uri)
                if kid is not None:
                    data["keys"][kid] = dict(krec, state="active", credential=name)
            if old_key and old_key != key_uri and scheme_of(old_key) == "file":
                self._backend_for(old_key).delete(old_key)
        if roots:
            self.add_trust_anchors(f"idevid-{name}", roots[-1:], source=source or "idevid import",
                                   verified_by="manufacturer chain")
        self.audit("idevid-import", name=name, serial=format(certificate.serial_number, "x"),
                   fingerprint=fingerprint(certificate), key_uri=key_uri, source=source, replaced=bool(existing))
        return self.get(name)

    def delete(self, name: str, *, force: bool = False, reason: str = "") -> None:
        """Delete a credential: its key is destroyed (secure delete / evict) and its files removed.

        Raises:
            ReadOnlyError: an IDevID without ``force``.
        """
        cred = self.get(name)
        if cred.readonly and not force:
            raise ReadOnlyError(f"credential {name} is the manufacturer's IDevID: it is read-only and is deleted "
                                "only with --force")
        with self._lock:  # the files go under the lock too: another process may be storing this name anew
            self._run_deferred()
            uri = cred.key_uri
            shared = self._view().key_users().get(uri, []) != [name]
            # See store_certificate. Deleting is this process's own decision: its own holds do not keep the key.
            claim = None if shared else self._claim(uri, ours_too=True)
            try:
                with self._txn() as data:
                    doc_id, rec = self._find_cred(data, name)
                    if doc_id is None or rec["version"] != cred.version:
                        raise NotFoundError(f"credential {name} changed (renewed or deleted by another devagent "
                                            "process) while it was being deleted; look at it again")
                    del data["credentials"][doc_id]
                    if not shared:
                        self._unrecord(data, uri, claim is not None, _now().isoformat(), name)
            except BaseException:
                if claim is not None:
                    self._locks.release_exclusive(claim)
                raise
            details = dict(name=name, kind=cred.kind, key_uri=uri, reason=reason,
                           serial=format(cred.certificate.serial_number, "x"))
            if not self.durable:  # a power cut could bring the credential back: gc removes its files once synced
                if claim is not None:
                    self._locks.release_exclusive(claim)
                _log.warning("credential %s deleted; its key and files are removed once the keystore is synced", name)
                self.audit("credential-delete", **details, sync_error=str(self.unsynced))
                return
            if claim is not None:
                self._finish_destroy(uri, claim)
                self._destroyed.add(uri)
            fsutil.remove_tree(self.root / "creds" / name, secret=False)
        self.audit("credential-delete", **details)

    def purge_expired(self, now: datetime.datetime | None = None, include_idevid: bool = False) -> list[str]:
        """Delete credentials whose live certificate has expired (seed 000 §II.I). Returns their names."""
        now = now or _now()
        removed = []
        for cred in self.list():
            if cred.not_after < now and (include_idevid or not cred.readonly):
                self.delete(cred.name, force=include_idevid, reason="expired (purge)")
                removed.append(cred.name)
        return removed

    def export(self, name: str, fmt: str = "pem", *, password: bytes | None = None, with_key: bool = False) -> bytes:
        """Export a credential. PEM: certificate + chain (+ encrypted key with ``with_key``); PKCS#12 always
        includes the key and requires a password. Hardware keys refuse (ExportRefusedError)."""
        cred = self.get(name)
        if fmt == "pem":
            out = pem([cred.certificate, *cred.chain])
            if with_key:
                if not password:
                    raise ValueError("exporting a private key needs --password (the key is written encrypted)")
                out = self._backend_for(cred.key_uri).export_pem(cred.key_uri, password) + out
        elif fmt == "p12":
            from cryptography.hazmat.primitives.serialization import pkcs12, BestAvailableEncryption

            if not password:
                raise ValueError("PKCS#12 export needs --password")
            be = self._backend_for(cred.key_uri)
            if not be.exportable:
                be.export_pem(cred.key_uri, password)  # raises ExportRefusedError with the reason
            key = be.load(cred.key_uri)
            out = pkcs12.serialize_key_and_certificates(name.encode(), key, cred.certificate, list(cred.chain),
                                                        BestAvailableEncryption(password))
        else:
            raise ValueError(f"unknown export format {fmt!r}; use pem or p12")
        if with_key or fmt == "p12":
            self.audit("private-key-export", name=name, format=fmt)
        return out

    # ---- housekeeping -------------------------------------------------------------------------
    def gc(self, locked: bool = False) -> list[str]:
        """Remove files no index entry references (left by a crash between file write and commit)."""
        ctx = contextlib.nullcontext() if locked else self._lock
        removed = []
        with ctx:
            self._run_deferred()
            # A commit whose directory fsync failed left its superseded files unreferenced by an index that may not
            # be durable yet: sync first (StorageError if that still fails), so nothing a power cut could bring
            # back into use is removed.
            try:
                fsutil.sync_parent(self.root / INDEX)
            except OSError as e:
                raise StorageError(f"cannot sync keystore directory {self.root} ({e.strerror or e}); nothing was "
                                   "removed") from e
            reaped = self._reap_retired()
            if reaped:
                with self._txn():
                    pass  # drops the records of the keys just destroyed
                removed += [f"retired key {u}" for u in reaped]
            removed += [f"pending key {u}" for u in self.discard_orphaned_pending()]
            data = self._storage.read() or {}
            creds = {c["name"]: c for c in (data.get("credentials") or {}).values()}
            key_uris = {k["uri"] for k in (data.get("keys") or {}).values()}
            key_uris |= {c["key_uri"] for c in creds.values()}
            live_locks = {lock_name(u) for u in key_uris}
            for p in self._locks.files():  # lock files of keys that are gone, or of a staged held key (held)
                if p.name not in live_locks:
                    with contextlib.suppress(OSError):
                        self._locks.remove_if_free(p)
            keydir = self.root / "keys"
            if keydir.is_dir():
                for p in keydir.iterdir():
                    if p.name.startswith("."):
                        if p.name.endswith(".tmp"):
                            fsutil.secure_delete(p)
                            removed.append(str(p))
                        continue
                    uri = f"file:keys/{p.name}"
                    if uri not in key_uris:
                        # Unnamed: left by a crash before its commit, or a held key staged by a live process
                        # (stage_held_key), which holds its lock: that one stays.
                        fd = self._locks.try_exclusive(uri)
                        if fd is None:
                            continue
                        try:
                            fsutil.secure_delete(p)
                        finally:
                            self._locks.remove(uri, fd)
                        removed.append(str(p))
            for p in self.root.glob(".*.tmp"):  # an index write killed before its rename
                fsutil.secure_delete(p)
                removed.append(str(p))
            tpmdir = self.root / "tpm"
            if tpmdir.is_dir():  # TSS2 key blobs (tpm:blob/<id>) left by a crash before the commit
                for p in tpmdir.iterdir():
                    if p.suffix == ".tss" and f"tpm:blob/{p.stem}" not in key_uris:
                        fsutil.secure_delete(p)
                        removed.append(str(p))
            cdir = self.root / "creds"
            if cdir.is_dir():
                for d in cdir.iterdir():
                    rec = creds.get(d.name)
                    keep = set(rec.get("versions", [])) | {rec["version"]} if rec else set()
                    for v in d.iterdir():
                        if not v.name.isdigit() or int(v.name) not in keep:
                            fsutil.remove_tree(v) if v.is_dir() else fsutil.secure_delete(v)
                            removed.append(str(v))
                    if rec is None:
                        with contextlib.suppress(OSError):
                            d.rmdir()
        return removed

    def orphaned_pending(self, now: datetime.datetime | None = None) -> list[tuple[dict, str]]:
        """Pending keys to discard, with the reason: the owner process is gone (pid, boot id and start time no
        longer match), or the key is older than ``pending_max_age_s`` whoever owns it."""
        now = now or _now()
        out = []
        for rec in self.pending_keys():
            if owner.alive(rec.get("owner")) is False:
                out.append((rec, f"its owner {owner.describe(rec.get('owner'))} is gone"))
                continue
            try:
                age = (now - datetime.datetime.fromisoformat(rec["created"])).total_seconds()
            except (KeyError, TypeError, ValueError):
                age = float("inf")
            if age > self.pending_max_age_s:
                out.append((rec, f"it is {age / 3600:.1f} h old (more than {self.pending_max_age_s / 3600:g} h; "
                                 f"owner {owner.describe(rec.get('owner'))})"))
        return out

    def discard_orphaned_pending(self, now: datetime.datetime | None = None) -> list[str]:
        """Discard every pending key ``orphaned_pending`` names, through its backend (key file, TPM blob or handle,
        token objects), each with an audit line. A key its (live) owner still holds is retired instead: its
        enrollment can no longer store a certificate for it, and it is destroyed once released. Returns the URIs."""
        done = []
        with self._lock:
            for rec, why in self.orphaned_pending(now):
                uri = rec["uri"]
                try:
                    destroyed = self._destroy_now(uri)
                except KeystoreError as e:
                    _log.error("cannot discard pending key %s (%s): %s", uri, why, e)
                    continue
                with self._txn() as data:
                    kid, cur = self._find_key(data, uri)
                    if kid is not None and cur.get("state") == "pending":
                        if destroyed:
                            del data["keys"][kid]
                        else:
                            data["keys"][kid] = dict(cur, state="retired", retired=_now().isoformat())
                self._destroyed.discard(uri)
                _log.warning("discarded pending key %s: %s", uri, why)
                self.audit("pending-key-discard", key_uri=uri, reason=why, owner=rec.get("owner"),
                           created=rec.get("created"), key_type=rec.get("key_type"), label=rec.get("label"),
                           pending_for=rec.get("pending_for"),
                           **({} if destroyed else {"retired": "still held by its owner"}))
                done.append(uri)
        return done

    # ---- wipe (decommissioning) ----------------------------------------------------------------------
    def wipe(self, *, include_idevid: bool = False, audit_action: str = "keystore-wipe", **details) -> dict:
        """Destroy every key and credential (decommissioning), leaving an audit record.

        Without ``include_idevid`` the IDevIDs, their keys, their ``idevid-*`` trust anchors, the master key (it
        encrypts a software IDevID key), the index and the audit log stay, and the keystore stays usable; every
        other credential, key (pending ones too) and trust anchor goes. With ``include_idevid`` everything goes:
        afterwards the state directory holds only ``audit.log``, ending with the ``audit_action`` record.

        Keys are destroyed through their backends: software keys and the master key are overwritten and unlinked
        (fsutil.secure_delete), TPM key blobs likewise and persistent handles devagent allocated are evicted,
        PKCS#11 objects are destroyed on the token. Keys devagent did not create (registered with ``--key-uri`` /
        ``register_key``, e.g. a manufacturer's IDevID key in a TPM or token) are forgotten, never destroyed.

        Crash safety: the plan (key URIs, what to keep) is written first to ``wipe-pending.json``; while it exists
        ``Keystore.open`` refuses the keystore, and ``resume_wipe`` (``devagent decommission`` again) completes the
        same plan. Every step is idempotent, so a kill at any instant leaves a state that a re-run finishes. The
        final record is appended to ``audit.log`` before the plan file is removed (after a kill between the two,
        the re-run appends it again).

        Args:
            details: non-secret fields for the final audit record (e.g. what was revoked).
        Returns:
            ``{"deleted": names, "keys_destroyed": uris, "keys_forgotten": uris, "trust_removed": n,
            "include_idevid": bool}``.
        Raises:
            KeystoreError: a key could not be destroyed (e.g. the TPM is unreachable); the plan stays, re-run.
        """
        with self._lock:
            self._run_deferred()
            data = self._storage.read() or {}
            creds = list((data.get("credentials") or {}).values())
            keep = [c for c in creds if c["kind"] == "idevid" and not include_idevid]
            keep_keys = {c["key_uri"] for c in keep}
            records = {k["uri"]: k for k in (data.get("keys") or {}).values()}
            uris = sorted(set(records) | {c["key_uri"] for c in creds})

            def external(uri: str) -> bool:
                # Registered, not generated; for index records older than "origin": an IDevID's hardware key.
                return (records.get(uri) or {}).get("origin") == "external" or (scheme_of(uri) != "file" and any(
                    c["key_uri"] == uri and c["kind"] == "idevid" for c in creds))

            plan = {
                "started": _now().isoformat(), "include_idevid": include_idevid, "audit_action": audit_action,
                "destroy": [u for u in uris if u not in keep_keys and not external(u)],
                "forget": [u for u in uris if u not in keep_keys and external(u)],
                "delete_credentials": sorted(c["name"] for c in creds if c not in keep),
                "keep_credentials": sorted(c["name"] for c in keep),
                "trust_removed": sum(1 for t in (data.get("trust") or {}).values()
                                     if include_idevid or not t["domain"].startswith("idevid-")),
                "details": details,
            }
            fsutil.atomic_write(self.root / WIPE_MARKER, json.dumps(plan, sort_keys=True, default=str).encode())
            return self._finish_wipe(plan)

    @staticmethod
    def wipe_pending(root: str | os.PathLike) -> dict | None:
        """The plan of an interrupted ``wipe`` in ``root``, or None."""
        try:
            return json.loads((Path(root) / WIPE_MARKER).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as e:  # written atomically: only a foreign hand makes it unreadable
            raise CorruptFileError(f"{Path(root) / WIPE_MARKER} is not the plan of a wipe: {e}") from e

    @classmethod
    def resume_wipe(cls, root: str | os.PathLike, backend_options: dict | None = None) -> dict:
        """Finish the interrupted ``wipe`` whose plan is in ``root`` (``devagent decommission`` calls this)."""
        plan = cls.wipe_pending(root)
        if plan is None:
            raise NotFoundError(f"no interrupted wipe in {root}")
        ks = cls(root, backend_options)
        with ks._lock:
            return ks._finish_wipe(plan)

    def _finish_wipe(self, plan: dict) -> dict:
        """Carry out a wipe plan (under the lock); idempotent, see ``wipe``."""
        failed = []
        for uri in plan["destroy"]:
            try:
                self._backend_for(uri).delete(uri)
            except KeystoreError as e:
                failed.append(f"{uri}: {e}")
        if failed:
            raise KeystoreError("decommissioning wipe: could not destroy " + "; ".join(failed) + ". Nothing else "
                                "was removed; fix the cause and run 'devagent decommission' again")
        self.close()
        if plan["include_idevid"]:
            # Everything but the audit log and the plan; the secrets first, the index and the lock file last.
            order = ["keys", "tpm", MASTER_KEY, "master.tss", "creds", "trust", INDEX]
            rest = sorted(p.name for p in self.root.iterdir() if p.name not in (AUDIT_LOG, WIPE_MARKER, ".lock",
                                                                                 *order))
            for name in [*order, *rest, ".lock"]:
                p = self.root / name
                if p.is_dir() and not p.is_symlink():
                    fsutil.remove_tree(p)
                else:
                    fsutil.secure_delete(p)
        else:
            gone = set(plan["delete_credentials"])
            with self._txn() as data:
                for table, drop in (
                        ("credentials", lambda r: r["name"] in gone),
                        ("keys", lambda r: r["uri"] in plan["destroy"] or r["uri"] in plan["forget"]),
                        ("trust", lambda r: not r["domain"].startswith("idevid-"))):
                    data[table] = {k: v for k, v in data[table].items() if not drop(v)}
            for name in sorted(gone):
                fsutil.remove_tree(self.root / "creds" / name)
            tdir = self.root / "trust"
            if tdir.is_dir():
                for d in tdir.iterdir():
                    if not d.name.startswith("idevid-"):
                        fsutil.remove_tree(d) if d.is_dir() else fsutil.secure_delete(d)
            # Anything else in the state directory is not the IDevID's: CoAP security contexts (coap/), a CLM's
            # device inventory with its secrets (clm/), leftovers.
            keep = {INDEX, MASTER_KEY, "master.tss", AUDIT_LOG, ".lock", WIPE_MARKER, "keys", "creds", "trust", "tpm",
                    "locks"}
            for p in sorted(self.root.iterdir()):
                if p.name not in keep:
                    fsutil.remove_tree(p) if p.is_dir() and not p.is_symlink() else fsutil.secure_delete(p)
            self.gc()
        report = {"deleted": plan["delete_credentials"], "keys_destroyed": plan["destroy"],
                  "keys_forgotten": plan["forget"], "trust_removed": plan["trust_removed"],
                  "include_idevid": plan["include_idevid"]}
        self.audit(plan["audit_action"], **plan["details"], **report, kept=plan["keep_credentials"],
                   wipe_started=plan["started"])
        _log.warning("keystore %s wiped (%s): %s", self.root, plan["audit_action"],
                     json.dumps({**plan["details"], **report}, sort_keys=True, default=str))
        # The plan holds no secret: a plain unlink, so that a kill cannot leave an overwritten, unreadable plan.
        with contextlib.suppress(FileNotFoundError):
            (self.root / WIPE_MARKER).unlink()
        fsutil.fsync_dir(self.root)
        return report

    def check(self) -> list[str]:
        """Consistency check: every credential loads and its key matches. Returns problems found.

        The key is asked for its public half through its backend (a software key is decrypted), not taken from the
        index: this is the check that the stored key and certificate really belong together. Each key is held while
        it is checked, so a renewal by another process cannot destroy it meanwhile; a credential renewed or deleted
        while the check runs is checked in its new version (or not at all)."""
        problems = []
        for name in sorted(self._view().creds()):
            for attempt in (0, 1):
                hit = self._view().creds().get(name)
                if hit is None:
                    break  # deleted meanwhile
                rec = hit[1]
                problem = self._check_one(name, rec)
                if problem is None:
                    break
                now = self._view().creds().get(name)
                if attempt or now is None or now[1] is rec:
                    if now is not None:
                        problems.append(problem)
                    break
        return self._check_index() + problems + self._check_trust()

    def _check_index(self) -> list[str]:
        """What the index itself says wrongly: two records for one credential name or one key, a current version
        missing from the credential's version list."""
        view, problems = self._view(), []
        for table, field in (("credentials", "name"), ("keys", "uri")):
            seen: dict[str, str] = {}
            for rid, rec in view.table(table).items():
                if rec[field] in seen:
                    problems.append(f"{self._storage.path}: {table} records {seen[rec[field]]} and {rid} have the same "
                                    f"{field} {rec[field]!r}")
                seen.setdefault(rec[field], rid)
        for rid, rec in view.table("credentials").items():
            if rec["version"] not in rec["versions"]:
                problems.append(f"{rec['name']}: version {rec['version']} is not in its versions {rec['versions']} "
                                f"({self._storage.path}, credentials record {rid})")
        return problems

    def _check_trust(self) -> list[str]:
        """Every trust anchor file the index names exists, parses, and has the fingerprint its record gives."""
        problems = []
        for _rid, rec in sorted(self._view().table("trust").items(), key=lambda kv: int(kv[0])):
            p = self.root / rec["file"]
            what = f"trust anchor {rec['fingerprint']} of domain {rec['domain']} ({p})"
            try:
                certs = self._certs_of(p)
            except FileNotFoundError:
                problems.append(f"{what} is missing")
                continue
            except (KeystoreError, OSError) as e:
                problems.append(f"{what}: {e}")
                continue
            if not any(fingerprint(c) == rec["fingerprint"] for c in certs):
                problems.append(f"{what}: the file holds no certificate with that fingerprint")
        return problems

    def _check_one(self, name: str, rec: dict) -> str | None:
        uri = rec["key_uri"]
        try:
            self.hold_key(uri, credential=name)
        except KeyGoneError as e:
            return f"{name}: {e}"
        try:
            cert = self._version_files(name, rec["version"])[0]
            be = self._backend_for(uri)
            if not same_public_key(cert.public_key(), be.public_key(uri)):
                return f"{name}: certificate does not match key {uri}"
        except FileNotFoundError as e:
            return f"{name}: version {rec['version']} file missing: {e.filename}"
        except KeystoreError as e:
            return f"{name}: {e}"
        finally:
            self.release_key(uri)
        return None
