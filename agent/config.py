"""Agent configuration: frozen dataclasses with bounded defaults, layered CLI > DEVAGENT_* env > agent.toml > profile.

Every setting has a dotted key (``renewal.fraction``), an environment variable (``DEVAGENT_RENEWAL_FRACTION``), a
type, bounds and a default, all in ``KEYS``; the docs table in docs/operations.md is generated from it
(``python -m agent.config``). Per-credential policy (rekey, fraction, deploy targets, hook commands) lives only in
the file, under ``[credential.<name>]``.

Invariants:
- A value is checked where it enters, and an error names its source: the file and ``[section] key``, the
  environment variable, or the ``--set`` option. Unknown keys in the file are errors (typos do not pass silently);
  unknown DEVAGENT_* variables are ignored (other tools share the prefix).
- The board profile is the lowest layer; its choice follows the same precedence (``profile`` key), else detection.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

import board_profiles

DEFAULT_CONFIG_PATH = "/etc/devagent/agent.toml"
ENV_PREFIX = "DEVAGENT_"
DEPLOY_TYPES = ("pem", "p12", "opcua")
PEM_FIELDS = ("cert", "key", "chain", "fullchain", "bundle")


class ConfigError(Exception):
    """Root of configuration errors; the message names the file/variable/option and the key."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One setting of ``KEYS``: dotted name, type, default, help text, bounds and allowed values."""

    name: str
    type: type
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace(".", "_")


KEYS: tuple[Key, ...] = (
    Key("key.backend", str, "soft", "where new keys are generated", choices=board_profiles.KEY_BACKENDS),
    Key("key.tcti", str, "device:/dev/tpmrm0", "TPM TCTI for the tpm backend"),
    Key("key.tpm_parent", str, "owner", "TPM parent of new keys: owner (an ECC P-256 storage primary in the owner "
        "hierarchy) or a persistent SRK handle 0x81xxxxxx"),
    Key("key.tpm_persist", str, "blob", "where TPM keys live: blob (TSS2 PRIVATE KEY file in the keystore) or "
        "handle (a persistent handle from key.tpm_handle_base)", choices=("blob", "handle")),
    Key("key.tpm_handle_base", str, "0x81100000", "first persistent handle for key.tpm_persist = handle"),
    Key("key.pkcs11_module", str, "", "PKCS#11 module (.so); empty: SoftHSM2's from the usual Debian paths"),
    Key("key.pkcs11_token", str, "", "label of the PKCS#11 token new keys are generated on"),
    Key("key.pkcs11_pin", str, "", "PKCS#11 user PIN source: env:VAR or file:PATH (never the PIN itself in a file "
        "that others can read)"),
    Key("key.algorithm", str, "p256", "key type for new keys (RSA only where the CA demands it)",
        choices=board_profiles.KEY_ALGORITHMS),
    Key("keystore.path", str, "/var/lib/devagent", "keystore directory (command line: --state-dir; environment "
        "also DEVAGENT_STATE_DIR)"),
    Key("keystore.pending_max_age_s", float, 86400.0, "a pending key (generated, no certificate yet) older than this "
        "is discarded by keystore check and the daemon's start, whatever its owner", 60.0, 365 * 86400.0),
    Key("serial.port", str, "/dev/serial0", "serial port for the CoAP-over-serial transport"),
    Key("coap.bind", str, "[::]:5684", "CoAP server bind address HOST:PORT"),
    Key("coap.security", str, "oscore", "CoAP security mode", choices=board_profiles.COAP_SECURITY),
    Key("coap.ack_timeout_s", float, 2.0, "CoAP ACK_TIMEOUT (RFC 7252 4.8)", 0.5, 60.0),
    Key("coap.ack_random_factor", float, 1.5, "CoAP ACK_RANDOM_FACTOR", 1.0, 4.0),
    Key("coap.max_retransmit", int, 4, "CoAP MAX_RETRANSMIT", 0, 10),
    Key("renewal.fraction", float, 2 / 3, "renew at this fraction of the certificate lifetime", 0.1, 0.95),
    Key("renewal.jitter", float, 0.05, "renew up to this share of the lifetime earlier, at random", 0.0, 0.5),
    Key("renewal.retry_base_s", float, 60.0, "first retry delay after a failed renewal", 0.05, 86400.0),
    Key("renewal.retry_cap_s", float, 3600.0, "longest retry delay", 0.05, 7 * 86400.0),
    Key("renewal.rekey", bool, True, "generate a new key on each renewal (per credential: [credential.X] rekey)"),
    Key("renewal.check_interval_s", float, 300.0, "longest sleep between checks of the keystore", 0.05, 86400.0),
    Key("renewal.ca_check_interval_s", float, 86400.0, "how often to ask the CA for new CA certificates "
        "(also before every renewal)", 1.0, 30 * 86400.0),
    Key("renewal.parallel", int, 4, "renewal attempts (and CA checks) in progress at once, over all servers; one "
        "at a time per server", 1, 64),
    Key("renewal.attempt_timeout_s", float, 600.0, "longest one renewal attempt may take in all (CA check + "
        "request + polling), whatever the per-request --timeout; then it counts as failed", 1.0, 86400.0),
    Key("clock.trusted", bool, False, "trust the system clock (true with NTP/RTC); false: estimate from CA time"),
    Key("clock.tolerance_s", float, 300.0, "clock error above which CA time is used instead", 1.0, 86400.0),
    Key("ca.fingerprint", str, "", "sha256:HEX of a new root CA the operator accepts without a link certificate"),
    Key("hooks.timeout_s", float, 120.0, "time limit for each hook command", 1.0, 3600.0),
    Key("metrics.textfile", str, "/var/lib/node_exporter/textfile_collector/devagent.prom",
        "Prometheus textfile for node_exporter (empty: off)"),
    Key("daemon.notify", bool, True, "send sd_notify READY/STATUS/STOPPING when $NOTIFY_SOCKET is set"),
    Key("log.level", str, "info", "log level", choices=("debug", "info", "warning", "error")),
    Key("clm.inventory", str, "", "the edge CLM's device inventory: sqlite:PATH or postgresql://USER@HOST/DB "
        "(several workers; password in ~/.pgpass); empty: CLM_DIR/inventory.sqlite"),
)
KEY_BY_NAME = {k.name: k for k in KEYS}
ENV_ALIASES = {"DEVAGENT_STATE_DIR": "keystore.path"}


@dataclasses.dataclass(frozen=True)
class DeployTarget:
    """One place a renewed credential is written to. ``type`` is pem, p12 or opcua."""

    type: str
    cert: str = ""
    key: str = ""
    chain: str = ""
    fullchain: str = ""
    bundle: str = ""
    path: str = ""  # p12 file
    password: str = ""  # p12: env:VAR / file:PATH / pass:TEXT
    pki_dir: str = ""  # opcua
    cert_mode: int = 0o644
    key_mode: int = 0o600


@dataclasses.dataclass(frozen=True)
class CredentialPolicy:
    """``[credential.<name>]``: per-credential overrides (None: the global setting), deploy targets and hooks."""

    name: str
    enabled: bool = True
    rekey: bool | None = None  # None: renewal.rekey
    fraction: float | None = None  # None: renewal.fraction
    deploy: tuple[DeployTarget, ...] = ()
    hooks: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class KeyConfig:
    """``[key]``: where new keys are generated (backend, TPM/PKCS#11 settings) and their algorithm."""

    backend: str
    tcti: str
    algorithm: str
    tpm_parent: str = "owner"
    tpm_persist: str = "blob"
    tpm_handle_base: str = "0x81100000"
    pkcs11_module: str = ""
    pkcs11_token: str = ""
    pkcs11_pin: str = ""


@dataclasses.dataclass(frozen=True)
class CoapConfig:
    """``[coap]``: the device service's bind address, security and RFC 7252 transmission parameters."""

    bind: str
    security: str
    ack_timeout_s: float
    ack_random_factor: float
    max_retransmit: int


@dataclasses.dataclass(frozen=True)
class RenewalConfig:
    """``[renewal]``: when and how credentials are renewed (fraction of life, jitter, retry back-off, rekey)."""

    fraction: float
    jitter: float
    retry_base_s: float
    retry_cap_s: float
    rekey: bool
    check_interval_s: float
    ca_check_interval_s: float
    parallel: int = 4
    attempt_timeout_s: float = 600.0


@dataclasses.dataclass(frozen=True)
class Config:
    """The agent's whole configuration: board profile defaults, the config file and the environment, checked."""

    profile: str
    keystore_path: Path
    serial_port: str
    key: KeyConfig
    coap: CoapConfig
    renewal: RenewalConfig
    clock_trusted: bool
    clock_tolerance_s: float
    ca_fingerprint: str
    hooks_timeout_s: float
    metrics_textfile: str
    notify: bool
    log_level: str
    credentials: tuple[CredentialPolicy, ...] = ()
    clm_inventory: str = ""
    keystore_pending_max_age_s: float = 86400.0
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    def policy_for(self, name: str) -> CredentialPolicy:
        for c in self.credentials:
            if c.name == name:
                return c
        return CredentialPolicy(name)

    def values(self) -> dict:
        """Effective value of every key in ``KEYS`` (for ``devagent profile show --effective`` and docs)."""
        return {k.name: _lookup(self, k.name) for k in KEYS}


def _lookup(cfg: Config, name: str):
    flat = {"keystore.path": str(cfg.keystore_path), "serial.port": cfg.serial_port,
            "clock.trusted": cfg.clock_trusted, "clock.tolerance_s": cfg.clock_tolerance_s,
            "ca.fingerprint": cfg.ca_fingerprint, "hooks.timeout_s": cfg.hooks_timeout_s,
            "metrics.textfile": cfg.metrics_textfile, "daemon.notify": cfg.notify, "log.level": cfg.log_level,
            "clm.inventory": cfg.clm_inventory, "keystore.pending_max_age_s": cfg.keystore_pending_max_age_s}
    if name in flat:
        return flat[name]
    section, key = name.split(".", 1)
    return getattr(getattr(cfg, section), key)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def coerce(key: Key, value: Any, where: str) -> Any:
    """Convert and bound-check one value (strings from env/CLI are parsed).

    Raises:
        ConfigError: naming ``where`` and the key.
    """
    def bad(msg):
        return ConfigError(f"{where}: {key.name} = {value!r}: {msg}")

    v = value
    if key.type is bool:
        if isinstance(v, str):
            if v.strip().lower() in _TRUE:
                v = True
            elif v.strip().lower() in _FALSE:
                v = False
        if not isinstance(v, bool):
            raise bad("must be true or false")
    elif key.type in (int, float):
        if isinstance(v, str):
            try:
                v = key.type(v.strip())
            except ValueError:
                raise bad(f"must be {'an integer' if key.type is int else 'a number'}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (key.type is int and not isinstance(v, int)):
            raise bad(f"must be {'an integer' if key.type is int else 'a number'}")
        v = key.type(v)
        if (key.lo is not None and v < key.lo) or (key.hi is not None and v > key.hi):
            raise bad(f"must be between {key.lo:g} and {key.hi:g}")
    else:
        if not isinstance(v, str):
            raise bad("must be a string")
        if key.name in ("key.tcti", "key.tpm_parent") and not v:
            raise bad("must not be empty")
        if key.name in ("key.tpm_handle_base",) or (key.name == "key.tpm_parent" and v != "owner"):
            try:
                h = int(v, 16) if v.lower().startswith("0x") else None
            except ValueError:
                h = None
            if h is None or not 0x81000000 <= h <= 0x81FFFFFF:
                raise bad(f"{v!r} must be a persistent handle 0x81000000-0x81FFFFFF" +
                          (" or owner" if key.name == "key.tpm_parent" else ""))
        if key.name == "key.pkcs11_pin" and v and not v.startswith(("env:", "file:")):
            raise bad("must be a secret source env:VAR or file:PATH, not the PIN itself")
    if key.choices and v not in key.choices:
        raise bad(f"must be one of {', '.join(key.choices)}")
    return v


def _read_file(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def _mode(value, where) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ConfigError(f"{where}: must be an octal string like \"0640\"") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ConfigError(f"{where}: must be an octal file mode like \"0640\"")
    if value & 0o022:
        raise ConfigError(f"{where}: {value:04o} lets others write the file; use 0640 or 0600")
    return value


def _deploy_target(t: Any, where: str) -> DeployTarget:
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: each [[...deploy]] entry must be a table")
    typ = t.get("type")
    if typ not in DEPLOY_TYPES:
        raise ConfigError(f"{where}: type = {typ!r}: must be one of {', '.join(DEPLOY_TYPES)}")
    allowed = {"pem": PEM_FIELDS, "p12": ("path", "password"), "opcua": ("pki_dir",)}[typ]
    kw: dict[str, Any] = {"type": typ}
    for k, v in t.items():
        if k == "type":
            continue
        if k in ("cert_mode", "key_mode"):
            kw[k] = _mode(v, f"{where}: {k}")
            continue
        if k not in allowed:
            raise ConfigError(f"{where}: unknown key {k!r} for a {typ} target; use {', '.join(allowed)}, "
                              "cert_mode, key_mode")
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{where}: {k} must be a non-empty string")
        if k != "password" and not os.path.isabs(v):
            raise ConfigError(f"{where}: {k} = {v!r} must be an absolute path")
        kw[k] = v
    if typ == "pem" and not any(kw.get(f) for f in PEM_FIELDS):
        raise ConfigError(f"{where}: a pem target needs at least one of {', '.join(PEM_FIELDS)}")
    if typ == "p12" and not (kw.get("path") and kw.get("password")):
        raise ConfigError(f"{where}: a p12 target needs path and password (env:VAR, file:PATH or pass:TEXT)")
    if typ == "p12" and kw["password"].split(":", 1)[0] not in ("env", "file", "pass"):
        raise ConfigError(f"{where}: password must be env:VAR, file:PATH or pass:TEXT")
    if typ == "opcua" and not kw.get("pki_dir"):
        raise ConfigError(f"{where}: an opcua target needs pki_dir (the server's PKI root)")
    return DeployTarget(**kw)


def _credential_policies(table: Any, where: str) -> tuple[CredentialPolicy, ...]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [credential] must hold [credential.<name>] tables")
    out = []
    for name, t in table.items():
        w = f"{where}: [credential.{name}]"
        if not isinstance(t, dict):
            raise ConfigError(f"{w} must be a table")
        kw: dict[str, Any] = {"name": name}
        for k, v in t.items():
            if k in ("enabled", "rekey"):
                if not isinstance(v, bool):
                    raise ConfigError(f"{w} {k} must be true or false")
                kw[k] = v
            elif k == "fraction":
                kw[k] = coerce(KEY_BY_NAME["renewal.fraction"], v, w)
            elif k == "hooks":
                if not isinstance(v, list) or not all(isinstance(c, str) and c.strip() for c in v):
                    raise ConfigError(f"{w} hooks must be a list of command strings")
                kw[k] = tuple(v)
            elif k == "deploy":
                if not isinstance(v, list):
                    raise ConfigError(f"{w} deploy must be a list: write [[credential.{name}.deploy]]")
                kw[k] = tuple(_deploy_target(x, f"{w} deploy #{i + 1}") for i, x in enumerate(v))
            else:
                raise ConfigError(f"{w}: unknown key {k!r}; use enabled, rekey, fraction, hooks, deploy")
        out.append(CredentialPolicy(**kw))
    return tuple(out)


def user_state_dir(env: Mapping[str, str]) -> str:
    """The per-user keystore directory of a non-root user: ``$XDG_DATA_HOME/devagent`` (~/.local/share/devagent)."""
    base = env.get("XDG_DATA_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "devagent")


def load_config(cli_overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                config_path: str | os.PathLike | None = None, profile_root: str | os.PathLike = "/",
                euid: int | None = None) -> Config:
    """Build the effective configuration.

    Args:
        cli_overrides: dotted key -> value from the command line (``profile`` selects the board profile).
        env: environment (default ``os.environ``); ``DEVAGENT_CONFIG`` names the file.
        config_path: the file (default ``$DEVAGENT_CONFIG`` or /etc/devagent/agent.toml; a missing default file is
            fine, a missing explicit one is an error).
        profile_root: where board detection looks for /proc and /dev (tests fake a board there).
        euid: the effective user id (default ``os.geteuid()``). ``keystore.path`` (the state directory) follows the
            same precedence as every key (``--state-dir`` is its command-line form, ``DEVAGENT_STATE_DIR`` an alias
            of ``DEVAGENT_KEYSTORE_PATH`` that wins over it), except that for a non-root user a path that only the
            board profile or the built-in default names (the system service's /var/lib/devagent) is replaced by
            the per-user directory (``user_state_dir``). Relative paths from the command line or the
            environment are taken relative to the working directory; in a file or profile they are an error.
    Raises:
        ConfigError: a bad value or unknown key, naming where it came from; BoardProfileError is wrapped.
    """
    cli = dict(cli_overrides or {})
    env = os.environ if env is None else env
    env_path = env.get("DEVAGENT_CONFIG") or None  # set but empty counts as unset
    explicit = config_path is not None or env_path is not None
    path = Path(config_path if config_path is not None else env_path or DEFAULT_CONFIG_PATH)
    try:
        filedata = _read_file(path)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist (from {'--config' if config_path else 'DEVAGENT_CONFIG'})") from None
        filedata = {}

    # Flatten the file into dotted keys, rejecting unknown ones.
    file_vals: dict[str, Any] = {}
    policies: tuple[CredentialPolicy, ...] = ()
    for section, table in filedata.items():
        if section == "profile":
            if not isinstance(table, str):
                raise ConfigError(f"{path}: profile must be a profile name string (see 'devagent profile list')")
            file_vals["profile"] = table
        elif section == "credential":
            policies = _credential_policies(table, str(path))
        elif isinstance(table, dict):
            for k, v in table.items():
                name = f"{section}.{k}"
                if name not in KEY_BY_NAME:
                    known = sorted(n.split(".", 1)[1] for n in KEY_BY_NAME if n.startswith(section + "."))
                    hint = f"known keys in [{section}]: {', '.join(known)}" if known else \
                        f"known sections: {', '.join(sorted({n.split('.')[0] for n in KEY_BY_NAME}))}, credential"
                    raise ConfigError(f"{path}: unknown key [{section}] {k}; {hint}")
                file_vals[name] = coerce(KEY_BY_NAME[name], v, f"{path}: [{section}]")
        else:
            raise ConfigError(f"{path}: {section} = {table!r} is not a setting; settings live in [sections]")

    env_vals: dict[str, tuple[str, Any]] = {}
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        if var == "DEVAGENT_PROFILE":
            env_vals["profile"] = (var, raw)
            continue
        name = ENV_ALIASES.get(var) or next((k.name for k in KEYS if k.env == var), None)
        if name is not None:
            if var in ENV_ALIASES and not raw:
                continue  # DEVAGENT_STATE_DIR= (set but empty) counts as unset, as it always did
            if name in env_vals and env_vals[name][0] in ENV_ALIASES:
                continue  # the alias (DEVAGENT_STATE_DIR) wins over DEVAGENT_KEYSTORE_PATH
            env_vals[name] = (var, coerce(KEY_BY_NAME[name], raw, f"environment {var}"))

    cli_vals: dict[str, Any] = {}
    for name, v in cli.items():
        if v is None:
            continue
        if name == "profile":
            cli_vals[name] = v
            continue
        if name not in KEY_BY_NAME:
            raise ConfigError(f"--set {name}: unknown key; known: {', '.join(k.name for k in KEYS)}")
        cli_vals[name] = coerce(KEY_BY_NAME[name], v, f"--set {name}")

    sources: dict[str, str] = {}
    # The profile, by the same precedence, else detected.
    if "profile" in cli_vals:
        pname, sources["profile"] = cli_vals["profile"], "command line"
    elif "profile" in env_vals:
        pname, sources["profile"] = env_vals["profile"][1], "environment DEVAGENT_PROFILE"
    elif "profile" in file_vals:
        pname, sources["profile"] = file_vals["profile"], str(path)
    else:
        pname = None
    try:
        if pname is None:
            det = board_profiles.detect(profile_root)
            prof, sources["profile"] = det.profile, f"detected ({det.model or det.machine})"
        else:
            prof = board_profiles.load(pname)
    except board_profiles.BoardProfileError as e:
        raise ConfigError(f"board profile (from {sources.get('profile', 'detection')}): {e}") from e
    prof_vals = {k: v for k, v in prof.settings().items() if k in KEY_BY_NAME}

    vals: dict[str, Any] = {}
    for k in KEYS:
        if k.name in cli_vals:
            vals[k.name], sources[k.name] = cli_vals[k.name], "command line"
        elif k.name in env_vals:
            vals[k.name], sources[k.name] = env_vals[k.name][1], f"environment {env_vals[k.name][0]}"
        elif k.name in file_vals:
            vals[k.name], sources[k.name] = file_vals[k.name], str(path)
        elif k.name in prof_vals:
            vals[k.name], sources[k.name] = coerce(k, prof_vals[k.name], f"profile {prof.path}"), f"profile {prof.name}"
        else:
            vals[k.name], sources[k.name] = k.default, "default"

    if vals["renewal.retry_cap_s"] < vals["renewal.retry_base_s"]:
        raise ConfigError(f"renewal.retry_cap_s ({vals['renewal.retry_cap_s']:g}, from {sources['renewal.retry_cap_s']}) "
                          f"must be >= renewal.retry_base_s ({vals['renewal.retry_base_s']:g}, from "
                          f"{sources['renewal.retry_base_s']})")
    if vals["renewal.jitter"] >= vals["renewal.fraction"]:
        raise ConfigError(f"renewal.jitter ({vals['renewal.jitter']:g}, from {sources['renewal.jitter']}) must be "
                          f"smaller than renewal.fraction ({vals['renewal.fraction']:g}, from "
                          f"{sources['renewal.fraction']})")
    fp = vals["ca.fingerprint"]
    if fp and not (fp.startswith("sha256:") and len(fp) == 71 and all(c in "0123456789abcdefABCDEF" for c in fp[7:])):
        raise ConfigError(f"ca.fingerprint ({sources['ca.fingerprint']}): {fp!r} must be sha256: followed by 64 hex "
                          "digits (openssl x509 -noout -fingerprint -sha256, without the colons)")
    ks_src = sources["keystore.path"]
    if not vals["keystore.path"]:
        raise ConfigError(f"keystore.path ({ks_src}): must not be empty")
    if (euid if euid is not None else os.geteuid()) != 0 and (ks_src == "default" or ks_src.startswith("profile ")):
        # A profile names the system service's directory; a user without root keeps a keystore of their own.
        vals["keystore.path"], sources["keystore.path"] = user_state_dir(env), f"default for a non-root user ({ks_src})"
    elif not os.path.isabs(vals["keystore.path"]):
        if ks_src == "command line" or ks_src.startswith("environment "):
            vals["keystore.path"] = os.path.abspath(vals["keystore.path"])
        else:
            raise ConfigError(f"keystore.path ({ks_src}): {vals['keystore.path']!r} must be absolute")

    def sect(cls, section):
        return cls(**{f.name: vals[f"{section}.{f.name}"] for f in dataclasses.fields(cls)})

    return Config(
        profile=prof.name, keystore_path=Path(vals["keystore.path"]), serial_port=vals["serial.port"],
        key=sect(KeyConfig, "key"), coap=sect(CoapConfig, "coap"), renewal=sect(RenewalConfig, "renewal"),
        clock_trusted=vals["clock.trusted"], clock_tolerance_s=vals["clock.tolerance_s"],
        ca_fingerprint=fp.lower() if fp else "", hooks_timeout_s=vals["hooks.timeout_s"],
        metrics_textfile=vals["metrics.textfile"], notify=vals["daemon.notify"], log_level=vals["log.level"],
        credentials=policies, clm_inventory=vals["clm.inventory"],
        keystore_pending_max_age_s=vals["keystore.pending_max_age_s"], sources=sources)


def docs_table() -> str:
    """Markdown table of every key (kept in docs/operations.md)."""
    rows = ["| key | environment | default | allowed | meaning |", "|---|---|---|---|---|"]
    for k in KEYS:
        if k.choices:
            allowed = ", ".join(k.choices)
        elif k.lo is not None:
            allowed = f"{k.lo:g} – {k.hi:g}"
        else:
            allowed = "true/false" if k.type is bool else "text"
        d = k.default
        d = f"{d:.3f}".rstrip("0") if isinstance(d, float) and d != int(d) else (str(d).lower() if isinstance(d, bool) else d)
        rows.append(f"| `{k.name}` | `{k.env}` | `{d}` | {allowed} | {k.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(docs_table())
