"""EST (RFC 7030) enrollment client.

Cheap to import: the client, httpx and pyasn1 load only when first used. Public API:

- ``client_from_options(options) -> EstClient`` (an ``EnrollmentClient``)
- ``EstClient.enroll/request/renew/revoke/ca_certs`` (the interface), plus ``csrattrs()``,
  ``bootstrap_cacerts()``, ``accept_bootstrap()`` and ``url()``
- pure helpers from ``enroll_clients.est.messages``: ``parse_csrattrs``, ``apply_csrattrs``, ``CsrAttrs``,
  ``fingerprint``, ``parse_certs_body``, ``parse_serverkeygen`` …
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from enroll_clients.base import EnrollmentClient, EnrollOptions

_LAZY = {
    "EstClient": "enroll_clients.est.client",
    "BootstrapResult": "enroll_clients.est.client",
    "EstConfigError": "enroll_clients.est.client",
    "CsrAttrs": "enroll_clients.est.messages",
    "CsrAttrItem": "enroll_clients.est.messages",
    "parse_csrattrs": "enroll_clients.est.messages",
    "apply_csrattrs": "enroll_clients.est.messages",
    "fingerprint": "enroll_clients.est.messages",
    "parse_certs_body": "enroll_clients.est.messages",
    "parse_serverkeygen": "enroll_clients.est.messages",
}

__all__ = ["client_from_options", *_LAZY]


def client_from_options(options: "EnrollOptions") -> "EnrollmentClient":
    """Build an EST client from protocol-neutral options.

    Uses ``server``, ``trust_anchors``, ``label`` (``<label>`` or ``<domain>/<profile>``), ``timeout_s``,
    ``retries`` (GET only), ``ca_fingerprint``, ``max_wait_s`` and ``extra`` keys ``base_path`` (instead of
    ``/.well-known/est``), ``ca_anchors`` (extra anchors for issued chains), ``system_trust`` (opt-in).

    Raises:
        EstConfigError: bad URL, label or fingerprint (also a ValueError).
    """
    from enroll_clients.est.client import EstClient

    return EstClient(options)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'enroll_clients.est' has no attribute {name!r}")
