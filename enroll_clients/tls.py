"""TLS client authentication for the enrollment clients (EST always with its credential; CMP over https with
``--tls-client-auth``): load a keystore credential into an ``ssl.SSLContext``.

Python's ``ssl`` takes the client certificate and key as files only. The certificate chain and the key go into
a private 0700 directory for the ``load_cert_chain`` call and are removed right after: a software key as an
encrypted copy of the keystore's own key file (read once, by descriptor) or, in memory only, re-encrypted with a
random one-time password. TPM/PKCS#11 keys cannot be used this way (no OpenSSL provider in use): a clear
``EnrollError`` says so.

``server_certificate_failure`` and ``NOT_TLS_REASONS`` sort the TLS failures both transports meet the same way, so
EST and CMP name (and classify) a server that failed to authenticate alike: each is a ``ProtectionError`` (exit 5).
``handshake_failure_causes`` and ``handshake_close_hint`` word the two TLS failures whose cause the client cannot
know, alike for both: a handshake_failure alert, and a close in the handshake (with or without a client certificate);
``client_certificate_refusal`` words the server's alert refusing our client certificate (unknown_ca and the like).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import ssl
import tempfile
from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enroll_clients.base import EnrollError


# OpenSSL's reasons for a first answer that is not TLS at all (our ClientHello met a plain HTTP server, or another
# protocol): the server answered wrongly, which no retry cures.
NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL",
                             "HTTPS_PROXY_REQUEST", "HTTP_REQUEST"})


def not_tls(e: BaseException) -> bool:
    """Did the server answer our TLS handshake with something that is not TLS (``NOT_TLS_REASONS``)?"""
    return isinstance(e, ssl.SSLError) and not isinstance(e, ssl.SSLCertVerificationError) and (
        e.reason in NOT_TLS_REASONS)


def handshake_failure_causes(e: BaseException, subject: str | None) -> str:
    """What a handshake_failure alert (40) ``e`` can mean, to follow "the server ended the TLS handshake with":
    the alert as OpenSSL reports it, then its causes. A server sends it when it shares no TLS version or cipher
    suite with us, and a TLS 1.2 server also when it requires a client certificate and got none (under TLS 1.3 that
    is certificate_required, 116, unambiguous) or, for some servers, when it refuses the one we sent
    (``subject``)."""
    import re

    reason = getattr(e, "reason", None) or "SSLV3_ALERT_HANDSHAKE_FAILURE"
    description = re.sub(r"^\[[^]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", str(e)) or "sslv3 alert handshake failure"
    if subject is None:
        first = "it requires a TLS client certificate and we sent none"
    else:
        first = f"it refused our TLS client certificate {subject!r} (some servers answer a refused certificate so)"
    return (f"a handshake_failure alert (40; OpenSSL: {reason}, \"{description}\"): either {first}, or it shares "
            "no TLS version or cipher suite with us (we offer TLS 1.2 or later, Python's default cipher suites); "
            "the alert does not tell which")


def handshake_close_hint(subject: str | None) -> str:
    """The hint for a server that closed (or reset) the connection in a TLS handshake in which we presented the
    client certificate ``subject``: a TLS 1.2 server that refuses it can close without sending its alert, which
    looks like a drop; the close proves nothing, so the error stays a transport failure (exit 6). With no client
    certificate presented (``subject`` None) it is a drop, or a port that is not the server's TLS one (a server
    there may close on a ClientHello it cannot read): retry later, then check the port."""
    if subject is None:
        return "retry later, and if it persists check that the URL's port is the server's TLS port"
    return (f"we presented our TLS client certificate {subject!r} in that handshake, and the server may have "
            "refused it: a TLS 1.2 server that refuses a client certificate can close without its alert (a close "
            "alone proves no refusal). If it persists, check that the certificate is issued by a CA the server "
            "trusts for TLS clients and still valid")


def client_certificate_refusal(subject: str | None, reason: str) -> str:
    """The server's alert refusing our TLS client certificate ``subject`` (unknown_ca, bad_certificate, revoked,
    expired...; OpenSSL's ``reason``), to follow "the server" (EST) or "the CMP server": the same words for both.
    ``subject`` None (no certificate known to have been sent) leaves the subject out."""
    named = "" if subject is None else f" {subject!r}"
    return (f"refused our TLS client certificate{named} ({reason}): check that it is issued by a CA the server "
            "trusts for TLS clients and still valid")


def server_certificate_failure(e: BaseException | None, text: str = "") -> tuple[str, str]:
    """Why the server's TLS certificate did not verify: (kind, OpenSSL's reason). ``e``: the
    ``ssl.SSLCertVerificationError`` (or None when only its ``text`` is known). ``kind``: ``"hostname"`` (not
    issued for the URL's host), ``"not-yet-valid"`` or ``"expired"`` (X509_V_ERR_CERT_NOT_YET_VALID 9 /
    X509_V_ERR_CERT_HAS_EXPIRED 10, by the local clock), else ``"untrusted"`` (no chain to the TLS trust anchors,
    or a chain OpenSSL refuses)."""
    detail = getattr(e, "verify_message", "") or text or str(e or "")
    if "Hostname mismatch" in text or "hostname" in detail.lower() or "IP address mismatch" in text + detail:
        return "hostname", detail
    validity = {9: "not-yet-valid", 10: "expired"}.get(getattr(e, "verify_code", None))
    if validity is None and ("not yet valid" in detail or "has expired" in detail):
        validity = "not-yet-valid" if "not yet valid" in detail else "expired"
    return validity or "untrusted", detail


def validity_error(what: str, chain: str, kind: str, detail: str) -> EnrollError:
    """The error of a server certificate outside its validity period by this device's clock: ``what`` the request
    and where (``TLS to GET <url>``), ``chain`` whose chain (``server's``), ``kind`` "expired"/"not-yet-valid"
    (set as ``validity``, for the daemon's clock hint), ``detail`` OpenSSL's reason. A ``ProtectionError``."""
    import datetime

    from enroll_clients.base import ProtectionError

    local = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    state = kind.replace("-", " ")
    err = ProtectionError(f"{what}: a certificate of the {chain} chain is {state} by this device's clock ({detail}; "
                          f"the clock reads {local}): if the clock is wrong, fix NTP or the RTC; if it is right, the "
                          f"server's certificate is {state} (tell its operator); the trust anchors are not the cause")
    err.validity = kind
    return err


@contextlib.contextmanager
def private_tempdir():
    """A 0700 temporary directory (mkdtemp's mode) removed on exit, whatever happens."""
    d = tempfile.mkdtemp(prefix="devagent-tls-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _write_private(directory: str, name: str, data: bytes) -> str:
    fd, path = tempfile.mkstemp(prefix=name, dir=directory)  # mkstemp creates 0600
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _read_key_file(path: str, certificate: x509.Certificate) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            return f.read()
    except OSError as e:
        raise EnrollError(f"cannot read the TLS client key {path} of "
                          f"{certificate.subject.rfc4514_string()!r}: {e.strerror or e}") from None


def load_client_credential(ctx: ssl.SSLContext, certificate: x509.Certificate,
                           chain: Sequence[x509.Certificate] = (), *, private_key: Any = None,
                           key_file: str | None = None, key_password: bytes | None = None) -> None:
    """Load ``certificate`` (+ ``chain``) and its key (``key_file`` with ``key_password``, else the exportable
    ``private_key``) into ``ctx`` as the TLS client credential.

    Raises:
        EnrollError: no key, a non-exportable (TPM/PKCS#11) key without ``key_file``, or a key/certificate
            OpenSSL cannot load (naming the certificate's subject).
    """
    pem = serialization.Encoding.PEM
    chain_pem = certificate.public_bytes(pem) + b"".join(c.public_bytes(pem) for c in chain)
    with private_tempdir() as d:
        cert_path = _write_private(d, "cert", chain_pem)
        key_path, password = key_file, key_password
        if key_path is not None:
            # One read of the keystore's (encrypted) key file, by descriptor, into our private directory: OpenSSL
            # then reads that copy, never the keystore's path, which a concurrent renewal may replace or destroy.
            key_path = _write_private(d, "key", _read_key_file(key_path, certificate))
        else:
            if private_key is None:
                raise EnrollError("TLS client authentication needs the private key of "
                                  f"{certificate.subject.rfc4514_string()!r} (ClientAuth.key_file or private_key)")
            password = secrets.token_bytes(32)
            try:
                key_pem = private_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                    serialization.BestAvailableEncryption(password))
            except Exception as e:  # TPM/PKCS#11 keys cannot be exported
                raise EnrollError(
                    "TLS client authentication with a non-exportable (TPM/PKCS#11) key is not supported by "
                    "devagent's TLS client yet: Python's ssl needs the key as a file or through an OpenSSL provider "
                    f"(tpm2-openssl); give ClientAuth.key_file for such a key ({type(e).__name__})") from None
            key_path = _write_private(d, "key", key_pem)
        try:
            ctx.load_cert_chain(cert_path, key_path, password=password)
        except (ssl.SSLError, OSError, ValueError) as e:
            raise EnrollError(f"cannot load the TLS client credential {certificate.subject.rfc4514_string()!r} with "
                              f"key {key_file or '(in memory)'}: {e}") from None
