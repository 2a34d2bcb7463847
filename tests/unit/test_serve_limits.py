"""The bounded structures behind `devagent serve` (coap_services.limits), on an injected clock."""
from __future__ import annotations

import logging

import pytest

from coap_services.limits import DedupCache, ExpiringLru, LogSummary, ServeLimits


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_expiring_lru_capacity_and_lifetime():
    c = Clock()
    m = ExpiringLru(3, 10.0, clock=c)
    for k in "abcd":
        m.put(k, k.upper())
    assert len(m) == 3 and "a" not in m and m.evicted == 1
    assert m.get("d") == "D" and m["b"] == "B"
    c.t += 10.0
    assert len(m) == 0 and m.get("d") is None
    with pytest.raises(KeyError):
        m["d"]


def test_expiring_lru_refresh_keeps_the_active_entry():
    c = Clock()
    m = ExpiringLru(2, 10.0, refresh=True, clock=c)
    m["old"] = 1
    m["active"] = 2
    c.t += 6
    assert m.get("old") == 1  # touched: refreshed and now the most recent
    m["new"] = 3  # full: the least recently used ("active") goes
    assert "active" not in m and "old" in m and "new" in m
    c.t += 6
    assert "old" in m  # refreshed at +6, lives to +16
    c.t += 5
    assert "old" not in m


def test_expiring_lru_per_entry_lifetime_behind_a_longer_one():
    c = Clock()
    m = ExpiringLru(8, 100.0, clock=c)
    m.put("long", 1, 100)
    m.put("short", 2, 5)
    c.t += 6
    assert "short" not in m and "long" in m


def test_dedup_duplicate_gets_the_stored_answer():
    c = Clock()
    d = DedupCache(4, 2, clock=c)
    assert d.seen(("peer", 1), 247) == (False, None)
    assert d.seen(("peer", 1), 247) == (True, None)  # in progress: dropped, nothing to resend yet
    d.answered(("peer", 1), b"answer", keep=False)
    assert d.seen(("peer", 1), 247) == (True, b"answer")
    c.t += 247
    assert d.seen(("peer", 1), 247) == (False, None)  # EXCHANGE_LIFETIME over: a new message
    assert d.duplicates == 2


def test_dedup_flood_cannot_evict_kept_answers():
    c = Clock()
    d = DedupCache(4, 2, clock=c)
    d.seen(("clm", 7), 247)
    d.answered(("clm", 7), b"csr", keep=True)  # 2.04 to a POST
    for mid in range(1000):  # unauthenticated flood: error answers only
        d.seen(("attacker", mid), 247)
        d.answered(("attacker", mid), b"4.01", keep=False)
    assert len(d) <= 4 + 2
    assert d.seen(("clm", 7), 247) == (True, b"csr")
    assert d.evicted >= 996
    c.t += 248
    assert d.seen(("clm", 7), 247) == (False, None)  # the kept answer still expires on time


def test_dedup_answer_for_a_forgotten_exchange_is_dropped():
    d = DedupCache(1, 1, clock=Clock())
    d.seen("a", 247)
    d.seen("b", 247)  # evicts "a"
    d.answered("a", b"late", keep=True)
    assert "a" not in d.keep and len(d) == 1


def _records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "t.summary"]


def test_log_summary_one_line_per_kind_then_a_summary(caplog):
    c = Clock()
    s = LogSummary(logging.getLogger("t.summary"), interval_s=60, clock=c)
    with caplog.at_level(logging.INFO, logger="t.summary"):
        for i in range(1000):
            s.note(("POST", "/csr", "5.03", "rate-limited"), logging.INFO, "refused %d", i)
        s.note(("POST", "/verify", "4.00", "malformed"), logging.INFO, "refused verify")
        assert _records(caplog) == ["refused 0", "refused verify"]
        c.t += 61
        s.tick()
        lines = _records(caplog)
        assert len(lines) == 3 and "999 more request(s) in the last 61 s: 999 × POST /csr 5.03 rate-limited" in lines[2]
        # the flood goes on: the kind was counted in the last interval, so only the next summary reports it
        s.note(("POST", "/csr", "5.03", "rate-limited"), logging.INFO, "refused again")
        assert len(_records(caplog)) == 3
        c.t += 61
        s.tick()
        c.t += 61
        s.tick()  # a quiet interval: nothing to say
        assert len(_records(caplog)) == 4
        s.note(("POST", "/csr", "5.03", "rate-limited"), logging.INFO, "refused after a pause")
        assert _records(caplog)[-1] == "refused after a pause"
    assert s.logged == 3 and s.suppressed == 1000


def test_log_summary_level_is_the_worst_counted(caplog):
    c = Clock()
    s = LogSummary(logging.getLogger("t.summary"), interval_s=10, clock=c)
    with caplog.at_level(logging.INFO, logger="t.summary"):
        s.note("k", logging.INFO, "first")
        s.note("k", logging.WARNING, "second")
        s.tick(force=True)
    assert [r.levelno for r in caplog.records if r.name == "t.summary"] == [logging.INFO, logging.WARNING]


def test_serve_limits_reject_nonsense():
    with pytest.raises(ValueError, match="in_flight"):
        ServeLimits(in_flight=0)
