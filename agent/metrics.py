"""Prometheus textfile for node_exporter's textfile collector.

``render`` is pure (credentials' metadata in, exposition text out); ``write`` replaces the file atomically via
``keystore.fsutil`` so node_exporter never reads half a file. Mode 0644: node_exporter runs as another user and the
file holds no secrets.

Metrics (labels ``credential``, ``kind``, ``domain``):
  devagent_certificate_expiry_seconds           seconds until notAfter (negative once expired)
  devagent_certificate_not_after_timestamp_seconds
  devagent_renewal_next_timestamp_seconds       when the daemon will next try
  devagent_renewal_last_success_timestamp_seconds  (0: never renewed by the daemon)
  devagent_renewal_failures_total               failed renewal attempts since the credential was created
  devagent_renewal_consecutive_failures         failures since the last success (0: healthy)
  devagent_deploy_failures_total                failed deployments/hooks
  devagent_clock_offset_seconds                 CA time minus system time as the daemon estimates it
  devagent_last_run_timestamp_seconds           when the daemon last checked (staleness alarm)
"""
from __future__ import annotations

import datetime

from keystore import fsutil

HELP = {
    "devagent_certificate_expiry_seconds": ("gauge", "Seconds until the live certificate expires."),
    "devagent_certificate_not_after_timestamp_seconds": ("gauge", "notAfter of the live certificate (Unix time)."),
    "devagent_renewal_next_timestamp_seconds": ("gauge", "Next scheduled renewal attempt (Unix time)."),
    "devagent_renewal_last_success_timestamp_seconds": ("gauge", "Last successful renewal (Unix time, 0 = never)."),
    "devagent_renewal_failures_total": ("counter", "Failed renewal attempts."),
    "devagent_renewal_consecutive_failures": ("gauge", "Failed renewal attempts since the last success."),
    "devagent_deploy_failures_total": ("counter", "Failed deployments or hook commands."),
}


def _ts(iso: str | None) -> float:
    if not iso:
        return 0.0
    try:
        return datetime.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(creds, now: datetime.datetime, *, clock_offset_s: float = 0.0) -> str:
    """Exposition text for ``creds`` (keystore Credentials) at ``now`` (the daemon's best time estimate)."""
    rows: dict[str, list[str]] = {m: [] for m in HELP}
    for c in creds:
        m = c.record.get("meta") or {}
        lab = f'credential="{_esc(c.name)}",kind="{_esc(c.kind)}",domain="{_esc(c.domain or "")}"'
        vals = {
            "devagent_certificate_expiry_seconds": (c.not_after - now).total_seconds(),
            "devagent_certificate_not_after_timestamp_seconds": c.not_after.timestamp(),
            "devagent_renewal_next_timestamp_seconds": _ts(m.get("next_renewal")),
            "devagent_renewal_last_success_timestamp_seconds": _ts(m.get("last_success")),
            "devagent_renewal_failures_total": int(m.get("failures_total", 0)),
            "devagent_renewal_consecutive_failures": int(m.get("failures", 0)),
            "devagent_deploy_failures_total": int(m.get("deploy_failures_total", 0)),
        }
        for k, v in vals.items():
            rows[k].append(f"{k}{{{lab}}} {v:.3f}" if isinstance(v, float) else f"{k}{{{lab}}} {v}")
    out = []
    for name, (typ, text) in HELP.items():
        out += [f"# HELP {name} {text}", f"# TYPE {name} {typ}", *rows[name]]
    out += ["# HELP devagent_clock_offset_seconds CA time minus system time, as estimated by the daemon.",
            "# TYPE devagent_clock_offset_seconds gauge", f"devagent_clock_offset_seconds {clock_offset_s:.3f}",
            "# HELP devagent_last_run_timestamp_seconds When the daemon last checked its credentials.",
            "# TYPE devagent_last_run_timestamp_seconds gauge",
            f"devagent_last_run_timestamp_seconds {now.timestamp():.3f}"]
    return "\n".join(out) + "\n"


def write(path: str, text: str) -> None:
    """Replace the textfile atomically (creating its directory 0755 if missing).

    Raises:
        keystore.errors.StorageError: the write failed; the previous file is intact.
    """
    from pathlib import Path

    p = Path(path)
    if not p.parent.exists():
        fsutil.ensure_dir(p.parent, 0o755)
    fsutil.atomic_write(p, text.encode(), mode=0o644)
