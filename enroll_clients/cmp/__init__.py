"""CMP client (RFC 9483 lightweight CMP profile; RFC 4210/9810, 4211, 6712, 9480, 9481).

Cheap to import: nothing here (or in ``client``/``transport``) imports pyasn1; the ASN.1 layer loads on the
first CMP message. The HTTP transport is the standard library's ``http.client`` (httpx is EST's alone).

Public API::

    client_from_options(options: EnrollOptions) -> CmpClient      # an EnrollmentClient
    CmpClient(transport, *, trust_anchors=(), recipient=None, implicit_confirm=False, mac="pbm", ...)
    HttpTransport(url, *, timeout_s=30, retries=2) / FileTransport(reqout, rspin, *, wait_s=300)
    CallableTransport(handler)

See docs/cmp.md.
"""
from __future__ import annotations

from enroll_clients.base import EnrollOptions

__all__ = ["client_from_options", "CmpClient", "HttpTransport", "FileTransport", "CallableTransport", "Transport"]


def client_from_options(options: EnrollOptions):
    """Build a ``CmpClient`` from ``EnrollOptions``.

    Transport: a file transport when ``options.reqout`` or ``options.rspin`` is set (both are then
    needed), else HTTP to ``options.server`` (``http://`` or ``https://`` URL of the CMP endpoint).

    ``options.extra`` keys understood (all optional):
        ``old_root`` (x509.Certificate): current root; ``ca_certs()`` then asks for a root CA key update.
        ``max_clock_skew_s`` (float): messageTime tolerance with a trusted clock (default 300 s).
        ``clock_trusted`` (bool): check messageTime against the clock (default True; False e.g. on a Pi without
            RTC before NTP). The response signer's validity is checked either way (docs/trust.md).
        ``now`` (callable): our time, a datetime or a ``keystore.validator.ClockReading`` (the daemon's CA-time
            estimate with its uncertainty: the response signer is validated at it; messageTime is checked only
            against a trusted clock). Default: the system clock.
        ``server_certs`` (sequence of x509.Certificate): pinned response signer(s), ``--cmp-server-cert``.
        ``ignore_keyusage`` (bool): tolerate a signer without digitalSignature keyUsage (off by default).
        ``reuse_signer`` (bool): verify a signed response without extraCerts with the signer validated earlier in
            the transaction (off by default; docs/cmp.md "Deviations").
        ``trusted_signer_fallback`` (bool): verify a signed response without extraCerts with a pinned
            certificate or trust anchor named as its sender (off by default).
        ``cert_template`` (bool): ask for and apply the server's certReqTemplate before ir/cr.
        ``mac_iterations`` (int): iteration count of our PBM/PBMAC1 (default 10000).
        ``tls_verify`` (bool | str | sequence of x509.Certificate | ssl.SSLContext): what authenticates an
            https:// server (default True = the system trust store; a str is a CA file or directory; certificates
            are the TLS trust anchors, only they: the domain's ``tls`` store, ``--tls-trust``).
        ``tls_trust_source`` (str): how an untrusted-server error names where that trust came from.
        ``tls_client_auth`` (bool): over https://, present the certificate that signs the request (``auth``:
            the IDevID or LDevID) as the TLS client certificate (off by default; software keys only).
        ``http_keep_alive`` (bool): reuse the HTTP connection between messages (default False).
        ``file_wait_s`` (float): how long the file transport waits for a response file
            (default ``options.max_wait_s``).
        ``mac_alg`` (str): HMAC of our MAC, "hmac-sha1" .. "hmac-sha512" (default hmac-sha256, RFC 9481).
        ``mac_owf`` (str): PasswordBasedMac one-way function, "sha1" .. "sha512" (default sha256).
        ``mac_sender`` (str): header sender of MAC-protected requests: "subject" (default) or "null-dn".
        ``operation_labels`` (bool): ``server`` is a base URL; each message goes to ``<server>/<label>``
            (RFC 9483 6.1: initialization, certification, keyupdate, p10, revocation, getcacerts, ...).
        ``profile_in`` (str): where ``options.profile`` goes: "generalinfo" (default, certProfile,
            RFC 9483 3.1), "path" (a URL path segment before the operation label) or "both".
        ``unprotected`` (bool): send requests without protection (diagnostics, as ``openssl cmp
            -unprotected_requests``; servers refuse them). Responses are still checked.
        ``tolerate_nonce_reuse`` (bool): accept a response that repeats a senderNonce of the transaction when
            its recipNonce and transactionID match (docs/cmp.md, "Deviations").

    Raises:
        ValueError: inconsistent options (e.g. only one of reqout/rspin, a non-HTTP server URL).
        TypeError: wrong option types.
    """
    if not isinstance(options, EnrollOptions):
        raise TypeError(f"options must be EnrollOptions, not {type(options).__name__}")
    from enroll_clients.cmp.algs import PROFILE_LOCATIONS
    from enroll_clients.cmp.client import CmpClient
    from enroll_clients.cmp.transport import FileTransport, HttpTransport

    extra = dict(options.extra or {})
    profile_in = extra.get("profile_in") or "generalinfo"
    if profile_in not in PROFILE_LOCATIONS:
        raise ValueError(f"profile_in {profile_in!r}: one of {', '.join(PROFILE_LOCATIONS)}")
    if profile_in != "generalinfo" and not options.profile:
        raise ValueError(f"profile_in {profile_in!r} needs a profile (--profile)")
    if options.reqout or options.rspin:
        if not (options.reqout and options.rspin):
            raise ValueError("the CMP file transport needs both reqout (requests) and rspin (responses)")
        transport = FileTransport(options.reqout, options.rspin,
                                  wait_s=float(extra.get("file_wait_s", options.max_wait_s)))
    else:
        transport = HttpTransport(options.server, timeout_s=options.timeout_s, retries=options.retries,
                                  verify=extra.get("tls_verify", True),
                                  trust_source=extra.get("tls_trust_source"),
                                  keep_alive=bool(extra.get("http_keep_alive", False)),
                                  operation_labels=bool(extra.get("operation_labels", False)),
                                  path_profile=options.profile if profile_in in ("path", "both") else None)
    old_root = extra.get("old_root")
    if old_root is not None:
        from cryptography import x509

        if not isinstance(old_root, x509.Certificate):
            raise TypeError("options.extra['old_root'] must be an x509.Certificate")
    return CmpClient(
        transport,
        trust_anchors=tuple(options.trust_anchors),
        recipient=options.recipient,
        implicit_confirm=options.implicit_confirm,
        mac=options.mac,
        mac_iterations=extra.get("mac_iterations"),
        max_clock_skew_s=extra.get("max_clock_skew_s", 300.0),
        clock_trusted=bool(extra.get("clock_trusted", True)), now=extra.get("now"),
        server_certs=tuple(extra.get("server_certs") or ()),
        ignore_keyusage=bool(extra.get("ignore_keyusage", False)),
        reuse_signer=bool(extra.get("reuse_signer", False)),
        trusted_signer_fallback=bool(extra.get("trusted_signer_fallback", False)),
        max_wait_s=options.max_wait_s,
        profile=options.profile,
        old_root=old_root,
        use_cert_template=bool(extra.get("cert_template", False)),
        mac_alg=extra.get("mac_alg"),
        mac_owf=extra.get("mac_owf"),
        mac_sender=extra.get("mac_sender") or "subject",
        profile_in_general_info=profile_in in ("generalinfo", "both"),
        tolerate_nonce_reuse=bool(extra.get("tolerate_nonce_reuse", False)),
        unprotected_requests=bool(extra.get("unprotected", False)),
        tls_client_auth=bool(extra.get("tls_client_auth", False)),
    )


def __getattr__(name):  # lazy re-exports
    if name == "CmpClient":
        from enroll_clients.cmp.client import CmpClient

        return CmpClient
    if name in ("HttpTransport", "FileTransport", "CallableTransport", "Transport"):
        from enroll_clients.cmp import transport

        return getattr(transport, name)
    raise AttributeError(name)
