"""Pure parts of the daemon's reporting (issue #20): "attempt n of m", the clock hint, the in-flight metrics and the
`devagent status` view of an attempt in progress."""
from __future__ import annotations

import dataclasses
import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import metrics, policy, renewal_status

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@settings(deadline=None)  # a property, not a timing: a loaded CI machine must not fail it
@given(st.integers(0, 50), st.floats(1, 10 * 86400), st.floats(0.5, 600), st.floats(1, 7200))
def test_attempts_before_expiry_is_a_positive_count_that_shrinks(failures, left, base, cap_extra):
    cap = base + cap_extra
    na = NOW + datetime.timedelta(seconds=left)
    m = policy.attempts_before_expiry(NOW, failures, na, base_s=base, cap_s=cap)
    assert 1 <= m <= 10_000
    later = NOW + datetime.timedelta(seconds=left / 2)
    assert policy.attempts_before_expiry(later, failures, na, base_s=base, cap_s=cap) <= m


def test_attempts_before_expiry_counts_the_schedule():
    # 10 min left, base 60 s: delays min(backoff, half the time left, floored at 30 s) until expiry
    assert policy.attempts_before_expiry(NOW, 0, NOW + datetime.timedelta(seconds=600), base_s=60, cap_s=3600) > 3
    assert policy.attempts_before_expiry(NOW, 0, NOW - datetime.timedelta(seconds=1)) == 1  # expired: this one


def test_clock_hint_uses_the_ca_time_first():
    h = policy.clock_hint("expired", NOW, ca_now=NOW - datetime.timedelta(days=3), ca_source="the CA's time (HTTP Date)")
    assert h and "likely cause" in h and "3 days ahead of the CA's time (HTTP Date)" in h
    assert policy.clock_hint("expired", NOW, ca_now=NOW - datetime.timedelta(seconds=20)) is None  # within tolerance


def test_clock_hint_from_a_certificate_we_hold_and_from_an_unset_clock():
    h = policy.clock_hint("not-yet-valid", NOW, valid_since=NOW + datetime.timedelta(days=400))
    assert h and "before 2027" in h and "already holds" in h
    assert policy.clock_hint("expired", NOW, valid_since=NOW + datetime.timedelta(days=400)) is None
    h = policy.clock_hint("not-yet-valid", datetime.datetime(1970, 1, 2, tzinfo=UTC))
    assert h and "never set" in h
    assert policy.clock_hint("untrusted", datetime.datetime(1970, 1, 2, tzinfo=UTC)) is None  # not a validity issue


@dataclasses.dataclass
class Cred:  # the attributes metrics.render reads from a keystore Credential
    name: str
    kind: str = "ldevid"
    domain: str = "plant"
    not_after: datetime.datetime = NOW + datetime.timedelta(days=10)
    record: dict = dataclasses.field(default_factory=dict)


ATTEMPT = {"started": "2026-06-01T11:59:00+00:00", "server": "https://ca.plant:8443", "attempt": 2, "of": 14,
           "step": "request", "gives_up_at": "2026-06-01T12:09:00+00:00", "pid": 1}


def _value(text, metric, cred):
    rows = [ln for ln in text.splitlines() if ln.startswith(metric + "{") and f'credential="{cred}"' in ln]
    return rows


def test_metrics_show_the_attempt_in_progress():
    text = metrics.render([Cred("a"), Cred("b")], NOW, in_flight={"a": ATTEMPT})
    assert _value(text, "devagent_renewal_in_progress", "a")[0].endswith(" 1")
    assert _value(text, "devagent_renewal_in_progress", "b")[0].endswith(" 0")
    assert _value(text, "devagent_renewal_attempt_number", "a")[0].endswith(" 2")
    assert _value(text, "devagent_renewal_attempts_before_expiry", "a")[0].endswith(" 14")
    started = float(_value(text, "devagent_renewal_attempt_started_timestamp_seconds", "a")[0].rsplit(" ", 1)[1])
    assert started == datetime.datetime(2026, 6, 1, 11, 59, tzinfo=UTC).timestamp()
    info = _value(text, "devagent_renewal_attempt_info", "a")
    assert info == ['devagent_renewal_attempt_info{credential="a",kind="ldevid",domain="plant",'
                    'server="https://ca.plant:8443",step="request"} 1']
    assert not _value(text, "devagent_renewal_attempt_info", "b")
    # without the daemon's live view (a one-shot render), the stored mark is used
    text = metrics.render([Cred("a", record={"meta": {"renewing": ATTEMPT}})], NOW)
    assert _value(text, "devagent_renewal_in_progress", "a")[0].endswith(" 1")


def test_status_view_of_an_attempt_and_of_a_dead_daemon():
    r = renewal_status.renewing({"renewing": ATTEMPT}, NOW, alive=lambda pid: True)
    assert r["running_s"] == 60.0 and not r["stale"]
    text = renewal_status.lines({"renewing": r})
    assert "attempt 2 of about 14" in text[0] and "https://ca.plant:8443" in text[0] and "12:09:00" in text[0]
    gone = renewal_status.renewing({"renewing": ATTEMPT}, NOW, alive=lambda pid: False)
    assert gone["stale"] and "cut off" in renewal_status.lines({"renewing": gone})[0]
    assert renewal_status.renewing({}, NOW) is None


@pytest.mark.parametrize("offset_days,valid_by_ca", [(3, True), (-3, False), (400, False)])
def test_status_clock_note(offset_days, valid_by_ca):
    """A certificate "not yet valid" by the local clock (it starts tomorrow): with the CA's time 3 days ahead of the
    local clock it is valid, and status says so; otherwise status only reports the disagreement."""
    nb, na = NOW + datetime.timedelta(days=1), NOW + datetime.timedelta(days=91)
    meta = {"clock": {"offset_s": offset_days * 86400.0, "seen": "2026-06-01T11:00:00+00:00", "source": "HTTP Date"}}
    c = renewal_status.clock(meta, nb, na, NOW)
    assert c["valid_by_ca_time"] is valid_by_ca
    assert "Fix NTP or the RTC" in c["note"] or "fix NTP or the RTC" in c["note"]
    assert ("not yet valid only by the local clock" in c["note"]) is valid_by_ca
    assert f"{abs(offset_days)} days {'behind' if offset_days > 0 else 'ahead of'} the CA's time" in c["note"]
    assert renewal_status.clock({}, nb, na, NOW) is None


def test_status_says_when_validity_was_checked_at_an_estimated_time():
    meta = {"checked_at": {"at": "2026-12-01T10:00:00Z", "clock": "estimate", "uncertainty_s": 1.6,
                           "source": "the CA's time (cmp response time) seen 2 s ago"}}
    item = {"checked_at": renewal_status.checked_at(meta)}
    (line,) = renewal_status.lines(item)
    assert "estimated time 2026-12-01T10:00:00Z +- 2 s" in line and "cmp response time" in line
    assert renewal_status.checked_at({}) is None and renewal_status.lines({"checked_at": None}) == []
