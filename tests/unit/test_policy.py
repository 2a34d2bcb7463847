"""agent.policy: the daemon's scheduling rules as properties (hypothesis)."""
from __future__ import annotations

import datetime

import pytest
from hypothesis import given, strategies as st

from agent import policy

UTC = datetime.timezone.utc
T0 = datetime.datetime(2030, 1, 1, tzinfo=UTC)
lifetimes = st.floats(min_value=1.0, max_value=10 * 365 * 86400.0)
fractions = st.floats(min_value=0.1, max_value=0.95)
jitters = st.floats(min_value=0.0, max_value=0.5)
units = st.floats(min_value=0.0, max_value=1.0)
failures = st.integers(min_value=1, max_value=200)


@given(lifetimes, fractions, jitters, units)
def test_renewal_inside_validity_and_not_after_fraction(life, fraction, jitter, u):
    nb, na = T0, T0 + datetime.timedelta(seconds=life)
    t = policy.renewal_time(nb, na, fraction=fraction, jitter=jitter, u=u)
    slack = datetime.timedelta(microseconds=2)  # timedelta rounds to microseconds
    assert nb <= t + slack and t < na
    assert t <= nb + datetime.timedelta(seconds=life * fraction) + slack
    assert t + slack >= nb + datetime.timedelta(seconds=life * max(fraction - jitter, fraction / 2))


@given(lifetimes, fractions)
def test_no_jitter_is_exactly_the_fraction(life, fraction):
    nb, na = T0, T0 + datetime.timedelta(seconds=life)
    t = policy.renewal_time(nb, na, fraction=fraction, jitter=0.3, u=0.0)
    assert abs((t - nb).total_seconds() - life * fraction) < 1e-3


def test_default_is_two_thirds():
    t = policy.renewal_time(T0, T0 + datetime.timedelta(hours=3), jitter=0)
    assert t == T0 + datetime.timedelta(hours=2)


def test_empty_lifetime_renews_at_once():
    assert policy.renewal_time(T0, T0) == T0
    assert policy.renewal_time(T0, T0 - datetime.timedelta(seconds=5)) == T0


@pytest.mark.parametrize("kw", [dict(fraction=0), dict(fraction=1), dict(jitter=-0.1), dict(jitter=1), dict(u=2)])
def test_renewal_rejects_bad_parameters(kw):
    with pytest.raises(ValueError):
        policy.renewal_time(T0, T0 + datetime.timedelta(hours=1), **kw)


@given(failures, st.floats(0.05, 600), st.floats(1, 86400), units)
def test_retry_delay_bounded(n, base, cap, u):
    cap = max(cap, base)
    d = policy.retry_delay(n, base_s=base, cap_s=cap, u=u)
    assert base / 2 - 1e-9 <= d <= cap + 1e-9


@given(failures, st.floats(0.05, 600), st.floats(1, 86400), units)
def test_retry_delay_grows_to_the_cap(n, base, cap, u):
    cap = max(cap, base)
    a = policy.retry_delay(n, base_s=base, cap_s=cap, u=u)
    b = policy.retry_delay(n + 1, base_s=base, cap_s=cap, u=u)
    assert b >= a - 1e-9


def test_retry_delay_doubles():
    assert [policy.retry_delay(n, base_s=10, cap_s=1000, u=1.0) for n in (1, 2, 3, 4, 8)] == [10, 20, 40, 80, 1000]


@given(failures, st.floats(0.05, 600), st.floats(1, 86400), units, st.floats(0, 10 * 86400))
def test_next_retry_stays_before_expiry_while_valid(n, base, cap, u, left):
    cap = max(cap, base)
    na = T0 + datetime.timedelta(seconds=left)
    t = policy.next_retry(T0, n, na, base_s=base, cap_s=cap, u=u)
    d = (t - T0).total_seconds()
    assert d >= base / 2 - 1e-6
    if left > base:  # room left: the next attempt comes before expiry
        assert t < na
    assert d <= cap + 1e-6


def test_next_retry_after_expiry_is_plain_backoff():
    na = T0 - datetime.timedelta(hours=1)
    t = policy.next_retry(T0, 3, na, base_s=10, cap_s=1000, u=1.0)
    assert (t - T0).total_seconds() == 40


@pytest.mark.parametrize("kw", [dict(failures=0), dict(base_s=0), dict(base_s=10, cap_s=5), dict(u=-1)])
def test_retry_rejects_bad_parameters(kw):
    args = dict(failures=1, base_s=1, cap_s=10, u=0.5) | kw
    with pytest.raises(ValueError):
        policy.retry_delay(args.pop("failures"), **args)


@given(st.floats(-20 * 365 * 86400, 20 * 365 * 86400))
def test_clock_estimate_follows_the_ca_when_obviously_wrong(skew):
    server = T0
    local = T0 + datetime.timedelta(seconds=skew)
    est = policy.observe_server_time(policy.ClockEstimate(), local, server, 1.0, source="CMP messageTime")
    if abs(skew) > policy.CLOCK_TOLERANCE_S or local < policy.CLOCK_FLOOR:
        assert abs((est.now(local) - server).total_seconds()) < 1e-3
        assert est.source == "CMP messageTime"
    else:  # small differences are network delay / Date resolution: keep the system clock
        assert est.offset_s == 0


def test_trusted_clock_ignores_the_ca():
    local = T0 + datetime.timedelta(days=400)
    est = policy.observe_server_time(policy.ClockEstimate(), local, T0, 1.0, source="x", trusted_clock=True)
    assert est.offset_s == 0


def test_naive_server_time_is_refused():
    with pytest.raises(ValueError):
        policy.observe_server_time(policy.ClockEstimate(), T0, T0.replace(tzinfo=None), 0, source="x")


def test_clock_before_floor_is_obviously_wrong():
    assert policy.clock_obviously_wrong(datetime.datetime(1970, 1, 1, 0, 2, tzinfo=UTC))
    assert not policy.clock_obviously_wrong(T0)


def test_ca_time_uncertainty_covers_resolution_round_trip_and_drift():
    assert policy.ca_time_uncertainty(0.25, 0.0) == pytest.approx(1.25)  # 1 s resolution + the round trip
    day = policy.ca_time_uncertainty(0.25, 86400.0)
    assert day == pytest.approx(1.25 + 86400 * policy.CLOCK_DRIFT_PPM / 1e6)  # grows with the estimate's age
    with pytest.raises(ValueError):
        policy.ca_time_uncertainty(-1.0, 0.0)


@given(age=st.floats(0, 10 * 86400))
def test_floor_window_covers_floor_to_floor_plus_slack(age):
    floor = datetime.datetime(2026, 5, 1, tzinfo=datetime.timezone.utc)
    at, u = policy.floor_window(floor, age)
    lo, hi = at - datetime.timedelta(seconds=u), at + datetime.timedelta(seconds=u)
    assert lo <= floor and hi >= floor + datetime.timedelta(seconds=policy.NOT_BEFORE_SLACK_S)
    assert (floor - lo).total_seconds() <= age * policy.CLOCK_DRIFT_PPM / 1e6 + 1e-3  # only the drift below it
