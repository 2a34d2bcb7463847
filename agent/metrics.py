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
  devagent_renewal_in_progress                  1 while a renewal attempt runs (0 otherwise)
  devagent_renewal_attempt_started_timestamp_seconds  when the attempt in progress started (0: none)
  devagent_renewal_attempt_number               n of "attempt n of m" for the attempt in progress (0: none)
  devagent_renewal_attempts_before_expiry       m: attempts the retry schedule makes before the certificate expires
  devagent_renewal_attempt_info                 1 per attempt in progress, labels also ``server`` and ``step``
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
    "devagent_renewal_in_progress": ("gauge", "1 while a renewal attempt is in progress."),
    "devagent_renewal_attempt_started_timestamp_seconds": ("gauge", "Start of the renewal attempt in progress "
                                                           "(Unix time, 0 = none)."),
    "devagent_renewal_attempt_number": ("gauge", "Number of the attempt in progress in the current streak (0 = none)."),
    "devagent_renewal_attempts_before_expiry": ("gauge", "Attempts the retry schedule makes before the certificate "
                                                "expires, counting the one in progress (0 = none in progress)."),
}
INFO = ("devagent_renewal_attempt_info", "The renewal attempt in progress: server and step (request or "
        "ca-check).")


def _ts(iso: str | None) -> float:
    if not iso:
        return 0.0
    try:
        return datetime.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(creds, now: datetime.datetime, *, clock_offset_s: float = 0.0, in_flight: dict | None = None) -> str:
    """Exposition text for ``creds`` (keystore Credentials) at ``now`` (the daemon's best time estimate).

    ``in_flight``: credential name -> the attempt in progress (``started``, ``server``, ``step``, ``attempt``,
    ``of``; the daemon's own view, fresher than the stored ``renewing`` mark, which is used when it is missing).
    """
    rows: dict[str, list[str]] = {m: [] for m in HELP}
    info: list[str] = []
    for c in creds:
        m = c.record.get("meta") or {}
        lab = f'credential="{_esc(c.name)}",kind="{_esc(c.kind)}",domain="{_esc(c.domain or "")}"'
        att = (in_flight or {}).get(c.name) if in_flight is not None else m.get("renewing")
        att = att if isinstance(att, dict) else None
        vals = {
            "devagent_certificate_expiry_seconds": (c.not_after - now).total_seconds(),
            "devagent_certificate_not_after_timestamp_seconds": c.not_after.timestamp(),
            "devagent_renewal_next_timestamp_seconds": _ts(m.get("next_renewal")),
            "devagent_renewal_last_success_timestamp_seconds": _ts(m.get("last_success")),
            "devagent_renewal_failures_total": int(m.get("failures_total", 0)),
            "devagent_renewal_consecutive_failures": int(m.get("failures", 0)),
            "devagent_deploy_failures_total": int(m.get("deploy_failures_total", 0)),
            "devagent_renewal_in_progress": 1 if att else 0,
            "devagent_renewal_attempt_started_timestamp_seconds": _ts(att.get("started")) if att else 0.0,
            "devagent_renewal_attempt_number": int(att.get("attempt", 0)) if att else 0,
            "devagent_renewal_attempts_before_expiry": int(att.get("of", 0)) if att else 0,
        }
        for k, v in vals.items():
            rows[k].append(f"{k}{{{lab}}} {v:.3f}" if isinstance(v, float) else f"{k}{{{lab}}} {v}")
        if att:
            info.append(f'{INFO[0]}{{{lab},server="{_esc(att.get("server", ""))}",step="{_esc(att.get("step", ""))}"}} 1')
    out = []
    for name, (typ, text) in HELP.items():
        out += [f"# HELP {name} {text}", f"# TYPE {name} {typ}", *rows[name]]
    out += [f"# HELP {INFO[0]} {INFO[1]}", f"# TYPE {INFO[0]} gauge", *info]
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
