"""Security layers between the CLM and a device: OSCORE and DTLS-PSK, pluggable.

Commissioning (``devagent coap provision``) writes a fresh context pair: the device half under the device's
security directory and the CLM half under the CLM's ``contexts/<device>/``::

    <device security dir>/oscore/<peer>/settings.json   ids, algorithm (not secret)
    <device security dir>/oscore/<peer>/secret.json     master secret + salt (0600)
    <device security dir>/dtls/<peer>.json              {"identity", "psk_ascii"} (0600)
    <clm dir>/contexts/<device>/oscore/{settings,secret}.json   the same context with ids swapped
    <clm dir>/contexts/<device>/dtls.json
    <clm dir>/contexts/<device>/hmac.json               {"device_id", "secret_hex"} (0600): a MicroPython board
                                                        (agent/mpy), HMAC-SHA256 requests under its commissioning
                                                        secret (``write_hmac_context``, ``load_hmac_context``)

Directories are 0700, secret files 0600, written through ``keystore.fsutil`` (temp + fsync + replace); loading
refuses secrets that group/others can read. aiocoap persists OSCORE sequence numbers in ``sequence.json``.

The paper (Astorga et al. 2021) authenticates with raw-public-key DTLS on identity-based keys. aiocoap's tinydtls
does PSK only, and its EDHOC (0.4.17) redoes the handshake per request and stops accepting new contexts after 48
handshakes per process, so it cannot protect a long-lived device service yet. Each mechanism is a
``ServerSecurity`` / ``client_credentials`` pair behind one small interface so that EDHOC can be added as another
layer when it is usable.

Invariants: a request is authenticated only when the transport reports a claim that one of the loaded layers
issued (``authenticated_peer``); plain CoAP requests carry no claims. Secrets are never logged.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from coap_services.errors import SecurityConfigError

OSCORE_ALGORITHM = "AES-CCM-16-64-128"
OSCORE_KDF = "sha256"
DEVICE_SENDER_ID = b"D"  # the device's OSCORE sender id; the CLM's is CLM_SENDER_ID
CLM_SENDER_ID = b"C"
METHODS = ("oscore", "dtls-psk")
CLIENT_METHODS = ("oscore", "dtls-psk", "hmac", "none")  # what the CLM can speak ("hmac": agent/mpy boards)
HMAC_MIN_SECRET = 16  # bytes; agent/mpy refuses shorter commissioning secrets


def _fsutil():
    from keystore import fsutil

    return fsutil


def _write_json(path: Path, data: dict) -> None:
    _fsutil().atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n", mode=0o600)


def _read_secret_json(path: Path, what: str) -> dict:
    from keystore.errors import KeystorePermissionError

    try:
        return json.loads(_fsutil().read_private(path, what))
    except KeystorePermissionError as e:
        raise SecurityConfigError(str(e)) from e
    except FileNotFoundError:
        raise SecurityConfigError(f"{what} {path} is missing; run 'devagent coap provision'") from None
    except (OSError, ValueError) as e:
        raise SecurityConfigError(f"{what} {path} cannot be read: {e}") from e


# DTLSSocket's tinydtls copies the PSK into a fixed buffer without checking its length: a PSK of 19 bytes or more
# fails the handshake with an internal_error alert, 128 bytes or more overwrite the process's stack (seen: SIGSEGV).
# ``provision`` writes 16; a longer one (a hand-edited file) is refused here, before the DTLS stack sees it.
DTLS_PSK_MAX_BYTES = 16


def _read_dtls_psk(path: Path) -> dict:
    """A DTLS PSK file ({"identity", "psk_ascii"}), checked. Raises SecurityConfigError naming the file."""
    d = _read_secret_json(path, "DTLS PSK file")
    if not isinstance(d, dict) or not isinstance(d.get("identity"), str) or not isinstance(d.get("psk_ascii"), str):
        raise SecurityConfigError(f"DTLS PSK file {path} needs 'identity' and 'psk_ascii'")
    n = len(d["psk_ascii"].encode())
    if not 1 <= n <= DTLS_PSK_MAX_BYTES:
        raise SecurityConfigError(f"DTLS PSK file {path}: 'psk_ascii' is {n} bytes; the DTLS stack (tinydtls) takes "
                                  f"1 to {DTLS_PSK_MAX_BYTES}: run 'devagent coap provision --force' for a new pair")
    return d


# ---- commissioning --------------------------------------------------------------------------------------------
def _oscore_pair(dir_a: Path, sender_a: bytes, dir_b: Path, sender_b: bytes) -> None:
    secret, salt = secrets.token_bytes(32), secrets.token_bytes(8)
    for d, snd, rcv in ((dir_a, sender_a, sender_b), (dir_b, sender_b, sender_a)):
        fs = _fsutil()
        fs.ensure_dir(d)
        for stale in ("sequence.json", "lock"):
            if (d / stale).exists():
                fs.secure_delete(d / stale)  # a new secret starts new sequence numbers
        _write_json(d / "secret.json", {"secret_hex": secret.hex(), "salt_hex": salt.hex()})
        _write_json(d / "settings.json", {"sender-id_hex": snd.hex(), "recipient-id_hex": rcv.hex(),
                                          "algorithm": OSCORE_ALGORITHM, "kdf-hashfun": OSCORE_KDF})


def provision(device_id: str, device_dir: str | os.PathLike, clm_dir: str | os.PathLike, *,
              methods=METHODS, peer: str = "clm", force: bool = False) -> dict:
    """Create a fresh security context pair for (device, CLM). Returns what was written (no secrets).

    Raises:
        SecurityConfigError: a context exists already and ``force`` is not set.
    """
    from keystore.store import check_name

    check_name(device_id, "device id")
    check_name(peer, "peer name")
    fs = _fsutil()
    device_dir, clm_dir = Path(device_dir), Path(clm_dir)
    dev_oscore = device_dir / "oscore" / peer
    dev_dtls = device_dir / "dtls" / f"{peer}.json"
    clm_ctx = clm_dir / "contexts" / device_id
    written = {"device": device_id, "peer": peer, "files": []}
    for m in methods:
        if m not in METHODS:
            raise SecurityConfigError(f"unknown security method {m!r}; use one of {', '.join(METHODS)}")
    if not force:
        for m, p in (("oscore", dev_oscore / "secret.json"), ("oscore", clm_ctx / "oscore" / "secret.json"),
                     ("dtls-psk", dev_dtls), ("dtls-psk", clm_ctx / "dtls.json")):
            if m in methods and p.exists():
                raise SecurityConfigError(f"{p} exists already; pass --force to replace the context on BOTH "
                                          "the device and the CLM (the old one stops working)")
    fs.ensure_dir(device_dir)
    fs.ensure_dir(clm_ctx)
    if "oscore" in methods:
        fs.ensure_dir(device_dir / "oscore")
        _oscore_pair(dev_oscore, DEVICE_SENDER_ID, clm_ctx / "oscore", CLM_SENDER_ID)
        written["files"] += [str(dev_oscore), str(clm_ctx / "oscore")]
    if "dtls-psk" in methods:
        # 16 characters: the tinydtls in DTLSSocket refuses longer PSKs, and libcoap 4.3.1 takes -k as text.
        psk = {"identity": peer, "psk_ascii": secrets.token_urlsafe(12)}
        fs.ensure_dir(device_dir / "dtls")
        _write_json(dev_dtls, psk)
        _write_json(clm_ctx / "dtls.json", dict(psk, device=device_id))
        written["files"] += [str(dev_dtls), str(clm_ctx / "dtls.json")]
    return written


# ---- device (server) side -------------------------------------------------------------------------------------
class ServerSecurity:
    """One mechanism on the device. ``transports`` to enable, ``credentials`` for aiocoap's CredentialsMap,
    ``wrap_site`` to put around the resource tree, ``claims`` it issues for an authenticated peer."""

    name = ""
    transports: tuple[str, ...] = ()

    def credentials(self) -> dict:
        return {}

    def wrap_site(self, site, credentials_map):
        return site

    @property
    def claims(self) -> set[str]:
        return set(self.credentials())

    def describe(self) -> str:
        return self.name


class OscoreServer(ServerSecurity):
    name = "oscore"
    transports = ("oscore",)

    def __init__(self, contexts: dict[str, Path]):
        self.contexts = contexts  # peer -> context directory

    def credentials(self) -> dict:
        return {f":oscore-{peer}": {"oscore": {"basedir": str(d) + "/"}} for peer, d in self.contexts.items()}

    def wrap_site(self, site, credentials_map):
        from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

        return OscoreSiteWrapper(site, credentials_map)

    def describe(self) -> str:
        return f"OSCORE ({', '.join(sorted(self.contexts))})"


class DtlsPskServer(ServerSecurity):
    name = "dtls-psk"
    transports = ("tinydtls_server",)

    def __init__(self, psks: dict[str, dict]):
        self._psks = psks  # peer -> {"identity", "psk_ascii"}

    def credentials(self) -> dict:
        return {f":dtls-{peer}": {"dtls": {"psk": {"ascii": p["psk_ascii"]},
                                           "client-identity": {"ascii": p["identity"]}}}
                for peer, p in self._psks.items()}

    def describe(self) -> str:
        return f"DTLS-PSK ({', '.join(sorted(p['identity'] for p in self._psks.values()))})"

    def __repr__(self) -> str:  # never show PSKs
        return f"DtlsPskServer(identities={sorted(p['identity'] for p in self._psks.values())})"


def load_server_security(security_dir: str | os.PathLike, methods=METHODS) -> list[ServerSecurity]:
    """Load every provisioned context below ``security_dir`` (see module docstring).

    Raises:
        SecurityConfigError: a context is unreadable or its secret file is group/world-readable.
    """
    root = Path(security_dir)
    layers: list[ServerSecurity] = []
    if "oscore" in methods and (root / "oscore").is_dir():
        ctx = {}
        for d in sorted((root / "oscore").iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                _read_secret_json(d / "secret.json", "OSCORE secret")
                ctx[d.name] = d
        if ctx:
            layers.append(OscoreServer(ctx))
    if "dtls-psk" in methods and (root / "dtls").is_dir():
        psks = {}
        for f in sorted((root / "dtls").glob("*.json")):
            psks[f.stem] = _read_dtls_psk(f)
        if psks:
            layers.append(DtlsPskServer(psks))
    return layers


def authenticated_peer(remote, claims: set[str]) -> str | None:
    """The claim (e.g. ``:oscore-clm``) under which the transport authenticated ``remote``, or None."""
    try:
        got = list(getattr(remote, "authenticated_claims", None) or ())
    except Exception:  # an address type without claims support
        return None
    for c in got:
        if isinstance(c, str) and c in claims:
            return c
    return None


# ---- CLM (client) side ----------------------------------------------------------------------------------------
def detect_method(context_dir: str | os.PathLike | None) -> str:
    """``oscore`` / ``dtls-psk`` / ``none`` from what a CLM context directory holds (OSCORE preferred)."""
    if not context_dir:
        return "none"
    d = Path(context_dir)
    if (d / "oscore" / "secret.json").exists():
        return "oscore"
    if (d / "dtls.json").exists():
        return "dtls-psk"
    if (d / "hmac.json").exists():
        return "hmac"
    return "none"


def write_hmac_context(context_dir: str | os.PathLike, device_id: str, secret: bytes) -> Path:
    """Store a MicroPython board's commissioning secret for the CLM (``devagent mpy deploy`` made it).

    Raises:
        SecurityConfigError: the secret is shorter than ``HMAC_MIN_SECRET`` bytes.
    """
    if not isinstance(secret, bytes) or len(secret) < HMAC_MIN_SECRET:
        raise SecurityConfigError(f"the commissioning secret of {device_id} must be at least {HMAC_MIN_SECRET} "
                                  "bytes (the hex string 'devagent mpy deploy --secret-file' wrote)")
    d = _fsutil().ensure_dir(Path(context_dir))
    _write_json(d / "hmac.json", {"device_id": device_id, "secret_hex": secret.hex()})
    return d / "hmac.json"


def load_hmac_context(context_dir: str | os.PathLike | None) -> tuple[str, bytes]:
    """(device id on the board, commissioning secret) from ``<context>/hmac.json``.

    Raises:
        SecurityConfigError: missing, group/world-readable, or malformed.
    """
    if not context_dir:
        raise SecurityConfigError("security method hmac needs a context directory holding hmac.json")
    p = Path(context_dir) / "hmac.json"
    d = _read_secret_json(p, "HMAC commissioning secret")
    try:
        secret = bytes.fromhex(d["secret_hex"])
        device_id = d["device_id"]
    except (KeyError, TypeError, ValueError):
        raise SecurityConfigError(f"{p} needs 'device_id' and a hex 'secret_hex'") from None
    if not isinstance(device_id, str) or len(secret) < HMAC_MIN_SECRET:
        raise SecurityConfigError(f"{p}: device_id must be text and the secret at least {HMAC_MIN_SECRET} bytes")
    return device_id, secret


def client_credentials(uri: str, method: str, context_dir: str | os.PathLike | None) -> dict:
    """aiocoap client credentials (``CredentialsMap.load_from_dict`` input) for requests to ``uri``.

    Raises:
        SecurityConfigError: missing/unsafe context files, or a URI scheme that does not fit the method.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    base = f"{parts.scheme}://{parts.netloc}/*"
    if method == "none":
        return {}
    if not context_dir:
        raise SecurityConfigError(f"security method {method} needs a context directory")
    d = Path(context_dir)
    if method == "oscore":
        if parts.scheme != "coap":
            raise SecurityConfigError(f"OSCORE runs over coap://, not {parts.scheme}:// ({uri})")
        _read_secret_json(d / "oscore" / "secret.json", "OSCORE secret")
        return {base: {"oscore": {"basedir": str(d / "oscore") + "/"}}}
    if method == "dtls-psk":
        if parts.scheme != "coaps":
            raise SecurityConfigError(f"DTLS-PSK needs a coaps:// URI (the device serves DTLS on its CoAP port + 1), "
                                      f"not {uri}")
        p = _read_dtls_psk(d / "dtls.json")
        return {base: {"dtls": {"psk": {"ascii": p["psk_ascii"]}, "client-identity": {"ascii": p["identity"]}}}}
    raise SecurityConfigError(f"unknown security method {method!r}; use oscore, dtls-psk or none")


def release_oscore_contexts(credentials_map) -> None:
    """Persist sequence numbers and release the lock of every OSCORE context in an aiocoap CredentialsMap.

    aiocoap 0.4.17 does this only when the context object is garbage-collected (``_destroy`` from ``__del__``),
    so a service that stops, or a CLM that opens the same context again in the same process, would find it
    locked. This is the one place that calls that private method.

    ``_destroy`` writes the exact next sequence number back to ``sequence.json`` (with an fsync) so that no
    number is skipped. Where the file already holds a next-to-send at or above every number the context used
    (aiocoap persists a chunk ahead before it uses a number) and the current replay window, that write only
    saves a few sequence numbers of 2**40: it is left out, so a CLM that releases a context after each renewal
    pays one durable write per renewal (the one before the first number is used), not two. Nonce safety is
    unchanged: a context loaded later starts at or above every number used.
    """
    for item in list(credentials_map.values()):
        if getattr(item, "lockfile", None) is not None and hasattr(item, "_destroy"):
            if _persisted_ahead(item):
                item._store = _nothing_to_store  # this instance only; it is unusable after _destroy
            item._destroy()


def _persisted_ahead(item) -> bool:
    try:
        return item.replay_window_persisted is True and \
            int(item.sequence_number_persisted) >= int(item.sender_sequence_number)
    except (AttributeError, TypeError, ValueError):
        return False


def _nothing_to_store() -> None:
    pass
