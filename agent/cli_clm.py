"""Click commands of the edge CLM (``devagent clm …``): inventory, delegated enrollment, renewal scheduling.

Loaded lazily by ``agent.cli``; aiocoap and the database client are imported only when a command runs.
``ctx.obj`` is the root group's App (``state_dir``, ``json``, ``verbose``, ``config()``).

The inventory is ``--inventory`` > ``DEVAGENT_CLM_INVENTORY`` > ``[clm] inventory`` in agent.toml >
``CLM_DIR/inventory.sqlite`` (see ``agent.inventory``).
"""
from __future__ import annotations

import json as _json
import sys
from pathlib import Path

import click

from agent.cli_coap import EXIT_CONFIG, EXIT_SERVER, _fail, _run, _state

EXIT_USAGE = 2
EXIT_KEYSTORE = 3
EXIT_NETWORK = 6


@click.group("clm")
@click.option("--clm-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="CLM state (device contexts, the default SQLite inventory) [default: STATE_DIR/clm].")
@click.option("--inventory", "inventory_spec", default=None, metavar="SPEC",
              help="sqlite:PATH or postgresql://USER@HOST[:PORT]/DB (several workers) [default: "
                   "$DEVAGENT_CLM_INVENTORY, else [clm] inventory in agent.toml, else CLM_DIR/inventory.sqlite].")
@click.pass_context
def clm(ctx, clm_dir, inventory_spec):
    """Edge CLM: delegated enrollment and renewal of constrained devices over CoAP."""
    ctx.meta["clm_dir"] = clm_dir or _state(ctx) / "clm"
    ctx.meta["inventory_spec"] = inventory_spec


def _inventory_spec(ctx) -> str | None:
    spec = ctx.meta.get("inventory_spec")
    if spec:
        return spec
    config = getattr(ctx.obj, "config", None)
    if config is None:  # a bare App stand-in (tests)
        import os

        return os.environ.get("DEVAGENT_CLM_INVENTORY") or None
    return config().clm_inventory or None


def _inventory(ctx):
    """Open the inventory; a bad location or an unreachable database ends the command with a clear error."""
    from agent.inventory import InventoryError, InventorySpecError, InventoryUnavailableError, open_inventory

    try:
        inv = open_inventory(_inventory_spec(ctx), ctx.meta["clm_dir"])
    except InventorySpecError as e:
        _fail(f"configuration error: {e}", EXIT_CONFIG)
    except InventoryUnavailableError as e:
        _fail(f"network error: {e}", EXIT_NETWORK)
    except InventoryError as e:
        _fail(f"inventory error: {e}", EXIT_CONFIG)
    ctx.call_on_close(inv.close)
    return inv


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
@click.option("--opcua", is_flag=True, help="An OPC UA device (opc.tcp://HOST:PORT/PATH) managed by Part 12 push "
              "management ('devagent opcua serve' or any OPC UA server with ServerConfiguration); docs/opcua.md.")
@click.option("--server-fingerprint", default=None, help="--opcua: sha256:HEX of the device's current (first, "
              "self-signed) application certificate, accepted once; afterwards it must chain to --trust.")
@click.option("--application-uri", default=None, help="--opcua: the device's applicationUri [default: the one its "
              "endpoint describes].")
@click.pass_context
def add_device(ctx, device_id, uri, security, hmac_secret, board_id, context, subject, san, key_type, cred_name,
               domain, profile, replace, opcua, server_fingerprint, application_uri):
    """Register a device (state "not operational")."""
    from agent.inventory import InventoryError
    from coap_services.errors import SecurityConfigError
    from coap_services.security import write_hmac_context

    inv = _inventory(ctx)
    if opcua or server_fingerprint or application_uri:
        _add_opcua_device(ctx, inv, device_id, uri, security, hmac_secret, subject, san, key_type, cred_name, domain,
                          profile, replace, opcua, server_fingerprint, application_uri)
        return
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
        if not replace and _exists(inv, device_id):
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
        security = _auto_security(uri, context)
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


def _add_opcua_device(ctx, inv, device_id, uri, security, hmac_secret, subject, san, key_type, cred_name, domain,
                      profile, replace, opcua, server_fingerprint, application_uri):
    import re

    from agent.inventory import InventoryError

    if not opcua:
        raise click.BadParameter("only with --opcua", param_hint="--server-fingerprint/--application-uri")
    if security not in ("auto", "opcua") or hmac_secret:
        raise click.BadParameter("an OPC UA device is secured by its own secure channel", param_hint="--security")
    if san or cred_name:
        raise click.BadParameter("the device puts its applicationUri and hostnames in the SAN and names the "
                                 "credential itself", param_hint="--san/--name")
    kt = {"rsa2048": "rsa", "rsa": "rsa", "p256": "p256", "p384": "p384", None: None}.get(key_type, "?")
    if kt == "?":
        raise click.BadParameter(f"{key_type!r}: an OPC UA certificate type is rsa (RSA-2048), p256 or p384",
                                 param_hint="--key-type")
    if server_fingerprint and not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", server_fingerprint):
        raise click.BadParameter("sha256: followed by 64 hex digits (as 'devagent opcua serve' logs it)",
                                 param_hint="--server-fingerprint")
    extra = {k: v for k, v in (("server_fingerprint", server_fingerprint and server_fingerprint.lower()),
                               ("application_uri", application_uri)) if v}
    try:
        rec = inv.add(device_id, uri, security="opcua", context=None, subject=subject, san=(), key_type=kt,
                      domain=domain, profile=profile, replace=replace, opcua=extra)
    except InventoryError as e:
        _fail(f"invalid value: {e}", 2)
    click.echo(_json.dumps(rec, indent=1) if ctx.obj.json else f"added {device_id} ({uri}, OPC UA push)")


def _auto_security(uri: str, context: Path) -> str:
    """The security method the context directory provides for ``uri`` (OSCORE/HMAC for coap://, DTLS-PSK for
    coaps://), else "none"."""
    from coap_services.security import detect_method

    if uri.startswith("coaps://"):
        return "dtls-psk" if (context / "dtls.json").exists() else "none"
    found = detect_method(context)
    return found if found in ("oscore", "hmac") else "none"


IMPORT_FIELDS = ("id", "uri", "security", "context", "subject", "san", "key_type", "name", "domain", "profile")


def _import_rows(source, fmt: str):
    """(line number, dict) from JSON lines or CSV with a header row. Raises click.BadParameter naming the line."""
    import csv

    try:
        text = source.read()
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"not UTF-8 text (byte {e.start}: {e.reason})", param_hint="SOURCE") from None
    if fmt == "auto":
        fmt = "jsonl" if text.lstrip().startswith("{") else "csv"
    if fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = _json.loads(line)
            except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
                raise click.BadParameter(f"line {n}: not JSON ({e})", param_hint="SOURCE") from None
            if not isinstance(row, dict):
                raise click.BadParameter(f"line {n}: not a JSON object", param_hint="SOURCE")
            yield n, {k: v for k, v in row.items() if v is not None}  # null = not given
        return
    reader = csv.DictReader(text.splitlines(), restkey=CSV_EXTRA)
    try:
        header = reader.fieldnames
        unknown = set(header or ()) - set(IMPORT_FIELDS)
        if not header or "id" not in header or "uri" not in header:
            raise click.BadParameter("CSV needs a header row with at least id and uri", param_hint="SOURCE")
        if unknown:
            raise click.BadParameter(f"CSV column(s) {', '.join(sorted(unknown))} unknown; use "
                                     f"{', '.join(IMPORT_FIELDS)}", param_hint="SOURCE")
        for n, row in enumerate(reader, 2):
            if CSV_EXTRA in row:
                raise click.BadParameter(f"line {n}: {len(row[CSV_EXTRA])} more field(s) than the header row has "
                                         "columns", param_hint="SOURCE")
            row = {k: v for k, v in row.items() if v not in (None, "")}
            if "san" in row:
                row["san"] = row["san"].split()
            yield n, row
    except csv.Error as e:  # a NUL byte, a field over the csv module's size limit ...
        raise click.BadParameter(f"line {reader.line_num + 1}: not CSV ({e})", param_hint="SOURCE") from None


CSV_EXTRA = "\0extra"  # DictReader's key for the fields of a row beyond the header's columns


def _check_row_types(n: int, row: dict) -> None:
    """Every field is text, ``san`` a list of texts (JSON lines can carry any type)."""
    for k, v in row.items():
        if k == "san":
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                _fail(f"invalid value: line {n}: 'san' must be a list of strings like \"dns:dev1.plant\"; nothing "
                      "was imported", 2)
        elif not isinstance(v, str):
            _fail(f"invalid value: line {n}: {k!r} must be a string, not {type(v).__name__}; nothing was imported",
                  2)


@clm.command("import")
@click.argument("source", type=click.File("r"))
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "csv"]), default="auto", show_default=True,
              help="JSON lines (one object per line) or CSV with a header row.")
@click.option("--replace", is_flag=True, help="Replace devices that are in the inventory already.")
@click.pass_context
def import_devices(ctx, source, fmt, replace):
    """Add many devices at once from SOURCE ('-' for stdin), all or nothing.

    Fields (JSON keys or CSV columns): id, uri (required), security (auto|oscore|dtls-psk|hmac|none, default auto:
    from the context directory), context (default CLM_DIR/contexts/ID), subject, san (a list; in CSV separated by
    spaces), key_type, name, domain, profile. A bad row names its line, and nothing is stored."""
    from agent.inventory import InventoryError, new_record

    inv = _inventory(ctx)
    records = []
    for n, row in _import_rows(source, fmt):
        extra = set(row) - set(IMPORT_FIELDS)
        if extra:
            _fail(f"invalid value: line {n}: unknown field(s) {', '.join(sorted(extra))}; nothing was imported", 2)
        if not isinstance(row.get("id"), str) or not isinstance(row.get("uri"), str):
            _fail(f"invalid value: line {n}: 'id' and 'uri' are required; nothing was imported", 2)
        _check_row_types(n, row)
        context = Path(row.get("context") or inv.dir / "contexts" / row["id"])
        security = row.get("security") or "auto"
        if security == "auto":
            security = _auto_security(row["uri"], context)
        fields = {k: row[k] for k in ("subject", "key_type", "name", "domain", "profile") if k in row}
        try:
            records.append(new_record(row["id"], row["uri"], security=security,
                                      context=str(context) if security != "none" else None,
                                      san=tuple(row.get("san") or ()), **fields))
        except (InventoryError, TypeError) as e:
            _fail(f"invalid value: line {n}: {e}; nothing was imported", 2)
    from collections import Counter

    dup = sorted(i for i, k in Counter(r["id"] for r in records).items() if k > 1)
    if dup:
        _fail(f"invalid value: device(s) {', '.join(dup[:5])} appear more than once; nothing was imported", 2)
    try:
        n = inv.add_many(records, replace=replace)
    except InventoryError as e:
        _fail(f"invalid value: {e}; nothing was imported", 2)
    unprotected = sum(1 for r in records if r["security"] == "none")
    if unprotected:
        click.echo(f"WARNING: {unprotected} device(s) without a security context: requests to them are "
                   "unauthenticated (devices refuse them unless --insecure)", err=True)
    click.echo(_json.dumps({"imported": n}) if ctx.obj.json else f"imported {n} device(s)")


def _exists(inv, device_id: str) -> bool:
    from agent.inventory import InventoryError

    try:
        inv.get(device_id)
        return True
    except InventoryError:
        return False


def _when(text: str | None, param: str):
    """--due-before: ISO 8601, 'now', or now+DURATION (s, m, h, d)."""
    import datetime
    import re

    if text is None:
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    m = re.fullmatch(r"now(?:\+(\d+(?:\.\d+)?)([smhd]))?", text.strip())
    if m:
        if not m.group(1):
            return now
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return now + datetime.timedelta(seconds=float(m.group(1)) * mult)
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: use an ISO 8601 time (2026-06-01T00:00Z), now or now+7d",
                                 param_hint=param) from None
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


@clm.command("list")
@click.option("--state", type=click.Choice(["operational", "not operational"]), default=None,
              help="Only devices in this state.")
@click.option("--due-before", default=None, metavar="TIME",
              help="Only devices due for (re)enrollment by TIME: ISO 8601, now, or now+DURATION (30m, 12h, 7d).")
@click.option("--due", is_flag=True, help="Only devices due now (same as --due-before now).")
@click.option("--error", default=None, metavar="TEXT", help="Only devices whose last error contains TEXT.")
@click.option("--failing", is_flag=True, help="Only devices with a last error.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many rows.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_devices(ctx, state, due_before, due, error, failing, limit, as_json):
    """The inventory: identity, URI, security, state, certificate not-after, next due, last error."""
    from agent.inventory import InventoryError

    when = _when("now" if due and due_before is None else due_before, "--due-before")
    try:
        rows = _inventory(ctx).list(state=state, due_before=when, error=error, failing=failing, limit=limit)
    except InventoryError as e:
        _fail(f"inventory error: {e}", EXIT_NETWORK)
    if as_json or ctx.obj.json:
        click.echo(_json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no devices" + (" match" if (state or when or error or failing) else
                                   " (add one with 'devagent clm add-device')"))
        return
    click.echo(f"{'DEVICE':16} {'STATE':16} {'NOT AFTER':20} {'DUE':20} {'SECURITY':9} {'URI':28} LAST ERROR")
    for r in rows:
        click.echo(f"{r['id']:16} {r['state']:16} {_short(r.get('not_after')):20} {_short(r.get('due_at'), 'now'):20} "
                   f"{r['security']:9} {r['uri']:28} {(r.get('last_error') or '')[:60]}")


def _short(iso: str | None, none: str = "-") -> str:
    return iso[:19].replace("T", " ") if iso else none


@clm.command("status")
@click.argument("device", required=False)
@click.option("--pem", is_flag=True, help="With DEVICE: print the certificate chain last issued to it.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx, device, pem, as_json):
    """The fleet at a glance (devices by state, due now, failing, leases per worker), or one DEVICE."""
    from agent.inventory import InventoryError

    inv = _inventory(ctx)
    try:
        if device is None:
            if pem:
                raise click.BadParameter("needs a DEVICE", param_hint="--pem")
            out = inv.summary()
        else:
            out = inv.get(device)
            cert_pem = inv.certificate(device)
    except InventoryError as e:
        _fail(f"invalid value: {e}" if "no device" in str(e) else f"inventory error: {e}",
              EXIT_USAGE if "no device" in str(e) else EXIT_NETWORK)
    if device is not None and pem:
        if not cert_pem:
            _fail(f"device {device} has no certificate yet", EXIT_SERVER)
        click.echo(cert_pem.decode(), nl=False)
        return
    if as_json or ctx.obj.json:
        click.echo(_json.dumps(out, indent=1))
        return
    if device is None:
        click.echo(f"inventory   {out['inventory']}")
        click.echo(f"devices     {out['devices']} ("
                   + ", ".join(f"{n} {s}" for s, n in sorted(out['by_state'].items())) + ")")
        click.echo(f"due now     {out['due_now']}")
        click.echo(f"failing     {out['failing']} (devagent clm list --failing)")
        click.echo(f"next due    {out['next_due'] or '-'}")
        click.echo("leases      " + (", ".join(f"{w}: {n}" for w, n in sorted(out['leased'].items())) or "none"))
        return
    for k, v in out.items():
        click.echo(f"{k:16} {v if v is not None else '-'}")


@clm.command("renew")
@click.argument("devices", nargs=-1)
@click.option("--all", "all_devices", is_flag=True, help="Every device in the inventory.")
@click.pass_context
def renew(ctx, devices, all_devices):
    """Make DEVICES (or --all) due now: the 'clm run' workers renew them at their next look (after a CA
    compromise, a profile change, or to rekey a fleet). Use 'clm enroll' to renew one device right here."""
    if bool(devices) == all_devices:
        raise click.UsageError("give DEVICE names or --all")
    inv = _inventory(ctx)
    if devices:
        missing = [d for d in devices if not _exists(inv, d)]
        if missing:
            _fail(f"invalid value: no device {', '.join(map(repr, missing))} in the inventory; nothing changed",
                  EXIT_USAGE)
    n = inv.set_due(list(devices) if devices else None)
    click.echo(f"{n} device(s) due now")


@clm.command("remove-device")
@click.argument("device")
@click.pass_context
def remove_device(ctx, device):
    """Forget a device (its context directory and the device itself are left alone)."""
    if not _inventory(ctx).remove(device):
        _fail(f"invalid value: no device {device!r} in the inventory", EXIT_USAGE)
    click.echo(f"removed {device}")


def _tls_trust(files) -> tuple:
    """--tls-trust files -> their CA certificates; a file that is not certificates or has no CA is a usage error."""
    from keystore.certs import load_certificate_file
    from keystore.errors import KeystoreError
    from keystore.validator import is_ca

    out = []
    for f in files or ():
        try:
            certs = [c for c in load_certificate_file(str(f)) if is_ca(c)]
        except KeystoreError as e:
            raise click.BadParameter(str(e), param_hint="--tls-trust") from None
        if not certs:
            raise click.BadParameter(f"{f}: no CA certificate in it (the CA that issued the server's TLS "
                                     "certificate)", param_hint="--tls-trust")
        out += certs
    return tuple(out)


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
        click.option("--tls-trust", "tls_trust_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="CA of the upstream server's TLS certificate when it is another (a TLS front with a site "
                          "PKI): EST TLS, CMP over https:// [EST: --server-ca; CMP: the system trust store]."),
        click.option("--credential", default=None, help="The CLM's own credential in its keystore (STATE_DIR)."),
        click.option("--opcua-credential", default=None, help="OPC UA devices: the CLM's application certificate "
                     "(a credential in its keystore with its applicationUri in the SAN; the devices give its subject "
                     "or issuer the SecurityAdmin role)."),
        click.option("--username", default=None, help="EST HTTP Basic user."),
        click.option("--password", default=None, help="EST password as env:VAR, file:PATH or pass:TEXT."),
        click.option("--reference", default=None, help="CMP MAC senderKID."),
        click.option("--secret", default=None, help="CMP MAC secret as env:VAR, file:PATH or pass:TEXT."),
        click.option("--implicit-confirm/--no-implicit-confirm", "implicit_confirm", default=False,
                     help="CMP: ask for implicitConfirm (no certConf round trip when granted)."),
        click.option("--recipient", default=None, help="CMP: recipient DN (RFC 4514 or /CN=...) [NULL-DN]."),
        click.option("--mac-alg", default=None, metavar="hmac-sha1|hmac-sha256|...",
                     help="CMP: HMAC of the MAC protection [hmac-sha256]; hmac-sha1 for servers that want it."),
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
                   reference, secret, implicit_confirm=False, recipient=None, mac_alg=None, tls_trust_files=()):
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
        ks = ctx.obj.keystore()  # the configured TPM TCTI / PKCS#11 module of the CLM's own key
        cred = _open_credential(ks, credential, "--credential")
        auth_kw.update(certificate=cred.certificate, private_key=ks.private_key(cred.key_uri), chain=cred.chain)
        kf = ks.key_file(cred.key_uri)
        if kf:
            auth_kw.update(key_file=kf[0], key_password=kf[1])
    auth = ClientAuth(username=username, password=resolve_secret(password, "--password"),
                      reference=reference.encode() if reference else None, secret=resolve_secret(secret, "--secret"),
                      **auth_kw)
    server_anchors = tuple(c for f in server_ca for c in load_certificate_file(f)) or tuple(anchors)
    tls = _tls_trust(tls_trust_files)
    # EST: the profile is the path segment (/.well-known/est/<profile>/...), as the EST client builds it.
    extra = {}
    if tls and kind == "est":  # TLS by the front's CA; the issued chain by the server / domain anchors
        server_anchors, extra["ca_anchors"] = tls, server_anchors
    elif tls:  # CMP over https: these authenticate the TLS server; the response signer stays --server-ca/--trust
        extra["tls_verify"] = tls
        extra["tls_trust_source"] = f"--tls-trust {', '.join(map(str, tls_trust_files))}"
    if kind == "cmp" and mac_alg:
        from enroll_clients.cmp.algs import mac_hash_name

        try:
            mac_hash_name(mac_alg)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--mac-alg") from None
        extra["mac_alg"] = mac_alg.lower()
    rcpt = None
    if kind == "cmp" and recipient:
        from keystore.csr import parse_subject

        try:
            rcpt = parse_subject(recipient)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--recipient") from None
    opts = EnrollOptions(server=where, trust_anchors=server_anchors, domain=domain, profile=profile,
                         implicit_confirm=bool(implicit_confirm), recipient=rcpt, extra=extra)
    return EnrollClientUpstream(kind, opts, auth, anchors)


def _open_credential(ks, name: str, option: str):
    """The CLM's own credential with its key opened (agent.clm.open_credential); an unusable one ends the command
    here, at start-up, before any device is leased (exit 3, naming the credential, its key URI and what failed)."""
    from agent.clm import CredentialKeyError, open_credential

    try:
        return open_credential(ks, name, option)
    except CredentialKeyError as e:
        _fail(f"keystore error: {e}", EXIT_KEYSTORE)


def _opcua_identity(ctx, name):
    """The CLM's OPC UA client identity from its keystore (--opcua-credential), its key opened; or None."""
    if not name:
        return None
    from agent.opcua.clm_push import identity_from_keystore
    from agent.opcua.errors import OpcuaError
    from keystore.errors import KeystoreError

    ks = ctx.obj.keystore()
    _open_credential(ks, name, "--opcua-credential")
    try:
        return identity_from_keystore(ks, name)
    except (KeystoreError, OpcuaError) as e:
        raise click.BadParameter(str(e), param_hint="--opcua-credential") from None


def _print_stages(device_id, stages, as_json):
    if as_json:
        return
    if "apply_s" in stages:  # OPC UA push management
        labels = [("connect_s", "  secure channel + session"), ("csr_s", "1+2 CreateSigningRequest (device keygen + CSR)"),
                  ("enroll_s", "3 enrollment CLM <-> CA (incl. pre-verification)"),
                  ("update_s", "4+5 UpdateCertificate (device verification)"), ("trustlist_s", "  TrustList"),
                  ("apply_s", "  ApplyChanges (device commit + deployment)"), ("total_s", "  total")]
        click.echo(f"{device_id}: operational (attempt {stages.get('attempts', 1)})")
        for k, label in labels:
            click.echo(f"  {label:62} {stages[k] * 1000:9.1f} ms")
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
def enroll(ctx, devices, upstream, domain, profile, lifetime, trust_files, server_ca, tls_trust_files, credential,
           opcua_credential, username, password, reference, secret, implicit_confirm, recipient, mac_alg, retries,
           notify, timeout):
    """Delegated enrollment of DEVICES now: /csr -> upstream -> pre-verification -> /verify.

    Each device is leased for the enrollment, so a 'clm run' worker on the same inventory leaves it alone."""
    from agent.clm import Clm, ClmError
    from agent.inventory import InventoryError
    from coap_services.client import CoapClient

    up = build_upstream(ctx, upstream, domain, profile, lifetime, trust_files, server_ca, credential, username,
                        password, reference, secret, implicit_confirm, recipient, mac_alg, tls_trust_files)
    identity = _opcua_identity(ctx, opcua_credential)  # both credentials checked before any device is leased
    inv = _inventory(ctx)
    try:
        for d in devices:
            inv.get(d)  # fail early on an unknown device
    except InventoryError as e:
        _fail(f"invalid value: {e}", 2)

    async def main():
        out, failed = {}, {}
        async with CoapClient(timeout_s=timeout) as c:
            m = Clm(inv, up, c, retries=retries, notify=notify, default_domain=domain,
                    opcua_identity=identity)
            try:
                for d in devices:
                    try:
                        out[d] = await m.enroll(d)
                        _print_stages(d, out[d], ctx.obj.json)
                    except (ClmError, InventoryError) as e:
                        failed[d] = str(e)
                        click.echo(f"devagent: enrollment failed: {e}", err=True)
            finally:
                m.close()
        return out, failed

    out, failed = _run(main())
    if ctx.obj.json:
        click.echo(_json.dumps({"enrolled": out, "failed": failed}, indent=1))
    if failed:
        sys.exit(EXIT_SERVER)


@clm.command("run")
@upstream_options
@click.option("--interval", type=click.FloatRange(0.1), default=60.0, show_default=True,
              help="Longest sleep between looks at the inventory (the worker wakes earlier when a device falls "
                   "due); also how soon devices added by another process are noticed.")
@click.option("--parallel", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Renewals in flight at once in this worker.")
@click.option("--fraction", type=click.FloatRange(0.05, 0.95), default=0.66, show_default=True,
              help="Renew after this fraction of the certificate lifetime.")
@click.option("--jitter", type=click.FloatRange(0, 0.4), default=0.05, show_default=True,
              help="+- this fraction of the lifetime, so a fleet does not renew at once.")
@click.option("--lease", "lease_s", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
              help="Seconds a claimed device stays leased to this worker without a heartbeat; a dead worker's "
                   "devices are taken over by another after this.")
@click.option("--worker-id", default=None, help="Name of this worker in leases and 'clm status' [default: HOST-PID].")
@click.option("--once", is_flag=True, help="Renew what is due now, then exit.")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path), default=None, hidden=True,
              help="Write 'ready' here once the inventory is open (tests).")
@click.pass_context
def run(ctx, upstream, domain, profile, lifetime, trust_files, server_ca, tls_trust_files, credential, opcua_credential,
        username, password, reference, secret, implicit_confirm, recipient, mac_alg, retries, notify, timeout, interval,
        parallel, fraction, jitter, lease_s, worker_id, once, ready_file):
    """Keep every device's certificate renewed before expiry (long-lived; SIGTERM stops it cleanly).

    Several workers (on one or more machines, with a postgresql:// inventory) share the fleet: each claims due
    devices under a lease, so no device is renewed by two at once."""
    import asyncio
    import signal

    from agent.clm import Clm
    from coap_services.client import CoapClient

    up = build_upstream(ctx, upstream, domain, profile, lifetime, trust_files, server_ca, credential, username,
                        password, reference, secret, implicit_confirm, recipient, mac_alg, tls_trust_files)
    identity = _opcua_identity(ctx, opcua_credential)  # both credentials checked before any device is leased
    inv = _inventory(ctx)
    if not once:
        from agent.cli import long_lived

        long_lived()

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with CoapClient(timeout_s=timeout) as c:
            m = Clm(inv, up, c, retries=retries, notify=notify, fraction=fraction, jitter=jitter,
                    default_domain=domain, worker_id=worker_id, lease_s=lease_s,
                    opcua_identity=identity)
            if ready_file is not None:
                from keystore import fsutil

                fsutil.atomic_write(ready_file, f"{m.worker_id}\n".encode())
            try:
                return await m.run(interval_s=interval, parallel=parallel, once=once, stop=stop)
            finally:
                m.close()

    results = _run(main())
    if ctx.obj.json:
        click.echo(_json.dumps(results, indent=1))
    elif once:
        for d, r in sorted(results.items()):
            click.echo(f"{d}: {r}")
    if once and any(r != "ok" for r in results.values()):
        sys.exit(EXIT_SERVER)
