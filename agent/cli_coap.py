"""Click commands of the CoAP delegated-enrollment roles: ``serve`` (device), ``coap provision`` (commissioning)
and ``clm`` (edge CLM). Loaded lazily by ``agent.cli``; aiocoap is imported only when a command runs.

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
@click.option("--key-type", default="p256", show_default=True, help="Default key type.")
@click.option("--name", "cred_name", default="ldevid", show_default=True, help="Default credential name.")
@click.option("--key-backend", default="soft", show_default=True, help="Key backend: soft, tpm, pkcs11.")
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

    from coap_services.device import DeviceConfig, DeviceService
    from coap_services.errors import SecurityConfigError
    from coap_services.security import load_server_security
    from keystore.store import Keystore

    log = logging.getLogger("devagent.coap")
    if not getattr(ctx.obj, "verbose", False):  # Block1 "Continue" and similar per-request lines are noise
        logging.getLogger("coap-server").setLevel(logging.WARNING)
    if bind in ("0.0.0.0", "::", ""):
        raise click.BadParameter("bind one address (aiocoap's DTLS server cannot bind the any-address)",
                                 param_hint="--bind")
    ks = Keystore.open(_state(ctx))
    methods = tuple(m for m, off in (("oscore", no_oscore), ("dtls-psk", no_dtls)) if not off)
    try:
        layers = load_server_security(security_dir or _state(ctx) / "coap", methods)
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
    cfg = DeviceConfig(device_id=device_id or socket.gethostname(), default_subject=subject, default_san=tuple(san),
                       default_key_type=key_type, default_name=cred_name, default_domain=domain,
                       key_backend=key_backend, csr_rate_per_min=csr_rate, csr_burst=csr_burst,
                       max_pending=max_pending, check_validity=not no_clock, accept_ca_from_clm=accept_ca_from_clm,
                       allow_weak_keys=allow_weak_keys)

    async def main():
        from coap_services.server import serve_forever

        def ready(server):
            if ready_file is not None:
                from keystore import fsutil

                fsutil.atomic_write(ready_file, f"{server.uri}\n".encode())

        await serve_forever(DeviceService(ks, cfg), layers, host=bind, port=port, insecure=insecure, ready=ready)

    try:
        _run(main())
    except OSError as e:
        _fail(f"network error: cannot listen on {bind}:{port}/{port + 1}: {e.strerror or e}", 6)
    finally:
        ks.close()
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
@click.pass_context
def provision(ctx, device_id, method, peer, device_dir, clm_dir, force):
    """Create a fresh OSCORE and/or DTLS-PSK context pair for DEVICE_ID and the CLM (files 0600)."""
    from coap_services.errors import SecurityConfigError
    from coap_services.security import provision as do_provision

    methods = ("oscore", "dtls-psk") if method == "both" else (method,)
    try:
        out = do_provision(device_id, device_dir or _state(ctx) / "coap", clm_dir or _state(ctx) / "clm",
                           methods=methods, peer=peer, force=force)
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


# ---- CLM --------------------------------------------------------------------------------------------------------
@click.group("clm")
@click.option("--clm-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="CLM state (inventory, contexts, certificates) [default: STATE_DIR/clm].")
@click.pass_context
def clm(ctx, clm_dir):
    """Edge CLM: delegated enrollment and renewal of constrained devices over CoAP."""
    ctx.meta["clm_dir"] = clm_dir or _state(ctx) / "clm"


def _inventory(ctx):
    from agent.clm import Inventory

    return Inventory(ctx.meta["clm_dir"])


@clm.command("add-device")
@click.argument("device_id")
@click.option("--uri", required=True, help="coap://HOST:PORT (OSCORE/HMAC/none) or coaps://HOST:PORT+1 (DTLS-PSK).")
@click.option("--security", type=click.Choice(["auto", "oscore", "dtls-psk", "hmac", "none"]), default="auto",
              show_default=True, help="auto: from the context files (OSCORE for coap://, DTLS-PSK for coaps://, "
                                      "HMAC for a MicroPython board). hmac: a board running agent/mpy.")
@click.option("--hmac-secret", default=None,
              help="hmac: the board's commissioning secret (hex, as 'devagent mpy deploy --secret-file' wrote it) "
                   "as env:VAR, file:PATH or pass:HEX; stored 0600 in the context directory.")
@click.option("--board-id", default=None, help="hmac: the board's device_id (its config.json) [default: DEVICE_ID].")
@click.option("--context", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Context directory [default: CLM_DIR/contexts/DEVICE_ID].")
@click.option("--subject", default=None, help="Subject to request (default: the device's).")
@click.option("--san", multiple=True, help="SAN to request; repeatable.")
@click.option("--key-type", default=None, help="Key type the device generates (default: the device's).")
@click.option("--name", "cred_name", default=None, help="Credential name on the device.")
@click.option("--domain", default=None, help="Domain (trust anchor) of the credential.")
@click.option("--profile", default=None, help="Certificate profile upstream.")
@click.option("--replace", is_flag=True)
@click.pass_context
def add_device(ctx, device_id, uri, security, hmac_secret, board_id, context, subject, san, key_type, cred_name,
               domain, profile, replace):
    """Register a device (state "not operational")."""
    from agent.clm import InventoryError
    from coap_services.errors import SecurityConfigError
    from coap_services.security import detect_method, write_hmac_context

    inv = _inventory(ctx)
    context = context or inv.dir / "contexts" / device_id
    if hmac_secret is not None:
        from keystore.errors import KeystoreError
        from keystore.secrets import resolve_secret

        if security not in ("auto", "hmac"):
            raise click.BadParameter("only with --security hmac", param_hint="--hmac-secret")
        try:
            raw = resolve_secret(hmac_secret, "--hmac-secret")
            secret = bytes.fromhex(raw.decode("ascii").strip())
        except (KeystoreError, ValueError, UnicodeError) as e:
            raise click.BadParameter(f"the commissioning secret must be hex: {e}", param_hint="--hmac-secret") \
                from None
        # Refuse everything the inventory would refuse before the secret is written: bad input stores nothing.
        if not uri.startswith("coap://"):
            _fail(f"invalid value: device URI {uri!r}: an HMAC-protected board (agent/mpy) is reached over coap://", 2)
        if not replace and device_id in {r["id"] for r in inv.list()}:
            _fail(f"invalid value: device {device_id} is already in the inventory (use --replace)", 2)
        if not replace and (context / "hmac.json").exists():
            _fail(f"invalid value: {context / 'hmac.json'} exists already (use --replace)", 2)
        try:
            from keystore.store import check_name

            check_name(device_id, "device id")
        except ValueError as e:
            _fail(f"invalid value: {e}", 2)
        try:
            write_hmac_context(context, board_id or device_id, secret)
        except SecurityConfigError as e:
            _fail(f"invalid value: {e}", 2)
        security = "hmac"
    elif security == "hmac" and not (context / "hmac.json").exists():
        raise click.BadParameter(f"no {context / 'hmac.json'}: give the board's commissioning secret",
                                 param_hint="--hmac-secret")
    if security == "auto":
        found = detect_method(context)
        if uri.startswith("coaps://"):
            security = "dtls-psk" if (context / "dtls.json").exists() else "none"
        else:
            security = found if found in ("oscore", "hmac") else "none"
        if security == "none":
            click.echo(f"WARNING: no {'DTLS-PSK' if uri.startswith('coaps://') else 'OSCORE'} context in {context}; "
                       "requests to this device are unauthenticated (the device refuses them unless --insecure)",
                       err=True)
    try:
        rec = inv.add(device_id, uri, security=security, context=str(context) if security != "none" else None,
                      subject=subject, san=san, key_type=key_type, name=cred_name, domain=domain, profile=profile,
                      replace=replace)
    except InventoryError as e:
        _fail(f"invalid value: {e}", 2)
    click.echo(_json.dumps(rec, indent=1) if ctx.obj.json else f"added {device_id} ({uri}, {security})")


@clm.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_devices(ctx, as_json):
    """The inventory: identity, URI, security, state, certificate not-after, last error."""
    rows = _inventory(ctx).list()
    if as_json or ctx.obj.json:
        click.echo(_json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no devices (add one with 'devagent clm add-device')")
        return
    click.echo(f"{'DEVICE':16} {'STATE':16} {'NOT AFTER':26} {'SECURITY':9} {'URI':28} LAST ERROR")
    for r in rows:
        click.echo(f"{r['id']:16} {r['state']:16} {(r.get('not_after') or '-'):26} {r['security']:9} "
                   f"{r['uri']:28} {(r.get('last_error') or '')[:60]}")


def upstream_options(f):
    opts = [
        click.option("--upstream", required=True,
                     help="lab:LAB_DIR (test CA), est:https://HOST/.well-known/est or cmp:http://HOST/PATH."),
        click.option("--domain", default=None, help="Default domain for devices without one."),
        click.option("--profile", default=None, help="Certificate profile / EST label / CMP profile."),
        click.option("--lifetime", type=int, default=None, help="lab: certificate lifetime in seconds."),
        click.option("--trust", "trust_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="CA root(s) issued certificates must chain to (pre-verification; sent to devices)."),
        click.option("--server-ca", "server_ca", multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="Trust for the upstream server (TLS / CMP signer) [default: --trust]."),
        click.option("--credential", default=None, help="The CLM's own credential in its keystore (STATE_DIR)."),
        click.option("--username", default=None, help="EST HTTP Basic user."),
        click.option("--password", default=None, help="EST password as env:VAR, file:PATH or pass:TEXT."),
        click.option("--reference", default=None, help="CMP MAC senderKID."),
        click.option("--secret", default=None, help="CMP MAC secret as env:VAR, file:PATH or pass:TEXT."),
        click.option("--retries", type=click.IntRange(1, 20), default=3, show_default=True,
                     help="Attempts per device before the notification hook runs."),
        click.option("--notify", default=None, help="Command run when a device fails all attempts "
                     "(env DEVAGENT_DEVICE, DEVAGENT_ERROR)."),
        click.option("--timeout", type=click.FloatRange(0.1, 600), default=30.0, show_default=True,
                     help="Seconds per CoAP request."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def build_upstream(ctx, upstream, domain, profile, lifetime, trust_files, server_ca, credential, username, password,
                   reference, secret):
    """Build the Upstream from CLI options (the CLM's own credential comes from its keystore)."""
    from agent.clm import EnrollClientUpstream, LabUpstream
    from keystore.certs import load_certificate_file

    kind, sep, where = upstream.partition(":")
    if not sep or not where:
        raise click.BadParameter("use lab:DIR, est:URL or cmp:URL", param_hint="--upstream")
    anchors = [c for f in trust_files for c in load_certificate_file(f)]
    if kind == "lab":
        from agent.lab.ca import LabCA

        up = LabUpstream(LabCA(where), lifetime)
        if anchors:
            up.trust_anchors = lambda d, a=anchors: list(a)
        return up
    if kind not in ("est", "cmp"):
        raise click.BadParameter(f"unknown upstream {kind!r}; use lab:, est: or cmp:", param_hint="--upstream")
    from enroll_clients.base import ClientAuth, EnrollOptions
    from keystore.secrets import resolve_secret

    if not anchors:
        raise click.BadParameter("EST/CMP upstream needs --trust (the CA root for pre-verification)",
                                 param_hint="--trust")
    auth_kw = {}
    if credential:
        from keystore.store import Keystore

        ks = Keystore.open(_state(ctx))
        cred = ks.get(credential)
        auth_kw.update(certificate=cred.certificate, private_key=ks.private_key(cred.key_uri), chain=cred.chain)
        kf = ks.key_file(cred.key_uri)
        if kf:
            auth_kw.update(key_file=kf[0], key_password=kf[1])
    auth = ClientAuth(username=username, password=resolve_secret(password, "--password"),
                      reference=reference.encode() if reference else None, secret=resolve_secret(secret, "--secret"),
                      **auth_kw)
    server_anchors = tuple(c for f in server_ca for c in load_certificate_file(f)) or tuple(anchors)
    # EST: the profile is the path segment (/.well-known/est/<profile>/...), as the EST client builds it.
    opts = EnrollOptions(server=where, trust_anchors=server_anchors, domain=domain, profile=profile)
    return EnrollClientUpstream(kind, opts, auth, anchors)


def _print_stages(device_id, stages, as_json):
    if as_json:
        return
    labels = [("coap_csr_s", "1 CoAP CSR request"), ("keygen_csr_s", "2 key + CSR creation (device)"),
              ("enroll_s", "3 delegated enrollment (CLM <-> CA, incl. pre-verification)"),
              ("coap_verify_s", "4 CoAP verify"), ("cert_verify_s", "5 certificate verification (device)"),
              ("total_s", "  total")]
    click.echo(f"{device_id}: operational (attempt {stages.get('attempts', 1)})")
    for k, label in labels:
        click.echo(f"  {label:62} {stages[k] * 1000:9.1f} ms")


@clm.command("enroll")
@click.argument("devices", nargs=-1, required=True)
@upstream_options
@click.pass_context
def enroll(ctx, devices, upstream, domain, profile, lifetime, trust_files, server_ca, credential, username, password,
           reference, secret, retries, notify, timeout):
    """Delegated enrollment of DEVICES now: /csr -> upstream -> pre-verification -> /verify."""
    from agent.clm import Clm, ClmError
    from coap_services.client import CoapClient

    up = build_upstream(ctx, upstream, domain, profile, lifetime, trust_files, server_ca, credential, username,
                        password, reference, secret)
    from agent.clm import InventoryError

    inv = _inventory(ctx)
    try:
        for d in devices:
            inv.get(d)  # fail early on an unknown device
    except InventoryError as e:
        _fail(f"invalid value: {e}", 2)

    async def main():
        out, failed = {}, {}
        async with CoapClient(timeout_s=timeout) as c:
            m = Clm(inv, up, c, retries=retries, notify=notify, default_domain=domain)
            for d in devices:
                try:
                    out[d] = await m.enroll(d)
                    _print_stages(d, out[d], ctx.obj.json)
                except ClmError as e:
                    failed[d] = str(e)
                    click.echo(f"devagent: enrollment failed: {e}", err=True)
        return out, failed

    out, failed = _run(main())
    if ctx.obj.json:
        click.echo(_json.dumps({"enrolled": out, "failed": failed}, indent=1))
    if failed:
        sys.exit(EXIT_SERVER)


@clm.command("run")
@upstream_options
@click.option("--interval", type=click.FloatRange(0.1), default=60.0, show_default=True,
              help="Seconds between renewal passes.")
@click.option("--parallel", type=click.IntRange(1, 256), default=4, show_default=True)
@click.option("--fraction", type=click.FloatRange(0.05, 0.95), default=0.66, show_default=True,
              help="Renew after this fraction of the certificate lifetime.")
@click.option("--jitter", type=click.FloatRange(0, 0.4), default=0.05, show_default=True,
              help="+- this fraction of the lifetime, so a fleet does not renew at once.")
@click.option("--once", is_flag=True, help="One pass, then exit.")
@click.pass_context
def run(ctx, upstream, domain, profile, lifetime, trust_files, server_ca, credential, username, password, reference,
        secret, retries, notify, timeout, interval, parallel, fraction, jitter, once):
    """Keep every device's certificate renewed before expiry (long-lived; SIGTERM stops it cleanly)."""
    import asyncio
    import signal

    from agent.clm import Clm
    from coap_services.client import CoapClient

    up = build_upstream(ctx, upstream, domain, profile, lifetime, trust_files, server_ca, credential, username,
                        password, reference, secret)
    inv = _inventory(ctx)

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with CoapClient(timeout_s=timeout) as c:
            m = Clm(inv, up, c, retries=retries, notify=notify, fraction=fraction, jitter=jitter,
                    default_domain=domain)
            return await m.run(interval_s=interval, parallel=parallel, once=once, stop=stop)

    results = _run(main())
    if ctx.obj.json:
        click.echo(_json.dumps(results, indent=1))
    elif once:
        for d, r in sorted(results.items()):
            click.echo(f"{d}: {r}")
    if once and any(r != "ok" for r in results.values()):
        sys.exit(EXIT_SERVER)
