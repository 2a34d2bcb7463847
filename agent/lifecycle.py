"""Credential lifecycle flows: enroll, request, renew, revoke, CA update.

This is where keystore and enrollment clients meet. Each flow:
- creates any new key as *pending* in the keystore (generated where it lives: software, TPM, PKCS#11),
- builds the request (CSR in the keystore), lets the protocol client talk to the server,
- stores the result only through ``Keystore.store_certificate`` (verify-before-store),
- on any failure destroys the pending key and leaves the previously live credential untouched.
The enrollment parameters (protocol, server, label, profile, non-secret options) are remembered in the
credential record so that ``renew`` and the daemon can rebuild the client without the operator.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import logging
import time
from typing import Sequence

from cryptography import x509

from enroll_clients.base import (
    CaCertsResult,
    CertRequest,
    ClientAuth,
    EnrollError,
    EnrollmentClient,
    EnrollOptions,
)
from keystore.certs import fingerprint
from keystore.csr import build_csr, default_key_usage
from keystore.errors import KeyGoneError, KeystoreError, NotFoundError, VerificationError
from keystore.store import Credential, Keystore, check_name
from keystore.validator import CLOCK_FLOOR, ClockReading, Policy, check_root_update, issued_by, self_signed, validate

log = logging.getLogger("devagent.lifecycle")
CLOCK_SKEW_TOLERANCE_S = 300

# Remembered per credential (never secrets): enough to rebuild the client for renewal.
REMEMBERED = ("protocol", "server", "label", "profile", "mac", "implicit_confirm", "timeout_s", "recipient",
              "server_trust_domain", "key_backend", "rekey", "csrattrs", "renew_username", "renew_password_source",
              "tls_unique")
CSRATTRS_MODES = ("require", "use", "ignore")
# CMP switches (docs/cmp.md), remembered so renewals and the daemon talk to the server the same way; they are
# handed to the client as EnrollOptions.extra.
CMP_EXTRA = ("mac_alg", "mac_owf", "mac_sender", "operation_labels", "profile_in", "tolerate_nonce_reuse",
             "ignore_keyusage", "reuse_signer", "trusted_signer_fallback", "tls_client_auth")


class LifecycleError(KeystoreError):
    """A lifecycle step that cannot proceed (no LDevID for the domain, no trust anchor, ...)."""


class OptionConflictError(ValueError):
    """The operator's options contradict what the server requires (e.g. ``--key-type`` against EST /csrattrs):
    a usage error (exit 2); nothing was generated or sent yet."""


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """Where the new key comes from: generated (type + backend), an existing URI, or server-generated."""

    key_type: str = "p256"
    backend: str = "soft"
    key_uri: str | None = None
    server_keygen: bool = False
    allow_weak: bool = False
    explicit: bool = False  # the operator chose key_type; a server's different requirement is then an error


def _sans_of(cert: x509.Certificate) -> tuple:
    try:
        return tuple(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return ()


AUTH_ATTEMPTS = 3  # reads of a credential renewed under us before its key is held (each retry: a renewal happened)


def auth_for(ks: Keystore, cred: Credential) -> ClientAuth:
    """Client authentication material for a stored credential (key stays in its backend).

    The key is held (``Keystore.hold_key``) from here on: a concurrent renewal by another process retires it instead
    of destroying it under us. The flows below release it when their exchange is over (``_auth``); a caller that
    keeps the ClientAuth for the rest of its process does not need to.
    """
    return _auth(ks, cred)[0]


class _Held:
    """A key held for one flow (see ``_auth``); ``release`` is idempotent."""

    def __init__(self, ks: Keystore, uri: str | None):
        self.ks, self.uri = ks, uri

    def release(self) -> None:
        uri, self.uri = self.uri, None
        if uri is not None:
            self.ks.release_key(uri)


def _auth(ks: Keystore, cred: Credential) -> tuple[ClientAuth, _Held, Credential]:
    """(ClientAuth, its key's hold, the credential it was built from). A credential renewed by another process
    between reading it and holding its key (the old key is gone) is read again and used in its new version; again
    (up to ``AUTH_ATTEMPTS`` in all) only if it was renewed once more in that moment."""
    for attempt in range(AUTH_ATTEMPTS):
        try:
            ks.hold_key(cred.key_uri, credential=cred.name)
        except KeyGoneError:
            fresh = ks.get(cred.name)
            if attempt == AUTH_ATTEMPTS - 1 or fresh.key_uri == cred.key_uri:
                raise
            log.info("credential %s was renewed by another process (version %d -> %d): using the new version",
                     cred.name, cred.version, fresh.version)
            cred = fresh
            continue
        held = _Held(ks, cred.key_uri)
        try:
            kf = ks.key_file(cred.key_uri)
            auth = ClientAuth(certificate=cred.certificate, private_key=ks.private_key(cred.key_uri),
                              chain=cred.chain, key_file=kf[0] if kf else None, key_password=kf[1] if kf else None)
        except BaseException:
            held.release()
            raise
        return auth, held, cred
    raise AssertionError("unreachable")  # pragma: no cover


def _renewed_since(ks: Keystore, cred: Credential) -> Credential | None:
    """The credential's live version if another process replaced ``cred`` meanwhile, else None."""
    try:
        now = ks.get(cred.name)
    except NotFoundError:
        return None
    return now if now.version != cred.version else None


def _resolve_now(now):
    """``now`` as given to a lifecycle flow: None (the system clock), a datetime (a trusted clock), a
    ``ClockReading``, or a callable returning one of these (the daemon's ``reading``, asked when it is used, so a
    CA time seen in this very exchange counts)."""
    return now() if callable(now) else now


def validity_time(certificate: x509.Certificate, server_time: datetime.datetime | None,
                  now=None, *, round_trip_s: float = 0.0):
    """The time at which to check a freshly issued certificate's validity: ``None`` (the system clock, trusted), a
    datetime (trusted) or a ``keystore.validator.ClockReading`` (an estimate with its uncertainty).

    ``now`` given as a ``ClockReading`` (the daemon: it already folded this response's time into its estimate) is
    used as it is: strict when trusted, widened by its uncertainty when an estimate. Otherwise (the CLI), devices
    without an RTC start in 1970, and a fresh certificate must never be rejected for a clock that is obviously
    wrong; only the validity *time* is replaced, so a certificate that is wrong for any other reason (not for our
    key, untrusted, wrong key usage) is still rejected:
    - the CA sent its time (CMP messageTime) and it differs from ours by more than ``CLOCK_SKEW_TOLERANCE_S``:
      the CA's time, uncertain by its resolution and the exchange's ``round_trip_s``;
    - no CA time, and our clock reads before ``agent.policy.CLOCK_FLOOR`` (no certificate this software meets is
      that old): the certificate's notBefore, but not before the floor, so a certificate that expired before it
      is still rejected.
    Each correction is logged as a warning.
    """
    from agent.policy import CLOCK_FLOOR, ca_time_uncertainty

    if isinstance(now, ClockReading):
        return now
    local = now or datetime.datetime.now(datetime.timezone.utc)
    if server_time is not None:
        skew = (local - server_time).total_seconds()
        if abs(skew) > CLOCK_SKEW_TOLERANCE_S:
            u = ca_time_uncertainty(max(0.0, round_trip_s), 0.0)
            log.warning("local clock differs from the CA's by %.0f s; checking validity against the CA's "
                        "time %s (+- %.0f s)", skew, server_time.isoformat(), u)
            return ClockReading(server_time, "estimate", u, f"the CA's time in its response (the system clock reads "
                                f"{local:%Y-%m-%dT%H:%M:%SZ}, {skew:+.0f} s off)")
        return now
    if local < CLOCK_FLOOR:
        at = max(certificate.not_valid_before_utc, CLOCK_FLOOR)
        log.warning("local clock reads %s, before %s: it was never set (no RTC/NTP?) and the CA sent no time; "
                    "checking the new certificate's validity at %s instead; fix the clock",
                    local.isoformat(), CLOCK_FLOOR.date().isoformat(), at.isoformat())
        return ClockReading(at, "estimate", 0.0, f"the certificate's own notBefore (not before "
                            f"{CLOCK_FLOOR:%Y-%m-%d}): the system clock reads {local:%Y-%m-%dT%H:%M:%SZ} (never "
                            "set) and the CA sent no time")
    return now


def _new_key(ks: Keystore, spec: KeySpec, label: str, pending_for: dict):
    """Returns (key_uri, private_key, created_here)."""
    if spec.server_keygen:
        return None, None, False
    if spec.key_uri:
        return spec.key_uri, ks.private_key(spec.key_uri), False
    uri = ks.generate_key(spec.key_type, backend=spec.backend, label=label, pending_for=pending_for,
                          allow_weak=spec.allow_weak)
    return uri, ks.private_key(uri), True


async def _issue(ks: Keystore, op: str, client: EnrollmentClient, *, name: str, domain: str, kind: str,
                 subject: x509.Name, sans: Sequence[x509.GeneralName], key: KeySpec, auth: ClientAuth,
                 profile: str | None, purpose: str | None, remember: dict, extensions=(),
                 challenge_password: bytes | None = None, now: datetime.datetime | None = None,
                 check_validity: bool = True, csrattrs: str = "use", held: _Held | None = None) -> Credential:
    """The common flow; ``held``: the hold on ``auth``'s key, released as soon as the exchange is over (so that
    the commit below can destroy that key when it is the one being replaced)."""
    if csrattrs not in CSRATTRS_MODES:
        raise ValueError(f"csrattrs mode {csrattrs!r}: use one of {', '.join(CSRATTRS_MODES)}")
    hash_name = None
    if (op in ("enroll", "request") and not key.server_keygen and not key.key_uri and hasattr(client, "csrattrs")
            and csrattrs != "ignore"):
        key, extensions, hash_name = await _apply_server_attributes(client, auth, key, tuple(extensions), subject,
                                                                    csrattrs)
    if getattr(client, "protocol", None) == "est":
        await _check_est_issuer(ks, client, domain, auth, _resolve_now(now))
    # Key generation and CSR signing block (TPM/PKCS#11 round trips, RSA keygen): keep them off the event loop.
    key_uri, private_key, created = await asyncio.to_thread(
        _new_key, ks, key, name, {"name": name, "domain": domain, "op": op})
    try:
        csr = None
        if private_key is not None:
            kt = ks.key_record(key_uri)["key_type"] if ks.key_record(key_uri) else key.key_type
            csr = await asyncio.to_thread(build_csr, private_key, subject, sans, key_usage=default_key_usage(kt),
                                          extensions=extensions, challenge_password=challenge_password,
                                          hash_name=hash_name)
        # The same CSR with a challengePassword, for protocols that bind it to their session (EST tls-unique,
        # RFC 7030 §3.5); signed in the key's backend like the first.
        builder = None if private_key is None else functools.partial(
            build_csr, private_key, subject, sans, key_usage=default_key_usage(kt), extensions=tuple(extensions),
            hash_name=hash_name)
        req = CertRequest(subject=subject, private_key=private_key, csr=csr, sans=tuple(sans),
                          extensions=tuple(extensions), key_type=key.key_type, server_keygen=key.server_keygen,
                          profile=profile, csr_builder=builder)
        t0 = time.monotonic()
        result = await getattr(client, op)(req, auth)
        round_trip_s = time.monotonic() - t0
        if (result.info or {}).get("tls_unique_bound") and not remember.get("tls_unique"):
            remember = {**remember, "tls_unique": True}  # the server wants the binding: renewals bind too
        if held is not None:
            held.release()
        if key.server_keygen:
            if result.private_key is None:
                raise EnrollError("server-side key generation was requested but the server returned no key")
            key_uri = ks.import_key(result.private_key, label=name, state="pending")
            created = True
            ks.audit("server-keygen", name=name, domain=domain, protocol=client.protocol,
                     server=remember.get("server"))
        eff_now = validity_time(result.certificate, result.server_time, _resolve_now(now), round_trip_s=round_trip_s)
        cred = ks.store_certificate(name, result.certificate, result.chain, key_uri=key_uri, kind=kind,
                                    domain=domain, profile=profile, purpose=purpose, protocol=client.protocol,
                                    server=remember.get("server"), meta={"enroll": remember, "last_success":
                                    datetime.datetime.now(datetime.timezone.utc).isoformat(),
                                    **_confirmation_meta(result)},
                                    now=eff_now, check_validity=check_validity)
        _log_confirmation(name, result)
        return cred
    except BaseException:
        if created and key_uri is not None:
            try:
                ks.discard_key(key_uri)
            except KeystoreError as e:  # pragma: no cover - best effort cleanup, reported
                log.error("could not discard pending key %s: %s", key_uri, e)
        raise


def _confirmation_meta(result) -> dict:
    """What the record says about the CA's confirmation and the deviations accepted (CMP)."""
    info = result.info or {}
    out = {"unconfirmed": info.get("unconfirmed_reason") or None}
    if info.get("tolerated"):
        out["tolerated"] = list(info["tolerated"])
    return out


def _log_confirmation(name: str, result) -> None:
    info = result.info or {}
    for t in info.get("tolerated") or ():
        log.warning("%s: accepted a known server deviation: %s", name, t)
    if info.get("unconfirmed_reason"):
        log.warning("%s: stored, but the CA's confirmation (pkiConf) was not authenticated (recorded as "
                    "'unconfirmed' in the credential)", name)


async def _check_est_issuer(ks: Keystore, client, domain: str, auth: ClientAuth,
                            now: datetime.datetime | None = None) -> None:
    """Before an EST server issues anything: its /cacerts must chain to the domain's trust anchors.

    An EST server issues on the POST, and a certificate the keystore then refuses (verify-before-store) stays
    issued and orphaned on the CA. The TLS server can be trusted through an anchor that is not the domain's CA
    (a TLS front with its own PKI), so a working TLS connection says nothing about the issuer: check that some CA
    certificate the server offers is, or chains to, one of the domain's anchors (``keystore.validator``, purpose
    ``ca-cert``). Validity is left to verify-before-store (boards without a clock must still enroll).

    Raises:
        VerificationError("untrusted"): no anchor, or nothing in /cacerts chains to one; nothing was requested.
    """
    from keystore.validator import Policy, validate

    anchors = tuple(ks.trust_anchors(domain))
    if not anchors:
        raise VerificationError("untrusted", f"domain {domain} has no trust anchor: give its CA certificate with "
                                "--trust or bootstrap with --ca-fingerprint; nothing was requested")
    from enroll_clients.base import ProtectionError, ProtocolError, ServerError

    cert_auth = (dataclasses.replace(auth, username=None, password=None, reference=None, secret=None)
                 if auth.certificate is not None else None)  # never spend a (one-time) password on /cacerts
    try:
        result = await client.ca_certs(cert_auth)
    except ProtectionError:
        raise
    except (ProtocolError, ServerError) as e:
        # A server whose /cacerts is broken may still answer the enrollment with the whole chain: do not block it
        # here; verify-before-store judges the issued certificate.
        log.warning("EST /cacerts could not be checked against domain %s's anchors before the request (%s); the "
                    "issued certificate is verified before it is stored", domain, e)
        return
    at = result.server_time or now or datetime.datetime.now(datetime.timezone.utc)
    policy = Policy.for_purpose("ca-cert", at=at)
    for c in result.ca_certs:
        try:
            validate(c, result.ca_certs, anchors, policy, what="EST /cacerts certificate")
            return
        except VerificationError as e:
            if e.reason not in ("untrusted", "bad-signature"):
                return  # it chains; validity and the rest are judged on the issued certificate
    got = "; ".join(c.subject.rfc4514_string() for c in result.ca_certs) or "none"
    have = "; ".join(a.subject.rfc4514_string() for a in anchors)
    raise VerificationError("untrusted", f"the EST server's CA certificates ({got}) do not chain to domain {domain}'s "
                            f"trust anchors ({have}): a certificate it issued would be refused, so nothing was "
                            "requested; if the server's TLS certificate comes from another CA than the one that "
                            "issues, give that CA with --tls-trust and the domain's root with --trust or "
                            "--ca-fingerprint")


async def _apply_server_attributes(client, auth: ClientAuth, key: KeySpec, extensions: tuple, subject,
                                   mode: str = "use"):
    """EST /csrattrs (RFC 7030 §4.5): the server's key type, signature hash and requested extensions, before the
    key exists. Returns (key spec, extensions, signature hash name or None).

    /csrattrs is optional (§4.5): in mode ``use`` an answer that cannot be used (an HTTP error, a malformed body,
    an attribute devagent cannot honour) is logged as a warning and the request goes on without the server's
    attributes; in mode ``require`` it is fatal. Transport and TLS-trust failures always propagate: the request
    that follows would meet them too.

    Raises:
        OptionConflictError: the operator's explicit ``--key-type`` contradicts the server's key type.
    """
    from enroll_clients.base import ProtectionError, ProtocolError, ServerError
    from keystore.keytypes import KEY_TYPES

    def unusable(why: str):
        if mode == "require":
            raise LifecycleError(f"{why} (--csrattrs require)")
        log.warning("%s; going on without the server's CSR attributes (--csrattrs use; 'require' makes this fatal, "
                    "'ignore' skips /csrattrs)", why)
        return key, extensions, None

    try:
        attrs = await client.csrattrs(auth if auth.certificate is not None else None)
    except ProtectionError:
        raise
    except (ProtocolError, ServerError) as e:
        if mode == "require":
            raise
        return unusable(f"EST /csrattrs could not be used: {e}")
    if attrs is None:
        return key, extensions, None
    from enroll_clients.est.messages import apply_csrattrs

    proto = CertRequest(subject=subject, key_type=key.key_type if key.explicit else None, extensions=extensions)
    try:
        applied = apply_csrattrs(proto, attrs)
    except ValueError as e:
        raise OptionConflictError(f"{e} (from the server's /csrattrs): drop --key-type to follow the server, or "
                                  "pass --csrattrs ignore to send the request as given") from e
    kt = applied.key_type
    if kt == "ec":
        kt = {"secp384r1": "p384", "secp521r1": "p521"}.get(getattr(attrs, "curve", None) or "", "p256")
    elif kt == "rsa":
        kt = f"rsa{getattr(attrs, 'rsa_key_size', None) or 2048}"
    if kt and kt != key.key_type and not key.explicit:
        if kt not in KEY_TYPES:
            return unusable(f"the EST server asks for key type {kt}, which devagent does not generate")
        log.info("EST server requests key type %s (csrattrs)", kt)
        key = dataclasses.replace(key, key_type=kt)
    hash_name = getattr(attrs, "signature_hash", None)
    if hash_name and (key.key_type or "").startswith("ed"):
        log.info("EST server asks for signature hash %s; %s signatures have none of their own: ignored", hash_name,
                 key.key_type)
        hash_name = None
    if getattr(attrs, "challenge_password", False):
        if getattr(client, "binds_to_session", False):
            log.info("EST server asks for a challengePassword: the CSR is bound to the TLS session (tls-unique, "
                     "RFC 7030 §3.5)")
        else:
            log.warning("EST server asks for a challengePassword (RFC 7030 §3.5 tls-unique binding of the CSR to the "
                        "TLS session), and binding is off (--no-tls-unique): the request is sent without it; a "
                        "server that enforces the binding (libest -t) will refuse it")
    missing = [o for o in getattr(attrs, "extension_oids", ()) if o not in {e.oid.dotted_string for e in extensions}]
    if missing:
        log.info("EST server asks for attribute(s)/extension(s) %s without a value; devagent does not fill them in",
                 ", ".join(missing))
    return key, tuple(applied.extensions), hash_name


async def enroll(ks: Keystore, client: EnrollmentClient, *, name: str, domain: str, subject: x509.Name,
                 sans: Sequence[x509.GeneralName] = (), key: KeySpec = KeySpec(), auth: ClientAuth | None = None,
                 profile: str | None = None, remember: dict | None = None, **kw) -> Credential:
    """Obtain the domain credential (LDevID): CMP ir / EST simpleenroll, authenticated by a shared secret,
    HTTP Basic, or the IDevID (``auth``)."""
    check_name(name, "credential name")
    check_name(domain, "domain")
    if ks.exists(name) and ks.get(name).readonly:
        raise LifecycleError(f"{name} is an IDevID; choose another name for the domain credential")
    return await _issue(ks, "enroll", client, name=name, domain=domain, kind="ldevid", subject=subject, sans=sans,
                        key=key, auth=auth or ClientAuth(), profile=profile, purpose="clientAuth", remember=remember or {}, **kw)


async def request(ks: Keystore, client: EnrollmentClient, *, name: str, domain: str, subject: x509.Name,
                  sans: Sequence[x509.GeneralName] = (), key: KeySpec = KeySpec(), profile: str | None = None,
                  remember: dict | None = None, auth: ClientAuth | None = None, **kw) -> Credential:
    """Application credential (CMP cr / EST simpleenroll) authenticated with the domain's LDevID."""
    check_name(name, "credential name")
    if auth is not None:
        return await _issue(ks, "request", client, name=name, domain=domain, kind="app", subject=subject,
                            sans=sans, key=key, auth=auth, profile=profile, purpose=None, remember=remember or {},
                            **kw)
    ldevid = ks.find_domain_credential(domain)
    if ldevid is None:
        raise LifecycleError(f"no domain credential (LDevID) for domain {domain}: run 'devagent enroll "
                             f"--domain {domain} ...' first")
    for attempt in (0, 1):
        # Loading a token key is a blocking lookup. The LDevID's key is held for the exchange.
        auth, held, ldevid = await asyncio.to_thread(_auth, ks, ldevid)
        try:
            return await _issue(ks, "request", client, name=name, domain=domain, kind="app", subject=subject,
                                sans=sans, key=key, auth=auth, profile=profile, purpose=None,
                                remember=remember or {}, held=held, **kw)
        except EnrollError:
            fresh = None if attempt else _renewed_since(ks, ldevid)
            if fresh is None:
                raise
            log.info("the LDevID %s was renewed by another process during the request: retrying once with "
                     "version %d", ldevid.name, fresh.version)
            ldevid = fresh
        finally:
            held.release()
    raise AssertionError("unreachable")  # pragma: no cover


async def renew(ks: Keystore, name: str, *, client: EnrollmentClient, rekey: bool = True,
                now: datetime.datetime | None = None, check_validity: bool = True, username: str | None = None,
                password_source: str | None = None, remember: dict | None = None) -> Credential:
    """Renew ``name`` (CMP kur / EST simplereenroll) authenticated by its current certificate and key.

    With ``rekey`` a new key of the same type is generated in the same backend; the old credential stays
    live until the new certificate is verified and stored, then the old key is destroyed. ``remember``:
    options given for this renewal (CMP switches) that the record keeps from now on.
    A revoked credential is not renewed (``LifecycleError``).

    ``username``/``password_source`` (``env:VAR``, ``file:PATH``, ``pass:TEXT``) add HTTP Basic for EST servers
    that require it besides the client certificate (RFC 7030 §3.2.3). An ``env:``/``file:`` source is remembered
    with the credential (the reference, never the secret) so unattended renewals send it too; without arguments
    the remembered ones are used.
    """
    from keystore.secrets import resolve_secret

    cred = ks.get(name)
    if cred.readonly:
        raise LifecycleError(f"{name} is an IDevID: it is issued by the manufacturer and cannot be renewed")
    revoked = (cred.record.get("meta") or {}).get("revoked")
    if revoked:
        raise LifecycleError(f"{name} was revoked ({revoked}); a revoked credential is not renewed: enroll a new "
                             "one ('devagent enroll' / 'devagent request')")
    backend = {"file": "soft"}.get(cred.key_uri.partition(":")[0], cred.key_uri.partition(":")[0])
    spec = KeySpec(key_type=cred.key_type, backend=backend, key_uri=None if rekey else cred.key_uri,
                   allow_weak=True)
    remember = {**dict(cred.record.get("meta", {}).get("enroll") or {}),
                **{k: v for k, v in (remember or {}).items() if v is not None}}
    if username is None and password_source is None:
        username, password_source = remember.get("renew_username"), remember.get("renew_password_source")
    elif password_source is not None and username is None:
        raise ValueError("--password needs --username (HTTP Basic)")
    elif username is not None:
        remember["renew_username"] = username
        if password_source and password_source.split(":", 1)[0] in ("env", "file"):
            remember["renew_password_source"] = password_source
        else:
            remember.pop("renew_password_source", None)
            if password_source:
                log.info("the password source %s is not remembered (only env: and file: are): unattended "
                         "renewals will not send HTTP Basic", password_source.split(":", 1)[0] + ":")
    try:
        for attempt in (0, 1):
            auth, held, cred = await asyncio.to_thread(_auth, ks, cred)
            try:
                if username is not None:
                    auth = dataclasses.replace(auth, username=username,
                                               password=resolve_secret(password_source, "--password") or b"")
                if not rekey:
                    spec = dataclasses.replace(spec, key_uri=cred.key_uri)
                return await _issue(ks, "renew", client, name=name, domain=cred.domain, kind=cred.kind,
                                    subject=cred.certificate.subject, sans=_sans_of(cred.certificate), key=spec,
                                    auth=auth, profile=cred.record.get("profile"),
                                    purpose=cred.record.get("purpose"), remember=remember, now=now,
                                    check_validity=check_validity, held=held)
            except EnrollError:
                # Another process renewed it while we asked the CA (which may refuse the superseded certificate):
                # renew the new version instead, once.
                fresh = None if attempt else _renewed_since(ks, cred)
                if fresh is None:
                    raise
                log.info("credential %s was renewed by another process during this renewal: retrying once with "
                         "version %d", name, fresh.version)
                cred = fresh
            finally:
                held.release()
        raise AssertionError("unreachable")  # pragma: no cover
    except (EnrollError, KeystoreError) as e:
        ks.set_meta(name, last_error=f"{type(e).__name__}: {e}",
                    last_failure=datetime.datetime.now(datetime.timezone.utc).isoformat())
        raise


async def revoke(ks: Keystore, name: str, *, client: EnrollmentClient, reason: str = "unspecified",
                 auth: ClientAuth | None = None) -> None:
    """Revoke ``name``'s certificate (CMP rr), signed with its own key (or ``auth``)."""
    cred = ks.get(name)
    serials = []
    try:
        for attempt in (0, 1):
            held = None
            if auth is None:
                use, held, cred = await asyncio.to_thread(_auth, ks, cred)
            else:
                use = auth
            try:
                await client.revoke(cred.certificate, use, reason)
            finally:
                if held is not None:
                    held.release()
            serials.append(format(cred.certificate.serial_number, "x"))
            # Renewed by another process meanwhile: the live certificate is not the one just revoked. Revoke it
            # too (once), or the credential would be marked revoked while its live certificate is not.
            fresh = None if attempt else _renewed_since(ks, cred)
            if fresh is None:
                break
            log.info("credential %s was renewed by another process during the revocation: revoking version %d too",
                     name, fresh.version)
            cred = fresh
    except (EnrollError, KeystoreError) as e:
        ks.set_meta(name, last_error=f"revoke: {type(e).__name__}: {e}",
                    last_failure=datetime.datetime.now(datetime.timezone.utc).isoformat())
        raise
    ks.set_meta(name, revoked=reason, revoked_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                last_error=None)
    ks.audit("revoke", name=name, serial=serials[-1], reason=reason, **({"serials": serials} if len(serials) > 1
                                                                         else {}))


def _ca_policy(result: CaCertsResult, now) -> Policy:
    """CA certificates are checked at ``now`` (a ``ClockReading`` from the daemon: at its estimate, within its
    uncertainty); with a clock that was never set, at the CA's time, or else only after the validator's clock
    floor."""
    if isinstance(now, ClockReading):
        return Policy.for_purpose("ca-cert", now)
    at = now or datetime.datetime.now(datetime.timezone.utc)
    if at < CLOCK_FLOOR:
        at = result.server_time if result.server_time is not None and result.server_time >= CLOCK_FLOOR else None
    return Policy.for_purpose("ca-cert", at) if at is not None else Policy.for_unknown_clock("ca-cert")


def apply_ca_update(ks: Keystore, domain: str, result: CaCertsResult, *, ca_fingerprint: str | None = None,
                    confirmed: bool = False, now: datetime.datetime | None = None) -> list[str]:
    """Decide which received CA certificates to trust (pure policy + keystore writes).

    - No anchors yet (bootstrap, RFC 7030 §4.1.1): trust only if ``ca_fingerprint`` matches one received
      root (then everything chaining to it), or the operator ``confirmed`` after seeing the fingerprints.
    - Anchors exist: certificates that chain to them are added; a new self-signed root only through a
      verified link (newWithOld signed by a current anchor and carrying the new root's key, and the new root
      self-signed) or an operator fingerprint. Old anchors are kept while certificates still use them.

    Returns the fingerprints added. Raises VerificationError when nothing can be trusted.
    """
    anchors = ks.trust_anchors(domain)
    policy = _ca_policy(result, now)
    received = list(result.ca_certs) + [c for c in (result.new_root,) if c is not None]
    if not received:
        raise VerificationError("malformed", "the server sent no CA certificate")
    fps = {fingerprint(c): c for c in received}
    want = ca_fingerprint.lower() if ca_fingerprint else None
    if want and not want.startswith("sha256:"):
        want = "sha256:" + want.replace(":", "")
    added: list[str] = []
    if want:
        if want not in fps:
            raise VerificationError("untrusted", f"none of the received CA certificates has fingerprint {want}; "
                                    f"received: {', '.join(fps)}")
        root = fps[want]
        added += ks.add_trust_anchors(domain, [root], source="ca-update", verified_by="operator fingerprint")
        anchors = ks.trust_anchors(domain)
    elif not anchors:
        if not confirmed:
            raise VerificationError("untrusted", f"domain {domain} has no trust anchor yet: check the fingerprints "
                                    "out of band and pass --ca-fingerprint sha256:HEX (or confirm interactively): "
                                    + "; ".join(f"{c.subject.rfc4514_string()} {fp}" for fp, c in fps.items()))
        roots = [c for c in received if self_signed(c)] or received[-1:]
        added += ks.add_trust_anchors(domain, roots, source="ca-update", verified_by="operator confirmation")
        anchors = ks.trust_anchors(domain)
    if result.new_root is not None and fingerprint(result.new_root) not in {fingerprint(a) for a in anchors}:
        check_root_update([a for a in anchors if self_signed(a)] or anchors, result.new_root, result.new_with_old,
                          result.old_with_new)
        try:
            validate(result.new_root, [], [result.new_root], policy, what="new root")
            added += ks.add_trust_anchors(domain, [result.new_root], source="ca-update",
                                          verified_by="newWithOld link")
        except VerificationError as e:
            raise VerificationError(e.reason, f"root CA key update refused: the offered new root "
                                    f"{result.new_root.subject.rfc4514_string()} ({fingerprint(result.new_root)}) "
                                    f"cannot be a trust anchor: {e}; nothing was changed") from None
        anchors = ks.trust_anchors(domain)
    # Intermediates and any further roots: only if they chain to what we trust now.
    rest = [c for c in received if fingerprint(c) not in {fingerprint(a) for a in anchors}]
    chaining = []
    for c in rest:
        try:
            validate(c, rest, anchors, policy, what="CA certificate")
            chaining.append(c)
        except VerificationError:
            log.warning("ignoring CA certificate %s: it does not chain to domain %s's anchors",
                        c.subject.rfc4514_string(), domain)
    if chaining:
        added += ks.add_trust_anchors(domain, chaining, source="ca-update", role="ca", verified_by="chain")
    return added


def current_root(ks: Keystore, domain: str) -> x509.Certificate | None:
    """The domain's root to ask a CMP root CA key update for: the self-signed anchor the LDevID chains to,
    else the self-signed anchor that expires last."""
    roots = [a for a in ks.trust_anchors(domain) if self_signed(a)]
    if not roots:
        return None
    ldevid = ks.find_domain_credential(domain)
    if ldevid is not None:
        top = (list(ldevid.chain) or [ldevid.certificate])[-1]
        for r in roots:
            if r == top or issued_by(top, r):
                return r
    return max(roots, key=lambda r: r.not_valid_after_utc)


async def ca_update(ks: Keystore, domain: str, *, client: EnrollmentClient, ca_fingerprint: str | None = None,
                    confirm=None, auth: ClientAuth | None = None,
                    old_root: x509.Certificate | None = None, now=None) -> list[str]:
    """Fetch CA certificates (EST /cacerts, CMP genm caCerts + rootCaCert) and apply the trust policy above.

    ``confirm`` is an optional callable(list[(subject, fingerprint)]) -> bool used for interactive bootstrap.
    ``auth``: how the request is authenticated (default: the domain's LDevID; CMP also takes a MAC secret).
    Over CMP, ``old_root`` (default: ``current_root``) is sent in genm rootCaCert, so a root CA key update
    (newWithNew/newWithOld, checked by the client and again by ``apply_ca_update``) is found before the old
    root expires; the daemon calls this every CA check interval, with ``now`` = its ``reading`` (see
    ``_resolve_now``; default the system clock).
    """
    ldevid = ks.find_domain_credential(domain)
    held = None
    if auth is None and ldevid is not None:
        auth, held, ldevid = await asyncio.to_thread(_auth, ks, ldevid)
    try:
        if client.protocol == "cmp":
            result = await client.ca_certs(auth, old_root=old_root or current_root(ks, domain))
        else:
            result = await client.ca_certs(auth)
    finally:
        if held is not None:
            held.release()
    confirmed = False
    if not ks.trust_anchors(domain) and not ca_fingerprint and confirm is not None:
        confirmed = bool(confirm([(c.subject.rfc4514_string(), fingerprint(c)) for c in result.ca_certs]))
    return apply_ca_update(ks, domain, result, ca_fingerprint=ca_fingerprint, confirmed=confirmed,
                           now=_resolve_now(now))


def server_trust(ks: Keystore, domain: str | None, protocol: str | None,
                 pki: Sequence[x509.Certificate] = ()) -> tuple[tuple, dict]:
    """(EnrollOptions.trust_anchors, extra) that authenticate ``domain``'s server (docs/trust.md, trust stores):
    EST: the ``tls`` store, else the domain PKI (``pki`` or the ``pki`` store), and the domain PKI as
    ``extra["ca_anchors"]`` for the issued certificate when TLS has its own anchors; CMP: the ``cmp`` store, else
    the domain PKI, the ``cmp-server`` store's pinned certificates as ``extra["server_certs"]``, and the ``tls``
    store as ``extra["tls_verify"]`` (what authenticates an https:// CMP server; without it the system store)."""
    if not domain:
        return tuple(pki), {}
    pki = tuple(pki) or tuple(ks.trust_anchors(domain))
    extra: dict = {}
    if protocol == "est":
        tls = tuple(ks.trust_anchors(domain, "tls"))
        if tls and pki:
            extra["ca_anchors"] = pki
        return tls or pki, extra
    if protocol == "cmp":
        pinned = tuple(ks.trust_anchors(domain, "cmp-server"))
        if pinned:
            extra["server_certs"] = pinned
        tls = tuple(ks.trust_anchors(domain, "tls"))
        if tls:  # an https:// CMP server is authenticated by these alone (else: the system trust store)
            extra["tls_verify"] = tls
            extra["tls_trust_source"] = (f"domain {domain}'s tls trust store ({len(tls)} anchor(s), from --tls-trust; "
                                         f"'devagent keystore trust --domain {domain} --purpose tls' lists them, "
                                         "--remove FP drops one)")
        return tuple(ks.trust_anchors(domain, "cmp")) or pki, extra
    return pki, extra


def options_for_credential(ks: Keystore, cred: Credential, overrides: dict | None = None) -> tuple[str, EnrollOptions]:
    """Rebuild (protocol, EnrollOptions) for a stored credential from what its record remembers."""
    remembered = dict(cred.record.get("meta", {}).get("enroll") or {})
    remembered.update({k: v for k, v in (overrides or {}).items() if v is not None and k != "now"})
    protocol = remembered.get("protocol") or cred.record.get("protocol")
    server = remembered.get("server") or cred.record.get("server")
    if not protocol or not server:
        raise LifecycleError(f"credential {cred.name} does not record how it was enrolled; give --protocol and "
                             "--server")
    trust_domain = remembered.get("server_trust_domain") or cred.domain
    recipient = remembered.get("recipient")
    extra = {k: v for k, v in remembered.items() if k.startswith("x_")}
    trust, more = server_trust(ks, trust_domain, protocol)
    extra.update(more)
    if protocol == "est" and remembered.get("tls_unique") is not None:
        extra["tls_unique"] = bool(remembered["tls_unique"])
    if protocol == "cmp":
        extra.update({k: remembered[k] for k in CMP_EXTRA if remembered.get(k) is not None})
        if (overrides or {}).get("clock_trusted") is not None:  # the daemon's clock.trusted
            extra["clock_trusted"] = bool(overrides["clock_trusted"])
        if (overrides or {}).get("now") is not None:  # the daemon's time (ClockReading) for the signer check
            extra["now"] = overrides["now"]
    opts = EnrollOptions(
        server=server, trust_anchors=trust, domain=cred.domain, profile=remembered.get("profile"),
        label=remembered.get("label"), timeout_s=float(remembered.get("timeout_s") or 30.0),
        implicit_confirm=bool(remembered.get("implicit_confirm")), mac=remembered.get("mac") or "pbm",
        recipient=_parse_dn(recipient) if recipient else None, extra=extra)
    return protocol, opts


def _parse_dn(dn: str) -> x509.Name:
    from keystore.csr import parse_subject

    return parse_subject(dn)


@dataclasses.dataclass(frozen=True)
class CsrResult:
    """``enroll_csr``: the stored credential (the CSR's key is in the keystore) or the verified certificate."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    credential: Credential | None = None
    unconfirmed: str | None = None


async def enroll_csr(ks: Keystore, client: EnrollmentClient, *, csr: x509.CertificateSigningRequest, name: str,
                     domain: str, auth: ClientAuth | None, key_uri: str | None = None, op: str = "enroll",
                     remember: dict | None = None, now: datetime.datetime | None = None) -> CsrResult:
    """CMP p10cr from an existing CSR (its key stays where it is).

    With ``key_uri`` (the CSR's key, registered in the keystore) the credential is stored as usual; without,
    the certificate is verified exactly as before storing (our key = the CSR's, chain to the domain's
    anchors, validity) and returned, nothing stored.
    """
    from keystore.certs import same_public_key
    from keystore.validator import Policy, validate

    check_name(name, "credential name")
    if op not in ("enroll", "request"):
        raise ValueError("op must be 'enroll' or 'request'")
    if key_uri is not None:
        key = await asyncio.to_thread(ks.private_key, key_uri)
        if not same_public_key(key.public_key(), csr.public_key()):
            raise LifecycleError(f"--key {key_uri} is not the CSR's key (public keys differ)")
    if auth is None and op == "request":
        ldevid = ks.find_domain_credential(domain)
        if ldevid is None:
            raise LifecycleError(f"no domain credential (LDevID) for domain {domain}")
        auth = await asyncio.to_thread(auth_for, ks, ldevid)
    req = CertRequest(subject=csr.subject, csr=csr)
    result = await getattr(client, op)(req, auth)
    remember = remember or {}
    if key_uri is not None:
        cred = ks.store_certificate(name, result.certificate, result.chain, key_uri=key_uri,
                                    kind="ldevid" if op == "enroll" else "app", domain=domain,
                                    purpose="clientAuth" if op == "enroll" else None, protocol=client.protocol,
                                    server=remember.get("server"),
                                    meta={"enroll": remember, **_confirmation_meta(result)},
                                    now=validity_time(result.certificate, result.server_time, now))
        _log_confirmation(name, result)
        return CsrResult(cred.certificate, cred.chain, cred, result.info.get("unconfirmed_reason"))
    anchors = ks.trust_anchors(domain)
    if not anchors:
        raise VerificationError("untrusted", f"domain {domain} has no trust anchor to verify the certificate "
                                "against: give --trust")
    at = (validity_time(result.certificate, result.server_time, now)
          or datetime.datetime.now(datetime.timezone.utc))
    path = validate(result.certificate, result.chain, anchors,
                    Policy.for_purpose("credential", at=at, eku={"clientAuth"} if op == "enroll" else {}),
                    public_key=csr.public_key(), what="certificate for the CSR")
    _log_confirmation(name, result)
    return CsrResult(result.certificate, tuple(path[1:]), None, result.info.get("unconfirmed_reason"))


def client_for_credential(ks: Keystore, cred: Credential, overrides: dict | None = None) -> EnrollmentClient:
    from enroll_clients import client_for

    protocol, opts = options_for_credential(ks, cred, overrides)
    return client_for(protocol, opts)


def get_or_none(ks: Keystore, name: str) -> Credential | None:
    try:
        return ks.get(name)
    except NotFoundError:
        return None
