"""What ``devagent status`` says about the daemon's work on a credential: the renewal attempt in progress and the
local clock against the CA's time. Pure (the record's ``meta`` in, JSON fields and text lines out), cheap to import.

The daemon (``agent.daemon``) writes, per credential: ``renewing`` while an attempt runs (``started``, ``server``,
``step``, ``attempt``, ``of``, ``gives_up_at``, ``pid``) and ``clock`` (``offset_s`` = CA time minus the local
clock, ``seen``, ``source``) when its last contact with the CA showed them disagreeing by more than
``clock.tolerance_s``, and ``checked_at`` (``at``, ``clock``, ``uncertainty_s``, ``source``) when its last attempt
checked certificates at an estimated time rather than a trusted clock (docs/trust.md "The time to check at").
"""
from __future__ import annotations

import datetime
import os

from agent.policy import human_duration


def _parse(s) -> datetime.datetime | None:
    try:
        t = datetime.datetime.fromisoformat(s)
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def renewing(meta: dict, now: datetime.datetime, *, alive=_alive) -> dict | None:
    """The attempt in progress with ``running_s`` and ``stale`` (its daemon is gone: it was cut off and is
    retried when the daemon starts again); None when there is none."""
    r = meta.get("renewing")
    if not isinstance(r, dict):
        return None
    out = dict(r)
    started = _parse(r.get("started"))
    out["running_s"] = round((now - started).total_seconds(), 1) if started else None
    out["stale"] = not alive(r.get("pid"))
    return out


def clock(meta: dict, not_before: datetime.datetime, not_after: datetime.datetime,
          now: datetime.datetime) -> dict | None:
    """The daemon's last view of the local clock against the CA's, and what that means for this certificate."""
    c = meta.get("clock")
    if not isinstance(c, dict) or not isinstance(c.get("offset_s"), (int, float)):
        return None
    off = float(c["offset_s"])
    ca_now = now + datetime.timedelta(seconds=off)
    local_ok = not_before <= now <= not_after
    ca_ok = not_before <= ca_now <= not_after
    out = dict(c)
    out["valid_by_ca_time"] = ca_ok
    way = "behind" if off > 0 else "ahead of"
    note = (f"the local clock is {human_duration(abs(off))} {way} the CA's time ({c.get('source', 'CA')}, seen "
            f"{c.get('seen')})")
    if ca_ok and not local_ok:
        state = "not yet valid" if now < not_before else "expired"
        note += f": this certificate is {state} only by the local clock; by the CA's time it is valid. Fix NTP or " \
                "the RTC (the certificate and the trust anchors are fine)"
    else:
        note += "; fix NTP or the RTC"
    out["note"] = note
    return out


def checked_at(meta: dict) -> dict | None:
    """The estimated time the daemon's last attempt checked validity at, or None (a trusted clock)."""
    c = meta.get("checked_at")
    return dict(c) if isinstance(c, dict) and isinstance(c.get("uncertainty_s"), (int, float)) else None


def lines(item: dict) -> list[str]:
    """Extra ``devagent status`` text lines for a credential summary carrying ``renewing`` / ``clock``."""
    out = []
    r = item.get("renewing")
    if r:
        if r.get("stale"):
            out.append(f"    renewal attempt started {r.get('started')} was cut off (daemon pid {r.get('pid')} is gone); "
                       "it is retried when the daemon starts")
        else:
            running = f", {r['running_s']:.0f} s so far" if r.get("running_s") is not None else ""
            out.append(f"    renewing now: attempt {r.get('attempt')} of about {r.get('of')} before expiry, at "
                       f"{r.get('server')} (step {r.get('step')}), since {r.get('started')}{running}; counted as "
                       f"failed if not done by {r.get('gives_up_at')}")
    c = item.get("clock")
    if c:
        out.append(f"    clock: {c['note']}")
    e = item.get("checked_at")
    if e:
        out.append(f"    validity checked at the estimated time {e.get('at')} +- {e['uncertainty_s']:.0f} s "
                   f"({e.get('source')}); set clock.trusted = true on a board with NTP or an RTC")
    return out
