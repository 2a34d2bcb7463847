"""Click commands of OPC UA push management: ``devagent opcua serve`` (the device side, OPC 10000-12 §7.7/§7.8)
and ``devagent opcua status``. Loaded lazily by ``agent.cli``; asyncua is imported only when a command runs.

``ctx.obj`` is the root group's App (``state_dir``, ``json``, ``verbose``, ``config()``).
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import click

EXIT_CONFIG = 7
EXIT_NETWORK = 6


def _fail(msg: str, code: int):
    click.echo(f"devagent: {msg}", err=True)
    sys.exit(code)


@click.group("opcua")
def opcua():
    """OPC UA push management: devagent as the certificate endpoint of an OPC UA device (docs/opcua.md)."""


@opcua.command("serve")
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=4840, show_default=True)
@click.option("--path", "url_path", default="/devagent", show_default=True, help="Path of the endpoint URL.")
@click.option("--application-uri", default=None,
              help="The application's URI (in every certificate's SAN) [default: urn:HOSTNAME:devagent:opcua].")
@click.option("--domain", required=True, help="Trust domain: its keystore anchors are the first TrustList and "
              "every pushed certificate must chain to the TrustList.")
@click.option("--name", "cred_name", default="opcua", show_default=True,
              help="Credential name of the RSA application certificate (NAME-p256, NAME-p384 for the ECC types).")
@click.option("--hostname", "hostnames", multiple=True,
              help="DNS name or IP address for the certificates' SAN; repeatable [default: hostname and --bind].")
@click.option("--subject", default="", help="Subject of a CSR when the GDS sends none and no certificate exists.")
@click.option("--admin-subject", multiple=True, help="Client certificate subject DN with the SecurityAdmin role "
              "(RFC 4514, e.g. 'CN=gds,O=Plant'); repeatable.")
@click.option("--admin-issuer", multiple=True, help="Issuer DN: every client certificate it issued has the "
              "SecurityAdmin role; repeatable.")
@click.option("--key-backend", default=None, help="soft, tpm or pkcs11 [default: key.backend of the config].")
@click.option("--rsa-key-type", default=None, type=click.Choice(["rsa2048", "rsa3072", "rsa4096"]),
              help="Key type of the RSA application certificate (RsaSha256ApplicationCertificateType, the secure "
                   "channel's) [default: key.algorithm of the config when it is an RSA type, else rsa2048: the RSA "
                   "security policies need an RSA key; the ECC certificate types always use p256 / p384 keys].")
@click.option("--pki-dir", "pki_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="OPC UA PKI directory to deploy into at ApplyChanges (besides the opcua targets of "
                   "[credential.NAME] in agent.toml); repeatable.")
@click.option("--max-trust-list-size", type=click.IntRange(0, 64 * 1024 * 1024), default=65536, show_default=True,
              help="MaxTrustListSize in bytes (0: no limit).")
@click.option("--policy", "policies", multiple=True, type=click.Choice(["Basic256Sha256", "Aes128_Sha256_RsaOaep",
                                                                        "Aes256_Sha256_RsaPss"]),
              help="SignAndEncrypt security policies offered [default: Basic256Sha256, Aes128_Sha256_RsaOaep].")
@click.option("--allow-none", is_flag=True, help="Also offer a None endpoint (browsing only: every push method "
              "refuses an unencrypted channel).")
@click.option("--allow-trust-lockout", is_flag=True, help="Accept a TrustList change that no longer trusts the "
              "calling client (it then cannot reconnect).")
@click.option("--bootstrap-credential", default=None, help="Credential (e.g. the IDevID, an RSA key) for the "
              "channel until the first push [default: a self-signed certificate].")
@click.option("--no-clock", is_flag=True, help="Board has no real-time clock: skip validity dates.")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path), default=None, hidden=True)
@click.pass_context
def serve(ctx, bind, port, url_path, application_uri, domain, cred_name, hostnames, subject, admin_subject,
          admin_issuer, key_backend, rsa_key_type, pki_dirs, max_trust_list_size, policies, allow_none,
          allow_trust_lockout, bootstrap_credential, no_clock, ready_file):
    """Serve OPC UA push management (ServerConfiguration, TrustList) on opc.tcp://BIND:PORT/PATH.

    A GDS (or 'devagent clm') with the SecurityAdmin role calls CreateSigningRequest, UpdateCertificate, the
    TrustList methods and ApplyChanges; ApplyChanges stores through the keystore, deploys into the PKI
    directories and re-binds this endpoint to the new certificate. Long-lived; stops on SIGTERM.
    """
    import asyncio
    import signal

    from agent.opcua.push import PushConfig, PushService
    from keystore.store import check_name

    from keystore.csr import parse_subject

    try:
        check_name(domain, "domain")
        check_name(cred_name, "credential name")
        for dn in (*admin_subject, *admin_issuer):
            parse_subject(dn)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if not admin_subject and not admin_issuer:
        click.echo("WARNING: no --admin-subject/--admin-issuer: no client has the SecurityAdmin role, every push "
                   "method will answer BadUserAccessDenied", err=True)
    app = ctx.obj
    cfg = app.config()
    host = socket.gethostname()
    pol = cfg.policy_for(cred_name)
    dirs = [*pki_dirs, *(Path(t.pki_dir) for t in pol.deploy if t.type == "opcua")]
    pc = PushConfig(application_uri=application_uri or f"urn:{host}:devagent:opcua", domain=domain, name=cred_name,
                    key_backend=key_backend or cfg.key.backend, rsa_key_type=_rsa_key_type(app, rsa_key_type),
                    hostnames=tuple(hostnames) or tuple(dict.fromkeys((host, bind))), subject=subject,
                    admin_subjects=tuple(admin_subject), admin_issuers=tuple(admin_issuer),
                    max_trust_list_size=max_trust_list_size, check_validity=not no_clock,
                    allow_lockout=allow_trust_lockout, bootstrap_credential=bootstrap_credential)

    async def deployer(creds, tl):  # deployer and main use the keystore opened below (``ks``)
        from agent.opcua.deploy import deploy

        await deploy(ks, creds, tl, dirs, pol.hooks, timeout_s=cfg.hooks_timeout_s)

    async def main():
        from agent.opcua.server import PushServer

        svc = PushService(ks, pc, app.state_dir, deploy=deployer if dirs or pol.hooks else None)
        srv = PushServer(svc, f"opc.tcp://{bind}:{port}{url_path}", name=f"devagent {host}",
                         policies=policies or ("Basic256Sha256", "Aes128_Sha256_RsaOaep"), allow_none=allow_none)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await srv.start()
        try:
            click.echo(f"devagent: OPC UA push management on {srv.url} (application {pc.application_uri}, "
                       f"certificate {srv.endpoint_fingerprint})", err=True)
            if ready_file is not None:
                from keystore import fsutil

                fsutil.atomic_write(ready_file, f"{srv.url} {srv.endpoint_fingerprint}\n".encode())
            await stop.wait()
        finally:
            await srv.stop()

    from agent.cli import long_lived

    long_lived()
    with app.keystore() as ks:  # closed however the start (a busy port, a key backend failing) or the service ends
        try:
            asyncio.run(main())
        except OSError as e:
            _fail(f"network error: cannot listen on {bind}:{port}: {e.strerror or e}", EXIT_NETWORK)


def _rsa_key_type(app, option: str | None) -> str:
    """The RSA certificate's key type: --rsa-key-type, else ``key.algorithm`` (``App.key_type``, as enroll, request
    and serve) when it is an RSA type, else rsa2048. An EC or Ed25519 ``key.algorithm`` (p256 is the default) is
    not refused: it is for the device's other credentials, and OPC 10000-12 §7.8.4.9 wants this certificate RSA
    (2048, 3072 or 4096 bits) in every application that offers Basic256Sha256, as this endpoint does (asyncua has
    only the RSA policies, docs/opcua.md); the ECC certificate types have p256 / p384 keys of their own."""
    configured = app.key_type(option)
    return configured if configured.startswith("rsa") else "rsa2048"


@opcua.command("status")
@click.option("--name", "cred_name", default="opcua", show_default=True)
@click.pass_context
def status(ctx, cred_name):
    """The push-managed application certificates, TrustList version and any unfinished ApplyChanges."""
    import json

    from agent.opcua.push import slots_for
    from agent.opcua.trustlist import TrustListStore
    from keystore.errors import NotFoundError

    app = ctx.obj
    ks = app.keystore()
    store = TrustListStore(Path(app.state_dir) / "opcua")
    out = {"certificates": [], "trustlist": store.state(), "apply_pending": (Path(app.state_dir) / "opcua" /
                                                                            "apply.json").exists()}
    for s in slots_for(cred_name):
        try:
            c = ks.get(s.credential)
        except NotFoundError:
            continue
        out["certificates"].append(dict(c.summary(), certificate_type=s.type_name))
    tl = store.load()
    out["trustlist"].update(trusted=len(tl.trusted_certificates), issuers=len(tl.issuer_certificates),
                            crls=len(tl.trusted_crls) + len(tl.issuer_crls))
    if app.json:
        click.echo(json.dumps(out, indent=2, sort_keys=True, default=str))
        return
    for c in out["certificates"]:
        click.echo(f"{c['name']:<14} {c['certificate_type']:<38} {c['subject']}  until {c['not_after']}")
    if not out["certificates"]:
        click.echo("no push-managed certificate yet (the endpoint uses its bootstrap certificate)")
    t = out["trustlist"]
    click.echo(f"TrustList v{t['version']}: {t['trusted']} trusted, {t['issuers']} issuer certificates, {t['crls']} "
               f"CRLs; last update {t.get('last_update') or 'never'}")
    if out["apply_pending"]:
        click.echo("an ApplyChanges was interrupted: the next 'opcua serve' start finishes it")
