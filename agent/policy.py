"""The lifecycle daemon's scheduling policy: pure functions of certificate validity, failures and clock readings.

Nothing here does I/O or reads the clock; callers pass ``now`` and a uniform random ``u`` in [0, 1), so every rule
is testable with hypothesis.

Invariants (tests/unit/test_policy.py checks them):
- A renewal is scheduled inside the certificate's validity, never later than ``fraction`` of it; jitter only moves
  it earlier, by at most ``jitter`` of the lifetime, and never before ``fraction / 2``.
- A retry delay after ``n`` failures lies in [base/2, cap], grows with ``n`` up to the cap, and while the current
  certificate is still valid it is at most half of the remaining time (but not below ``base / 2``), so the device
  keeps trying ever more often before expiry instead of sleeping through it.
- A clock is "obviously wrong" when it is before ``CLOCK_FLOOR`` (an RTC-less board after power-up) or differs from
  a CA's time by more than the tolerance; then CA time plus monotonic elapsed time is used instead.
- An estimated time carries its uncertainty, derived from how it was obtained (``ca_time_uncertainty``,
  ``floor_window``): it never shrinks as the estimate ages, and it always covers the CA time's resolution and the
  round trip of the exchange that carried it.
"""
from __future__ import annotations

import dataclasses
import datetime

DEFAULT_FRACTION = 2 / 3
DEFAULT_JITTER = 0.05
RETRY_BASE_S = 60.0
RETRY_CAP_S = 3600.0
CLOCK_TOLERANCE_S = 300.0
# Earlier than any certificate this software can meet: a reading before it is a clock that was never set.
CLOCK_FLOOR = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
# How an estimate of the CA's time is uncertain (docs/trust.md "The time to check at"):
CA_TIME_RESOLUTION_S = 1.0  # HTTP Date and CMP messageTime (GeneralizedTime, RFC 5280 4.1.2.5.2) carry whole seconds
# Drift of the monotonic clock of a board without NTP between two contacts with the CA: quartz crystals are specified
# at 20-100 ppm over temperature; twice the worst of that, so a day-old estimate is off by at most ~17 s more.
CLOCK_DRIFT_PPM = 200.0
# CAs backdate notBefore (the lab CA and step-ca by a minute, Let's Encrypt's Boulder by an hour): a certificate's
# notBefore says only that the true time is at least it, and at most about this much later at its issuance.
NOT_BEFORE_SLACK_S = 3600.0
_MAX_EXP = 60  # 2**60 * base overflows nothing and exceeds any cap


def _check_u(u: float) -> None:
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"u must be in [0, 1], not {u}")


def renewal_time(not_before: datetime.datetime, not_after: datetime.datetime, *,
                 fraction: float = DEFAULT_FRACTION, jitter: float = DEFAULT_JITTER,
                 u: float = 0.0) -> datetime.datetime:
    """When to renew a certificate valid from ``not_before`` to ``not_after``.

    Args:
        fraction: point of the lifetime to renew at (0 < fraction < 1).
        jitter: share of the lifetime by which to renew earlier at most (spreads a fleet's load on the CA).
        u: uniform random number in [0, 1]; 0 means no jitter.
    Returns:
        ``not_before + lifetime * max(fraction - jitter * u, fraction / 2)``; ``not_before`` for an empty lifetime.
    Raises:
        ValueError: fraction, jitter or u out of range.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"renewal fraction must be between 0 and 1 (exclusive), not {fraction}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), not {jitter}")
    _check_u(u)
    lifetime = (not_after - not_before).total_seconds()
    if lifetime <= 0:
        return not_before
    f = max(fraction - jitter * u, fraction / 2)
    return not_before + datetime.timedelta(seconds=lifetime * f)


def retry_delay(failures: int, *, base_s: float = RETRY_BASE_S, cap_s: float = RETRY_CAP_S,
                u: float = 0.5) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure: capped exponential backoff, jittered
    in its upper half (``d/2 + d/2*u`` with ``d = min(cap, base * 2**(failures-1))``).

    Raises:
        ValueError: failures < 1, base <= 0, cap < base, u out of range.
    """
    if failures < 1:
        raise ValueError(f"failures must be >= 1, not {failures}")
    if base_s <= 0 or cap_s < base_s:
        raise ValueError(f"need 0 < base_s <= cap_s (got base {base_s}, cap {cap_s})")
    _check_u(u)
    d = min(cap_s, base_s * 2.0 ** min(failures - 1, _MAX_EXP))
    return d / 2 + d / 2 * u


def next_retry(now: datetime.datetime, failures: int, not_after: datetime.datetime, *,
               base_s: float = RETRY_BASE_S, cap_s: float = RETRY_CAP_S, u: float = 0.5) -> datetime.datetime:
    """When to try again after a failed renewal. While the certificate is valid the wait is at most half the time
    left (floored at ``base_s / 2``), so attempts get denser towards expiry; after expiry plain backoff applies."""
    d = retry_delay(failures, base_s=base_s, cap_s=cap_s, u=u)
    left = (not_after - now).total_seconds()
    if left > 0:
        d = min(d, max(left / 2, base_s / 2))
    return now + datetime.timedelta(seconds=d)


def attempts_before_expiry(now: datetime.datetime, failures: int, not_after: datetime.datetime, *,
                           base_s: float = RETRY_BASE_S, cap_s: float = RETRY_CAP_S, limit: int = 10_000) -> int:
    """How many renewal attempts the retry schedule makes from ``now`` (this attempt, the ``failures + 1``-th of a
    streak, included) until ``not_after``, if each one fails at once: the "m" of "attempt n of m" in ``devagent
    status``. An estimate (the mean jitter, ``u = 0.5``); 1 once the certificate has expired, at most ``limit``.
    """
    count, t, n = 1, now, failures + 1
    while count < limit:
        t = next_retry(t, n, not_after, base_s=base_s, cap_s=cap_s, u=0.5)
        if t >= not_after:
            break
        count, n = count + 1, n + 1
    return count


VALIDITY_REASONS = ("not-yet-valid", "expired")


def clock_hint(validity: str, local_now: datetime.datetime, *, ca_now: datetime.datetime | None = None,
               ca_source: str = "the CA's time", valid_since: datetime.datetime | None = None,
               tolerance_s: float = CLOCK_TOLERANCE_S) -> str | None:
    """Why a certificate failed a validity-period check (``validity``: "not-yet-valid" or "expired") when the local
    clock, not the certificate or the trust anchors, is the likely cause; None when nothing points at the clock.

    Evidence, strongest first: the CA's time (``ca_now``: CMP messageTime or HTTP Date plus the monotonic time since
    it was seen) differs from the local clock by more than ``tolerance_s``; for "not yet valid", the local clock is
    before ``valid_since`` (the time is at least the notBefore of a certificate this device already holds from the
    CA); the local clock reads a date before ``CLOCK_FLOOR`` (never set).
    """
    if validity not in VALIDITY_REASONS:
        return None
    local = local_now.isoformat(timespec="seconds")
    if ca_now is not None:
        off = (ca_now - local_now).total_seconds()
        if abs(off) > tolerance_s:
            way = "behind" if off > 0 else "ahead of"
            return (f"the local clock is the likely cause, not the certificate or the trust anchors: it reads {local}, "
                    f"{human_duration(abs(off))} {way} {ca_source} ({ca_now.isoformat(timespec='seconds')}); fix NTP or the "
                    "RTC")
    if validity == "not-yet-valid" and valid_since is not None and (valid_since - local_now).total_seconds() > tolerance_s:
        return (f"the local clock is the likely cause, not the certificate or the trust anchors: it reads {local}, "
                f"before {valid_since.isoformat(timespec='seconds')}, when a certificate this device already holds "
                "from the CA became valid; fix NTP or the RTC")
    if local_now < CLOCK_FLOOR:
        return (f"the local clock is the likely cause, not the certificate or the trust anchors: it reads {local} "
                "(never set: no RTC battery, no NTP?); fix NTP or the RTC")
    return None


def human_duration(s: float) -> str:
    """``3 days``, ``5 h``, ``12 min``, ``40 s``."""
    for unit, n in (("day", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            v = s / n
            return f"{v:.0f} {unit}{'s' if unit == 'day' and round(v) != 1 else ''}"
    return f"{s:.0f} s"


def ca_time_uncertainty(round_trip_s: float, age_s: float, *, resolution_s: float = CA_TIME_RESOLUTION_S,
                        drift_ppm: float = CLOCK_DRIFT_PPM) -> float:
    """How far the CA's time, carried forward with the monotonic clock, may be off now.

    The server stamped its time (CMP messageTime, HTTP Date) at some instant between our request and its response
    (``round_trip_s``), truncated to ``resolution_s``; since then (``age_s``) our monotonic clock drifted by up to
    ``drift_ppm``. The estimate is CA time + elapsed, so it is off by at most the sum.
    """
    if round_trip_s < 0 or age_s < 0:
        raise ValueError("round_trip_s and age_s must be >= 0")
    return resolution_s + round_trip_s + age_s * drift_ppm / 1e6


def floor_window(floor: datetime.datetime, age_s: float, *, slack_s: float = NOT_BEFORE_SLACK_S,
                 drift_ppm: float = CLOCK_DRIFT_PPM) -> tuple[datetime.datetime, float]:
    """The time to check at, and its uncertainty, when all we know is a lower bound: ``floor`` = the newest notBefore
    of our certificates plus the monotonic time since we saw it (no CA time, a clock that was never set).

    The true time lies in [floor, floor + slack_s] (CAs backdate notBefore by up to ``slack_s``), widened by the
    drift since: returns the middle of that interval and half its width, so a certificate that expired before the
    floor is still refused and one whose notBefore is more than ``slack_s`` ahead of it too.
    """
    if age_s < 0:
        raise ValueError("age_s must be >= 0")
    drift = age_s * drift_ppm / 1e6
    half = (slack_s + 2 * drift) / 2
    return floor + datetime.timedelta(seconds=slack_s / 2), half


@dataclasses.dataclass(frozen=True)
class ClockEstimate:
    """Offset of trusted time from the local wall clock, learnt from a CA response at ``observed_mono``."""

    offset_s: float = 0.0
    source: str = "system clock"
    observed_mono: float | None = None

    def now(self, local_now: datetime.datetime) -> datetime.datetime:
        return local_now + datetime.timedelta(seconds=self.offset_s)


def clock_obviously_wrong(local_now: datetime.datetime, reference: datetime.datetime | None = None, *,
                          tolerance_s: float = CLOCK_TOLERANCE_S) -> bool:
    """True for a local clock before ``CLOCK_FLOOR`` or more than ``tolerance_s`` away from ``reference``."""
    if local_now < CLOCK_FLOOR:
        return True
    return reference is not None and abs((local_now - reference).total_seconds()) > tolerance_s


def observe_server_time(estimate: ClockEstimate, local_now: datetime.datetime, server_time: datetime.datetime,
                        mono: float, *, source: str, trusted_clock: bool = False,
                        tolerance_s: float = CLOCK_TOLERANCE_S) -> ClockEstimate:
    """Fold a CA's time (CMP messageTime, HTTP Date) into the estimate.

    With a trusted clock the estimate stays at zero offset. Otherwise a server time that disagrees with the local
    clock by more than ``tolerance_s`` (or any server time when the local clock is before ``CLOCK_FLOOR``) becomes
    the new reference; small differences (network delay, HTTP Date's one-second resolution) are ignored.
    """
    if server_time.tzinfo is None:
        raise ValueError("server_time must be timezone-aware")
    if trusted_clock:
        return ClockEstimate()
    if clock_obviously_wrong(local_now, server_time, tolerance_s=tolerance_s):
        return ClockEstimate((server_time - local_now).total_seconds(), source, mono)
    return ClockEstimate(0.0, "system clock", mono)
