"""CLI for operations: ``devagent run``, ``devagent profile list|show|detect``, ``devagent decommission``.

Registered lazily by agent.cli (``agent.cli_ops:run`` etc.); the root group's ``ctx.obj`` carries ``state_dir``,
``json``, ``verbose`` and the effective config (``ctx.obj.config()``). Errors are raised as their package's root
(ConfigError, KeystoreError, EnrollError) and mapped to exit codes by the root group.
"""
from __future__ import annotations

import asyncio
import json
import logging

import click

import board_profiles
from agent.cli import long_lived

log = logging.getLogger("devagent.ops")


def _out(app, data, text: str) -> None:
    if getattr(app, "json", False):
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo(text)


def _parse_sets(items) -> dict:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise click.BadParameter(f"{item!r}: write KEY=VALUE, e.g. renewal.fraction=0.5", param_hint="--set")
        out[k.strip()] = v.strip()
    return out


def _config(app, sets: dict):
    from agent.config import load_config

    overrides = dict(sets)
    if getattr(app, "board_profile", None):
        overrides.setdefault("profile", app.board_profile)
    for k, v in app.state_dir_override().items():  # --state-dir is the command-line layer of keystore.path
        overrides.setdefault(k, v)
    return load_config(overrides, config_path=getattr(app, "config_path", None))


# ---- run ----------------------------------------------------------------------------------------------
@click.command("run")
@click.option("--once", is_flag=True, help="One pass (renew what is due, deploy, write metrics), then exit; "
              "for devagent-renew.timer.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (highest precedence), e.g. --set renewal.fraction=0.5. Repeatable.")
@click.pass_obj
def run(app, once, sets):
    """Run the lifecycle daemon: renew credentials before they expire, deploy them, report.

    Renews each managed credential at renewal.fraction of its lifetime (with jitter), retries failures with
    capped exponential backoff while the current certificate stays in use, follows CA rollovers, deploys to the
    configured targets and runs hooks, writes the Prometheus textfile, and tells systemd it is ready. Stops cleanly
    on SIGTERM. Exit status 1 if a managed credential has expired.
    """
    from agent.daemon import Daemon

    cfg = _config(app, _parse_sets(sets))
    if not app.verbose:
        logging.getLogger("devagent").setLevel(cfg.log_level.upper())
    if not once:
        long_lived()
    with app.keystore() as ks:
        code = asyncio.run(Daemon(ks, cfg).run(once=once))
    raise SystemExit(code)


# ---- profile -----------------------------------------------------------------------------------------------
@click.group("profile")
def profile():
    """Board profiles: per-board defaults (key backend, CoAP parameters, renewal policy, timings)."""


@profile.command("list")
@click.pass_obj
def profile_list(app):
    """List the known board profiles."""
    profs = board_profiles.load_all()
    data = [{"name": p.name, "platform": p.platform, "description": p.description,
             "key_backend": p.get("key", "backend")} for p in profs]
    width = max(len(p.name) for p in profs)
    _out(app, data, "\n".join(f"{p.name:<{width}}  {p.platform:<11}  {p.get('key', 'backend'):<4}  {p.description}"
                              for p in profs))


def _render_profile(p: board_profiles.BoardProfile) -> str:
    lines = [f"{p.name}: {p.description} ({p.platform})", f"  file: {p.path}"]
    for section, table in p.data.items():
        if section == "profile":
            continue
        lines.append(f"  [{section}]")
        lines += [f"    {k} = {v!r}" for k, v in table.items()]
    return "\n".join(lines)


@profile.command("show")
@click.argument("name", required=False)
@click.option("--effective", is_flag=True, help="Show the effective configuration (all layers) and where each "
              "value comes from.")
@click.pass_obj
def profile_show(app, name, effective):
    """Show profile NAME (default: the configured or detected one)."""
    if effective:
        cfg = _config(app, {"profile": name} if name else {})
        vals = cfg.values()
        data = {"profile": cfg.profile, "values": vals, "sources": dict(cfg.sources)}
        text = [f"profile {cfg.profile} ({cfg.sources.get('profile')})"]
        text += [f"  {k} = {v!r}    # {cfg.sources.get(k, 'default')}" for k, v in vals.items()]
        _out(app, data, "\n".join(text))
        return
    if name is None:
        name = getattr(app, "board_profile", None) or _config(app, {}).profile
    p = board_profiles.load(name)
    _out(app, {"name": p.name, "path": str(p.path), **p.data}, _render_profile(p))


@profile.command("detect")
@click.option("--root", default="/", show_default=True, hidden=True, help="Root to look for /proc and /dev under.")
@click.pass_obj
def profile_detect(app, root):
    """Detect the board (device-tree model, /dev/tpmrm0, CPU architecture) and name its profile."""
    d = board_profiles.detect(root)
    text = [f"{d.profile.name}: {d.profile.description}",
            f"  model: {d.model or '(no device tree)'}", f"  tpm: {'yes' if d.tpm else 'no'}",
            f"  machine: {d.machine}"] + [f"  note: {n}" for n in d.notes]
    _out(app, d.as_dict(), "\n".join(text))


# ---- decommission ------------------------------------------------------------------------------------------
async def decommission_keystore(ks, cfg, *, client_factory, include_idevid: bool = False,
                                reason: str = "cessationOfOperation", revoke: bool = True) -> dict:
    """Revoke (where the protocol allows) and undeploy every credential, then wipe the keystore
    (``Keystore.wipe``): keys destroyed, credentials, trust anchors and pending keys removed, and a ``decommission``
    audit record left. The IDevID (the manufacturer's identity, needed to onboard again) and what it needs stay
    unless ``include_idevid``; then the state directory keeps only its audit log.

    Returns a report {revoked, not_revoked: {name: why}, deleted, undeployed, trust_removed, keys_destroyed, ...}.
    """
    from agent import hooks, lifecycle

    report = {"revoked": [], "not_revoked": {}, "undeployed": []}
    for cred in ks.list():
        if cred.readonly and not include_idevid:
            continue
        if revoke and not cred.readonly and cred.record.get("protocol"):
            try:
                await lifecycle.revoke(ks, cred.name, client=client_factory(cred), reason=reason)
                report["revoked"].append(cred.name)
            except Exception as e:  # keep going: the keys must go whatever the CA says (reported per credential)
                report["not_revoked"][cred.name] = str(e)
                log.warning("credential %s (serial %x) not revoked: %s; ask the CA operator to revoke it",
                            cred.name, cred.certificate.serial_number, e)
        report["undeployed"] += hooks.undeploy(cfg.policy_for(cred.name))
    wiped = ks.wipe(include_idevid=include_idevid, audit_action="decommission", reason=reason,
                    revoked=report["revoked"], not_revoked=sorted(report["not_revoked"]),
                    undeployed=report["undeployed"])
    report.update(wiped)
    return report


def _print_report(app, report: dict, state_dir) -> None:
    lines = [f"deleted: {', '.join(report['deleted']) or 'nothing'}",
             f"revoked: {', '.join(report.get('revoked', [])) or 'none'}"]
    lines += [f"NOT revoked {n}: {why} (ask the CA operator to revoke it)"
              for n, why in report.get("not_revoked", {}).items()]
    lines.append(f"destroyed {len(report['keys_destroyed'])} key(s), removed {len(report.get('undeployed', []))} "
                 f"deployed file(s), {report['trust_removed']} trust anchor(s); audit record written to "
                 f"{state_dir}/audit.log" + (" (the only file left)" if report["include_idevid"] else ""))
    if report.get("keys_forgotten"):
        lines.append(f"kept in their token/TPM (not created by devagent): {', '.join(report['keys_forgotten'])}")
    _out(app, report, "\n".join(lines))


@click.command("decommission")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--include-idevid", is_flag=True, help="Also delete the manufacturer's IDevID (device scrapped).")
@click.option("--no-revoke", is_flag=True, help="Do not contact the CA (offline); revoke there by serial instead.")
@click.option("--reason", default="cessationOfOperation", show_default=True,
              type=click.Choice(["cessationOfOperation", "superseded", "keyCompromise", "affiliationChanged",
                                 "unspecified"]), help="Revocation reason (RFC 5280).")
@click.pass_obj
def decommission(app, yes, include_idevid, no_revoke, reason):
    """Take the device out of service: revoke its certificates (CMP; EST cannot revoke), delete keys and deployed
    copies, wipe credentials and trust anchors, and leave an audit record. The IDevID stays unless
    --include-idevid."""
    from agent import lifecycle
    from keystore.store import Keystore

    pending = Keystore.wipe_pending(app.state_dir)
    if pending is not None:
        # An earlier decommission was killed during its wipe: finish that plan (its revocations are done).
        if pending["include_idevid"] != include_idevid:
            log.warning("finishing the interrupted decommission as it was started (include_idevid=%s)",
                        pending["include_idevid"])
        report = Keystore.resume_wipe(app.state_dir, app.backend_options())
        report.update({k: v for k, v in pending.get("details", {}).items() if k in ("revoked", "undeployed")})
        report["resumed"] = True
        _print_report(app, report, app.state_dir)
        return
    with app.keystore() as ks:  # closed also when the confirmation is declined or the configuration is bad
        cfg = _config(app, {})
        names = [c.name for c in ks.list() if include_idevid or not c.readonly]
        if not yes:
            click.confirm(f"Revoke and delete {', '.join(names) or 'nothing'} in {app.state_dir}? This cannot be "
                          "undone", abort=True)
        report = asyncio.run(decommission_keystore(
            ks, cfg, client_factory=lambda cred: lifecycle.client_for_credential(ks, cred, {}),
            include_idevid=include_idevid, reason=reason, revoke=not no_revoke))
    _print_report(app, report, app.state_dir)
