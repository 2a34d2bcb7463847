"""Click commands of the CoAP delegated-enrollment roles: ``serve`` (device) and ``coap provision``
(commissioning); the edge CLM's ``clm`` group is in ``agent.cli_clm``. Loaded lazily by ``agent.cli``; aiocoap is
imported only when a command runs.

``ctx.obj`` is the root group's App (``state_dir``, ``json``, ``verbose``).
"""
from __future__ import annotations

import json as _json
import socket
import sys
from pathlib import Path

import click

EXIT_SERVER = 5  # agent.cli: "enrollment failed"
EXIT_CONFIG = 7


def _fail(msg: str, code: int = EXIT_SERVER):
    click.echo(f"devagent: {msg}", err=True)
    sys.exit(code)


def _state(ctx) -> Path:
    return Path(ctx.obj.state_dir)


def _run(coro):
    import asyncio

    return asyncio.run(coro)


# ---- device: serve --------------------------------------------------------------------------------------------
@click.command("serve")
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on (one address).")
@click.option("--port", type=click.IntRange(1, 65534), default=5683, show_default=True,
              help="CoAP port; DTLS (coaps) is served on PORT+1.")
@click.option("--security-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Provisioned contexts [default: STATE_DIR/coap].")
@click.option("--no-oscore", is_flag=True, help="Do not load OSCORE contexts.")
@click.option("--no-dtls", is_flag=True, help="Do not serve DTLS-PSK.")
@click.option("--insecure", is_flag=True, help="Accept unauthenticated requests on plain CoAP (lab use only).")
@click.option("--device-id", default=None, help="Name in /status and the default subject CN [default: hostname].")
@click.option("--domain", default=None, help="Default domain (trust anchor) when the CLM sends none.")
@click.option("--subject", default=None, help="Default subject DN [default: CN=DEVICE_ID].")
@click.option("--san", multiple=True, help="Default SAN (dns:NAME, ip:ADDR, uri:URI, email:ADDR); repeatable.")
@click.option("--key-type", default=None,
              help="Key type when the CLM's request names none [key.algorithm of the config / board profile; p256].")
@click.option("--name", "cred_name", default="ldevid", show_default=True, help="Default credential name.")
@click.option("--key-backend", default=None,
              help="Key backend: soft, tpm, pkcs11 [key.backend of the config / board profile; soft].")
@click.option("--csr-rate", type=click.FloatRange(min=0.01), default=12.0, show_default=True,
              help="Key generations per minute (token bucket).")
@click.option("--csr-burst", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--max-pending", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Bound on keys waiting for their certificate.")
@click.option("--no-clock", is_flag=True, help="Board has no real-time clock: skip validity dates (the CLM checks).")
@click.option("--accept-ca-from-clm", is_flag=True,
              help="A domain without trust anchor adopts the root the (authenticated) CLM sends, once a "
                   "certificate verifies against it.")
@click.option("--allow-weak-keys", is_flag=True, help="Allow rsa1024 (benchmarks reproducing seed 003 only).")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path), default=None, hidden=True,
              help="Write 'ready' here once listening (tests).")
@click.pass_context
def serve(ctx, bind, port, security_dir, no_oscore, no_dtls, insecure, device_id, domain, subject, san, key_type,
          cred_name, key_backend, csr_rate, csr_burst, max_pending, no_clock, accept_ca_from_clm, allow_weak_keys,
          ready_file):
    """Run the device's CoAP services (/csr, /verify, /status) for delegated enrollment by a CLM.

    Long-lived: logs to stderr (journald), stops cleanly on SIGTERM.
    """
    import logging

    from coap_services.authz import load_grants
    from coap_services.device import DeviceConfig, DeviceService
    from coap_services.errors import SecurityConfigError
    from coap_services.security import load_server_security

    log = logging.getLogger("devagent.coap")
    if not getattr(ctx.obj, "verbose", False):  # Block1 "Continue" and similar per-request lines are noise
        logging.getLogger("coap-server").setLevel(logging.WARNING)
    if bind in ("0.0.0.0", "::", ""):
        raise click.BadParameter("bind one address (aiocoap's DTLS server cannot bind the any-address)",
                                 param_hint="--bind")
    key_backend = ctx.obj.key_backend(key_backend)  # --key-backend, else key.backend of the config
    key_type = ctx.obj.key_type(key_type)  # --key-type, else key.algorithm of the config
    # The configured key backend options and pending-key max age, as every command; closed however the start or the
    # service ends (a bad port or security context exits through _fail).
    with ctx.obj.keystore() as ks:
        removed = ks.gc()  # as `devagent run` starts: discards pending keys whose owner is gone (a killed service's)
        if removed:
            log.warning("start-up gc: removed %d leftover file(s) / orphaned pending key(s)", len(removed))
        methods = tuple(m for m, off in (("oscore", no_oscore), ("dtls-psk", no_dtls)) if not off)
        try:
            layers = load_server_security(security_dir or _state(ctx) / "coap", methods)
            grants = load_grants(security_dir or _state(ctx) / "coap")
        except SecurityConfigError as e:
            _fail(f"configuration error: {e}", EXIT_CONFIG)
        if insecure:
            click.echo("WARNING: --insecure: /csr, /verify and /status accept UNAUTHENTICATED plain-CoAP requests; "
                       "anyone who can reach this port can make the device generate keys and install certificates. "
                       "Use only in a lab.", err=True)
        elif not layers:
            _fail("configuration error: no OSCORE or DTLS-PSK context is provisioned in "
                  f"{security_dir or _state(ctx) / 'coap'}; run 'devagent coap provision DEVICE_ID' (or --insecure "
                  "in a lab)", EXIT_CONFIG)
        cfg = DeviceConfig(device_id=device_id or socket.gethostname(), default_subject=subject,
                           default_san=tuple(san), default_key_type=key_type, default_name=cred_name,
                           default_domain=domain, key_backend=key_backend, csr_rate_per_min=csr_rate,
                           csr_burst=csr_burst, max_pending=max_pending, check_validity=not no_clock,
                           accept_ca_from_clm=accept_ca_from_clm, allow_weak_keys=allow_weak_keys)

        async def main():
            from coap_services.server import serve_forever

            def ready(server):
                if ready_file is not None:
                    from keystore import fsutil

                    fsutil.atomic_write(ready_file, f"{server.uri}\n".encode())

            await serve_forever(DeviceService(ks, cfg, grants=grants), layers, host=bind, port=port,
                                insecure=insecure, ready=ready)

        from agent.cli import long_lived

        long_lived()
        try:
            _run(main())
        except OSError as e:
            _fail(f"network error: cannot listen on {bind}:{port}/{port + 1}: {e.strerror or e}", 6)
    log.debug("serve exited")


# ---- commissioning --------------------------------------------------------------------------------------------
@click.group("coap")
def coap():
    """CoAP security commissioning for delegated enrollment."""


@coap.command("provision")
@click.argument("device_id")
@click.option("--method", type=click.Choice(["oscore", "dtls-psk", "both"]), default="both", show_default=True)
@click.option("--peer", default="clm", show_default=True, help="Name of the CLM (DTLS PSK identity).")
@click.option("--device-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Device security directory [default: STATE_DIR/coap].")
@click.option("--clm-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="CLM directory [default: STATE_DIR/clm]; the CLM half goes to CLM_DIR/contexts/DEVICE_ID.")
@click.option("--force", is_flag=True, help="Replace existing contexts (do it on both ends).")
@click.option("--domain", "domains", multiple=True,
              help="PKI domain this context may enroll in; repeatable [the device service's --domain].")
@click.option("--name", "names", multiple=True,
              help="Credential name this context may create or replace; repeatable [any name in its domains].")
@click.option("--allow-replace-cli", is_flag=True,
              help="Let this context also replace credentials enrolled on the device itself (devagent enroll).")
@click.pass_context
def provision(ctx, device_id, method, peer, device_dir, clm_dir, force, domains, names, allow_replace_cli):
    """Create a fresh OSCORE and/or DTLS-PSK context pair for DEVICE_ID and the CLM (files 0600), bound to the
    domains and credential names the CLM may manage on the device (coap_services/authz.py, docs/coap.md)."""
    from coap_services.authz import Grant, write_grant
    from coap_services.errors import SecurityConfigError
    from coap_services.security import provision as do_provision

    methods = ("oscore", "dtls-psk") if method == "both" else (method,)
    dev_dir = device_dir or _state(ctx) / "coap"
    grant = Grant(peer, tuple(domains) or None, tuple(names) or None, allow_replace_cli)
    from keystore.store import check_name

    try:
        for what, values in (("domain", domains), ("credential name", names)):
            for v in values:
                check_name(v, what)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    try:
        out = do_provision(device_id, dev_dir, clm_dir or _state(ctx) / "clm",
                           methods=methods, peer=peer, force=force)
        out["grant"] = grant.to_json()
        out["files"].append(str(write_grant(dev_dir, grant)))
    except SecurityConfigError as e:
        _fail(f"configuration error: {e}", EXIT_CONFIG)
    if ctx.obj.json:
        click.echo(_json.dumps(out, indent=1))
    else:
        click.echo(f"provisioned {', '.join(methods)} for device {device_id} (peer {peer}):")
        for f in out["files"]:
            click.echo(f"  {f}")
        click.echo("Copy the device half to the device's security directory over a trusted channel; never copy "
                   "an OSCORE context that has been used (sequence numbers must not repeat).")
