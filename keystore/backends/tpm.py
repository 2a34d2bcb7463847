"""TPM 2.0 key backend (``tpm:`` URIs). The only module that imports tpm2_pytss.

Key URIs:

- ``tpm:blob/<16 hex>``      a key created under the storage primary key and kept as a TSS2 PRIVATE KEY
                             blob (the format of tpm2-openssl / tpm2-tss-engine) in ``<keystore>/tpm/<id>.tss``
                             (0600). The blob is wrapped by the TPM: it is useless on any other TPM.
- ``tpm:handle/0x81xxxxxx``  a key at a persistent handle: one we made persistent (``persist: "handle"``) or
                             one a manufacturer provisioned (the IDevID key, IEEE 802.1AR / TCG practice).

Backend options (``Keystore(root, backend_options={"tpm": {...}})``):

- ``tcti``          ``device:/dev/tpmrm0`` (default), ``tabrmd``, ``swtpm:host=127.0.0.1,port=2321``,
                    ``mssim:...``: any tpm2-tss TCTI name[:config].
- ``parent``        ``"owner"`` (default: the standard ECC P-256 storage primary key, re-derived from the
                    owner hierarchy's seed on use; the same template tpm2-openssl uses), or a persistent
                    handle of a storage key such as ``"0x81000001"`` (faster on a slow SPI TPM).
- ``persist``       ``"blob"`` (default) or ``"handle"``: where ``generate`` keeps new keys.
- ``handle_base``   first persistent handle devagent may allocate with ``persist: "handle"`` (default
                    ``0x81100000``; 256 handles). Only handles in this range are evicted by ``delete``;
                    others (a manufacturer's IDevID key) are forgotten by the keystore, never evicted.

Invariants:
- Keys are created in the TPM with ``fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|sign`` (no
  ``decrypt``): the private part never exists outside the TPM and cannot be duplicated. ``private_bytes``,
  ``export_pem`` and PKCS#12 export refuse with ``ExportRefusedError``.
- A key is loaded for one operation and flushed right after (swtpm and many firmware TPMs hold only ~3
  transient objects); the key objects handed out keep only the URI and the public key. Its saved context
  (encrypted by the TPM, valid until the next TPM reset) is cached in memory so that the next load is cheap.
- One ESAPI context per backend, used under a lock (ESAPI is not thread-safe); blocking calls are the
  caller's to move off the event loop (``asyncio.to_thread``).
- The backend owns its TPM connection (TCTI + ESAPI context, ``_Tpm``/``_Connection``) and closes it in
  ``close`` (``Keystore.close``), after any operation in progress; a failed open or a connection lost mid-operation
  is closed at once, and a backend dropped unclosed closes it when collected. No TPM connection (device fd, socket,
  tabrmd connection, ``cmd`` child process) outlives the keystore that opened it.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
import time
import weakref
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keystore import fsutil
from keystore.backends import HardwareKeyMixin, KeyBackend, NewKey
from keystore.keylocks import LOCK_DIR, TurnLock
from keystore.errors import (
    CorruptFileError,
    ExportRefusedError,
    KeyBackendError,
    KeystoreError,
    NotFoundError,
    UnsupportedKeyTypeError,
)

# tpm2-tss logs every failed lookup to stderr at "error" level; we wrap and report failures ourselves.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import ESAPI, TCTILdr  # noqa: E402  (after TSS2_LOG is set)
from tpm2_pytss.constants import (  # noqa: E402
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_HR,
    TPM2_SE,
    TPMA_OBJECT,
    TPMA_SESSION,
)
from tpm2_pytss.cryptography import tpm_ecc_private_key, tpm_rsa_private_key  # noqa: E402
from tpm2_pytss.internal.crypto import public_to_key  # noqa: E402
from tpm2_pytss.TSS2_Exception import TSS2_Exception  # noqa: E402
from tpm2_pytss.tsskey import TSSPrivKey  # noqa: E402
from tpm2_pytss.types import (  # noqa: E402
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_ECC_PARMS,
    TPMS_KEYEDHASH_PARMS,
    TPMS_RSA_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KEYEDHASH_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

DEFAULT_TCTI = "device:/dev/tpmrm0"
DEFAULT_HANDLE_BASE = 0x81100000
HANDLE_RANGE = 0x100
BLOB_DIR = "tpm"
BLOB_SUFFIX = ".tss"
MASTER_BLOB = "master.tss"
TPM_KEY_TYPES = ("p256", "p384", "rsa2048", "rsa3072")
_CURVES = {"p256": TPM2_ECC.NIST_P256, "p384": TPM2_ECC.NIST_P384}
_BLOB_RE = re.compile(r"^blob/([0-9a-f]{16})$")
_HANDLE_RE = re.compile(r"^handle/(0x81[0-9a-fA-F]{6})$")
_OWNER = 0x40000001  # TPM2_RH_OWNER: the parent recorded in a TSS2 PRIVATE KEY for the standard primary
_SIGN_ATTRS = (TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.NODA | TPMA_OBJECT.FIXEDTPM
               | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN)
_SEAL_ATTRS = TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT


class TpmError(KeyBackendError):
    """The TPM refused an operation or returned an error."""


class TpmUnavailableError(TpmError):
    """The TPM cannot be reached through the configured TCTI."""


class TpmKeyNotFoundError(TpmError, NotFoundError):
    """No key at the persistent handle, or the key blob is missing."""


# ---- templates -------------------------------------------------------------------------------------
def _template(key_type: str) -> TPMT_PUBLIC:
    """A fresh signing-key template (tpm2_pytss's module templates are shared mutable objects)."""
    if key_type in _CURVES:
        return TPMT_PUBLIC(
            type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=_SIGN_ATTRS, authPolicy=b"",
            parameters=TPMU_PUBLIC_PARMS(eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                curveID=_CURVES[key_type],
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL))))
    if key_type in ("rsa2048", "rsa3072"):
        return TPMT_PUBLIC(
            type=TPM2_ALG.RSA, nameAlg=TPM2_ALG.SHA256, objectAttributes=_SIGN_ATTRS, authPolicy=b"",
            parameters=TPMU_PUBLIC_PARMS(rsaDetail=TPMS_RSA_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
                keyBits=int(key_type[3:]), exponent=0)))
    raise UnsupportedKeyTypeError(
        f"key type {key_type} is not supported in the TPM; choose one of {', '.join(TPM_KEY_TYPES)}")


def _seal_template() -> TPMT_PUBLIC:
    return TPMT_PUBLIC(type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256, objectAttributes=_SEAL_ATTRS,
                       authPolicy=b"", parameters=TPMU_PUBLIC_PARMS(keyedHashDetail=TPMS_KEYEDHASH_PARMS(
                           scheme=TPMT_KEYEDHASH_SCHEME(scheme=TPM2_ALG.NULL))))


def _parse_handle(value, what: str) -> int:
    try:
        h = int(value, 0) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise KeyBackendError(f"{what} {value!r} is not a TPM handle (write it as hex, e.g. 0x81000001)") from None
    if not 0x81000000 <= h <= 0x81FFFFFF:
        raise KeyBackendError(f"{what} {value!r} is not a persistent handle (0x81000000-0x81FFFFFF)")
    return h


def handle_uri(handle: int) -> str:
    """The key URI of a persistent handle (e.g. for ``Keystore.import_idevid(key_uri=...)``)."""
    return f"tpm:handle/0x{handle:08x}"


# ---- connection ------------------------------------------------------------------------------------
# TPM warnings that say "not now" rather than "no": no room for one more loaded object or session (several
# processes share a TPM without a resource manager, e.g. a simulator or /dev/tpm0 via a daemon), or the TPM asks to
# be called again. Retried with a short backoff for up to RETRY_WAIT_S.
_TRANSIENT_RC = {0x902, 0x903, 0x904, 0x908, 0x90A, 0x922}  # OBJECT/SESSION_MEMORY, MEMORY, YIELDED, TESTING, RETRY
RETRY_WAIT_S = 30.0


def _transient(e: Exception) -> bool:
    rc = getattr(e, "rc", None)
    return isinstance(e, TSS2_Exception) and rc is not None and (rc & 0xFFF) in _TRANSIENT_RC


def _retrying(fn, *args):
    """``fn(*args)``, again after a short pause while the TPM answers with a transient warning (see above)."""
    deadline = time.monotonic() + RETRY_WAIT_S
    pause = 0.005
    while True:
        try:
            return fn(*args)
        except TSS2_Exception as e:
            if not _transient(e) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


class _Connection:
    """The two C contexts of one TPM connection, owned together: the TCTI (``TCTILdr``: the open device, socket, or
    ``cmd`` child process) and the ESAPI context on top of it. ``ESAPI.close`` finalizes only a TCTI it loaded
    itself from a string, never one handed to it, so ``close`` finalizes both, ESAPI first. Idempotent.

    In a forked child (the CLI's zygote, a hook) the inherited contexts are the parent's: finalizing them would
    end the parent's TPM session (a socket TCTI sends its session-end command), so ``close`` only forgets them there.
    """

    def __init__(self, tcti_spec: str):
        self.pid = os.getpid()
        name, _, conf = tcti_spec.partition(":")
        try:
            self.tcti = TCTILdr(name, conf or None)
        except TSS2_Exception as e:
            hint = (" (unknown TCTI name or its library libtss2-tcti-<name> is not installed; known: "
                    "device, tabrmd, swtpm, mssim)") if "not supported" in str(e) else ""
            raise TpmUnavailableError(
                f"TPM not reachable via TCTI {tcti_spec!r}: {e}{hint}. Check the 'tcti' backend option") from e
        try:
            self.ectx: ESAPI | None = ESAPI(self.tcti)
        except TSS2_Exception as e:
            self.ectx = None
            self.close()  # a failed open leaks nothing: the TCTI is ours until an ESAPI context holds it
            raise TpmUnavailableError(f"TPM not reachable via TCTI {tcti_spec!r}: {e}") from e

    def close(self) -> None:
        ectx, tcti, self.ectx, self.tcti = self.ectx, self.tcti, None, None
        if os.getpid() != self.pid:
            return
        if ectx is not None:
            with contextlib.suppress(Exception):
                ectx.close()
        if tcti is not None:
            with contextlib.suppress(Exception):
                tcti.close()


class _Tpm:
    """One TPM connection with error wrapping, shared by the key backend and the master-key sealing.

    It is the only owner of its ``_Connection`` (opened on first use). Every use runs in ``session`` under
    ``lock``, and ``close`` takes the same lock: closing waits for a key operation in progress, never cuts it
    off. After ``close`` (``Backend.close``, hence ``Keystore.close``) the next use opens a new connection, and a
    connection lost mid-operation is closed at once (``_wrap``) and reopened the same way. A ``_Tpm`` dropped
    without ``close`` (a Keystore nobody closed) closes its connection when it is collected (``weakref.finalize``;
    the keystore keeps no reference cycles, so that is when the last reference goes); at process exit the OS
    closes whatever is left.
    """

    def __init__(self, options: dict, lock_file: Path | None = None):
        self.tcti = str(options.get("tcti") or DEFAULT_TCTI)
        parent = options.get("parent", "owner")
        self.parent = _OWNER if parent in (None, "", "owner") else _parse_handle(parent, "TPM parent handle")
        self.lock = threading.RLock()
        self._conn: _Connection | None = None
        self._finalizer: weakref.finalize | None = None
        # devagent processes of one keystore take turns at the TPM (flock): a TPM holds only a few loaded objects,
        # and without a resource manager (a simulator; some boards) their loads would otherwise exhaust them.
        self._turns = TurnLock(lock_file) if lock_file is not None else contextlib.nullcontext()

    def _wrap(self, e: Exception, doing: str) -> TpmError:
        rc = getattr(e, "rc", None)
        text = str(e)
        if isinstance(e, TSS2_Exception) and (text.startswith("tcti:") or (rc is not None and (rc >> 16) == 0x0A)):
            self.close()
            return TpmUnavailableError(
                f"TPM not reachable via TCTI {self.tcti!r} while {doing}: {text}. Check the TPM device "
                "(ls -l /dev/tpmrm0; dtoverlay=tpm-slb9670 on a Raspberry Pi), the resource manager "
                "(tabrmd) or the simulator address, and the 'tcti' option")
        return TpmError(f"TPM error while {doing} (TCTI {self.tcti!r}): {text}")

    def esapi(self) -> ESAPI:
        """The ESAPI context, connecting first if needed; call it only under ``lock`` (``session`` does)."""
        if self._conn is None:
            conn = _Connection(self.tcti)
            self._conn = conn
            self._finalizer = weakref.finalize(self, conn.close)
            self._finalizer.atexit = False  # at exit the OS closes what is left; no C calls during teardown
        return self._conn.ectx

    @contextlib.contextmanager
    def session(self, doing: str):
        """Yield the ESAPI context under the lock; TSS errors become TpmError naming the TCTI."""
        with self.lock, self._turns:
            try:
                yield self.esapi()
            except TSS2_Exception as e:
                raise self._wrap(e, doing) from e

    def close(self) -> None:
        """Finalize the connection (ESAPI context and TCTI), after any operation in progress; idempotent."""
        with self.lock:
            if self._finalizer is not None:
                self._finalizer()  # runs _Connection.close once and unregisters it
            self._conn = self._finalizer = None

    def persistent_tr(self, ectx: ESAPI, handle: int):
        """ESYS_TR for a persistent handle, or TpmKeyNotFoundError naming it."""
        more, data = ectx.get_capability(TPM2_CAP.HANDLES, handle, 1)
        if not list(data.data.handles) or int(list(data.data.handles)[0]) != handle:
            raise TpmKeyNotFoundError(f"no TPM key at persistent handle 0x{handle:08x} (TCTI {self.tcti!r}); "
                                      "list them with: tpm2_getcap handles-persistent")
        return ectx.tr_from_tpmpublic(handle)


# ---- key objects -----------------------------------------------------------------------------------
class _TpmKeyMixin(HardwareKeyMixin):
    """Signing loads the key, signs through tpm2_pytss.cryptography, and flushes it."""
    _where = 'in the TPM'


class TpmEccPrivateKey(_TpmKeyMixin, ec.EllipticCurvePrivateKey):
    """A TPM-resident ECC key with ``cryptography``'s private-key interface."""

    def __init__(self, backend: "Backend", uri: str, public: ec.EllipticCurvePublicKey):
        self._init(backend, uri, public)

    @property
    def curve(self):
        return self._public.curve

    def sign(self, data: bytes, signature_algorithm) -> bytes:
        with self._backend._loaded(self._uri, "signing") as (ectx, handle):
            try:
                return tpm_ecc_private_key(ectx, handle).sign(data, signature_algorithm)
            except ValueError as e:
                raise ValueError(f"{self._uri}: {e}") from e

    def exchange(self, algorithm, peer_public_key) -> bytes:
        raise ValueError(f"{self._uri} is a signing-only TPM key (no ECDH)")


class TpmRsaPrivateKey(_TpmKeyMixin, rsa.RSAPrivateKey):
    """A TPM-resident RSA key with ``cryptography``'s private-key interface (PKCS#1 v1.5 and PSS with
    salt length = digest length, the only PSS form a TPM produces)."""

    def __init__(self, backend: "Backend", uri: str, public: rsa.RSAPublicKey):
        self._init(backend, uri, public)

    def sign(self, data: bytes, padding, algorithm) -> bytes:
        with self._backend._loaded(self._uri, "signing") as (ectx, handle):
            try:
                return tpm_rsa_private_key(ectx, handle).sign(data, padding, algorithm)
            except ValueError as e:
                raise ValueError(f"{self._uri}: {e}") from e

    def decrypt(self, ciphertext: bytes, padding) -> bytes:
        raise ValueError(f"{self._uri} is a signing-only TPM key (no decryption)")


# ---- backend ---------------------------------------------------------------------------------------
class Backend(KeyBackend):
    scheme = "tpm"
    exportable = False

    def __init__(self, context):
        super().__init__(context)
        opts = self.ctx.options
        self._tpm = _Tpm(opts, Path(self.ctx.root) / LOCK_DIR / ".lock")
        self.persist = str(opts.get("persist", "blob"))
        if self.persist not in ("blob", "handle"):
            raise KeyBackendError(f"TPM option persist={self.persist!r}: use 'blob' or 'handle'")
        self.handle_base = _parse_handle(opts.get("handle_base", DEFAULT_HANDLE_BASE), "TPM handle_base")
        self._publics: dict[str, object] = {}
        # uri -> TPMS_CONTEXT of the key after its last use: the TPM-encrypted saved context, kept in memory
        # only. Loading it is much cheaper than re-creating the primary and loading the blob.
        self._saved: dict[str, object] = {}

    @property
    def tcti(self) -> str:
        return self._tpm.tcti

    # ---- URIs ------------------------------------------------------------------------------------
    def _parse(self, uri: str) -> tuple[str, object]:
        scheme, _, rest = uri.partition(":")
        m = _BLOB_RE.match(rest) if scheme == "tpm" else None
        if m:
            return "blob", Path(self.ctx.root) / BLOB_DIR / f"{m.group(1)}{BLOB_SUFFIX}"
        m = _HANDLE_RE.match(rest) if scheme == "tpm" else None
        if m:
            return "handle", int(m.group(1), 16)
        raise KeyBackendError(f"malformed TPM key URI {uri!r}; expected tpm:blob/<16 hex digits> or "
                              "tpm:handle/0x81xxxxxx")

    def _read_blob(self, uri: str, path: Path) -> TSSPrivKey:
        try:
            data = fsutil.read_private(path, "TPM key blob")
        except FileNotFoundError:
            raise TpmKeyNotFoundError(f"TPM key {uri} is missing: its blob {path} does not exist") from None
        try:
            return TSSPrivKey.from_pem(data)
        except Exception as e:
            raise CorruptFileError(f"TPM key blob {path} is not a TSS2 PRIVATE KEY: {e}") from e

    @contextlib.contextmanager
    def _loaded(self, uri: str, doing: str):
        """Yield (ectx, ESYS_TR) with the key loaded; flush (or release) it afterwards."""
        kind, ref = self._parse(uri)
        tss = self._read_blob(uri, ref) if kind == "blob" else None
        with self._tpm.session(f"{doing} with {uri}") as ectx:
            if kind == "blob":
                tr = None
                saved = self._saved.pop(uri, None)
                if saved is not None:
                    # A saved context skips re-deriving the primary key (tens of ms on swtpm, far more on an
                    # SPI TPM); it is invalid after a TPM reset, and then we load from the blob again.
                    with contextlib.suppress(TSS2_Exception):
                        tr = ectx.context_load(saved)
                if tr is None:
                    try:
                        tr = _retrying(tss.load, ectx)
                    except TSS2_Exception as e:
                        if "tcti" in str(e):
                            raise
                        raise TpmError(f"the TPM cannot load key {uri} ({e}): the blob was made by another TPM, "
                                       f"for another parent, or the TPM was cleared (TCTI {self.tcti!r})") from e
                try:
                    yield ectx, tr
                    with contextlib.suppress(TSS2_Exception):
                        self._saved[uri] = ectx.context_save(tr)
                finally:
                    with contextlib.suppress(Exception):
                        ectx.flush_context(tr)
            else:
                tr = self._tpm.persistent_tr(ectx, ref)
                try:
                    yield ectx, tr
                finally:
                    with contextlib.suppress(Exception):
                        ectx.tr_close(tr)

    # ---- KeyBackend --------------------------------------------------------------------------------
    def prepare(self, key_type: str, label: str) -> NewKey:
        """The TPM creates the key (TPM2_Create: nothing stays in the TPM); ``keep`` writes its blob, or makes it
        persistent at the handle chosen here (free now; the keystore lock keeps other devagents from taking it)."""
        template = _template(key_type)
        with self._tpm.session(f"creating a {key_type} key") as ectx:
            tss = _retrying(lambda: TSSPrivKey.create(ectx, template, parent=self._tpm.parent))
            pub = public_to_key(tss.public.publicArea)
            if self.persist == "handle":
                handle = self._free_handle(ectx)
                uri = handle_uri(handle)

                def keep():
                    with self._tpm.session(f"making {uri} persistent") as ectx2:
                        tr = _retrying(tss.load, ectx2)
                        try:
                            ectx2.evict_control(ESYS_TR.RH_OWNER, tr, handle)
                        finally:
                            ectx2.flush_context(tr)
                    self._publics[uri] = pub
                    return pub

                return NewKey(uri, pub, keep)
        bid = secrets.token_hex(8)
        uri = f"tpm:blob/{bid}"

        def keep_blob():
            fsutil.ensure_dir(Path(self.ctx.root) / BLOB_DIR)
            fsutil.atomic_write(Path(self.ctx.root) / BLOB_DIR / f"{bid}{BLOB_SUFFIX}", tss.to_pem())
            self._publics[uri] = pub
            return pub

        return NewKey(uri, pub, keep_blob)

    def generate(self, key_type: str, label: str) -> str:
        nk = self.prepare(key_type, label)
        nk.keep()
        return nk.uri

    def _free_handle(self, ectx) -> int:
        _, data = ectx.get_capability(TPM2_CAP.HANDLES, self.handle_base, HANDLE_RANGE)
        used = {int(h) for h in data.data.handles}
        for h in range(self.handle_base, self.handle_base + HANDLE_RANGE):
            if h not in used:
                return h
        raise TpmError(f"no free persistent handle in 0x{self.handle_base:08x}+{HANDLE_RANGE} "
                       f"(TCTI {self.tcti!r}); delete unused keys or set handle_base")

    def _public(self, uri: str):
        pub = self._publics.get(uri)
        if pub is not None:
            return pub
        kind, ref = self._parse(uri)
        if kind == "blob":
            pub = public_to_key(self._read_blob(uri, ref).public.publicArea)
        else:
            with self._loaded(uri, "reading the public key") as (ectx, tr):
                public, _, _ = ectx.read_public(tr)
                area = public.publicArea
                if area.objectAttributes & TPMA_OBJECT.RESTRICTED or not \
                        area.objectAttributes & TPMA_OBJECT.SIGN_ENCRYPT:
                    raise TpmError(f"the TPM object at {uri} is not a general signing key (restricted or "
                                   "without the sign attribute); an IDevID key must be an unrestricted signing key")
                pub = public_to_key(area)
        self._publics[uri] = pub
        return pub

    def open_key(self, uri: str) -> None:
        """The key loaded into the TPM under its parent (a blob) or its persistent handle opened, then flushed."""
        with self._loaded(uri, "opening the key"):
            pass

    def load(self, uri: str):
        pub = self._public(uri)
        if isinstance(pub, ec.EllipticCurvePublicKey):
            return TpmEccPrivateKey(self, uri, pub)
        if isinstance(pub, rsa.RSAPublicKey):
            return TpmRsaPrivateKey(self, uri, pub)
        raise TpmError(f"the TPM key {uri} has an unsupported type ({type(pub).__name__})")

    def public_key(self, uri: str):
        return self._public(uri)

    def cached_public_key(self, uri: str):
        return self._publics.get(uri)

    def delete(self, uri: str) -> None:
        kind, ref = self._parse(uri)
        self._publics.pop(uri, None)
        self._saved.pop(uri, None)
        if kind == "blob":
            fsutil.secure_delete(ref)  # without its blob the TPM cannot load the key again
            return
        if not self.handle_base <= ref < self.handle_base + HANDLE_RANGE:
            return  # not ours (e.g. the manufacturer's IDevID key): the keystore forgets it, the TPM keeps it
        with self._tpm.session(f"evicting {uri}") as ectx:
            try:
                tr = self._tpm.persistent_tr(ectx, ref)
            except TpmKeyNotFoundError:
                return
            ectx.evict_control(ESYS_TR.RH_OWNER, tr, ref)

    def export_pem(self, uri: str, password):
        raise ExportRefusedError(f"the private key {uri} lives in the TPM and is non-exportable "
                                 "(created fixedTPM|fixedParent); re-enroll with a software key if you need "
                                 "to move the credential")

    def key_file(self, uri: str):
        # See docs/hardware-keys.md: TLS client authentication with a TPM key through OpenSSL's tpm2
        # provider did not complete a handshake here, so no key file is offered; callers raise a clear error.
        return None

    def persistent_handles(self) -> list[int]:
        """Persistent handles present in the TPM (for diagnostics and the CLI)."""
        with self._tpm.session("listing persistent handles") as ectx:
            _, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HR.PERSISTENT, 128)
            return [int(h) for h in data.data.handles]

    def close(self) -> None:
        with self._tpm.lock:  # after an operation in progress (its key's saved context goes too)
            self._saved.clear()
            self._tpm.close()


# ---- keystore master key sealed to the TPM ---------------------------------------------------------
def _encrypted_session(ectx: ESAPI, salt_key):
    """An HMAC session salted with ``salt_key`` (the storage parent) that encrypts the first command and response
    parameter with AES-128-CFB: the master key crosses the TPM bus (SPI) only encrypted, in both directions.

    The salt is encrypted to the parent's public key, which a passive bus probe cannot undo. (An active
    interposer that answers in place of the TPM would need a pinned or EK-certified parent; docs/hardware-keys.md.)
    """
    sym = TPMT_SYM_DEF(algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128),
                       mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB))
    sess = ectx.start_auth_session(tpm_key=salt_key, bind=ESYS_TR.NONE, session_type=TPM2_SE.HMAC,
                                   symmetric=sym, auth_hash=TPM2_ALG.SHA256)
    ectx.trsess_set_attributes(sess, TPMA_SESSION.DECRYPT | TPMA_SESSION.ENCRYPT | TPMA_SESSION.CONTINUESESSION)
    return sess


@contextlib.contextmanager
def _parent_and_session(tpm: "_Tpm", ectx: ESAPI):
    """The storage parent (created or looked up) and an encrypted session salted with it; both flushed after."""
    parent = TSSPrivKey._getparent(ectx, TPM2_ALG.KEYEDHASH, tpm.parent)
    sess = None
    try:
        sess = _encrypted_session(ectx, parent)
        yield parent, sess
    finally:
        if sess is not None:
            ectx.flush_context(sess)
        if tpm.parent == _OWNER:
            ectx.flush_context(parent)


def seal_master_key(root, master_key: bytes, options: dict) -> dict:
    """Seal ``master_key`` to the TPM and write the sealed blob to ``<root>/master.tss`` (0600).

    The secret goes to the TPM (TPM2_Create) and comes back (the test TPM2_Unseal) only inside a salted,
    parameter-encrypting session (``_encrypted_session``).

    Args:
        root: keystore directory.
        master_key: the secret (the keystore's current master key).
        options: TPM backend options (``tcti``, ``parent``).

    Returns:
        The index meta fields to record: ``{"master_key": "tpm", "master_key_blob": "master.tss"}``.

    Raises:
        TpmUnavailableError, TpmError, StorageError.
    """
    if not master_key or len(master_key) > 128:
        raise ValueError("master key must be 1-128 bytes")
    tpm = _Tpm(options)
    try:
        with tpm.session("sealing the keystore master key") as ectx, _parent_and_session(tpm, ectx) as (parent, sess):
            sens = TPM2B_SENSITIVE_CREATE()
            sens.sensitive.data = master_key
            private, public, _, _, _ = ectx.create(parent, sens, TPM2B_PUBLIC(publicArea=_seal_template()),
                                                   session1=sess)
            blob = TSSPrivKey(private, public, True, tpm.parent)
            # Check we can unseal before the caller removes the plain master key file.
            tr = ectx.load(parent, private, public, session1=sess)
            try:
                if bytes(ectx.unseal(tr, session1=sess)) != master_key:
                    raise TpmError("the TPM returned a different secret when unsealing the master key")
            finally:
                ectx.flush_context(tr)
    finally:
        tpm.close()
    fsutil.atomic_write(Path(root) / MASTER_BLOB, blob.to_pem())
    return {"master_key": "tpm", "master_key_blob": MASTER_BLOB}


def unseal_master_key(root, meta: dict, options: dict) -> bytes:
    """Unseal the keystore master key sealed by ``seal_master_key`` (called by ``Keystore._master_key``); the
    secret comes back over the bus encrypted (``_encrypted_session``).

    Raises:
        KeystoreError: the sealed blob is missing; TpmUnavailableError / TpmError: the TPM refused.
    """
    if meta.get("master_key") != "tpm":
        raise KeystoreError(f"unknown master key provider {meta.get('master_key')!r} in the keystore index")
    path = Path(root) / str(meta.get("master_key_blob") or MASTER_BLOB)
    try:
        tss = TSSPrivKey.from_pem(fsutil.read_private(path, "sealed keystore master key"))
    except FileNotFoundError:
        raise KeystoreError(f"the sealed keystore master key {path} is missing: software keys cannot be "
                            "decrypted") from None
    except ValueError as e:
        raise CorruptFileError(f"sealed keystore master key {path} is not a TSS2 blob: {e}") from e
    tpm = _Tpm(options if tss.parent == _OWNER else {**options, "parent": f"0x{tss.parent:08x}"})
    try:
        with tpm.session("unsealing the keystore master key") as ectx, _parent_and_session(tpm, ectx) as (parent, sess):
            try:
                tr = ectx.load(parent, tss.private, tss.public, session1=sess)
            except TSS2_Exception as e:
                if "tcti" in str(e):
                    raise
                raise TpmError(f"the TPM cannot load the sealed master key {path} ({e}): it was sealed by "
                               f"another TPM or the TPM was cleared (TCTI {tpm.tcti!r})") from e
            try:
                return bytes(ectx.unseal(tr, session1=sess))
            finally:
                ectx.flush_context(tr)
    finally:
        tpm.close()


def move_master_key_to_tpm(keystore, options: dict | None = None) -> None:
    """Seal an open keystore's file master key to the TPM, record it in the index, and remove master.key.

    Order (crash-safe): sealed blob written and test-unsealed → index meta switched → master.key deleted.
    A crash before the index switch leaves the file provider in use (the blob is ignored); after it, the
    stale master.key is removed by the next call.
    """
    root = Path(keystore.root)
    opts = options if options is not None else keystore._backend_options.get("tpm", {})
    meta = keystore.meta()
    if meta.get("master_key", "file") == "tpm":
        fsutil.secure_delete(root / "master.key")
        return
    master = keystore._master_key()
    fields = seal_master_key(root, master, opts)
    with keystore._txn() as data:
        m = dict((data.get("meta") or {}).get("1") or {})
        m.update(fields)
        data["meta"]["1"] = m
    keystore.audit("master-key-seal", provider="tpm", tcti=str(opts.get("tcti") or DEFAULT_TCTI))
    fsutil.secure_delete(root / "master.key")
