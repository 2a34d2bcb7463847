"""PKCS#11 key backend (``pkcs11:`` URIs, RFC 7512), e.g. SoftHSM2, a smart card or an HSM.

Key URIs: ``pkcs11:token=<token label>;object=<key label>;id=%xx%xx...;type=private`` (RFC 7512 path
attributes, percent-encoded). The key is found by ``id`` (random, 16 bytes, set at generation) and, if the
URI has no ``id``, by ``object`` label; ``token`` defaults to the configured token label.

Backend options (``Keystore(root, backend_options={"pkcs11": {...}})``):

- ``module``       path of the PKCS#11 module (default: SoftHSM2's ``/usr/lib/softhsm/libsofthsm2.so`` or the
                   per-architecture path, whichever exists).
- ``token_label``  the token on which new keys are generated (and searched when a URI names none).
- ``pin``          the user PIN as a secret source: ``env:VAR`` or ``file:PATH`` (``pass:`` works, for tests);
                   resolved with ``keystore.secrets.resolve_secret`` at first login, never logged or stored.

Invariants:
- Private keys are generated on the token with ``CKA_TOKEN``, ``CKA_PRIVATE``, ``CKA_SENSITIVE`` true and
  ``CKA_EXTRACTABLE`` false, and may only sign: the key never leaves the token; export refuses.
- The key objects handed out are real ``cryptography`` private-key subclasses (``ec.EllipticCurvePrivateKey``,
  ``rsa.RSAPrivateKey``) that hash in software and sign on the token, so CSR building, CMP protection and
  every other signer need no PKCS#11-specific code. ECDSA signatures from the token (raw r||s) are returned
  DER-encoded, as ``cryptography`` does.
- One session per backend, used under a lock; PKCS#11 login state is per process, so a second backend
  instance on the same token shares the first one's login (see docs/hardware-keys.md).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import threading
import urllib.parse
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from keystore.backends import HardwareKeyMixin, KeyBackend, NewKey
from keystore.keylocks import LOCK_DIR, TurnLock
from keystore.errors import (
    ExportRefusedError,
    KeyBackendError,
    NotFoundError,
    SecretSourceError,
    UnsupportedKeyTypeError,
)
from keystore.secrets import resolve_secret

MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                     "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
                     "/usr/lib/arm-linux-gnueabihf/softhsm/libsofthsm2.so")
PKCS11_KEY_TYPES = ("p256", "p384", "rsa2048", "rsa3072", "rsa4096")
_CURVES = {"p256": "secp256r1", "p384": "secp384r1"}
ID_BYTES = 16
# RFC 7512 pk11-pchar: unreserved and a few sub-delims are left as they are; everything else is %XX.
_PCHAR_SAFE = "-._~:[]@!$'()*+,=&"
_DIGEST_INFO = {  # RFC 8017 §9.2 note 1: DER DigestInfo prefixes for EMSA-PKCS1-v1_5
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_HASH_MECH = {"sha1": (Mechanism.SHA_1, MGF.SHA1), "sha224": (Mechanism.SHA224, MGF.SHA224),
              "sha256": (Mechanism.SHA256, MGF.SHA256), "sha384": (Mechanism.SHA384, MGF.SHA384),
              "sha512": (Mechanism.SHA512, MGF.SHA512)}
# Errors after which the session is reopened once (token re-inserted, another instance logged out, ...).
_RETRY = (pkcs11.SessionHandleInvalid, pkcs11.SessionClosed, pkcs11.UserNotLoggedIn, pkcs11.DeviceRemoved,
          pkcs11.TokenNotPresent, pkcs11.ObjectHandleInvalid, pkcs11.KeyHandleInvalid)


class Pkcs11Error(KeyBackendError):
    """The PKCS#11 module or token refused an operation."""


class Pkcs11ModuleError(Pkcs11Error):
    """The PKCS#11 module cannot be loaded or initialised."""


class Pkcs11TokenNotFoundError(Pkcs11Error, NotFoundError):
    """No token with the configured label is present."""


class Pkcs11PinError(Pkcs11Error):
    """The PIN is wrong, locked, expired or missing."""


class Pkcs11KeyNotFoundError(Pkcs11Error, NotFoundError):
    """No key object matches the URI."""


# ---- URIs ------------------------------------------------------------------------------------------
def _pct(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return "".join(f"%{b:02x}" for b in value)
    return urllib.parse.quote(value, safe=_PCHAR_SAFE)


def make_uri(token: str, label: str, key_id: bytes) -> str:
    return f"pkcs11:token={_pct(token)};object={_pct(label)};id={_pct(key_id)};type=private"


def parse_uri(uri: str) -> dict:
    """RFC 7512 path attributes of a ``pkcs11:`` URI (query attributes such as pin-source are ignored:
    module and PIN come from the backend options). ``id`` is bytes, the others str.

    Raises:
        KeyBackendError: not a pkcs11 URI, or malformed.
    """
    scheme, sep, rest = uri.partition(":")
    if scheme != "pkcs11" or not sep:
        raise KeyBackendError(f"not a PKCS#11 URI: {uri!r}")
    path = rest.split("?", 1)[0]
    out: dict = {}
    for part in filter(None, path.split(";")):
        name, eq, value = part.partition("=")
        if not eq:
            raise KeyBackendError(f"malformed PKCS#11 URI {uri!r}: attribute {part!r} has no '='")
        try:
            out[name] = urllib.parse.unquote_to_bytes(value) if name == "id" else \
                urllib.parse.unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise KeyBackendError(f"malformed PKCS#11 URI {uri!r}: {name} is not UTF-8") from None
    if "id" not in out and "object" not in out:
        raise KeyBackendError(f"PKCS#11 URI {uri!r} names no key: it needs id= or object=")
    if out.get("type", "private") != "private":
        raise KeyBackendError(f"PKCS#11 URI {uri!r}: type must be 'private' for a signing key")
    return out


# ---- key objects -----------------------------------------------------------------------------------
def _digest(data: bytes, algorithm) -> tuple[bytes, hashes.HashAlgorithm]:
    if isinstance(algorithm, Prehashed):
        alg = algorithm._algorithm
        if len(data) != alg.digest_size:
            raise ValueError(f"prehashed data must be {alg.digest_size} bytes for {alg.name}")
        return data, alg
    if not isinstance(algorithm, hashes.HashAlgorithm):
        raise TypeError("algorithm must be a cryptography hash algorithm or Prehashed")
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize(), algorithm


class _Pkcs11KeyMixin(HardwareKeyMixin):
    _where = 'on a PKCS#11 token'
    _refusal = 'non-extractable'


class Pkcs11EccPrivateKey(_Pkcs11KeyMixin, ec.EllipticCurvePrivateKey):
    """An EC key on a PKCS#11 token with ``cryptography``'s private-key interface (ECDSA only)."""

    def __init__(self, backend: "Backend", uri: str, public: ec.EllipticCurvePublicKey):
        self._init(backend, uri, public)

    @property
    def curve(self):
        return self._public.curve

    def sign(self, data: bytes, signature_algorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("only ECDSA signatures are supported")
        digest, _ = _digest(data, signature_algorithm.algorithm)
        raw = self._backend._sign(self._uri, digest, Mechanism.ECDSA, None)
        half = len(raw) // 2
        if len(raw) % 2 or half * 8 < self._public.key_size:
            raise Pkcs11Error(f"the token returned a malformed ECDSA signature for {self._uri} ({len(raw)} bytes)")
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def exchange(self, algorithm, peer_public_key) -> bytes:
        raise ValueError(f"{self._uri} is a signing-only PKCS#11 key (no ECDH)")


class Pkcs11RsaPrivateKey(_Pkcs11KeyMixin, rsa.RSAPrivateKey):
    """An RSA key on a PKCS#11 token with ``cryptography``'s private-key interface (PKCS#1 v1.5, PSS)."""

    def __init__(self, backend: "Backend", uri: str, public: rsa.RSAPublicKey):
        self._init(backend, uri, public)

    def sign(self, data: bytes, padding_, algorithm) -> bytes:
        digest, alg = _digest(data, algorithm)
        if alg.name not in _DIGEST_INFO:
            raise ValueError(f"unsupported hash {alg.name} for RSA signing on a PKCS#11 token")
        if isinstance(padding_, padding.PKCS1v15):
            return self._backend._sign(self._uri, _DIGEST_INFO[alg.name] + digest, Mechanism.RSA_PKCS, None)
        if isinstance(padding_, padding.PSS):
            mgf_alg = getattr(padding_.mgf, "_algorithm", alg)
            salt = padding_._salt_length
            if isinstance(salt, padding._MaxLength):
                salt = padding.calculate_max_pss_salt_length(self._public, alg)
            elif isinstance(salt, padding._DigestLength):
                salt = alg.digest_size
            elif not isinstance(salt, int):
                raise ValueError("PSS salt length AUTO is only valid for verification")
            param = (_HASH_MECH[alg.name][0], _HASH_MECH[mgf_alg.name][1], salt)
            return self._backend._sign(self._uri, digest, Mechanism.RSA_PKCS_PSS, param)
        raise TypeError(f"unsupported RSA padding {type(padding_).__name__}")

    def decrypt(self, ciphertext: bytes, padding_) -> bytes:
        raise ValueError(f"{self._uri} is a signing-only PKCS#11 key (no decryption)")


# ---- backend ---------------------------------------------------------------------------------------
def default_module() -> str | None:
    for p in MODULE_CANDIDATES:
        if os.path.exists(p):
            return p
    return None


class Backend(KeyBackend):
    scheme = "pkcs11"
    exportable = False

    def __init__(self, context):
        super().__init__(context)
        opts = self.ctx.options
        self.module = opts.get("module") or default_module()
        self.token_label = opts.get("token_label")
        self._pin_spec = opts.get("pin")
        self._lock = threading.RLock()
        # devagent processes of one keystore take turns at the token (flock): SoftHSM2's file store, for one, can
        # be read half-written by a process while another one writes it.
        self._turns = TurnLock(Path(self.ctx.root) / LOCK_DIR / ".lock")
        self._sessions: dict[str, object] = {}  # token label -> open session
        self._publics: dict[str, object] = {}

    # ---- sessions ----------------------------------------------------------------------------------
    def _lib(self):
        if not self.module:
            raise Pkcs11ModuleError("no PKCS#11 module configured and SoftHSM2 is not installed: set the pkcs11 "
                                    "'module' option (e.g. /usr/lib/softhsm/libsofthsm2.so; apt-get install softhsm2)")
        if not os.path.exists(self.module):
            raise Pkcs11ModuleError(f"PKCS#11 module {self.module} does not exist: check the pkcs11 'module' option")
        try:
            return pkcs11.lib(self.module)
        except Exception as e:
            raise Pkcs11ModuleError(f"cannot load PKCS#11 module {self.module}: {type(e).__name__} {e}") from e

    def _token_of(self, attrs: dict | None) -> str:
        label = (attrs or {}).get("token") or self.token_label
        if not label:
            raise Pkcs11Error("no PKCS#11 token given: set the pkcs11 'token_label' option (or token= in the URI)")
        return label

    def _session(self, label: str):
        s = self._sessions.get(label)
        if s is not None:
            return s
        lib = self._lib()
        try:
            token = lib.get_token(token_label=label)
        except pkcs11.NoSuchToken:
            present = []
            with contextlib.suppress(Exception):
                present = [t.label for t in lib.get_tokens()]
            raise Pkcs11TokenNotFoundError(
                f"no PKCS#11 token labelled {label!r} in module {self.module} (tokens present: "
                f"{', '.join(repr(p) for p in present) or 'none'}); check the token is inserted and the "
                "'token_label' option") from None
        except pkcs11.PKCS11Error as e:
            raise Pkcs11Error(f"PKCS#11 module {self.module}: cannot enumerate tokens: {type(e).__name__} {e}") from e
        if self._pin_spec is None:
            raise Pkcs11PinError(f"no PIN for PKCS#11 token {label!r}: set the pkcs11 'pin' option "
                                 "(env:VAR or file:PATH)")
        try:
            pin = resolve_secret(self._pin_spec, f"PIN for PKCS#11 token {label!r}")
        except SecretSourceError as e:
            raise Pkcs11PinError(str(e)) from e
        try:
            s = token.open(user_pin=pin.decode(), rw=True)
        except pkcs11.UserAlreadyLoggedIn:
            s = token.open(rw=True)  # login state is per process: another session of ours logged in already
        except pkcs11.PinIncorrect:
            raise Pkcs11PinError(f"wrong PIN for PKCS#11 token {label!r} (PIN from {self._pin_spec.split(':')[0]}:"
                                 f"...); repeated failures may lock the token") from None
        except (pkcs11.PinLocked, pkcs11.PinExpired) as e:
            raise Pkcs11PinError(f"the PIN of PKCS#11 token {label!r} is {type(e).__name__[3:].lower()}: "
                                 "unlock it with the SO PIN") from None
        except pkcs11.PKCS11Error as e:
            raise Pkcs11Error(f"cannot open a session on PKCS#11 token {label!r}: {type(e).__name__} {e}") from e
        self._sessions[label] = s
        return s

    def _drop(self, label: str) -> None:
        s = self._sessions.pop(label, None)
        if s is not None:
            with contextlib.suppress(Exception):
                s.close()

    def _call(self, attrs: dict | None, doing: str, fn):
        """Run ``fn(session)`` under the lock; reopen the session once after a stale-session error."""
        label = self._token_of(attrs)
        with self._lock, self._turns:
            for attempt in (0, 1):
                s = self._session(label)
                try:
                    return fn(s)
                except _RETRY as e:
                    self._drop(label)
                    if attempt:
                        raise Pkcs11Error(f"PKCS#11 token {label!r}: {doing} failed: {type(e).__name__}") from e
                except KeyBackendError:
                    raise
                except pkcs11.PKCS11Error as e:
                    raise Pkcs11Error(f"PKCS#11 token {label!r}: {doing} failed: {type(e).__name__} {e}") from e

    @staticmethod
    def _find(s, attrs: dict, cls: ObjectClass):
        q = {Attribute.CLASS: cls}
        if "id" in attrs:
            q[Attribute.ID] = attrs["id"]
        elif "object" in attrs:
            q[Attribute.LABEL] = attrs["object"]
        objs = list(s.get_objects(q))
        if len(objs) > 1:
            raise Pkcs11Error(f"{len(objs)} {cls.name.lower().replace('_', ' ')} objects match "
                              f"{ {k: v for k, v in attrs.items() if k in ('id', 'object')} }; give id= in the URI")
        return objs[0] if objs else None

    # ---- KeyBackend --------------------------------------------------------------------------------
    def generate(self, key_type: str, label: str) -> str:
        nk = self.prepare(key_type, label)
        nk.keep()
        return nk.uri

    def prepare(self, key_type: str, label: str) -> NewKey:
        """Only the URI (token, label, a random CKA_ID) before ``keep``: a token creates keys in place, so the
        keystore records the URI first and a crash leaves a record to clean up, never an unnamed token object."""
        if key_type not in PKCS11_KEY_TYPES:
            raise UnsupportedKeyTypeError(
                f"key type {key_type} is not supported on a PKCS#11 token; choose one of {', '.join(PKCS11_KEY_TYPES)}")
        token = self._token_of(None)
        key_id = secrets.token_bytes(ID_BYTES)
        obj_label = label or f"devagent-{key_id.hex()[:16]}"
        priv_t = {Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                  Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.DECRYPT: False,
                  Attribute.UNWRAP: False, Attribute.DERIVE: False}
        pub_t = {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.VERIFY: True,
                 Attribute.ENCRYPT: False, Attribute.WRAP: False}

        def gen(s):
            if key_type in _CURVES:
                params = s.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVES[key_type])}, local=True)
                return params.generate_keypair(store=True, id=key_id, label=obj_label,
                                               private_template=priv_t, public_template=pub_t)
            pub_t2 = {**pub_t, Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"}
            return s.generate_keypair(KeyType.RSA, int(key_type[3:]), store=True, id=key_id, label=obj_label,
                                      private_template=priv_t, public_template=pub_t2)

        uri = make_uri(token, obj_label, key_id)

        def keep():
            pub, _ = self._call(None, f"generating a {key_type} key", gen)
            self._publics[uri] = self._to_public(pub)
            return self._publics[uri]

        return NewKey(uri, None, keep)

    @staticmethod
    def _to_public(pub):
        if pub.key_type == KeyType.EC:
            return serialization.load_der_public_key(encode_ec_public_key(pub))
        if pub.key_type == KeyType.RSA:
            return rsa.RSAPublicNumbers(int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
                                        int.from_bytes(pub[Attribute.MODULUS], "big")).public_key()
        raise Pkcs11Error(f"unsupported PKCS#11 key type {pub.key_type!r}")

    def public_key(self, uri: str):
        pub = self._publics.get(uri)
        if pub is not None:
            return pub
        attrs = parse_uri(uri)

        def read(s):
            obj = self._find(s, attrs, ObjectClass.PUBLIC_KEY)
            if obj is None:
                if self._find(s, attrs, ObjectClass.PRIVATE_KEY) is None:
                    raise Pkcs11KeyNotFoundError(f"no key {uri} on PKCS#11 token {self._token_of(attrs)!r}")
                raise Pkcs11KeyNotFoundError(f"the public key object of {uri} is missing on the token; "
                                             "import it (same id) with pkcs11-tool --write-object")
            return self._to_public(obj)

        pub = self._call(attrs, f"reading the public key of {uri}", read)
        self._publics[uri] = pub
        return pub

    def cached_public_key(self, uri: str):
        return self._publics.get(uri)

    def open_key(self, uri: str) -> None:
        """A logged-in session on the key's token (the PIN is checked) and its private key object found."""
        attrs = parse_uri(uri)

        def find(s):
            if self._find(s, attrs, ObjectClass.PRIVATE_KEY) is None:
                raise Pkcs11KeyNotFoundError(f"no private key {uri} on PKCS#11 token {self._token_of(attrs)!r}")

        self._call(attrs, "finding the private key", find)

    def load(self, uri: str):
        pub = self.public_key(uri)
        if isinstance(pub, ec.EllipticCurvePublicKey):
            return Pkcs11EccPrivateKey(self, uri, pub)
        if isinstance(pub, rsa.RSAPublicKey):
            return Pkcs11RsaPrivateKey(self, uri, pub)
        raise Pkcs11Error(f"the PKCS#11 key {uri} has an unsupported type ({type(pub).__name__})")

    def _sign(self, uri: str, data: bytes, mechanism, param) -> bytes:
        attrs = parse_uri(uri)

        def sign(s):
            key = self._find(s, attrs, ObjectClass.PRIVATE_KEY)
            if key is None:
                raise Pkcs11KeyNotFoundError(f"no private key {uri} on PKCS#11 token {self._token_of(attrs)!r}")
            return key.sign(data, mechanism=mechanism, mechanism_param=param)

        return self._call(attrs, f"signing with {uri}", sign)

    def delete(self, uri: str) -> None:
        attrs = parse_uri(uri)
        self._publics.pop(uri, None)

        def destroy(s):
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                obj = self._find(s, attrs, cls)
                if obj is not None:
                    obj.destroy()

        self._call(attrs, f"destroying {uri}", destroy)

    def export_pem(self, uri: str, password):
        raise ExportRefusedError(f"the private key {uri} lives on a PKCS#11 token and is non-extractable "
                                 "(CKA_EXTRACTABLE=false); re-enroll with a software key if you need to move it")

    def key_file(self, uri: str):
        return None  # TLS with a token key would need OpenSSL's pkcs11 provider: see docs/hardware-keys.md

    def close(self) -> None:
        with self._lock:
            for label in list(self._sessions):
                self._drop(label)
