"""Enrollment protocol clients (EST, CMP).

Clients receive credentials and trust anchors as arguments and never look them up; they never import
``agent``. Message encoding/decoding is pure and synchronous (bytes in, objects out); transports are async.
Heavy modules (pyasn1 layers, httpx) are imported lazily by the protocol subpackages.
"""
from enroll_clients.base import (  # noqa: F401
    CaCertsResult,
    CertRequest,
    ClientAuth,
    EnrollError,
    EnrollOptions,
    EnrollResult,
    EnrollmentClient,
    ProtectionError,
    ProtocolError,
    ServerError,
    TransportError,
    UnsupportedError,
)


def client_for(protocol: str, options: "EnrollOptions") -> "EnrollmentClient":
    """Build the client for ``protocol`` ("cmp" or "est") from options, importing only that protocol.

    Raises:
        ValueError: unknown protocol name.
    """
    if protocol == "cmp":
        from enroll_clients.cmp import client_from_options
    elif protocol == "est":
        from enroll_clients.est import client_from_options
    else:
        raise ValueError(f"unknown enrollment protocol {protocol!r} (expected 'cmp' or 'est')")
    return client_from_options(options)
