"""What each provisioned CoAP security context may do on the device (delegated enrollment authorization).

``devagent coap provision`` binds the context pair it creates to the domains and credential names the CLM
behind it may manage, in ``<device security dir>/authz/<peer>.json`` (0600, written through keystore.fsutil)::

    {"peer": "clm", "domains": ["plant"] | null, "names": ["ldevid", ...] | null, "replace_cli": false}

- ``domains``: the PKI domains the context may enroll in; ``null`` = the domain the device service runs with
  (``serve --domain``). A context with no domain can manage nothing.
- ``names``: the credential names it may create; ``null`` = any name (in its domains).
- ``replace_cli``: it may also replace an LDevID / application credential that was enrolled from the CLI
  (``devagent enroll``/``request``) in its domains. Off by default.

Whatever the grant, a context may replace only a credential it delivered itself (by delegated enrollment, under
the same context and domain) — never an IDevID, never another domain's credential, never one another context
delivered. A context with no grant file (provisioned before grants existed) gets the defaults above.

Pure data and checks; the device service (coap_services.device) enforces them at /csr and again at /verify.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from coap_services.errors import SecurityConfigError

GRANT_DIR = "authz"
DELEGATED_PROTOCOL = "coap-delegated"


@dataclasses.dataclass(frozen=True)
class Grant:
    """What one context (peer name) may do. ``domains``/``names`` None: see the module docstring."""

    peer: str
    domains: tuple[str, ...] | None = None
    names: tuple[str, ...] | None = None
    replace_cli: bool = False

    def domains_for(self, default_domain: str | None) -> tuple[str, ...]:
        if self.domains is not None:
            return self.domains
        return (default_domain,) if default_domain else ()

    def to_json(self) -> dict:
        return {"peer": self.peer, "domains": list(self.domains) if self.domains is not None else None,
                "names": list(self.names) if self.names is not None else None, "replace_cli": self.replace_cli}


def peer_of_claim(claim: str | None) -> str | None:
    """``:oscore-clm`` / ``:dtls-clm`` -> ``clm`` (the provisioned peer name)."""
    if not claim:
        return None
    for prefix in (":oscore-", ":dtls-"):
        if claim.startswith(prefix):
            return claim[len(prefix):]
    return claim


def write_grant(device_dir: str | os.PathLike, grant: Grant) -> Path:
    from keystore import fsutil
    from keystore.store import check_name

    check_name(grant.peer, "peer name")
    for d in grant.domains or ():
        check_name(d, "domain")
    for n in grant.names or ():
        check_name(n, "credential name")
    d = fsutil.ensure_dir(Path(device_dir) / GRANT_DIR)
    p = d / f"{grant.peer}.json"
    fsutil.atomic_write(p, json.dumps(grant.to_json(), indent=1, sort_keys=True).encode() + b"\n", mode=0o600)
    return p


def load_grants(device_dir: str | os.PathLike) -> dict[str, Grant]:
    """Every grant in ``device_dir/authz`` by peer name.

    Raises:
        SecurityConfigError: a grant file is unreadable, malformed or readable by others.
    """
    from keystore import fsutil
    from keystore.errors import KeystorePermissionError

    out: dict[str, Grant] = {}
    d = Path(device_dir) / GRANT_DIR
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            fsutil.check_private(p, "CoAP authorization grant")
            raw = json.loads(p.read_text())
            g = Grant(peer=str(raw["peer"]),
                      domains=tuple(str(x) for x in raw["domains"]) if raw.get("domains") is not None else None,
                      names=tuple(str(x) for x in raw["names"]) if raw.get("names") is not None else None,
                      replace_cli=bool(raw.get("replace_cli", False)))
        except KeystorePermissionError as e:
            raise SecurityConfigError(str(e)) from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SecurityConfigError(f"CoAP authorization grant {p} is not valid: {e}; re-run "
                                      "'devagent coap provision'") from e
        if g.peer != p.stem:
            raise SecurityConfigError(f"CoAP authorization grant {p} names peer {g.peer!r}, not {p.stem!r}")
        out[g.peer] = g
    return out
