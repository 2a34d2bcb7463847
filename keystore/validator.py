"""The one certificate validator: every trust decision devagent makes goes through ``validate``.

A pure core (like python-tuf's trusted set): certificates and a frozen ``Policy`` in, the verified path or a
``keystore.errors.VerificationError`` with a stable ``reason`` out. No I/O, no clock reads: the time to check at
is part of the policy, and so are the purpose, the EKUs the leaf must carry, the role it must have, the maximum
path length, pinned certificates and the tolerated deviations (each one explicit field, never a bypass).
docs/trust.md documents the API and each purpose's policy.

How a path is judged:

1. ``_check_leaf`` (both engines): the leaf's extensions parse, it has no unknown critical extension, it carries
   the expected public key, its key is strong enough, it has the role the purpose needs (end entity, CA, or CMP
   response signer: CA flag or id-kp-cmcRA / id-kp-cmcCA, RFC 9483 §3.1 / RFC 6402 §2.10), its keyUsage and
   extendedKeyUsage fit the purpose. Its validity at the policy's time is judged with the path (pyca's, or
   ``_check_time`` where pyca does not judge it, for a pinned leaf, and to name the reason when pyca refuses).
   A pinned leaf (``Policy.pinned``, as OpenSSL's ``-srvcert``) is accepted without a path.
2. The path, by one of two engines that must reach the same verdict:

   - **pyca** (the default): ``cryptography.x509.verification`` builds and validates the RFC 5280 path (chain
     building with backtracking, signatures, validity of every certificate, basicConstraints cA and pathLen,
     keyUsage keyCertSign, DNS and IP name constraints, unknown critical extensions, algorithm and key-size
     rules), tested by pyca against the x509-limbo corpus. Its CA extension policy is ``webpki_defaults_ca``
     with the CA EKU rule and the certificate-policy extensions handed to step 3; its EE policy is
     ``permit_all`` because step 1 judges the leaf per purpose.
   - **fallback** (hand-written, only for what pyca refuses to judge): Ed25519/Ed448 signatures and keys,
     RSA keys below 2048 bits when the policy allows weak keys (``--allow-weak-keys``), RSA-PSS signatures,
     name constraints on URI, rfc822Name and directoryName forms (pyca supports only DNS and IP), a critical
     policyMappings extension, and an estimated (untrusted) clock whose window no single instant satisfies.
     It builds paths depth-first over the same candidates and applies the same checks as pyca does in
     ``webpki_defaults_ca`` (v3, serial, non-empty issuer, validity, BC critical with cA, pathLen, KU with
     keyCertSign, AKI/SKI/AIA criticality, non-empty name constraints, the signature) plus RFC 5280 §4.2.1.10
     name constraints for DNS, IP, URI, rfc822Name and directoryName.

   Validity is judged at the check time truncated to the second, by both engines: RFC 5280 times are whole
   seconds and notAfter is inclusive, so a certificate is valid during the whole second of its notAfter (pyca's
   rule; with an estimated clock, at some second of the window).

   When pyca refuses a path, the fallback is run on the same input to name the precise reason; if it would
   accept, the refusal stands with pyca's own text (reason ``untrusted``).
3. ``_check_path_extras`` (both engines, on the verified path): the CA EKU rule (a CA carrying
   extendedKeyUsage must allow the purpose, as OpenSSL does), and RFC 5280 §6.1 certificate-policy processing with user-initial-policy-set anyPolicy: it only changes the
   outcome when a requireExplicitPolicy constraint applies, and then the valid_policy_tree is computed; a chain
   that requires an explicit policy *and* maps policies is refused (``policy``), not guessed at.

Which engine judges (pyca or the fallback) is decided in the same passes: step 1's one pass over the leaf's
extensions also notes what the routing and step 3 need of the leaf, and one pass over each offered CA certificate
does the rest (``_route``). A CA key's size (RSA) or curve (elliptic curve) is the one thing left until pyca has
run: pyca refuses a CA key below 2048 bits or on a curve it does not support, so only a certificate off the
accepted path (or every one, when pyca refuses) needs its key parsed to tell whether the fallback must judge. Step 3 runs when a certificate offered
carries what it looks at (a CA's extendedKeyUsage, policyConstraints), else it cannot refuse.

A path pyca accepted is remembered by its exact inputs (``_PATH_MEMO``, bounded): validating the same chain again
(a flow checks it at the protocol level, then before storing; every response of a CMP transaction) re-checks the
validity of the path at the new time (the window common to its certificates, worked out at the first repeat) and
runs steps 1 and 3 again, without a second path build.
pyca's ``Store`` and policy builder are prepared once per set of anchors (``_ANCHOR_SETS``, bounded), with the
check that pyca can judge those anchors, and so is pyca's verifier for the last second asked for (pyca checks
validity at whole seconds, so the calls within one second share it). Memo and anchor sets are looked up by the
certificates' signature values (hashing bytes costs a tenth of hashing a certificate) and used only for the same
certificates (compared by their DER), so a certificate that copies another's signature never matches its entry.

Critical extensions devagent processes: basicConstraints, keyUsage, extendedKeyUsage, subjectAltName,
nameConstraints, certificatePolicies, policyConstraints, inhibitAnyPolicy, policyMappings, the key identifiers.
Any other critical extension is refused (``unknown-critical-extension``); nothing is silently accepted.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import ipaddress
import urllib.parse
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509 import verification as pv
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, SignatureAlgorithmOID

from keystore.certs import dn, fingerprint, same_public_key
from keystore.errors import VerificationError

OID_CMC_CA = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.27")  # id-kp-cmcCA, RFC 6402 §2.10
OID_CMC_RA = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.28")  # id-kp-cmcRA
OID_POLICY_MAPPINGS = x509.ObjectIdentifier("2.5.29.33")
ANY_POLICY = "2.5.29.32.0"

EKU_NAMES = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "cmcCA": OID_CMC_CA,
    "cmcRA": OID_CMC_RA,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
    "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING,
}

KNOWN_EXTENSIONS = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.NAME_CONSTRAINTS, ExtensionOID.POLICY_CONSTRAINTS,
    ExtensionOID.CERTIFICATE_POLICIES, ExtensionOID.INHIBIT_ANY_POLICY, OID_POLICY_MAPPINGS,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
})

KEY_USAGE_BITS = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                  "key_agreement", "key_cert_sign", "crl_sign")
LEAF_ROLES = ("end-entity", "ca", "cmp-signer")
CLOCKS = ("trusted", "estimate")
ENGINES = ("auto", "pyca", "fallback")
MAX_INTERMEDIATES = 8
# Earlier than any certificate devagent can meet: with no usable clock, "now" is only known to be after it.
CLOCK_FLOOR = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
UNKNOWN_CLOCK_SPAN_S = 100 * 365.25 * 86400
MIN_RSA_BITS = 2048
WEAK_MIN_RSA_BITS = 1024  # only with allow_weak_keys (seed 003's Table 1 reproduces rsa1024)
_POLICY_TREE_MAX_NODES = 1000
# Paths pyca accepted, by their exact inputs (DER of leaf, untrusted, anchors; max depth). pyca's verdict depends
# on the time only through the certificates' validity, so a remembered path is reused after re-checking the
# validity of each of its certificates at the new time; the per-purpose checks always run again.
_PATH_MEMO: collections.OrderedDict = collections.OrderedDict()  # oldest first: evicted in O(1)
_PATH_MEMO_MAX = 256

# What pyca's WebPKI profile verifies; anything else goes to the fallback engine.
_PYCA_SIGNATURES = frozenset({
    SignatureAlgorithmOID.RSA_WITH_SHA256, SignatureAlgorithmOID.RSA_WITH_SHA384,
    SignatureAlgorithmOID.RSA_WITH_SHA512, SignatureAlgorithmOID.ECDSA_WITH_SHA256,
    SignatureAlgorithmOID.ECDSA_WITH_SHA384, SignatureAlgorithmOID.ECDSA_WITH_SHA512,
})
_PYCA_CURVE_NAMES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
_OID_RSA = x509.ObjectIdentifier("1.2.840.113549.1.1.1")
_OID_EC = x509.ObjectIdentifier("1.2.840.10045.2.1")
_WEAK_SIGNATURES = frozenset({
    SignatureAlgorithmOID.RSA_WITH_MD5, SignatureAlgorithmOID.RSA_WITH_SHA1, SignatureAlgorithmOID.ECDSA_WITH_SHA1,
    SignatureAlgorithmOID.DSA_WITH_SHA1,
})
_PYCA_NAME_FORMS = (x509.DNSName, x509.IPAddress)


# ---- the time to check at ------------------------------------------------------------------------------------
def _check_clock(what: str, at, clock: str, uncertainty_s: float) -> None:
    """The time fields a ClockReading and a Policy share: an aware datetime, a known clock, an uncertainty >= 0
    (0 with a trusted clock; NaN refused)."""
    if not isinstance(at, datetime.datetime):
        raise TypeError(f"{what}.at must be a datetime (the time to check at is never absent)")
    if at.tzinfo is None:
        raise ValueError(f"{what}.at must be timezone-aware (UTC)")
    if clock not in CLOCKS:
        raise ValueError(f"{what}.clock must be one of {CLOCKS}, not {clock!r}")
    if not uncertainty_s >= 0 or (clock == "trusted" and uncertainty_s):
        raise ValueError(f"{what}.uncertainty_s must be >= 0, and 0 with a trusted clock")


@dataclasses.dataclass(frozen=True)
class ClockReading:
    """What the caller knows about the time: ``at``, and how far it may be off.

    ``clock="trusted"``: ``at`` is a real clock (NTP, an RTC; ``clock.trusted = true``), checked strictly.
    ``clock="estimate"``: ``at`` is an estimate (the daemon's CA-time estimate, a board without an RTC) that may
    be off by ``uncertainty_s`` either way, derived by whoever made it from how it was obtained (resolution of
    the CA's time, network round trip, drift since); ``source`` says how, for messages, the audit and status.
    ``Policy.for_purpose(purpose, reading)`` takes the clock fields from it.
    """

    at: datetime.datetime
    clock: str = "trusted"
    uncertainty_s: float = 0.0
    source: str = ""

    def __post_init__(self):
        _check_clock("ClockReading", self.at, self.clock, self.uncertainty_s)
        object.__setattr__(self, "at", self.at.astimezone(datetime.timezone.utc))
        object.__setattr__(self, "uncertainty_s", float(self.uncertainty_s))

    @classmethod
    def unknown(cls, floor: datetime.datetime | None = None, source: str = "no usable clock") -> "ClockReading":
        """No usable clock at all (no RTC, no NTP, no CA time yet): only "after ``floor``" is known."""
        floor = floor or CLOCK_FLOOR
        half = UNKNOWN_CLOCK_SPAN_S / 2
        return cls(floor + datetime.timedelta(seconds=half), "estimate", half, source)

    @property
    def trusted(self) -> bool:
        return self.clock == "trusted"

    def describe(self) -> str:
        """``2026-12-01T10:00:00Z`` (trusted) or ``2026-12-01T10:00:00Z +- 3 s (estimated: SOURCE)``."""
        if self.trusted:
            return _fmt(self.at) + (f" ({self.source})" if self.source else "")
        return f"{_fmt(self.at)} +- {self.uncertainty_s:.0f} s (estimated" + (
            f": {self.source})" if self.source else ")")

    def record(self) -> dict:
        """For the audit log and status: ``{"at", "clock", "uncertainty_s", "source"}``."""
        return {"at": _fmt(self.at), "clock": self.clock, "uncertainty_s": round(self.uncertainty_s, 3),
                "source": self.source}


# ---- the policy ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Policy:
    """What a certificate must satisfy for one purpose, at one time. Build it with ``Policy.for_purpose``.

    Fields:
        purpose: one of ``PURPOSES`` (names the decision in messages and the audit).
        at: the time to check at (timezone-aware). Never absent.
        clock: ``"trusted"`` (``at`` is a real clock) or ``"estimate"`` (a board without a real-time clock, or
            the daemon's estimate of the CA's time): then each certificate need only be valid at some instant
            of ``[at - uncertainty_s, at + uncertainty_s]``.
        uncertainty_s: how far ``at`` may be off (``estimate`` only; 0 with a trusted clock).
        clock_source: how the time was obtained (from a ``ClockReading``), named in validity errors.
        leaf: the role the leaf must have: ``end-entity`` (basicConstraints cA absent or false), ``ca`` (a CA
            certificate, e.g. a truststore update) or ``cmp-signer`` (RFC 9483 §3.1: a CA certificate, or an EE
            certificate carrying id-kp-cmcRA or id-kp-cmcCA).
        eku: EKU OIDs (dotted strings) of which the leaf must carry one; empty: no EKU requirement. A CA on the
            path that carries extendedKeyUsage must allow one of them (or anyExtendedKeyUsage).
        eku_required: the leaf must carry the extendedKeyUsage extension (otherwise an absent EKU means "any").
        any_eku_ok: anyExtendedKeyUsage in the leaf satisfies ``eku``.
        key_usage: keyUsage bits of which the leaf must assert one when it carries keyUsage.
        max_intermediates: at most this many non-self-issued intermediates.
        min_rsa_bits: the smallest RSA modulus accepted anywhere on the path.
        pinned: DER of certificates trusted directly as the leaf, without a path (``--cmp-server-cert``, like
            OpenSSL's ``-srvcert``). The validity, key usage and key-size checks still apply to them.
        ignore_key_usage: tolerated deviation (``--ignore-keyusage``, as OpenSSL's ``-ignore_keyusage``): the
            leaf's keyUsage is not checked against ``key_usage``. keyCertSign on CAs is always checked.
    """

    purpose: str
    at: datetime.datetime
    clock: str = "trusted"
    uncertainty_s: float = 0.0
    clock_source: str = ""
    leaf: str = "end-entity"
    eku: frozenset = frozenset()
    eku_required: bool = False
    any_eku_ok: bool = True
    key_usage: frozenset = frozenset({"digital_signature"})
    max_intermediates: int = MAX_INTERMEDIATES
    min_rsa_bits: int = MIN_RSA_BITS
    pinned: tuple = ()
    ignore_key_usage: bool = False

    def __post_init__(self):
        if self.purpose not in PURPOSES:
            raise ValueError(f"unknown validation purpose {self.purpose!r} (one of {', '.join(PURPOSES)})")
        _check_clock("Policy", self.at, self.clock, self.uncertainty_s)
        if self.leaf not in LEAF_ROLES:
            raise ValueError(f"Policy.leaf must be one of {LEAF_ROLES}, not {self.leaf!r}")
        if not set(self.key_usage) <= set(KEY_USAGE_BITS):
            raise ValueError(f"Policy.key_usage: unknown bits {sorted(set(self.key_usage) - set(KEY_USAGE_BITS))}")
        if not 0 <= self.max_intermediates <= 16:
            raise ValueError("Policy.max_intermediates must be 0..16")
        if self.min_rsa_bits < WEAK_MIN_RSA_BITS:
            raise ValueError(f"Policy.min_rsa_bits must be >= {WEAK_MIN_RSA_BITS}")
        object.__setattr__(self, "at", self.at.astimezone(datetime.timezone.utc))
        object.__setattr__(self, "eku", frozenset(_eku_oid(e).dotted_string for e in self.eku))
        object.__setattr__(self, "key_usage", frozenset(self.key_usage))
        object.__setattr__(self, "pinned", tuple(
            p.public_bytes(serialization.Encoding.DER) if isinstance(p, x509.Certificate) else bytes(p)
            for p in self.pinned))

    @classmethod
    def for_purpose(cls, purpose: str, at, **overrides) -> "Policy":
        """The preset for ``purpose`` (see ``PURPOSES`` and docs/trust.md), with ``overrides`` applied.

        ``at`` is a timezone-aware datetime (a trusted clock unless ``clock=`` says otherwise) or a
        ``ClockReading``, whose clock, uncertainty and source then apply.

        Raises:
            ValueError: unknown purpose or a field out of range.
        """
        if isinstance(at, ClockReading):
            if {"clock", "uncertainty_s", "clock_source"} & set(overrides):
                raise ValueError("give the clock either as a ClockReading or as clock=/uncertainty_s=, not both")
            p = cls.for_purpose(purpose, at.at, **overrides)
            object.__setattr__(p, "clock", at.clock)
            object.__setattr__(p, "uncertainty_s", at.uncertainty_s)
            object.__setattr__(p, "clock_source", at.source)
            return p
        if not overrides:
            key = purpose
        else:
            try:
                key = (purpose, tuple(sorted((k, frozenset(v) if isinstance(v, set) else v)
                                             for k, v in overrides.items())))
                hash(key)
            except TypeError:
                key = None
        template = _PRESET_CACHE.get(key) if key is not None else None
        if template is None:
            if purpose not in PURPOSES:
                raise ValueError(f"unknown validation purpose {purpose!r} (one of {', '.join(PURPOSES)})")
            fields = dict(PURPOSES[purpose])
            fields.update(overrides)
            template = cls(purpose=purpose, at=at, **fields)
            _leaf_rule(template)  # worked out once per preset: the copies below share it (``_at`` copies __dict__)
            if key is not None and len(_PRESET_CACHE) < 256:
                _PRESET_CACHE[key] = template
        return template._at(at)

    def _at(self, at: datetime.datetime) -> "Policy":
        """This policy at another time (the other fields are validated already)."""
        if not isinstance(at, datetime.datetime):
            raise TypeError("Policy.at must be a datetime (the time to check at is never absent)")
        if at.tzinfo is None:
            raise ValueError("Policy.at must be timezone-aware (UTC)")
        p = object.__new__(Policy)
        d = p.__dict__
        d.update(self.__dict__)
        d["at"] = at if at.tzinfo is datetime.timezone.utc else at.astimezone(datetime.timezone.utc)
        return p

    @classmethod
    def for_unknown_clock(cls, purpose: str, floor: datetime.datetime = CLOCK_FLOOR, **overrides) -> "Policy":
        """A board with no usable clock (no RTC, no NTP yet): the time is only known to be after ``floor``, so a
        certificate must be valid at some instant after it (an estimate spanning ``floor`` .. 100 years on)."""
        return cls.for_purpose(purpose, ClockReading.unknown(
            floor, f"no usable clock: the time is only known to be after {_fmt(floor)}"), **overrides)

    @property
    def clock_trusted(self) -> bool:
        """True when ``at`` is a real clock (then e.g. CMP messageTime can be checked against it)."""
        return self.clock == "trusted"

    @property
    def reading(self) -> ClockReading:
        """The time this policy checks at, as a ``ClockReading``."""
        return ClockReading(self.at, self.clock, self.uncertainty_s, self.clock_source)

    def _window(self) -> tuple[datetime.datetime, datetime.datetime]:
        """The instants a certificate must be valid at one of, truncated to the second: RFC 5280 times are whole
        seconds and notAfter is inclusive, so validity is judged at the check time's second (pyca's rule: a
        certificate is still valid during the second of its notAfter, by both engines)."""
        at = _second(self.at)
        if not self.uncertainty_s:
            return at, at
        d = datetime.timedelta(seconds=self.uncertainty_s)
        return _second(self.at - d), _second(self.at + d)


def _second(t: datetime.datetime) -> datetime.datetime:
    return t.replace(microsecond=0) if t.microsecond else t


_PRESET_CACHE: dict = {}  # (purpose, overrides) -> a validated Policy to copy with another ``at``
_EE_SIGNING = frozenset({"digital_signature"})
_TLS_SERVER_KU = frozenset({"digital_signature", "key_encipherment", "key_agreement"})
# The presets. docs/trust.md explains each; callers add the per-call facts (eku of a profile, pinned certs).
PURPOSES: dict[str, dict] = {
    # verify-before-store of a device credential (LDevID or application credential)
    "credential": dict(leaf="end-entity", key_usage=_EE_SIGNING | {"key_agreement"}),
    # the device's CoAP /verify (delegated enrollment): the same rules as a stored credential
    "coap-verify": dict(leaf="end-entity", key_usage=_EE_SIGNING | {"key_agreement"}),
    # the CLM's pre-verification of a certificate before it is sent to the device
    "clm-preverify": dict(leaf="end-entity", key_usage=_EE_SIGNING | {"key_agreement"}),
    # the signer of a CMP response (RFC 9483 §3.1, RFC 4210 §5.1.3.3)
    "cmp-signer": dict(leaf="cmp-signer", key_usage=_EE_SIGNING, any_eku_ok=False),
    # the EST server's TLS certificate (RFC 7030 §3.3.1, RFC 6125): serverAuth when it carries an EKU
    "est-tls-server": dict(leaf="end-entity", eku=frozenset({"serverAuth"}), key_usage=_TLS_SERVER_KU),
    # a manufacturer's IDevID (IEEE 802.1AR §8) at import
    "idevid": dict(leaf="end-entity", key_usage=_EE_SIGNING | {"key_agreement"}),
    # a CA certificate added to a truststore (issuing CA update, /cacerts, caPubs)
    "ca-cert": dict(leaf="ca", key_usage=frozenset({"key_cert_sign"})),
    # an OPC UA application instance certificate (OPC UA Part 6 §6.2.2)
    "opcua-app": dict(leaf="end-entity", eku=frozenset({"serverAuth", "clientAuth"}), key_usage=_EE_SIGNING),
}


def _eku_oid(e) -> x509.ObjectIdentifier:
    if isinstance(e, x509.ObjectIdentifier):
        return e
    if e in EKU_NAMES:
        return EKU_NAMES[e]
    try:
        return x509.ObjectIdentifier(e)
    except (ValueError, TypeError):
        raise ValueError(f"unknown extended key usage {e!r} (one of {', '.join(EKU_NAMES)} or a dotted OID)") \
            from None


# ---- small shared helpers (the only copies in devagent) ----------------------------------------------------------
def ext(cert: x509.Certificate, cls):
    """The value of ``cert``'s extension of type ``cls``, or None. Raises VerificationError("malformed")."""
    oid = cls.oid  # by OID: get_extension_for_class's isinstance checks on every extension cost more
    try:
        for e in cert.extensions:
            if e.oid == oid:
                return e.value
        return None
    except ValueError as e:
        raise VerificationError("malformed", f"certificate {_name(cert)}: malformed extension: {e}") from e


def is_ca(cert: x509.Certificate) -> bool:
    """basicConstraints cA is set (a malformed extension counts as not a CA)."""
    try:
        bc = ext(cert, x509.BasicConstraints)
    except VerificationError:
        return False
    return bool(bc is not None and bc.ca)


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer``'s name and key sign ``cert`` (no policy; path building only)."""
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False


def self_signed(cert: x509.Certificate) -> bool:
    return issued_by(cert, cert)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _name(cert: x509.Certificate) -> str:
    return dn(cert.subject) or "(empty subject)"


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def _fmt(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- the entry point -------------------------------------------------------------------------------------------
def validate(leaf: x509.Certificate, untrusted: Iterable[x509.Certificate], anchors: Sequence[x509.Certificate],
             policy: Policy, *, public_key=None, what: str = "certificate", engine: str = "auto",
             ) -> tuple[x509.Certificate, ...]:
    """Validate ``leaf`` for ``policy.purpose``.

    Args:
        leaf: the certificate to judge.
        untrusted: other certificates offered with it (intermediates, in any order; extra ones are ignored).
        anchors: the trust anchors for this purpose (domain PKI, EST TLS, CMP signer anchors).
        policy: see ``Policy``.
        public_key: when given, the leaf must carry exactly this public key (verify-before-store).
        what: how messages name the leaf ("CMP response signer", "TLS server certificate", ...).
        engine: ``auto`` (pyca where it can judge, else the fallback), or force ``pyca`` / ``fallback`` (tests).
    Returns:
        the verified path ``(leaf, intermediates..., anchor)``; ``(leaf,)`` for a pinned or anchor leaf.
    Raises:
        VerificationError: the first check that failed, with a stable ``reason`` (see docs/trust.md) and a
            message naming the certificate, the check and the time.
        ValueError: ``engine`` unknown.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}")
    untrusted = [c for c in untrusted if c is not leaf]
    anchors = list(anchors)
    leaf_form = _check_leaf(leaf, policy, public_key, what)
    if policy.pinned and _der(leaf) in policy.pinned:
        _check_time(leaf, policy, what)
        return (leaf,)
    if not anchors:
        _check_time(leaf, policy, what)
        raise VerificationError("untrusted", f"{what} {_name(leaf)}: no trust anchor is configured for this "
                                f"purpose ({policy.purpose}); add one (--trust CA.pem, or 'devagent ca-update')")
    aset = _anchor_set(anchors)
    route = None  # with engine="auto": what the one pass over the offered certificates found (_route)
    if engine == "auto":
        route = _route(leaf, leaf_form, untrusted, anchors, policy, aset)
        engine = "pyca" if route is not None else "fallback"
    if engine == "fallback":
        _check_time(leaf, policy, what)  # first, as on pyca's refusal below: the leaf's own validity is named
        return _fallback_path(leaf, untrusted, anchors, policy, what)
    # Looked up by the signature values (hashing bytes costs a tenth of hashing a certificate), used only for the
    # same certificates (pyca compares them by their DER), the same anchor set and the same depth limit.
    untrusted_t = tuple(untrusted)
    key = (leaf.signature, *[c.signature for c in untrusted_t], id(aset), policy.max_intermediates)
    hit = _PATH_MEMO.get(key)
    if hit is not None and hit[0] is aset and (hit[1] is leaf or hit[1] == leaf) and hit[2] == untrusted_t:
        path, window = hit[3], hit[4]
        if window is None:  # worked out at the first repeat: the validity common to the path's certificates
            window = hit[4] = _path_window(path)
        if window[0] <= policy.at < window[1]:
            _check_path_extras(path, policy, what)
            return path
    try:
        path = _pyca_path(leaf, untrusted, anchors, policy, aset)
    except pv.VerificationError as e:
        # pyca judged the leaf's validity (at the second, as _check_time does); its text for an expired or not yet
        # valid leaf does not name the times, so ours is built now, on the failure only.
        _check_time(leaf, policy, what)
        if route and route[1] and not all(_pyca_key_ok(c) for c in route[1]):
            return _fallback_path(leaf, untrusted, anchors, policy, what)  # pyca cannot judge this input
        _fallback_path(leaf, untrusted, anchors, policy, what)  # names the precise reason when it refuses too
        raise VerificationError("untrusted", f"{what} {_name(leaf)} (issuer {dn(leaf.issuer)}) was refused by the "
                                f"RFC 5280 path validator: {_pyca_text(e)}") from None
    if route is None:  # engine="pyca" forced (tests): not remembered, as auto routing was not asked
        _check_path_extras(path, policy, what)
        return path
    extras, lazy = route
    # A CA key's size (RSA) or curve (elliptic curve) is checked only now: pyca refuses an RSA CA key below 2048
    # bits and one on a curve it does not support, so the certificates on the path it accepted are fine; another
    # offered certificate with such a key makes the input one pyca cannot judge, and the fallback judges it.
    for c in lazy:
        if not any(c is p for p in path) and not _pyca_key_ok(c):
            return _fallback_path(leaf, untrusted, anchors, policy, what)
    if extras or aset.extras:  # else no certificate has what _check_path_extras looks at
        _check_path_extras(path, policy, what)
    if len(_PATH_MEMO) >= _PATH_MEMO_MAX and key not in _PATH_MEMO:
        _PATH_MEMO.popitem(last=False)  # (a plain dict's next(iter()) walks the slots its evictions emptied)
    _PATH_MEMO[key] = [aset, leaf, untrusted_t, path, None]  # the entry holds aset, so its id is not reused meanwhile
    return path


def _path_window(path) -> tuple[datetime.datetime, datetime.datetime]:
    """``(lo, hi)``: every certificate on ``path`` is valid at ``at``'s second (``_check_time``'s and pyca's rule:
    notBefore <= the second <= notAfter) exactly when ``lo <= at < hi``."""
    nb = max(c.not_valid_before_utc for c in path)
    na = min(c.not_valid_after_utc for c in path)
    lo = nb if not nb.microsecond else _second(nb) + _ONE_SECOND  # (certificate times are whole seconds)
    return lo, _second(na) + _ONE_SECOND


def _pyca_text(e: Exception) -> str:
    text = str(e)
    return text.split(" (encountered processing", 1)[0]


# ---- step 1: the leaf ------------------------------------------------------------------------------------------
def _same_key(a, b) -> bool:
    """``a`` is ``b``'s key. pyca's key equality (EVP_PKEY_eq) first: it is True only for the same key and costs
    less than two DER encodings; a key object of another kind (TPM, PKCS#11) is compared by its DER."""
    try:
        if a == b:
            return True
    except Exception:  # noqa: BLE001 -- a foreign key class's __eq__: compare the encodings instead
        pass
    return same_public_key(a, b)


def _extensions(cert: x509.Certificate, role: str):
    try:
        exts = cert.extensions
    except ValueError as e:
        raise VerificationError("malformed", f"{role} {_name(cert)}: malformed extension: {e}") from e
    for e in exts:
        if e.critical and e.oid not in KNOWN_EXTENSIONS:
            raise VerificationError("unknown-critical-extension", f"{role} {_name(cert)} has an unknown critical "
                                    f"extension {e.oid.dotted_string}; refused (RFC 5280 §4.2)")
    return exts


def _leaf_rule(policy: Policy) -> tuple:
    """What ``_check_leaf`` needs of ``policy``, worked out once per policy (kept in the instance's ``__dict__``;
    ``Policy.for_purpose`` works it out on the preset it keeps, so that the copies it makes share it; it is
    derived from the fields only, none of them the time or the clock)."""
    rule = policy.__dict__.get("_leaf_rule")
    if rule is None:
        ku_bits = ku_text = None
        if policy.leaf != "ca" and not policy.ignore_key_usage:
            ku_bits = tuple(sorted(policy.key_usage))
            ku_text = " or ".join(sorted(_KU_NAMES[b] for b in policy.key_usage))
        eku_want = eku_text = None
        if policy.eku and policy.leaf != "ca":
            eku_want = frozenset(x509.ObjectIdentifier(o) for o in policy.eku)
            if policy.any_eku_ok:
                eku_want |= {ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
            eku_text = _eku_text(policy.eku)
        rule = (ku_bits, ku_text, eku_want, eku_text)
        policy.__dict__["_leaf_rule"] = rule
    return rule


_CMP_SIGNER_EKUS = frozenset({OID_CMC_RA, OID_CMC_CA})
_OID_BC = ExtensionOID.BASIC_CONSTRAINTS
_OID_KU = ExtensionOID.KEY_USAGE
_OID_EKU = ExtensionOID.EXTENDED_KEY_USAGE
_OID_NC = ExtensionOID.NAME_CONSTRAINTS
_OID_PC = ExtensionOID.POLICY_CONSTRAINTS
# What the one pass over the leaf's extensions found, for validate's routing (_route).
LEAF_PYCA_FORM = 1  # pyca can judge the leaf's extensions (no critical policyMappings, name constraints in DNS/IP)
LEAF_EXTRAS = 2  # the leaf carries policyConstraints (certificate-policy processing may apply: _check_path_extras)


def _check_leaf(leaf, policy: Policy, public_key, what: str) -> int:
    """Step 1, one pass over the leaf's extensions. Returns ``LEAF_PYCA_FORM`` / ``LEAF_EXTRAS`` flags."""
    try:
        exts = leaf.extensions
    except ValueError as e:
        raise VerificationError("malformed", f"{what} {_name(leaf)}: malformed extension: {e}") from e
    bc = ku = eku = None
    form = LEAF_PYCA_FORM
    for e in exts:
        slot = _LEAF_SLOTS.get(e.oid, _SLOT_OTHER)
        if slot == _SLOT_NOTHING:
            continue
        if slot == _SLOT_KU:
            ku = e.value
        elif slot == _SLOT_EKU:
            eku = e.value
        elif slot == _SLOT_BC:
            bc = e.value
        elif slot == _SLOT_NC:
            if not _pyca_nc_forms(e.value):
                form &= ~LEAF_PYCA_FORM
        elif slot == _SLOT_PC:
            form |= LEAF_EXTRAS
        elif slot == _SLOT_PM:
            if e.critical:
                form &= ~LEAF_PYCA_FORM
        elif e.critical:  # not an extension devagent processes
            _extensions(leaf, what)  # raises, naming the first such extension
    key = None
    if public_key is not None:
        key = leaf.public_key()
        if not _same_key(key, public_key):
            raise VerificationError("key-mismatch", f"{what} {_name(leaf)} is for another key: its public key does "
                                    "not match the key this request was made with (public key mismatch)")
    alg = leaf.public_key_algorithm_oid
    if alg != _OID_EC:  # (an EC key has no size rule: _check_key_strength)
        _check_key_strength(leaf, policy, what, key, alg)
    leaf_is_ca = bc is not None and bc.ca
    role = policy.leaf
    if role == "end-entity":
        if leaf_is_ca:
            raise VerificationError("is-ca", f"{what} {_name(leaf)} is a CA certificate (basicConstraints cA), not "
                                    "an end-entity certificate")
    elif role == "ca":
        _check_ca(leaf, policy, what)
    elif not leaf_is_ca and (eku is None or _CMP_SIGNER_EKUS.isdisjoint(eku)) and \
            not (policy.pinned and _der(leaf) in policy.pinned):  # role "cmp-signer"
        raise VerificationError("not-authorized", f"{what} {_name(leaf)} is neither a CA certificate nor an "
                                "RA/CA signer (no extendedKeyUsage id-kp-cmcRA or id-kp-cmcCA, RFC 9483 §3.1): "
                                "another entity's certificate cannot sign CMP responses; pin the server's "
                                "certificate with --cmp-server-cert if this one is really it")
    ku_bits, ku_text, eku_want, eku_text = policy.__dict__.get("_leaf_rule") or _leaf_rule(policy)
    if ku is not None and ku_bits is not None:
        for b in ku_bits:
            if getattr(ku, b):
                break
        else:
            raise VerificationError("bad-key-usage", f"{what} {_name(leaf)}: keyUsage lacks {ku_text}")
    if eku_want is not None:
        if eku is None:
            if policy.eku_required:
                raise VerificationError("bad-eku", f"{what} {_name(leaf)} has no extendedKeyUsage; "
                                        f"{eku_text} is required")
        elif eku_want.isdisjoint(eku):
            raise VerificationError("bad-eku", f"{what} {_name(leaf)}: extendedKeyUsage lacks {eku_text}")
    return form  # the leaf's validity: pyca's, or _check_time's where pyca does not judge the path (validate)


# The leaf's extensions by what the pass above does with them; _SLOT_NOTHING: known, nothing to look at.
(_SLOT_NOTHING, _SLOT_BC, _SLOT_KU, _SLOT_EKU, _SLOT_NC, _SLOT_PC, _SLOT_PM, _SLOT_OTHER) = range(8)
_LEAF_SLOTS = {**dict.fromkeys(KNOWN_EXTENSIONS, _SLOT_NOTHING), ExtensionOID.BASIC_CONSTRAINTS: _SLOT_BC,
               ExtensionOID.KEY_USAGE: _SLOT_KU, ExtensionOID.EXTENDED_KEY_USAGE: _SLOT_EKU,
               ExtensionOID.NAME_CONSTRAINTS: _SLOT_NC, ExtensionOID.POLICY_CONSTRAINTS: _SLOT_PC,
               OID_POLICY_MAPPINGS: _SLOT_PM}


def _pyca_nc_forms(nc: x509.NameConstraints) -> bool:
    """pyca checks name constraints on DNS and IP names only; any other form goes to the fallback."""
    for t in (nc.permitted_subtrees or ()), (nc.excluded_subtrees or ()):
        for g in t:
            if not isinstance(g, _PYCA_NAME_FORMS):
                return False
    return True


_KU_NAMES = {"digital_signature": "digitalSignature", "content_commitment": "nonRepudiation",
             "key_encipherment": "keyEncipherment", "data_encipherment": "dataEncipherment",
             "key_agreement": "keyAgreement", "key_cert_sign": "keyCertSign", "crl_sign": "cRLSign"}
_EKU_TEXT = {v.dotted_string: k for k, v in EKU_NAMES.items()}


def _eku_text(oids) -> str:
    return " or ".join(sorted(_EKU_TEXT.get(o, o) for o in oids))


def _check_time(cert, policy: Policy, role: str) -> None:
    lo, hi = policy._window()
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    if lo <= na and nb <= hi:
        return
    if policy.clock_trusted:
        at = _fmt(policy.at)
    else:  # name the estimate, its uncertainty and where it came from: the plant engineer's first question
        at = (f"the estimated time {_fmt(policy.at)} +- {policy.uncertainty_s:.0f} s, i.e. between {_fmt(lo)} and "
              f"{_fmt(hi)}" + (f"; estimate: {policy.clock_source}" if policy.clock_source else ""))
    if hi < nb:
        ahead = f", {(nb - hi).total_seconds():.0f} s after the latest time allowed" if not policy.clock_trusted \
            else ""
        raise VerificationError("not-yet-valid", f"{role} {_name(cert)} is not valid before {_fmt(nb)} (checked at "
                                f"{at}{ahead}; is the clock right?)")
    if lo > na:
        raise VerificationError("expired", f"{role} {_name(cert)} expired at {_fmt(na)} (checked at {at})")


def _check_key_strength(cert, policy: Policy, role: str, key=None, alg=None) -> None:
    """RSA at least ``policy.min_rsa_bits``, no DSA. ``key``, ``alg``: ``cert.public_key()`` and
    ``cert.public_key_algorithm_oid`` when the caller has them."""
    try:
        if alg is None:
            alg = cert.public_key_algorithm_oid
        if alg == _OID_EC:
            return
        if key is None:
            key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise VerificationError("malformed", f"{role} {_name(cert)}: unsupported or malformed public key: {e}") \
            from None
    if (alg == _OID_RSA or isinstance(key, rsa.RSAPublicKey)) and key.key_size < policy.min_rsa_bits:
        raise VerificationError("weak-key", f"{role} {_name(cert)} has an RSA-{key.key_size} key; at least "
                                f"{policy.min_rsa_bits} bits are required" + (
                                    " (--allow-weak-keys accepts 1024)" if policy.min_rsa_bits > 1024 else ""))
    if alg != _OID_RSA and isinstance(key, dsa.DSAPublicKey):
        raise VerificationError("weak-key", f"{role} {_name(cert)} has a DSA key, which is not accepted")


# ---- step 2a: pyca -----------------------------------------------------------------------------------------------
def _route(leaf, leaf_form: int, untrusted, anchors, policy: Policy, aset: "_AnchorSet"):
    """Which engine judges, for ``validate``, in one pass: None when the fallback judges, else ``(extras, lazy)``.
    pyca judges when the anchors are in its form, every certificate is valid at an estimated time (a trusted
    clock lets pyca refuse an invalid one itself), and the leaf and each offered CA are in its form
    (``_pyca_form``; tests/unit/test_validator.py states the same rule certificate by certificate as a reference).

    ``extras``: a certificate offered carries what ``_check_path_extras`` looks at (extendedKeyUsage on a CA,
    policyConstraints). ``lazy``: the offered CA certificates whose key size (RSA) or curve ``_pyca_form``
    would check by parsing their public key; ``validate`` checks only those not on the path pyca accepted (pyca
    itself refuses an RSA CA key below 2048 bits or on a curve it does not support) and, when pyca refuses, all
    of them, so the verdict is the one the reference rule gives."""
    if not aset.pyca_ok:
        return None
    if not policy.clock_trusted:
        at = _second(policy.at)
        if any(not c.not_valid_before_utc <= at <= c.not_valid_after_utc for c in [leaf, *untrusted, *anchors]):
            return None
    if not leaf_form & LEAF_PYCA_FORM:
        return None
    if leaf.signature_algorithm_oid not in _PYCA_SIGNATURES and not any(leaf is a for a in anchors):
        return None
    extras = bool(leaf_form & LEAF_EXTRAS)
    lazy = []
    for c in untrusted:
        form = _pyca_form(c, False, any(c is a for a in anchors), keys=False)
        if not form:
            return None
        if form & _FORM_EXTRAS:
            extras = True
        lazy.append(c)  # an RSA or elliptic-curve CA key (_pyca_form): its size or curve is _pyca_key_ok's
    return extras, lazy


_FORM_OK = 1
_FORM_EXTRAS = 2  # carries extendedKeyUsage or policyConstraints (what _check_path_extras looks at)


def _pyca_form(c, is_leaf: bool, is_anchor: bool, keys: bool = True) -> int:
    """``c`` is in a form pyca's WebPKI profile judges (signature algorithm, name-constraint forms, no critical
    policyMappings; for a CA also the extension forms, the key type and size): 0 when not, else ``_FORM_OK``,
    with ``_FORM_EXTRAS`` when it carries extendedKeyUsage or policyConstraints. ``keys=False``: a CA key's
    size (RSA) or curve (elliptic curve) is left to ``_pyca_key_ok`` (``_route``)."""
    # An anchor's own signature is never checked (it is trusted as it is), so its algorithm does not matter.
    if not is_anchor and c.signature_algorithm_oid not in _PYCA_SIGNATURES:
        return 0
    try:
        exts = c.extensions
    except ValueError:
        return 0
    form = _FORM_OK
    by_oid = {}
    for e in exts:
        oid = e.oid
        by_oid[oid] = e
        if oid == OID_POLICY_MAPPINGS:
            if e.critical:
                return 0
        elif oid == _OID_NC:
            if not _pyca_nc_forms(e.value):
                return 0
        elif oid == _OID_EKU or oid == _OID_PC:
            form |= _FORM_EXTRAS
    if not is_leaf:
        if not _webpki_ca_form(by_oid):
            return 0
        alg = c.public_key_algorithm_oid
        if alg != _OID_RSA and alg != _OID_EC:
            return 0
        if keys and not _pyca_key_ok(c):
            return 0
    return form


def _pyca_key_ok(c) -> bool:
    """A CA key pyca's WebPKI profile accepts: RSA of at least ``MIN_RSA_BITS`` (pyca's own minimum, 2048), or
    elliptic-curve on a curve pyca supports (other key types: see ``_pyca_form``). Parses the public key."""
    alg = c.public_key_algorithm_oid
    if alg == _OID_RSA:
        return c.public_key().key_size >= MIN_RSA_BITS
    return alg != _OID_EC or c.public_key().curve.name in _PYCA_CURVE_NAMES


class _AnchorSet:
    """What a set of trust anchors costs to prepare once, not per validation: pyca's ``Store`` (it keeps each
    anchor's parsed public key) and its policy builders, whether pyca can judge the anchors at all, and whether
    one carries what ``_check_path_extras`` looks at. Keyed by the anchors themselves (certificates compare by
    their DER; looked up by their signatures, see ``_anchor_set``), so a trust store loaded again from disk finds
    its entry."""

    __slots__ = ("anchors", "pyca_ok", "extras", "_builders", "_verifier")

    def __init__(self, anchors: tuple):
        self.anchors = anchors
        forms = [_pyca_form(a, False, True) for a in anchors]
        self.pyca_ok = all(forms)
        self.extras = any(f & _FORM_EXTRAS for f in forms) or not self.pyca_ok
        self._builders: dict = {}
        self._verifier = None  # (max_intermediates, second, next second, verifier): the last one built

    def verifier(self, max_intermediates: int, at: datetime.datetime) -> "pv.ClientVerifier":
        """pyca's verifier for ``at``. pyca checks validity at whole seconds (it drops the microseconds), so the
        verifier built for one second is the one for every ``at`` within it: kept for the next call, which in a
        batch (a fleet's pre-verification, ``keystore check``, a flow's checks) is usually in the same second."""
        v = self._verifier
        if v is not None and v[0] == max_intermediates and v[1] <= at < v[2]:
            return v[3]
        second = at.replace(microsecond=0)
        verifier = self.builder(max_intermediates).time(second).build_client_verifier()
        self._verifier = (max_intermediates, second, second + _ONE_SECOND, verifier)
        return verifier

    def builder(self, max_intermediates: int) -> "pv.PolicyBuilder":
        b = self._builders.get(max_intermediates)
        if b is None:
            ca_policy, ee_policy = _extension_policies()
            b = (pv.PolicyBuilder().store(pv.Store(list(self.anchors))).max_chain_depth(max_intermediates)
                 .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy))
            self._builders[max_intermediates] = b
        return b


_ANCHOR_SETS: dict = {}
_ANCHOR_SETS_MAX = 32
_ONE_SECOND = datetime.timedelta(seconds=1)


def _anchor_set(anchors) -> _AnchorSet:
    """The prepared set for these anchors. Looked up by the anchors' signature values (hashing bytes costs a
    tenth of hashing a certificate), then compared certificate by certificate: an entry is only ever used for
    the same certificates."""
    key = tuple(anchors)
    sigs = tuple([a.signature for a in key])
    aset = _ANCHOR_SETS.get(sigs)
    if aset is None or aset.anchors != key:
        aset = _AnchorSet(key)
        if len(_ANCHOR_SETS) >= _ANCHOR_SETS_MAX and sigs not in _ANCHOR_SETS:
            _ANCHOR_SETS.pop(next(iter(_ANCHOR_SETS)))
        _ANCHOR_SETS[sigs] = aset
    return aset


_CA_POLICY = None
_EE_POLICY = None


def _webpki_ca_form(by_oid: dict) -> bool:
    """The CA-extension forms pyca's WebPKI profile accepts (else the fallback's RFC 5280 rules judge), given a
    certificate's extensions by OID."""
    bc = by_oid.get(ExtensionOID.BASIC_CONSTRAINTS)
    if bc is not None and not bc.critical:
        return False
    if bc is not None and bc.value.ca and ExtensionOID.KEY_USAGE not in by_oid:
        return False
    for oid in (ExtensionOID.AUTHORITY_KEY_IDENTIFIER, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
                ExtensionOID.AUTHORITY_INFORMATION_ACCESS):
        e = by_oid.get(oid)
        if e is not None and e.critical:
            return False
    aki = by_oid.get(ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    return aki is None or (aki.value.key_identifier is not None and aki.value.authority_cert_issuer is None
                           and aki.value.authority_cert_serial_number is None)


def _extension_policies():
    global _CA_POLICY, _EE_POLICY
    if _CA_POLICY is None:
        agn = pv.Criticality.AGNOSTIC
        _CA_POLICY = (pv.ExtensionPolicy.webpki_defaults_ca()
                      .may_be_present(x509.ExtendedKeyUsage, agn, None)  # the purpose's CA EKU rule: _check_path
                      .may_be_present(x509.CertificatePolicies, agn, None)
                      .may_be_present(x509.PolicyConstraints, agn, None)
                      .may_be_present(x509.InhibitAnyPolicy, agn, None))
        _EE_POLICY = (pv.ExtensionPolicy.permit_all()  # the leaf is judged per purpose in _check_leaf
                      .may_be_present(x509.CertificatePolicies, agn, None)
                      .may_be_present(x509.PolicyConstraints, agn, None)
                      .may_be_present(x509.InhibitAnyPolicy, agn, None))
    return _CA_POLICY, _EE_POLICY


def _pyca_path(leaf, untrusted, anchors, policy: Policy, aset: _AnchorSet | None = None,
               ) -> tuple[x509.Certificate, ...]:
    aset = aset or _anchor_set(anchors)
    verifier = aset.verifier(policy.max_intermediates, policy.at)
    # The path ends at the Store's anchor object (the same certificate as the caller's, its extensions parsed
    # once), as a remembered path holds the objects of the first validation.
    return tuple(verifier.verify(leaf, untrusted).chain)


# ---- step 2b: the fallback engine --------------------------------------------------------------------------------
def _fallback_path(leaf, untrusted, anchors, policy: Policy, what: str) -> tuple[x509.Certificate, ...]:
    anchor_ders = {_der(a) for a in anchors}
    if _der(leaf) in anchor_ders:
        path = (leaf,)
        _check_path(path, policy, what)
        return path
    failures: list[VerificationError] = []
    sig_cache: dict[tuple[int, int], bool] = {}

    def signs(child, issuer) -> bool:
        k = (id(child), id(issuer))
        if k not in sig_cache:
            sig_cache[k] = issued_by(child, issuer)
        return sig_cache[k]

    pool, seen = [], set()
    for c in [*anchors, *untrusted]:
        d = _der(c)
        if d not in seen:
            seen.add(d)
            pool.append((c, d, d in anchor_ders))

    def search(path: list, inters: int):
        cur = path[-1]
        in_path = {_der(c) for c in path}
        for cand, der, is_anchor in pool:
            if cand.subject != cur.issuer or der in in_path:
                continue
            if not signs(cur, cand):
                continue
            if is_anchor:
                candidate = (*path, cand)
                try:
                    _check_path(candidate, policy, what)
                    return candidate
                except VerificationError as e:
                    failures.append(e)
                continue
            n = inters + (0 if _self_issued(cand) else 1)
            if n > policy.max_intermediates:
                failures.append(VerificationError("path-length", f"{what} {_name(leaf)}: the path through "
                                                  f"{_name(cand)} has more than {policy.max_intermediates} "
                                                  "intermediate CA certificates"))
                continue
            found = search([*path, cand], n)
            if found:
                return found
        return None

    found = search([leaf], 0)
    if found:
        return found
    if failures:
        raise failures[0]
    bad_sig = [c for c in [*anchors, *untrusted] if c.subject == leaf.issuer]
    if bad_sig and not any(issued_by(leaf, c) for c in bad_sig):
        raise VerificationError("bad-signature", f"{what} {_name(leaf)}: the signature does not verify with the key "
                                f"of its issuer {dn(leaf.issuer)} (altered, or issued by another key)")
    raise VerificationError("untrusted", f"{what} {_name(leaf)} (issuer {dn(leaf.issuer)}) does not chain to the "
                            f"trust anchor(s) {'; '.join(_name(a) for a in anchors)}")


# ---- step 3: checks of a complete path (both engines) ----------------------------------------------------------
def _role(i: int, n: int) -> str:
    return "end-entity certificate" if i == 0 else ("trust anchor" if i == n - 1 else "intermediate CA")


def _check_path(path: Sequence[x509.Certificate], policy: Policy, what: str, signatures: bool = True) -> None:
    """RFC 5280 §6.1 checks of ``path`` (leaf first, anchor last) that pyca's CA policy makes, plus name
    constraints of every form, the CA EKU rule and certificate-policy processing. ``signatures`` is False when
    pyca has verified them already."""
    n = len(path)
    for i, cert in enumerate(path):
        role = what if i == 0 else _role(i, n)
        _extensions(cert, role)
        _check_basic(cert, policy, role)
        if i == 0:
            continue
        child = path[i - 1]
        _check_ca(cert, policy, role)
        below = path[1:i]  # intermediates between this CA and the leaf
        depth = sum(1 for c in below if not _self_issued(c))
        bc = ext(cert, x509.BasicConstraints)
        if bc.path_length is not None and depth > bc.path_length:
            raise VerificationError("path-length", f"{role} {_name(cert)}: path length constraint "
                                    f"{bc.path_length} exceeded ({depth} intermediate CA certificate(s) below it)")
        if child.signature_algorithm_oid in _WEAK_SIGNATURES:
            raise VerificationError("bad-algorithm", f"{_role(i - 1, n) if i > 1 else what} {_name(child)} is "
                                    f"signed with {child.signature_algorithm_oid._name}, which is not accepted")
        if signatures and not issued_by(child, cert):
            raise VerificationError("bad-signature", f"{_role(i - 1, n) if i > 1 else what} {_name(child)}: the "
                                    f"signature does not verify with the key of {_name(cert)}")
        _check_name_constraints(cert, path[:i], role)
    inters = sum(1 for c in path[1:-1] if not _self_issued(c))
    if inters > policy.max_intermediates:
        raise VerificationError("path-length", f"{what} {_name(path[0])}: {inters} intermediate CA certificates, "
                                f"more than the {policy.max_intermediates} allowed")
    _check_path_extras(path, policy, what)


def _check_path_extras(path: Sequence[x509.Certificate], policy: Policy, what: str = "certificate") -> None:
    """What neither engine's path checks cover: the CA EKU rule and certificate policies (RFC 5280 §6.1)."""
    n = len(path)
    # One look at each certificate's extensions: most paths have no CA EKU and no policyConstraints, and then
    # neither rule can refuse them.
    ca_oids = {e.oid for c in path[1:] for e in c.extensions}
    if ExtensionOID.EXTENDED_KEY_USAGE not in ca_oids and ExtensionOID.POLICY_CONSTRAINTS not in ca_oids and \
            not any(e.oid == ExtensionOID.POLICY_CONSTRAINTS for e in path[0].extensions):
        return
    if policy.eku:
        allowed = policy.eku | {ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE.dotted_string}
        for i in range(1, n):
            ceku = ext(path[i], x509.ExtendedKeyUsage)
            if ceku is not None:
                oids = {o.dotted_string for o in ceku}
                if not oids & allowed:
                    raise VerificationError("bad-eku", f"{_role(i, n)} {_name(path[i])} restricts extendedKeyUsage "
                                            f"to {_eku_text(oids)}, which does not allow {_eku_text(policy.eku)}")
    _check_policies(path, what)


def _check_basic(cert, policy: Policy, role: str) -> None:
    """What pyca's ``permits_basic`` requires of every certificate, and the key size."""
    if cert.version != x509.Version.v3:
        raise VerificationError("malformed", f"{role} {_name(cert)} is not an X.509 v3 certificate")
    serial = cert.serial_number
    if serial < 0:
        raise VerificationError("malformed", f"{role} {_name(cert)} has a negative serial number")
    if serial.bit_length() // 8 + 1 > 21:
        raise VerificationError("malformed", f"{role} {_name(cert)}: serial number longer than 20 octets")
    if not cert.issuer.rdns:
        raise VerificationError("malformed", f"{role} {_name(cert)} has an empty issuer name")
    _check_key_strength(cert, policy, role)
    _check_time(cert, policy, role)


def _check_ca(cert, policy: Policy, role: str) -> None:
    """RFC 5280 §6.1.4 (k) and (n) for a CA: basicConstraints present with cA TRUE, keyUsage (when present)
    with keyCertSign, name constraints not empty.

    Tolerated, as OpenSSL does without -x509_strict (and never security-relevant for a validator that
    processes the extensions): a non-critical basicConstraints (libest's example CA), a CA without keyUsage
    (no restriction, RFC 5280 §6.1.4 (n)), key identifier extensions in any form. pyca's WebPKI profile refuses
    these, so chains with them are judged by the fallback engine (``_route``)."""
    exts = _extensions(cert, role)
    by_oid = {e.oid: e for e in exts}
    bce = by_oid.get(ExtensionOID.BASIC_CONSTRAINTS)
    if bce is None or not bce.value.ca:
        raise VerificationError("not-a-ca", f"{role} {_name(cert)} is not a CA certificate (basicConstraints cA is "
                                "not set)")
    kue = by_oid.get(ExtensionOID.KEY_USAGE)
    if kue is not None and not kue.value.key_cert_sign:
        raise VerificationError("bad-key-usage", f"{role} {_name(cert)}: keyUsage lacks keyCertSign")
    nce = by_oid.get(ExtensionOID.NAME_CONSTRAINTS)
    if nce is not None and not (nce.value.permitted_subtrees or nce.value.excluded_subtrees):
        raise VerificationError("malformed", f"{role} {_name(cert)}: nameConstraints with no subtree")


# ---- name constraints (RFC 5280 §4.2.1.10) ---------------------------------------------------------------------
def _names_of(cert: x509.Certificate) -> list:
    names: list = []
    if cert.subject.rdns:
        names.append(x509.DirectoryName(cert.subject))
        for a in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
            names.append(x509.RFC822Name(str(a.value)))
    san = ext(cert, x509.SubjectAlternativeName)
    if san is not None:
        names.extend(san)
    return names


def _dns_match(name: str, c: str) -> bool:
    name, c = name.lower().rstrip("."), c.lower().rstrip(".")
    if not c:
        return True
    if c.startswith("."):
        return name.endswith(c)
    return name == c or name.endswith("." + c)


def _host_match(host: str, c: str) -> bool:
    host, c = host.lower().rstrip("."), c.lower().rstrip(".")
    if c.startswith("."):
        return host.endswith(c)
    return host == c


def _email_match(addr: str, c: str) -> bool:
    if "@" not in addr:
        return False
    local, _, domain = addr.rpartition("@")
    if "@" in c:
        cl, _, cd = c.rpartition("@")
        return local == cl and domain.lower() == cd.lower()
    return _host_match(domain, c)


def _matches(name, c) -> bool | None:
    """True/False when ``c`` constrains ``name``'s form; None when the forms differ."""
    if type(name) is not type(c):
        return None
    if isinstance(c, x509.DNSName):
        return _dns_match(name.value, c.value)
    if isinstance(c, x509.IPAddress):
        net = c.value
        if not isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            return False
        addr = name.value
        return isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and \
            addr.version == net.version and addr in net
    if isinstance(c, x509.UniformResourceIdentifier):
        try:
            host = urllib.parse.urlsplit(name.value).hostname
        except ValueError:
            host = None
        return bool(host) and _host_match(host, c.value)
    if isinstance(c, x509.RFC822Name):
        return _email_match(name.value, c.value)
    if isinstance(c, x509.DirectoryName):
        want = list(c.value.rdns)
        return list(name.value.rdns)[:len(want)] == want
    raise _UnsupportedForm(type(c).__name__)


class _UnsupportedForm(Exception):
    pass


def _check_name_constraints(ca: x509.Certificate, below: Sequence[x509.Certificate], role: str) -> None:
    nc = ext(ca, x509.NameConstraints)
    if nc is None:
        return
    permitted = list(nc.permitted_subtrees or ())
    excluded = list(nc.excluded_subtrees or ())
    for j, cert in enumerate(below):
        if j > 0 and _self_issued(cert):
            continue  # RFC 5280 §6.1.4: not applied to self-issued intermediates
        for name in _names_of(cert):
            try:
                for c in excluded:
                    if _matches(name, c):
                        raise VerificationError("name-constraints", f"{_name(cert)}: name {_gn(name)} is in an "
                                                f"excluded subtree ({_gn(c)}) of {role} {_name(ca)}")
                forms = [c for c in permitted if type(c) is type(name)]
                if forms and not any(_matches(name, c) for c in forms):
                    raise VerificationError("name-constraints", f"{_name(cert)}: name {_gn(name)} is outside the "
                                            f"permitted subtrees ({', '.join(_gn(c) for c in forms)}) of {role} "
                                            f"{_name(ca)}")
            except _UnsupportedForm as e:
                raise VerificationError("name-constraints", f"{role} {_name(ca)} constrains {e} names, which "
                                        "devagent cannot check; refused") from None
        if any(type(c) not in _FORMS for c in [*permitted, *excluded]) and any(
                type(nm) not in _FORMS and type(nm) in {type(c) for c in [*permitted, *excluded]}
                for nm in _names_of(cert)):
            raise VerificationError("name-constraints", f"{role} {_name(ca)} constrains a name form devagent "
                                    f"cannot check, and {_name(cert)} has such a name; refused")


_FORMS = (x509.DNSName, x509.IPAddress, x509.UniformResourceIdentifier, x509.RFC822Name, x509.DirectoryName)


def _gn(g) -> str:
    v = g.value
    if isinstance(v, x509.Name):
        v = dn(v)
    return f"{type(g).__name__.replace('Name', '').replace('UniformResourceIdentifier', 'URI')}:{v}"


# ---- certificate policies (RFC 5280 §6.1.3 (d)-(f), §6.1.4 (a), (b), (h)-(j), §6.1.5) --------------------------
def _check_policies(path: Sequence[x509.Certificate], what: str) -> None:
    certs = list(reversed(path[:-1])) if len(path) > 1 else list(path)  # RFC order: 1 = issued by the anchor
    n = len(certs)
    needs_tree = False
    for c in certs:
        pc = ext(c, x509.PolicyConstraints)
        if pc is not None and pc.require_explicit_policy is not None:
            needs_tree = True
    if not needs_tree:
        return  # initial-explicit-policy is false and nothing requires one: the outcome cannot be a failure
    if any(_has_ext(c, OID_POLICY_MAPPINGS) for c in certs):
        raise VerificationError("policy", f"{what} {_name(path[0])}: the path requires an explicit certificate "
                                "policy and maps policies (policyMappings); devagent does not process policy "
                                "mappings, so it refuses the path rather than guess")
    explicit, inhibit_any = n + 1, n + 1
    # The tree, one level per certificate: nodes are (valid_policy, expected_policy_set, parent index).
    levels: list[list[tuple[str, frozenset, int]]] = [[(ANY_POLICY, frozenset({ANY_POLICY}), -1)]]
    for i, c in enumerate(certs, start=1):
        cp = ext(c, x509.CertificatePolicies)
        if levels is not None and cp is not None:
            oids = [p.policy_identifier.dotted_string for p in cp]
            prev = levels[-1]
            level: list = []
            for p in oids:
                if p == ANY_POLICY:
                    continue
                parents = [k for k, nd in enumerate(prev) if p in nd[1]]
                if not parents:
                    parents = [k for k, nd in enumerate(prev) if nd[0] == ANY_POLICY]
                level += [(p, frozenset({p}), k) for k in parents]
            if ANY_POLICY in oids and (inhibit_any > 0 or (i < n and _self_issued(c))):
                for k, nd in enumerate(prev):
                    have = {x[0] for x in level if x[2] == k}
                    level += [(p, frozenset({p}), k) for p in sorted(nd[1]) if p not in have]
            if sum(len(lv) for lv in levels) + len(level) > _POLICY_TREE_MAX_NODES:
                raise VerificationError("policy", f"{what} {_name(path[0])}: the certificate policy tree grows "
                                        "beyond any sane size; refused")
            levels.append(level)
            levels = _prune(levels)
        elif cp is None:
            levels = None
        if explicit <= 0 and levels is None:
            break
        if i < n:
            if not _self_issued(c):
                explicit = max(explicit - 1, 0)
                inhibit_any = max(inhibit_any - 1, 0)
            pc = ext(c, x509.PolicyConstraints)
            if pc is not None and pc.require_explicit_policy is not None:
                explicit = min(explicit, pc.require_explicit_policy)
            iap = ext(c, x509.InhibitAnyPolicy)
            if iap is not None:
                inhibit_any = min(inhibit_any, iap.skip_certs)
    if explicit > 0:
        explicit -= 1
    leaf_pc = ext(certs[-1], x509.PolicyConstraints)
    if leaf_pc is not None and leaf_pc.require_explicit_policy == 0:
        explicit = 0
    if explicit <= 0 and levels is None:
        raise VerificationError("policy", f"{what} {_name(path[0])}: the path requires an explicit certificate "
                                "policy (policyConstraints requireExplicitPolicy) and no policy is valid for the "
                                "whole path (RFC 5280 §6.1)")


def _prune(levels):
    """Remove nodes without children below the newest level; None when the tree is empty."""
    if not levels[-1]:
        return None
    for d in range(len(levels) - 2, -1, -1):
        keep = {nd[2] for nd in levels[d + 1]}
        old = levels[d]
        remap, new = {}, []
        for k, nd in enumerate(old):
            if k in keep:
                remap[k] = len(new)
                new.append(nd)
        levels[d] = new
        levels[d + 1] = [(p, e, remap[par]) for p, e, par in levels[d + 1]]
    return levels


def _has_ext(cert, oid) -> bool:
    try:
        cert.extensions.get_extension_for_oid(oid)
        return True
    except x509.ExtensionNotFound:
        return False


def issuer_chain(cert: x509.Certificate, pool: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """The issuers of ``cert`` found in ``pool``, nearest first, by name and signature, up to a self-signed one.

    Ordering only, not a trust decision: e.g. the chain a CMP response carries, before the keystore validates it.
    """
    pool = list(pool)
    out: list = []
    cur = cert
    for _ in range(MAX_INTERMEDIATES + 1):
        if _self_issued(cur) and self_signed(cur):
            break
        nxt = next((c for c in pool if c != cur and c not in out and c != cert and issued_by(cur, c)), None)
        if nxt is None:
            break
        out.append(nxt)
        cur = nxt
    return tuple(out)


# ---- root CA key update (RFC 4210 §4.4, RFC 9483 §4.3.2, RFC 7030 §4.1.3) ---------------------------------------
_RU = "root CA key update: "


def check_root_update(old_roots: Sequence[x509.Certificate], new_with_new: x509.Certificate,
                      new_with_old: x509.Certificate | None, old_with_new: x509.Certificate | None = None,
                      policy: Policy | None = None) -> x509.Certificate:
    """Trust a new root only through a verified link to a current one: newWithNew is self-signed, newWithOld
    carries its subject and key and is signed by one of ``old_roots``, and oldWithNew (when given) carries that
    old root's key and is signed by the new one. With ``policy``, newWithNew must also be a valid CA certificate
    at ``policy.at``.

    Returns:
        the old root the link verified against.
    Raises:
        VerificationError: naming the link that failed (reason ``root-update``).
    """
    if not self_signed(new_with_new):
        raise VerificationError("root-update", _RU + "newWithNew is not a valid self-signed certificate")
    if new_with_old is None:
        raise VerificationError("root-update", _RU + "newWithOld is missing, so the new root cannot be "
                                "linked to the current one; not trusting it")
    if not same_public_key(new_with_old.public_key(), new_with_new.public_key()) or \
            new_with_old.subject != new_with_new.subject:
        raise VerificationError("root-update", _RU + "newWithOld does not carry newWithNew's subject and "
                                "public key")
    old = next((r for r in old_roots if _verifies(new_with_old, r)), None)
    if old is None:
        raise VerificationError("root-update", _RU + "newWithOld does not verify with the old root "
                                f"({'; '.join(_name(r) for r in old_roots) or 'none'}); not trusting the new root")
    if old_with_new is not None:
        if not same_public_key(old_with_new.public_key(), old.public_key()):
            raise VerificationError("root-update", _RU + "oldWithNew does not carry the old root's key")
        if not _verifies(old_with_new, new_with_new):
            raise VerificationError("root-update", _RU + "oldWithNew does not verify with the new root")
    if policy is not None:
        _check_ca(new_with_new, policy, "new root CA")
        _check_basic(new_with_new, policy, "new root CA")
    return old


def _verifies(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Signature by ``issuer``'s key, whatever the issuer name says (newWithOld names the new root as issuer's
    subject only when the old and new roots share a name)."""
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except ValueError:
        pass  # issuer name differs: verify the signature alone
    except (InvalidSignature, TypeError, UnsupportedAlgorithm):
        return False
    key = issuer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            from cryptography.hazmat.primitives.asymmetric import padding

            pad = cert.signature_algorithm_parameters
            key.verify(cert.signature, cert.tbs_certificate_bytes,
                       pad if pad is not None else padding.PKCS1v15(), cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
        return True
    except (InvalidSignature, TypeError, ValueError, UnsupportedAlgorithm):
        return False


__all__ = ["Policy", "PURPOSES", "EKU_NAMES", "OID_CMC_CA", "OID_CMC_RA", "validate", "check_root_update",
           "is_ca", "issued_by", "self_signed", "ext", "fingerprint"]
