"""The ``devagent`` command line (click).

Parses options, calls the lifecycle layer with one ``asyncio.run``, prints results (text or ``--json``), and
maps each error root to a documented exit code. Heavy modules (cryptography, pyasn1, httpx, aiocoap) are
imported inside commands so that ``devagent --help`` starts fast on a Raspberry Pi Zero.

Exit codes (README "Exit codes"): 0 ok, 1 internal error, 2 usage, 3 keystore, 4 certificate rejected,
5 server refused / protocol error, 6 network, 7 configuration, 8 stored but the CA's CMP confirmation was
not authenticated, 130 interrupted.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys
from pathlib import Path

import click

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_KEYSTORE, EXIT_REJECTED, EXIT_SERVER, EXIT_NETWORK, EXIT_CONFIG = range(8)
# Stored, but the CA's confirmation (CMP pkiConf after our certConf) could not be authenticated.
EXIT_UNCONFIRMED = 8
EXIT_INTERRUPTED = 130

# Subcommands that live in their own modules, imported only when used (not even for --help).
LAZY_COMMANDS = {
    "serve": "agent.cli_coap:serve",
    "coap": "agent.cli_coap:coap",
    "clm": "agent.cli_clm:clm",
    "run": "agent.cli_ops:run",
    "profile": "agent.cli_ops:profile",
    "decommission": "agent.cli_ops:decommission",
    "mpy": "agent.cli_mpy:mpy",
    "opcua": "agent.cli_opcua:opcua",
}
LAZY_HELP = {
    "serve": "Run the CoAP device services (/csr, /verify, /status) for delegated enrollment.",
    "coap": "CoAP security material: provision OSCORE contexts / DTLS PSKs.",
    "clm": "Edge CLM role: device inventory, delegated enrollment and renewal over CoAP.",
    "run": "Lifecycle daemon: renew credentials before expiry, CA rollover, hooks, metrics.",
    "profile": "Board profiles: list, show, detect.",
    "decommission": "Revoke, delete keys, wipe the keystore (audit record kept).",
    "mpy": "MicroPython boards: serial bridge (CLM over USB/UART) and deployment.",
    "opcua": "OPC UA push management (Part 12): ServerConfiguration endpoint for a GDS or the CLM.",
}


@dataclasses.dataclass
class App:
    """The global options of one ``devagent`` invocation; the configuration is loaded when a command first needs it."""

    state_dir_option: Path | None = None  # --state-dir as given (None: not given); see ``state_dir``
    json: bool = False
    verbose: bool = False
    config_path: str | None = None
    board_profile: str | None = None
    _config: object = None

    @property
    def state_dir(self) -> Path:
        """The effective keystore directory: --state-dir > DEVAGENT_STATE_DIR > config file [keystore] path >
        board profile > default, resolved by agent.config like every other key, and only when a command needs it."""
        if self.state_dir_option is not None:
            return Path(self.state_dir_option)
        return Path(self.config().keystore_path)

    def keystore(self):
        from keystore.store import Keystore

        return Keystore.open(self.state_dir, self.backend_options(),
                             pending_max_age_s=self.config().keystore_pending_max_age_s)

    def key_backend(self, option: str | None) -> str:
        """Where new keys are generated: --key-backend, else ``key.backend`` of the effective config (agent.toml
        [key] backend, DEVAGENT_KEY_BACKEND, board profile; default soft)."""
        if option:
            return option
        backend = self.config().key.backend
        if backend == "mpy":  # esp32 / picow: keys are made by the MicroPython agent on the board, not here
            from agent.config import ConfigError

            raise ConfigError(f"key.backend = 'mpy' (from {self.config().sources.get('key.backend', 'default')}) is "
                              "the MicroPython agent's key backend; devagent generates soft, tpm or pkcs11 keys: "
                              "give --key-backend or set key.backend")
        return backend

    def key_type(self, option: str | None) -> str:
        """The type of new keys: --key-type, else ``key.algorithm`` of the effective config (agent.toml [key]
        algorithm, DEVAGENT_KEY_ALGORITHM, board profile; default p256). agent.config refuses a value that is not
        a key type when it loads the file, naming the file and the key (exit 7)."""
        return option or self.config().key.algorithm

    def backend_options(self) -> dict:
        """Key backend options from the effective config ([key] tcti/tpm_*/pkcs11_*, env DEVAGENT_KEY_*, profile).

        The older variables DEVAGENT_TPM_<OPTION> and DEVAGENT_PKCS11_<OPTION> still override single backend
        options (docs/hardware-keys.md)."""
        k = self.config().key
        opts: dict = {"tpm": {"tcti": k.tcti, "parent": k.tpm_parent, "persist": k.tpm_persist,
                              "handle_base": k.tpm_handle_base}}
        p11 = {"module": k.pkcs11_module, "token_label": k.pkcs11_token, "pin": k.pkcs11_pin}
        opts["pkcs11"] = {n: v for n, v in p11.items() if v}
        for prefix, name in (("DEVAGENT_TPM_", "tpm"), ("DEVAGENT_PKCS11_", "pkcs11")):
            opts[name].update({var[len(prefix):].lower(): v for var, v in os.environ.items() if var.startswith(prefix)})
        return opts

    def config(self):
        """Effective configuration: CLI > DEVAGENT_* env > config file > board profile (agent.config)."""
        if self._config is None:
            from agent import config as config_mod

            overrides = {"profile": self.board_profile} if self.board_profile else {}
            overrides.update(self.state_dir_override())
            self._config = config_mod.load_config(overrides, config_path=self.config_path)
        return self._config

    def state_dir_override(self) -> dict:
        """``{"keystore.path": DIR}`` when --state-dir was given (the command-line layer), else {}."""
        opt = self.state_dir_option
        return {"keystore.path": str(Path(opt).absolute())} if opt is not None else {}

    def out(self, data, text: str | None = None) -> None:
        if self.json:
            click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        elif text is not None:
            click.echo(text)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS and name not in self.commands:
                rows.append((name, LAZY_HELP.get(name, "")))
                continue
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=formatter.width - 6 - max(len(n) for n in
                                                                                          self.list_commands(ctx)))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in LAZY_COMMANDS:
            return cmd
        mod, _, attr = LAZY_COMMANDS[name].partition(":")
        resume_gc()  # serve, run, clm ... run their own event loops, some for months
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            # Help must still render when an optional part is missing; running it reports why.
            reason = str(e)

            @click.command(name, help=f"(unavailable: {reason})")
            def unavailable():
                raise click.ClickException(f"'{name}' is unavailable in this installation: {reason}")

            return unavailable

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as e:  # map error roots to exit codes; traceback only with -v
            app = ctx.obj if isinstance(ctx.obj, App) else None
            code, label = classify(e)
            click.echo(f"devagent: {label}: {e}", err=True)
            if app is not None and app.verbose:
                import traceback

                traceback.print_exc()
            elif code == EXIT_INTERNAL:
                click.echo("(run with -v for the traceback; please report this)", err=True)
            sys.exit(code)


def classify(e: BaseException) -> tuple[int, str]:
    """Map an exception to (exit code, label) by its package root."""
    mods = {type(x).__module__.split(".")[0] for x in type(e).__mro__}
    names = {x.__name__ for x in type(e).__mro__}
    if "OptionConflictError" in names or "EstConfigError" in names:  # a bad or contradicting option value
        return EXIT_USAGE, "invalid value"
    if "VerificationError" in names:
        return EXIT_REJECTED, "certificate rejected"
    if "ConfigError" in names:
        return EXIT_CONFIG, "configuration error"
    if "TransportError" in names:
        return EXIT_NETWORK, "network error"
    if "EnrollError" in names or "CoapServiceError" in names:
        return EXIT_SERVER, "enrollment failed"
    if "KeystoreError" in names or "keystore" in mods:
        return EXIT_KEYSTORE, "keystore error"
    if isinstance(e, (ValueError,)) and "agent" not in mods:
        return EXIT_USAGE, "invalid value"
    return EXIT_INTERNAL, f"internal error ({type(e).__name__})"


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keystore directory [default: $DEVAGENT_STATE_DIR, else [keystore] path of the config file, "
                   "else the board profile's (/var/lib/devagent; as non-root the XDG data dir)].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable, see README).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and tracebacks.")
@click.option("--config", "config_path", default=None, envvar="DEVAGENT_CONFIG",
              help="Config file [default: /etc/devagent/agent.toml].")
@click.option("--board-profile", default=None, envvar="DEVAGENT_PROFILE", help="Board profile name (see 'profile list').")
@click.version_option(package_name="devagent", prog_name="devagent")
@click.pass_context
def cli(ctx, state_dir, as_json, verbose, config_path, board_profile):
    """devagent: the device identity agent (IDevID/LDevID keystore, EST, CMP, CoAP delegated enrollment)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # per-request lines of HTTP/CoAP libraries are debugging noise for an operator
        for noisy in ("httpx", "httpcore", "coap", "aiocoap"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = App(state_dir_option=state_dir, json=as_json, verbose=verbose,
                  config_path=config_path, board_profile=board_profile)
    from keystore import owner  # the owner recorded with the pending keys this command makes (no arguments)

    owner.COMMAND = f"devagent {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "devagent"
    if _one_shot_process:  # a command run by ``main``: no AIO context, whose teardown at exit costs ~40 ms (fsutil)
        from keystore import fsutil

        fsutil.USE_AIO = False


# Set by ``main`` (the console script: one command per process); a command invoked in-process (click's CliRunner, an
# embedding program) leaves the process's fsutil.USE_AIO as it is.
_one_shot_process = False


def long_lived() -> None:
    """Called by the commands that run for long (``serve``, ``run`` without ``--once``, ``clm run``, ``opcua
    serve``): the keystore's concurrent fsyncs go through native AIO again (``keystore.fsutil.USE_AIO``), which
    saves ~0.2 ms per batch; a one-shot command uses the thread pool, as an AIO context costs ~40 ms at exit. Only in a
    process ``main`` runs (see ``_one_shot_process``)."""
    if _one_shot_process:
        from keystore import fsutil

        fsutil.USE_AIO = True


pass_app = click.make_pass_decorator(App)


def run_async(coro):
    import asyncio

    return asyncio.run(coro)


GC_PAUSE_MAX_S = 10.0  # the longest a command runs without cyclic garbage collection (see ``main``)


_gc_paused = False  # the collector is off because ``pause_gc`` turned it off (not someone else)


def pause_gc() -> None:
    """Pause the cyclic garbage collector while a command starts (see ``main``)."""
    import gc

    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def resume_gc() -> None:
    """End the pause of ``pause_gc`` (a collector someone else turned off stays off): what is loaded so far
    (modules, classes, tables: they live until exit) is frozen out of later collections. Idempotent; any
    thread."""
    import gc

    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


# ---- keystore ---------------------------------------------------------------------------------------
@cli.group()
def keystore():
    """Manage the devid keystore (credentials, keys, truststores)."""


@keystore.command("init")
@pass_app
def keystore_init(app: App):
    """Create the keystore (idempotent)."""
    from keystore.store import Keystore

    with Keystore.init(app.state_dir, app.backend_options()) as ks:
        root = ks.root
    app.out({"state_dir": str(root), "created": True}, f"keystore ready at {root}")


def _cred_line(s: dict) -> str:
    left = "REVOKED" if s.get("revoked") else "EXPIRED" if s["expired"] else f"{s['days_left']:.1f} d"
    return f"{s['name']:<20} {s['kind']:<7} {str(s['domain'] or '-'):<12} {left:>10}  {s['subject']}"


@keystore.command("list")
@pass_app
def keystore_list(app: App):
    """List credentials."""
    ks = app.keystore()
    items = [c.summary() for c in ks.list()]
    pending = [ks.pending_summary(k) for k in ks.pending_keys()]
    text = "\n".join([f"{'NAME':<20} {'KIND':<7} {'DOMAIN':<12} {'LEFT':>10}  SUBJECT"] + [_cred_line(s) for s in items])
    if pending:
        text += f"\n\n{len(pending)} pending key(s) awaiting a certificate:"
        for k in pending:
            o = k["owner"] or {}
            who = f"pid {o.get('pid')} {o.get('command') or '?'} ({o.get('state')})" if o else "owner unknown"
            text += f"\n  {k['key_uri']:<40} {k['key_type'] or '?':<8} {_age(k['age_s']):>8} old  for {k['for'] or '-'}  " \
                    f"by {who}"
    app.out({"credentials": items, "pending_keys": pending}, text)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@keystore.command("show")
@click.argument("name")
@click.option("--pem", "show_pem", is_flag=True, help="Print the certificate and chain as PEM.")
@pass_app
def keystore_show(app: App, name, show_pem):
    """Show one credential in detail."""
    from keystore.certs import pem

    cred = app.keystore().get(name)
    s = cred.summary()
    if show_pem and not app.json:
        click.echo(pem([cred.certificate, *cred.chain]).decode(), nl=False)
        return
    app.out(s, "\n".join(f"{k:<13} {v}" for k, v in s.items()))


@keystore.command("import-idevid")
@click.argument("name")
@click.option("--p12", "p12_file", type=click.Path(exists=True, dir_okay=False), help="PKCS#12 with key + cert + chain.")
@click.option("--password", help="PKCS#12 password: env:VAR, file:PATH or pass:TEXT.")
@click.option("--key", "key_file", type=click.Path(exists=True, dir_okay=False), help="PEM/DER private key.")
@click.option("--key-password", help="Password of an encrypted --key (env:/file:/pass:).")
@click.option("--key-uri", help="Key already in a TPM/PKCS#11 token (tpm:..., pkcs11:...).")
@click.option("--cert", "cert_file", type=click.Path(exists=True, dir_okay=False), help="IDevID certificate (PEM/DER).")
@click.option("--chain", "chain_file", type=click.Path(exists=True, dir_okay=False), help="Manufacturer chain (PEM).")
@click.option("--force", is_flag=True, help="Replace an existing IDevID of that name.")
@pass_app
def keystore_import_idevid(app: App, name, p12_file, password, key_file, key_password, key_uri, cert_file,
                           chain_file, force):
    """Import the manufacturer's IDevID (read-only afterwards)."""
    from keystore.certs import load_certificate_file, load_pkcs12, load_private_key
    from keystore.secrets import resolve_secret

    ks = app.keystore()
    chain = load_certificate_file(chain_file) if chain_file else []
    if p12_file:
        if key_file or key_uri or cert_file:
            raise click.UsageError("--p12 excludes --key/--key-uri/--cert")
        with open(p12_file, "rb") as f:
            key, cert, extra = load_pkcs12(f.read(), p12_file, resolve_secret(password, "--password"))
        cred = ks.import_idevid(name, cert, extra + chain, private_key=key, force=force, source=p12_file)
    else:
        if not cert_file or not (key_file or key_uri):
            raise click.UsageError("give --p12, or --cert with --key or --key-uri")
        cert = load_certificate_file(cert_file)[0]
        if key_uri:
            cred = ks.import_idevid(name, cert, chain, key_uri=key_uri, force=force, source=cert_file)
        else:
            with open(key_file, "rb") as f:
                key = load_private_key(f.read(), key_file, resolve_secret(key_password, "--key-password"))
            cred = ks.import_idevid(name, cert, chain, private_key=key, force=force, source=cert_file)
    app.out(cred.summary(), f"imported IDevID {name}: {cred.certificate.subject.rfc4514_string()}")


@keystore.command("export")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["pem", "p12"]), default="pem", show_default=True)
@click.option("--with-key", is_flag=True, help="PEM: include the private key (encrypted with --password).")
@click.option("--password", help="Password protecting the exported key: env:VAR, file:PATH or pass:TEXT.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here (0600) instead of stdout.")
@pass_app
def keystore_export(app: App, name, fmt, with_key, password, output):
    """Export a credential (certificate + chain; the key only for software keys, encrypted)."""
    from keystore import fsutil
    from keystore.secrets import resolve_secret

    data = app.keystore().export(name, fmt, password=resolve_secret(password, "--password"), with_key=with_key)
    if output:
        fsutil.atomic_write(output, data)
        app.out({"written": output}, f"wrote {output}")
    elif fmt == "p12":
        raise click.UsageError("PKCS#12 is binary: give -o FILE")
    else:
        click.echo(data.decode(), nl=False)


@keystore.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Required to delete an IDevID.")
@pass_app
def keystore_delete(app: App, name, force):
    """Delete a credential and destroy its key."""
    app.keystore().delete(name, force=force, reason="operator")
    app.out({"deleted": name}, f"deleted {name}")


@keystore.command("purge")
@click.option("--expired", is_flag=True, required=True, help="Remove credentials whose certificate has expired.")
@pass_app
def keystore_purge(app: App, expired):
    """Remove expired credentials and their keys (IDevIDs are kept)."""
    removed = app.keystore().purge_expired()
    app.out({"removed": removed}, "removed: " + (", ".join(removed) or "nothing"))


@keystore.command("trust")
@click.option("--domain", required=True)
@click.option("--purpose", type=click.Choice(["pki", "tls", "cmp", "cmp-server"]), default=None,
              help="Trust store: pki (domain CA, default for --add), tls (server TLS: EST, CMP over https), cmp (CMP "
              "signer anchors), "
              "cmp-server (pinned CMP server certificates). Listing: only this store.")
@click.option("--add", "add_file", type=click.Path(exists=True, dir_okay=False), help="Add certificate(s) from this file.")
@click.option("--remove", "remove_fp", metavar="FP", help="Remove the anchor with this sha256 fingerprint (or a unique "
              "prefix of it) from the store (every store without --purpose).")
@pass_app
def keystore_trust(app: App, domain, purpose, add_file, remove_fp):
    """List a domain's trust anchors by store, add to or remove from a store (docs/trust.md)."""
    from keystore.certs import load_certificate_file

    ks = app.keystore()
    if add_file and remove_fp:
        raise click.UsageError("--add and --remove exclude each other")
    if add_file:
        ks.add_trust_anchors(domain, load_certificate_file(add_file), source=add_file, purpose=purpose or "pki")
    if remove_fp:
        stores = ks.remove_trust_anchor(domain, remove_fp, purpose)
        click.echo(f"removed {remove_fp} from the {', '.join(stores)} store(s) of {domain}", err=True)
    recs = ks.trust_records(domain, purpose)
    app.out({"domain": domain, "anchors": recs},
            "\n".join(f"{r['fingerprint']}  {r['purpose']:<10} {r['role']:<4} {r['subject']}" for r in recs)
            or "(none)")


@keystore.command("audit")
@click.option("-n", "count", default=20, show_default=True, help="Last N entries.")
@pass_app
def keystore_audit(app: App, count):
    """Show the audit log (who/what/when)."""
    entries = app.keystore().audit_entries()[-count:]
    # The user and action columns as wide as the longest shown (at least 8 and 18), so that every line's fields
    # start in the same column: certificate-store-unsynced is 26 characters, pending-key-discard 19.
    user_w = max([8] + [len(str(e['user'])) for e in entries])
    action_w = max([18] + [len(str(e['action'])) for e in entries])
    app.out(entries, "\n".join(f"{e['ts']} {str(e['user']):<{user_w}} {str(e['action']):<{action_w}} "
                               + " ".join(f"{k}={v}" for k, v in e.items()
                                          if k not in ("ts", "user", "action", "uid", "pid")) for e in entries))


@keystore.command("seal-master-key")
@pass_app
def keystore_seal_master_key(app: App):
    """Seal the keystore master key to the TPM and remove master.key (TCTI from config/profile)."""
    ks = app.keystore()
    ks.seal_master_key("tpm")
    app.out({"master_key": "tpm"}, "master key sealed to the TPM; master.key removed")


@keystore.command("check")
@pass_app
def keystore_check(app: App):
    """Check every credential loads and matches its key; remove leftovers of interrupted writes (only when the
    check passes: files an inconsistent index does not name may be what it lost, and are kept)."""
    ks = app.keystore()
    problems = ks.check()
    removed = [] if problems else ks.gc()
    discarded = [r for r in removed if r.startswith("pending key ")]
    files = len(removed) - len(discarded)
    note = f"{files} leftover file(s) removed" + (f", {len(discarded)} orphaned pending key(s) discarded"
                                                 if discarded else "")
    app.out({"problems": problems, "removed": removed},
            "\n".join(problems + ["nothing was removed: fix the problems above, then run 'devagent keystore check' "
                                  "again"]) if problems else f"keystore OK ({note})")
    if problems:
        sys.exit(EXIT_KEYSTORE)


# ---- status -----------------------------------------------------------------------------------------
@cli.command()
@click.argument("name", required=False)
@pass_app
def status(app: App, name):
    """Every credential: kind, domain, subject, issuer, key URI, not-after, days left, next renewal, the renewal
    in progress, last error."""
    import datetime

    from agent import renewal_status

    ks = app.keystore()
    creds = [ks.get(name)] if name else ks.list()
    now = datetime.datetime.now(datetime.timezone.utc)
    items = []
    for c in creds:
        s = c.summary()
        meta = c.record.get("meta") or {}
        s["renewing"] = renewal_status.renewing(meta, now)
        s["clock"] = renewal_status.clock(meta, c.not_before, c.not_after, now)
        s["checked_at"] = renewal_status.checked_at(meta)
        items.append(s)
    lines = []
    for s in items:
        lines.append(_cred_line(s))
        lines.append(f"    issuer {s['issuer']}; key {s['key_uri']} ({s['key_type']}); not after {s['not_after']}")
        if s.get("revoked"):
            lines.append(f"    REVOKED ({s['revoked']}) at {s.get('revoked_at') or '?'}: not renewed or deployed")
        elif s.get("next_renewal"):
            lines.append(f"    next renewal {s['next_renewal']}")
        lines += renewal_status.lines(s)
        if s.get("last_error"):
            lines.append(f"    last error: {s['last_error']}")
    app.out({"credentials": items}, "\n".join(lines) or "no credentials (run 'devagent enroll')")


# ---- enrollment ---------------------------------------------------------------------------------------
_TLS_TRUST_OPTION = click.option(
    "--tls-trust", "tls_trust_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
    help="CA certificate(s) that authenticate the server's TLS certificate (EST; CMP over https://) when that is "
         "not the domain CA (reverse proxy, site PKI); kept in the domain's tls store, so renewals need no option "
         "(for CMP they replace the system trust store); repeatable.")


def _server_options(f):
    opts = [
        click.option("--protocol", type=click.Choice(["cmp", "est"]), help="Enrollment protocol."),
        click.option("--server", help="CMP: http(s)://host/path (RFC 6712); EST: https://host[:port][/base]."),
        click.option("--profile", help="Certificate profile: EST path segment after the label "
                                       "(/.well-known/est/<label>/<profile>/..., Trustpoint-style); CMP profile."),
        click.option("--label", help="EST label: /.well-known/est/<label>/..."),
        click.option("--tls-unique/--no-tls-unique", "tls_unique", default=None,
                     help="EST: bind the CSR to the TLS session, challengePassword = tls-unique (RFC 7030 §3.5; TLS "
                          "1.2), for servers that check proof-of-possession linking (libest estserver -t) [automatic "
                          "when /csrattrs asks for a challengePassword; remembered]."),
        click.option("--csrattrs", "csrattrs", type=click.Choice(["require", "use", "ignore"]), default=None,
                     help="EST /csrattrs: 'use' applies the server's attributes and goes on without them when the "
                          "answer is unusable (warning); 'require' makes that fatal; 'ignore' skips the request "
                          "[use; remembered]."),
        click.option("--trust", "trust_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="CA certificate(s) of the domain to trust (PEM/DER); repeatable."),
        _TLS_TRUST_OPTION,
        click.option("--cmp-trust", "cmp_trust_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="CMP: anchor(s) for the response signer when not the domain CA; kept in the cmp store."),
        click.option("--cmp-server-cert", "cmp_server_files", multiple=True,
                     type=click.Path(exists=True, dir_okay=False),
                     help="CMP: trust this server certificate directly as the response signer (like openssl cmp "
                     "-srvcert); kept in the cmp-server store."),
        click.option("--ca-fingerprint", help="sha256:HEX of the root to accept at bootstrap (EST /cacerts)."),
        click.option("--ref", help="CMP: reference (senderKID) for MAC protection."),
        click.option("--secret", help="CMP: shared secret for MAC protection: env:VAR, file:PATH or pass:TEXT."),
        click.option("--mac", type=click.Choice(["pbm", "pbmac1"]), default=None,
                     help="CMP MAC algorithm: RFC 4210 PasswordBasedMac or RFC 9481 PBMAC1 [pbm]."),
        click.option("--recipient", help="CMP: recipient DN (RFC 4514) [default: NULL-DN]."),
        click.option("--implicit-confirm/--no-implicit-confirm", default=None, help="CMP implicitConfirm."),
        click.option("--username", help="EST: HTTP Basic user name."),
        click.option("--password", help="EST: HTTP Basic password: env:VAR, file:PATH or pass:TEXT."),
        click.option("--reqout", type=click.Path(dir_okay=False), help="CMP file transport: write the request here."),
        click.option("--rspin", type=click.Path(dir_okay=False), help="CMP file transport: read the response from here."),
        click.option("--timeout", "timeout_s", type=float, default=None, help="Network timeout per request, seconds [30]."),
    ]
    for o in reversed(opts):
        f = o(f)
    return _cmp_options(f)


# CMP switches remembered per credential (docs/cmp.md "Options" and "Deviations"); never secrets.
CMP_REMEMBERED = ("mac_alg", "mac_owf", "mac_sender", "operation_labels", "profile_in", "tolerate_nonce_reuse",
                  "ignore_keyusage", "reuse_signer", "trusted_signer_fallback", "tls_client_auth")


def _cmp_options(f):
    """CMP protection, URL and deviation switches; on enroll/request/renew/revoke/ca-update. Remembered."""
    # Choices spelled out here: importing enroll_clients at start-up would load cryptography for --help.
    opts = [
        click.option("--mac-alg", default=None, metavar="hmac-sha1|hmac-sha256|hmac-sha384|hmac-sha512",
                     help="CMP: HMAC of the MAC protection [hmac-sha256, RFC 9481]; hmac-sha1 is OpenSSL's "
                          "default and what some servers (Trustpoint) accept."),
        click.option("--mac-owf", default=None, metavar="sha1|sha256|sha384|sha512",
                     help="CMP: one-way function of PasswordBasedMac [sha256]."),
        click.option("--mac-sender", type=click.Choice(("subject", "null-dn")), default=None,
                     help="CMP: header sender of MAC-protected requests: the requested subject, or the NULL-DN "
                          "(the server finds the secret by --ref alone) [subject]."),
        click.option("--operation-labels/--no-operation-labels", default=None,
                     help="CMP: --server is a base URL; each message goes to <server>/<label> (RFC 9483 6.1: "
                          "initialization, certification, keyupdate, p10, revocation, getcacerts, ...)."),
        click.option("--profile-in", type=click.Choice(("generalinfo", "path", "both")), default=None,
                     help="CMP: where --profile goes: generalInfo certProfile, a URL path segment before the "
                          "operation label, or both [generalinfo]."),
        click.option("--tolerate-nonce-reuse/--no-tolerate-nonce-reuse", default=None,
                     help="CMP deviation: accept a response that repeats the server's senderNonce when recipNonce "
                          "and transactionID match (docs/cmp.md) [off]."),
        click.option("--ignore-keyusage/--no-ignore-keyusage", default=None,
                     help="CMP deviation: accept a response signer (CA or RA, still validated) whose keyUsage lacks "
                          "digitalSignature, as openssl cmp -ignore_keyusage [off]."),
        click.option("--reuse-signer/--no-reuse-signer", default=None,
                     help="CMP deviation: verify a signed response without extraCerts (e.g. pkiConf) with the "
                          "signer validated earlier in the same transaction [off]."),
        click.option("--tls-client-auth/--no-tls-client-auth", default=None,
                     help="CMP over https://: present the certificate that signs the request (the IDevID with "
                          "--idevid, the LDevID on request/renew/revoke/ca-update) as the TLS client certificate, "
                          "for servers behind a TLS front that requires one (openssl cmp -tls_cert) [off; "
                          "remembered; software keys only]."),
        click.option("--trusted-signer-fallback/--no-trusted-signer-fallback", default=None,
                     help="CMP deviation: verify a signed response without extraCerts (e.g. genp) with a CMP trust "
                          "anchor or pinned server certificate named as its sender [off]."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _cmp_extra(kw) -> dict:
    """EnrollOptions.extra for the CMP switches given in ``kw`` (None = not given); checks the MAC names."""
    from enroll_clients.cmp.algs import mac_hash_name, owf_name

    out = {k: (kw[k].lower() if isinstance(kw[k], str) else kw[k]) for k in CMP_REMEMBERED if kw.get(k) is not None}
    for k, check in (("mac_alg", mac_hash_name), ("mac_owf", owf_name)):
        if k in out:
            try:
                check(out[k])
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--" + k.replace("_", "-")) from None
    return out


def _key_options(f):
    opts = [
        click.option("--key-type", default=None, help="p256, p384, rsa2048, rsa3072, rsa4096, ed25519 [key.algorithm "
                     "of the config / board profile; p256]."),
        click.option("--key-backend", type=click.Choice(["soft", "tpm", "pkcs11"]), default=None,
                     help="Where to generate the key [key.backend of the config / board profile; soft]."),
        click.option("--key", "key_ref", help="Use an existing key: a URI (tpm:/pkcs11:/file:) or a PEM file to import."),
        click.option("--server-keygen", is_flag=True, help="Let the server generate the key (EST serverkeygen, CMP central keygen)."),
        click.option("--allow-weak-keys", is_flag=True, help="Allow RSA-1024 (weak; benchmarks only)."),
        click.option("--subject", help="Subject DN (RFC 4514), e.g. 'CN=pump-7,O=Plant' [CN=<hostname>]."),
        click.option("--san", "sans", multiple=True, help="dns:NAME, ip:ADDR, uri:URI or email:ADDR; repeatable."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _options_from(app: App, ks, *, protocol, server, domain, profile, label, trust_files, ca_fingerprint, mac,
                  recipient, implicit_confirm, reqout, rspin, timeout_s, cert_template=False,
                  unprotected_requests=False, **kw):
    from enroll_clients.base import EnrollOptions
    from keystore.certs import load_certificate_file

    from agent.lifecycle import server_trust

    trust = []
    for f in trust_files or ():
        trust.extend(load_certificate_file(f))
    anchors, trust_extra = server_trust(ks, domain, protocol, trust)
    if protocol == "cmp":
        trust_extra["clock_trusted"] = _clock_trusted(app)
    return EnrollOptions(
        server=server, trust_anchors=anchors, domain=domain, profile=profile, label=label,
        timeout_s=timeout_s or 30.0, recipient=_recipient(recipient),
        implicit_confirm=bool(implicit_confirm), mac=mac or "pbm", reqout=reqout, rspin=rspin,
        ca_fingerprint=ca_fingerprint, extra={**trust_extra, **_cmp_extra(kw),
                                              **({"tls_unique": kw["tls_unique"]} if protocol == "est" and
                                                 kw.get("tls_unique") is not None else {}),
                                              **({"cert_template": True} if cert_template else {}),
                                              **({"unprotected": True} if unprotected_requests else {})})


def _clock_trusted(app) -> bool:
    """``clock.trusted`` of the configuration (default false): CMP checks messageTime against the clock only
    then; the response signer's validity is checked either way (docs/trust.md)."""
    from agent.config import ConfigError

    try:
        return bool(app.config().clock_trusted)
    except ConfigError:
        return False


def _recipient(recipient):
    """--recipient as RFC 4514 or OpenSSL's /CN=... form."""
    if not recipient:
        return None
    from keystore.csr import parse_subject

    try:
        return parse_subject(recipient)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--recipient") from None


def _remember(protocol, server, label, profile, mac, implicit_confirm, timeout_s, recipient, key_backend,
              csrattrs=None, cmp=None, tls_unique=None) -> dict:
    d = dict(protocol=protocol, server=server, label=label, profile=profile, mac=mac,
             implicit_confirm=implicit_confirm, timeout_s=timeout_s, recipient=recipient, key_backend=key_backend,
             csrattrs=csrattrs if protocol == "est" else None, tls_unique=tls_unique if protocol == "est" else None)
    d.update(cmp or {})
    return {k: v for k, v in d.items() if v is not None}


def _new_key_backend(app: App, option, key_ref, server_keygen):
    """The backend a generated key goes to (--key-backend, else key.backend of the config); irrelevant (and not
    looked up) with --key or --server-keygen."""
    return option if key_ref or server_keygen else app.key_backend(option)


def _new_key_type(app: App, option, key_ref, server_keygen):
    """The type of a generated key (--key-type, else key.algorithm of the config); with --key or --server-keygen
    only what was given (the key exists, or the server's type applies)."""
    return option if key_ref or server_keygen else app.key_type(option)


def _key_spec(ks, key_type, key_backend, key_ref, server_keygen, allow_weak, label, explicit=None):
    """``explicit``: the operator chose ``key_type`` on the command line (default: ``key_type`` was given); a type
    from the configuration is a default the EST server's /csrattrs may still change."""
    from agent.lifecycle import KeySpec
    from keystore.certs import load_private_key

    if key_ref and server_keygen:
        raise click.UsageError("--key and --server-keygen exclude each other")
    key_uri, imported = None, False
    if key_ref:
        if key_ref.split(":", 1)[0] in ("tpm", "pkcs11", "file") and not os.path.exists(key_ref):
            key_uri = ks.register_key(key_ref, label=label)
        else:
            with open(key_ref, "rb") as f:
                key_uri, imported = ks.import_key(load_private_key(f.read(), key_ref), label=label), True
    return KeySpec(key_type=key_type or "p256", backend=key_backend or "soft", key_uri=key_uri,
                   server_keygen=server_keygen, allow_weak=allow_weak,
                   explicit=bool(key_type) if explicit is None else explicit), imported


def _issue_discarding_import(ks, spec, imported: bool, coro):
    """Run the enrollment ``coro``; when it fails, a key this command imported from a PEM file (--key FILE) and
    no credential uses is discarded again (the operator still has the file): a failed enroll stores nothing."""
    try:
        return run_async(coro)
    except BaseException:
        rec = ks.key_record(spec.key_uri) if imported else None
        if rec is not None and rec.get("state") == "pending":
            try:
                ks.discard_key(spec.key_uri)
            except Exception as e:  # pragma: no cover - reported; the enrollment's error is what matters
                click.echo(f"devagent: warning: could not discard the imported key {spec.key_uri}: {e}", err=True)
        raise


def _subject_sans(subject, sans):
    import socket

    from keystore.csr import parse_san, parse_subject

    return parse_subject(subject or f"CN={socket.gethostname()}"), tuple(parse_san(s) for s in sans)


# option (its click name) -> (trust store, command-line flag)
_TRUST_STORES = {"trust_files": ("pki", "--trust"), "tls_trust_files": ("tls", "--tls-trust"),
                 "cmp_trust_files": ("cmp", "--cmp-trust"), "cmp_server_files": ("cmp-server", "--cmp-server-cert")}
_TRUST_OPTIONS = tuple(_TRUST_STORES)


def _trust_file_certs(path, opt: str) -> list:
    """The anchors a trust option's file gives (CA certificates; any certificate for --cmp-server-cert). A file
    that is not certificates, or has none usable, is a usage error naming the option and the file."""
    from keystore.certs import load_certificate_file
    from keystore.errors import KeystoreError
    from keystore.validator import is_ca

    purpose, flag = _TRUST_STORES[opt]
    try:
        certs = load_certificate_file(str(path))
    except KeystoreError as e:
        raise click.BadParameter(str(e), param_hint=flag) from None
    if purpose != "cmp-server":
        certs = [c for c in certs if is_ca(c)]
        if not certs:
            raise click.BadParameter(f"{path}: no CA certificate in it (a trust anchor is the CA certificate that "
                                     "issued the server's or the domain's certificates, basicConstraints CA:TRUE)"
                                     + ("; to trust a CMP server's own certificate use --cmp-server-cert"
                                        if purpose == "cmp" else ""), param_hint=flag)
    return certs


def _add_trust_stores(ks, domain, kw, only=_TRUST_OPTIONS, check=()) -> None:
    """--trust, --tls-trust, --cmp-trust, --cmp-server-cert into the domain's trust stores (docs/trust.md).
    Every file (also those of the ``check`` options, used for this command only) is read and checked before
    anything is stored."""
    loaded = [(opt, f, _trust_file_certs(f, opt)) for opt in (*only, *check) for f in (kw.get(opt) or ())]
    for opt, f, certs in loaded:
        if opt in only:
            ks.add_trust_anchors(domain, certs, source=str(f), purpose=_TRUST_STORES[opt][0])


def _trust_domain(cred) -> str:
    """The domain whose trust stores authenticate ``cred``'s server (lifecycle.options_for_credential)."""
    return (cred.record.get("meta", {}).get("enroll") or {}).get("server_trust_domain") or cred.domain


def _undo_trust_on_failure(f=None, *, credential_domain: bool = False):
    """A failed enroll/request (renew/revoke/ca-update/cert-template) leaves no trust anchor behind that its
    --trust, --tls-trust, --cmp-trust or --cmp-server-cert added (an EST bootstrap root accepted by fingerprint or
    confirmation stays: that trust was established on its own). ``credential_domain``: the domain is the trust
    domain of the credential named by the command's ``name`` (renew, revoke)."""
    import functools

    if f is None:
        return functools.partial(_undo_trust_on_failure, credential_domain=credential_domain)

    @functools.wraps(f)
    def wrapper(app, *args, **kw):
        files = {str(p) for o in _TRUST_OPTIONS for p in (kw.get(o) or ())}
        if not files:
            return f(app, *args, **kw)
        ks = app.keystore()
        if credential_domain:
            from agent.lifecycle import get_or_none

            cred = get_or_none(ks, kw.get("name"))
            if cred is None:
                return f(app, *args, **kw)  # it names the missing credential; nothing was added
            domain = _trust_domain(cred)
        else:
            domain = kw.get("domain")
        before = {(r["fingerprint"], r["purpose"]) for r in ks.trust_records(domain)}
        try:
            return f(app, *args, **kw)
        except SystemExit as e:
            if e.code in (0, None, EXIT_UNCONFIRMED):  # stored (an unauthenticated pkiConf still stores)
                raise
            _remove_added_trust(ks, domain, before, files)
            raise
        except BaseException:
            _remove_added_trust(ks, domain, before, files)
            raise

    return wrapper


def _remove_added_trust(ks, domain, before, files) -> None:
    for r in ks.trust_records(domain):
        if (r["fingerprint"], r["purpose"]) not in before and r.get("source") in files:
            try:
                ks.remove_trust_anchor(domain, r["fingerprint"], r["purpose"])
            except Exception as e:  # pragma: no cover - reported, the original error is what matters
                click.echo(f"devagent: warning: could not remove trust anchor {r['fingerprint']}: {e}", err=True)


def _print_cred(app: App, cred, verb: str):
    s = cred.summary()
    app.out(s, f"{verb} {s['name']} ({s['kind']}, domain {s['domain']}): {s['subject']}\n"
               f"    issuer {s['issuer']}, serial {s['serial']}, valid until {s['not_after']} ({s['days_left']} d)")


def _output_options(f):
    opts = [
        click.option("--certout", type=click.Path(dir_okay=False), help="Also write the certificate (PEM) here."),
        click.option("--chainout", type=click.Path(dir_okay=False),
                     help="Also write the issuing chain (PEM, nearest issuer first) here."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _request_options(f):
    opts = [
        click.option("--csr", "csr_file", default=None, metavar="FILE",
                     help="CMP p10cr from an existing PKCS#10 CSR (PEM/DER); its key stays where it is. Without "
                          "--key (the CSR's key, to store the credential) the certificate is verified and "
                          "written to --certout (or stdout), nothing stored."),
        click.option("--cert-template", is_flag=True, default=False,
                     help="CMP: ask for the server's certReqTemplate (genm) and apply it to the request."),
        click.option("--unprotected-requests", is_flag=True, default=False,
                     help="CMP: send requests without protection (diagnostics; servers refuse them)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return _output_options(f)


def _write_outputs(certificate, chain, certout, chainout) -> None:
    from keystore import fsutil
    from keystore.certs import pem

    if certout:
        fsutil.atomic_write(certout, pem([certificate]), mode=0o644)
    if chainout:
        fsutil.atomic_write(chainout, pem(list(chain)), mode=0o644)


def _unconfirmed_exit(app: App, cred) -> None:
    """After a positive certConf, a pkiConf we could not verify: the certificate is stored (it passed all our
    checks; discarding it would orphan it on the CA), but say so and exit EXIT_UNCONFIRMED."""
    why = (cred.record.get("meta") or {}).get("unconfirmed")
    if why:
        click.echo(f"devagent: warning: {cred.name} was stored, but the CA's confirmation was NOT authenticated: "
                   f"{why}. Check with the CA operator that the certificate is active (exit code "
                   f"{EXIT_UNCONFIRMED}).", err=True)
        sys.exit(EXIT_UNCONFIRMED)


def _load_csr(csr_file: str):
    from cryptography import x509

    if not csr_file:
        raise click.UsageError("--csr: missing CSR file name (p10cr sends an existing PKCS#10 CSR)")
    try:
        with open(csr_file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise click.BadParameter(f"cannot read CSR {csr_file}: {e.strerror}", param_hint="--csr") from None
    try:
        csr = (x509.load_pem_x509_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data))
    except ValueError as e:
        raise click.BadParameter(f"{csr_file} is not a PKCS#10 CSR (PEM or DER): {e}", param_hint="--csr") from None
    if not csr.is_signature_valid:
        raise click.BadParameter(f"{csr_file}: the CSR's signature does not verify with its own key",
                                 param_hint="--csr")
    return csr


@cli.command()
@click.option("--domain", required=True, help="PKI domain this LDevID belongs to.")
@click.option("--name", help="Credential name [ldevid-<domain>].")
@click.option("--idevid", help="Authenticate with this IDevID (CMP signature / EST TLS client cert): zero-touch.")
@_server_options
@_key_options
@_request_options
@pass_app
@_undo_trust_on_failure
def enroll(app: App, domain, name, idevid, protocol, server, ref, secret, username, password, key_type, key_backend,
           key_ref, server_keygen, allow_weak_keys, subject, sans, csr_file, certout, chainout, unprotected_requests,
           **kw):
    """Obtain the domain credential (LDevID) over CMP (ir, or p10cr with --csr) or EST (simpleenroll)."""
    from agent import lifecycle
    from enroll_clients import client_for
    from enroll_clients.base import ClientAuth

    if not protocol or not server:
        raise click.UsageError("--protocol and --server are required")
    if csr_file is not None and protocol != "cmp":
        raise click.UsageError("--csr is for CMP (p10cr); EST builds its CSR from the device key")
    csr = _load_csr(csr_file) if csr_file is not None else None
    ks = app.keystore()
    name = name or f"ldevid-{domain}"
    _add_trust_stores(ks, domain, kw)
    if protocol == "est" and (not ks.trust_anchors(domain) or not _fingerprint_trusted(ks, domain,
                                                                                      kw.get("ca_fingerprint"))):
        # No anchor yet (RFC 7030 §4.1.1 bootstrap), or --ca-fingerprint names a root the domain does not trust
        # yet (e.g. --trust gave the TLS front's CA): fetch /cacerts (over TLS authenticated by what is trusted,
        # when anything is) and accept the root with that fingerprint, never silently ignore it.
        _bootstrap_est(app, ks, domain, server, kw)
    opts = _options_from(app, ks, protocol=protocol, server=server, domain=domain,
                         unprotected_requests=unprotected_requests, **kw)
    if idevid:
        auth = lifecycle.auth_for(ks, ks.get(idevid))
    else:
        auth = ClientAuth()
    auth = _with_secrets(auth, ref, secret, username, password)
    subj, san_list = _subject_sans(subject, sans)
    remember = _remember(protocol, server, kw.get("label"), kw.get("profile"), kw.get("mac"), kw.get("implicit_confirm"),
                         kw.get("timeout_s"), kw.get("recipient"), key_backend, kw.get("csrattrs"), _cmp_extra(kw),
                         kw.get("tls_unique"))
    client = client_for(protocol, opts)
    if csr is not None:
        key_uri = _key_spec(ks, None, None, key_ref, False, allow_weak_keys, name)[0].key_uri if key_ref else None
        res = run_async(lifecycle.enroll_csr(ks, client, csr=csr, name=name, domain=domain, auth=auth,
                                             key_uri=key_uri, op="enroll", remember=remember))
        _finish_csr(app, res, certout, chainout)
        return
    spec, imported = _key_spec(ks, _new_key_type(app, key_type, key_ref, server_keygen),
                               _new_key_backend(app, key_backend, key_ref, server_keygen), key_ref,
                               server_keygen, allow_weak_keys, name, explicit=bool(key_type))
    cred = _issue_discarding_import(ks, spec, imported, lifecycle.enroll(
        ks, client, name=name, domain=domain, subject=subj, sans=san_list, key=spec, auth=auth,
        profile=kw.get("profile"), remember=remember, csrattrs=kw.get("csrattrs") or "use"))
    _write_outputs(cred.certificate, cred.chain, certout, chainout)
    _print_cred(app, cred, "enrolled")
    _unconfirmed_exit(app, cred)


def _finish_csr(app: App, res, certout, chainout) -> None:
    """Output of a --csr request: the stored credential, or the verified certificate written to --certout."""
    if res.credential is not None:
        _write_outputs(res.credential.certificate, res.credential.chain, certout, chainout)
        _print_cred(app, res.credential, "issued")
        _unconfirmed_exit(app, res.credential)
        return
    _write_outputs(res.certificate, res.chain, certout, chainout)
    c = res.certificate
    if not certout and not app.json:
        from keystore.certs import pem

        click.echo(pem([c]).decode(), nl=False)  # nothing stored: the certificate goes to stdout
    app.out({"certificate": certout, "chain": chainout, "subject": c.subject.rfc4514_string(),
             "issuer": c.issuer.rfc4514_string(), "serial": format(c.serial_number, "x"),
             "not_after": c.not_valid_after_utc.isoformat(), "confirmation": res.unconfirmed or "ok"},
            f"issued {c.subject.rfc4514_string()} (issuer {c.issuer.rfc4514_string()}, serial "
            f"{c.serial_number:x}), written to {certout or 'stdout'}; not stored (its key is not in the keystore)")
    if res.unconfirmed:
        click.echo(f"devagent: warning: the CA's confirmation was NOT authenticated: {res.unconfirmed} (exit code "
                   f"{EXIT_UNCONFIRMED})", err=True)
        sys.exit(EXIT_UNCONFIRMED)


def _with_secrets(auth, ref, secret, username, password):
    import dataclasses as dc

    from keystore.secrets import resolve_secret

    return dc.replace(auth, reference=ref.encode() if ref else None, secret=resolve_secret(secret, "--secret"),
                      username=username, password=resolve_secret(password, "--password"))


def _fingerprint_trusted(ks, domain, fp) -> bool:
    """True without ``fp``, or when one of the domain's anchors has that ``sha256:`` fingerprint."""
    if not fp:
        return True
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from enroll_clients.est.messages import parse_fingerprint

    try:
        want = parse_fingerprint(fp)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--ca-fingerprint") from None
    return any(hashlib.sha256(a.public_bytes(serialization.Encoding.DER)).digest() == want
               for a in ks.trust_anchors(domain))


def _bootstrap_est(app, ks, domain, server, kw):
    """RFC 7030 §4.1.1: fetch /cacerts and store the domain's CA certificates only after a fingerprint check or
    confirmation.

    The TLS server is authenticated by the domain's tls store (--tls-trust: a TLS front with its own CA), else by
    its PKI anchors (--trust); with neither it is not (the bootstrap proper: /cacerts only, no credential sent).
    ``--ca-fingerprint`` then picks the domain root among what /cacerts returned."""
    from agent import lifecycle
    from enroll_clients import client_for
    from enroll_clients.base import EnrollOptions

    fp = kw.get("ca_fingerprint")
    tls_anchors, _ = lifecycle.server_trust(ks, domain, "est")
    client = client_for("est", EnrollOptions(server=server, domain=domain, label=kw.get("label"),
                                             profile=kw.get("profile"), ca_fingerprint=fp,
                                             trust_anchors=tls_anchors, timeout_s=kw.get("timeout_s") or 30.0))
    result = run_async(client.ca_certs(None))

    def confirm(items):
        click.echo("The EST server offered these CA certificates (check the fingerprints out of band):", err=True)
        for subj, f in items:
            click.echo(f"  {subj}\n    {f}", err=True)
        if not sys.stdin.isatty():
            return False
        return click.confirm("Trust them for domain " + domain + "?", default=False, err=True)

    confirmed = False if fp else confirm([(c.subject.rfc4514_string(), __import__("keystore.certs").certs.fingerprint(c))
                                          for c in result.ca_certs])
    added = lifecycle.apply_ca_update(ks, domain, result, ca_fingerprint=fp, confirmed=confirmed)
    click.echo(f"trust anchors for {domain}: {len(added)} added", err=True)


@cli.command()
@click.argument("name")
@click.option("--domain", required=True, help="Domain whose LDevID authenticates the request.")
@_server_options
@_key_options
@_request_options
@pass_app
@_undo_trust_on_failure
def request(app: App, name, domain, protocol, server, ref, secret, username, password, key_type, key_backend, key_ref,
            server_keygen, allow_weak_keys, subject, sans, csr_file, certout, chainout, unprotected_requests, **kw):
    """Obtain an application credential (CMP cr, or p10cr with --csr / EST simpleenroll), authenticated by the
    domain's LDevID."""
    from agent import lifecycle
    from enroll_clients import client_for

    ks = app.keystore()
    ldevid = ks.find_domain_credential(domain)
    if ldevid is None:
        raise lifecycle.LifecycleError(f"no LDevID for domain {domain}: run 'devagent enroll --domain {domain}' first")
    _add_trust_stores(ks, domain, kw, only=tuple(o for o in _TRUST_OPTIONS if o != "trust_files"),
                      check=("trust_files",))  # --trust: this request only
    protocol = protocol or ldevid.record.get("protocol")
    server = server or ldevid.record.get("server")
    remembered = ldevid.record.get("meta", {}).get("enroll", {})
    for k in ("label", "mac", "recipient", "timeout_s", "csrattrs", "tls_unique", "implicit_confirm") + CMP_REMEMBERED:
        if kw.get(k) is None and remembered.get(k) is not None:
            kw[k] = remembered[k]
    if csr_file is not None and protocol != "cmp":
        raise click.UsageError("--csr is for CMP (p10cr)")
    csr = _load_csr(csr_file) if csr_file is not None else None
    opts = _options_from(app, ks, protocol=protocol, server=server, domain=domain,
                         unprotected_requests=unprotected_requests, **kw)
    auth = _with_secrets(lifecycle.auth_for(ks, ldevid), ref, secret, username, password)
    subj, san_list = _subject_sans(subject, sans)
    remember = _remember(protocol, server, kw.get("label"), kw.get("profile"), kw.get("mac"), kw.get("implicit_confirm"),
                         kw.get("timeout_s"), kw.get("recipient"), key_backend, kw.get("csrattrs"), _cmp_extra(kw),
                         kw.get("tls_unique"))
    client = client_for(protocol, opts)
    if csr is not None:
        key_uri = _key_spec(ks, None, None, key_ref, False, allow_weak_keys, name)[0].key_uri if key_ref else None
        res = run_async(lifecycle.enroll_csr(ks, client, csr=csr, name=name, domain=domain, auth=auth,
                                             key_uri=key_uri, op="request", remember=remember))
        _finish_csr(app, res, certout, chainout)
        return
    spec, imported = _key_spec(ks, _new_key_type(app, key_type, key_ref, server_keygen),
                               _new_key_backend(app, key_backend, key_ref, server_keygen), key_ref,
                               server_keygen, allow_weak_keys, name, explicit=bool(key_type))
    cred = _issue_discarding_import(ks, spec, imported, lifecycle.request(
        ks, client, name=name, domain=domain, subject=subj, sans=san_list, key=spec, auth=auth,
        profile=kw.get("profile"), remember=remember, csrattrs=kw.get("csrattrs") or "use"))
    _write_outputs(cred.certificate, cred.chain, certout, chainout)
    _print_cred(app, cred, "issued")
    _unconfirmed_exit(app, cred)


def _override_dict(protocol, server, kw) -> dict:
    return {"protocol": protocol, "server": server, **{k: kw.get(k) for k in ("label", "profile", "mac", "recipient",
                                                                              "timeout_s")}}


def _cmp_overrides(kw) -> dict:
    """Remembered-option overrides from the CMP switches given on renew/revoke/ca-update."""
    out = _cmp_extra(kw)
    for k in ("mac", "recipient", "implicit_confirm"):
        if kw.get(k) is not None:
            out[k] = kw[k]
    return out


@cli.command()
@click.argument("name")
@click.option("--rekey/--no-rekey", default=True, show_default=True, help="Generate a new key for the renewal.")
@click.option("--protocol", type=click.Choice(["cmp", "est"]), help="Override the remembered protocol.")
@click.option("--server", help="Override the remembered server URL.")
@click.option("--timeout", "timeout_s", type=float, default=None)
@click.option("--username", help="EST: HTTP Basic user, for servers that require it besides the client certificate "
                                 "(remembered).")
@click.option("--password", help="EST: HTTP Basic password: env:VAR, file:PATH or pass:TEXT (env:/file: are "
                                 "remembered as the reference, never the secret).")
@click.option("--implicit-confirm/--no-implicit-confirm", default=None, help="CMP implicitConfirm (remembered).")
@_TLS_TRUST_OPTION
@_cmp_options
@_output_options
@pass_app
@_undo_trust_on_failure(credential_domain=True)
def renew(app: App, name, rekey, protocol, server, timeout_s, username, password, certout, chainout, **kw):
    """Renew a credential (CMP kur / EST simplereenroll) with its current certificate. CMP switches given here
    override the remembered ones and are remembered for the daemon's renewals; so is --tls-trust (the domain's
    tls store)."""
    from agent import lifecycle

    if password is not None and username is None:
        raise click.UsageError("--password needs --username")
    ks = app.keystore()
    cred = ks.get(name)
    _add_trust_stores(ks, _trust_domain(cred), kw, only=("tls_trust_files",))
    overrides = _cmp_overrides(kw)
    client = lifecycle.client_for_credential(ks, cred, {"protocol": protocol, "server": server, "timeout_s": timeout_s,
                                                        **overrides})
    new = run_async(lifecycle.renew(ks, name, client=client, rekey=rekey, username=username,
                                    password_source=password, remember=overrides))
    _write_outputs(new.certificate, new.chain, certout, chainout)
    _print_cred(app, new, "renewed")
    _unconfirmed_exit(app, new)


REASONS = ("unspecified", "keyCompromise", "cACompromise", "affiliationChanged", "superseded",
           "cessationOfOperation", "certificateHold", "privilegeWithdrawn")


@cli.command()
@click.argument("name")
@click.option("--reason", type=click.Choice(REASONS), default="unspecified", show_default=True)
@click.option("--protocol", type=click.Choice(["cmp", "est"]), help="Override the remembered protocol.")
@click.option("--server", help="Override the remembered server URL.")
@_TLS_TRUST_OPTION
@_cmp_options
@pass_app
@_undo_trust_on_failure(credential_domain=True)
def revoke(app: App, name, reason, protocol, server, **kw):
    """Revoke a credential's certificate (CMP rr). EST has no revocation."""
    from agent import lifecycle

    ks = app.keystore()
    cred = ks.get(name)
    _add_trust_stores(ks, _trust_domain(cred), kw, only=("tls_trust_files",))
    client = lifecycle.client_for_credential(ks, cred, {"protocol": protocol, "server": server, **_cmp_overrides(kw)})
    run_async(lifecycle.revoke(ks, name, client=client, reason=reason))
    app.out({"revoked": name, "reason": reason}, f"revoked {name} ({reason})")


@cli.command("ca-update")
@click.option("--domain", required=True)
@click.option("--protocol", type=click.Choice(["cmp", "est"]))
@click.option("--server")
@click.option("--label")
@click.option("--profile")
@click.option("--ca-fingerprint", help="sha256:HEX of a new root to accept (bootstrap or rollover).")
@click.option("--timeout", "timeout_s", type=float, default=None)
@click.option("--ref", help="CMP: reference (senderKID) for MAC protection of the genm.")
@click.option("--secret", help="CMP: shared secret for MAC protection: env:VAR, file:PATH or pass:TEXT.")
@click.option("--mac", type=click.Choice(["pbm", "pbmac1"]), default=None, help="CMP MAC scheme [pbm].")
@click.option("--recipient", help="CMP: recipient DN [NULL-DN].")
@click.option("--old-root", "old_root_file", type=click.Path(exists=True, dir_okay=False),
              help="CMP: the current root to ask a root CA key update for (genm rootCaCert) [the domain's "
                   "trust anchor].")
@_TLS_TRUST_OPTION
@_cmp_options
@pass_app
@_undo_trust_on_failure
def ca_update(app: App, domain, protocol, server, label, profile, ca_fingerprint, timeout_s, ref, secret, mac,
              recipient, old_root_file, **kw):
    """Fetch the CA certificates (EST /cacerts, CMP genm caCerts + rootCaCert) and update the truststore.

    Over CMP the genm is signed with the domain's LDevID, or MAC-protected with --ref/--secret; rootCaCert
    carries the domain's current root, and a new root is trusted only through a verified newWithOld link."""
    from agent import lifecycle
    from enroll_clients import client_for
    from enroll_clients.base import ClientAuth, EnrollOptions
    from keystore.secrets import resolve_secret

    ks = app.keystore()
    cred = ks.find_domain_credential(domain)
    _add_trust_stores(ks, domain, kw, only=("tls_trust_files",))
    overrides = {"protocol": protocol, "server": server, "label": label, "profile": profile, "timeout_s": timeout_s,
                 **_cmp_overrides({**kw, "mac": mac, "recipient": recipient})}
    if cred is not None and not secret:
        client = lifecycle.client_for_credential(ks, cred, overrides)
    else:
        remembered = (cred.record.get("meta", {}).get("enroll") or {}) if cred is not None else {}
        protocol = protocol or remembered.get("protocol")
        server = server or remembered.get("server")
        if not protocol or not server:
            raise click.UsageError(f"no LDevID for {domain}: give --protocol and --server")
        extra = {k: remembered[k] for k in CMP_REMEMBERED if remembered.get(k) is not None}
        extra.update(_cmp_extra(kw))
        server_anchors, trust_extra = lifecycle.server_trust(ks, domain, protocol)  # EST: the tls store first
        extra.update(trust_extra)
        client = client_for(protocol, EnrollOptions(
            server=server, trust_anchors=server_anchors, domain=domain,
            label=label or remembered.get("label"), profile=profile or remembered.get("profile"),
            ca_fingerprint=ca_fingerprint, timeout_s=timeout_s or 30.0, mac=mac or remembered.get("mac") or "pbm",
            recipient=_recipient(recipient or remembered.get("recipient")), extra=extra))
    auth = None
    if secret:
        if not ref:
            raise click.UsageError("--secret needs --ref (the senderKID the server knows the secret by)")
        auth = ClientAuth(reference=ref.encode(), secret=resolve_secret(secret, "--secret"))
    old_root = None
    if old_root_file:
        from keystore.certs import load_certificate_file

        old_root = load_certificate_file(old_root_file)[0]
    added = run_async(lifecycle.ca_update(ks, domain, client=client, ca_fingerprint=ca_fingerprint, auth=auth,
                                          old_root=old_root))
    app.out({"domain": domain, "added": added}, f"{domain}: {len(added)} CA certificate(s) added")


@cli.command("cert-template")
@click.option("--domain", required=True, help="Domain whose LDevID signs the genm (or give --ref/--secret).")
@click.option("--server", help="CMP server URL [the LDevID's].")
@click.option("--ref", help="CMP: reference (senderKID) for MAC protection.")
@click.option("--secret", help="CMP: shared secret: env:VAR, file:PATH or pass:TEXT.")
@click.option("--mac", type=click.Choice(["pbm", "pbmac1"]), default=None, help="CMP MAC scheme [pbm].")
@click.option("--recipient", help="CMP: recipient DN [NULL-DN].")
@click.option("--trust", "trust_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="CMP trust anchor(s) for a signed genp [the domain's].")
@click.option("--timeout", "timeout_s", type=float, default=None)
@_TLS_TRUST_OPTION
@_cmp_options
@pass_app
@_undo_trust_on_failure
def cert_template(app: App, domain, server, ref, secret, mac, recipient, trust_files, timeout_s, **kw):
    """Show the CMP server's certificate request template (genm certReqTemplate, RFC 9483 4.3.3).

    Apply it to a request with 'devagent enroll/request --cert-template'."""
    from agent import lifecycle
    from enroll_clients import client_for
    from enroll_clients.base import ClientAuth, EnrollOptions
    from keystore.certs import load_certificate_file
    from keystore.secrets import resolve_secret

    ks = app.keystore()
    cred = ks.find_domain_credential(domain)
    remembered = (cred.record.get("meta", {}).get("enroll") or {}) if cred is not None else {}
    server = server or remembered.get("server")
    if not server:
        raise click.UsageError(f"no LDevID for {domain} to take the server from: give --server")
    _add_trust_stores(ks, domain, {**kw, "trust_files": trust_files}, only=("tls_trust_files",),
                      check=("trust_files",))
    if secret:
        if not ref:
            raise click.UsageError("--secret needs --ref")
        auth = ClientAuth(reference=ref.encode(), secret=resolve_secret(secret, "--secret"))
    elif cred is not None:
        auth = lifecycle.auth_for(ks, cred)
    else:
        raise click.UsageError(f"no LDevID for {domain}: give --ref and --secret")
    trust = tuple(c for f in trust_files for c in load_certificate_file(f)) or tuple(ks.trust_anchors(domain))
    extra = {k: remembered[k] for k in CMP_REMEMBERED if k in remembered}
    extra.update(_cmp_extra(kw))
    tls = lifecycle.server_trust(ks, domain, "cmp")[1]  # an https:// server: the domain's tls store
    extra.update({k: v for k, v in tls.items() if k.startswith("tls_")})
    client = client_for("cmp", EnrollOptions(
        server=server, trust_anchors=trust, domain=domain, timeout_s=timeout_s or 30.0,
        mac=mac or remembered.get("mac") or "pbm", recipient=_recipient(recipient or remembered.get("recipient")),
        extra=extra))

    async def go():
        try:
            return await client.cert_req_template(auth)
        finally:
            await client.aclose()

    tpl = run_async(go())
    from enroll_clients.cmp.template import describe_template

    d = describe_template(tpl)
    app.out(d, "\n".join(f"{k:<12} {v}" for k, v in d.items()) if tpl is not None
            else "the server has no certificate request template (any subject and key type it accepts)")


def main(argv=None):
    """Console-script entry point: one command per process.

    Start-up cost: a command loads its modules (objects that live until exit) and the cyclic garbage collector
    would walk them ~100 times for nothing: ~15 ms of ``devagent enroll``, and ~25 ms more for the
    interpreter's final collections at exit. So collection pauses while a command runs, for at most
    ``GC_PAUSE_MAX_S`` (a timer resumes it: a polling enrollment or a long ``renew --all`` then collects as
    usual); a lazily loaded command (``serve``, ``run``, ``clm`` ...: some run for months) resumes it when it
    loads (``resume_gc``). Reference counting frees everything that is not a cycle as usual. At exit the heap
    is frozen, so the final collections skip it.
    """
    import gc
    import threading

    global _one_shot_process
    _one_shot_process = True
    pause_gc()
    timer = threading.Timer(GC_PAUSE_MAX_S, resume_gc)
    timer.daemon = True
    timer.start()
    try:
        cli.main(args=argv, prog_name="devagent", standalone_mode=True)
    finally:
        timer.cancel()
        gc.freeze()
        resume_gc()


if __name__ == "__main__":
    main()
