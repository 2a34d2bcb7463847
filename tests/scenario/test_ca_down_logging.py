"""While the CA is down its check fails every retry_base_s; the journal gets a warning on the first failure, on every
change of state (another kind of error, CA back), and otherwise at most every ca_warn_interval_s with the count.

The daemon's monotonic clock is injected (as the daemon tests inject the wall clock); the CA is the simulator over
the real lab CA, the keystore is real.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging

from tests.scenario.conftest import NAME


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "devagent.daemon" and r.levelno >= logging.WARNING and "CA certificate check" in r.getMessage()]


def test_ca_down_is_reported_once_then_rate_limited_with_the_count(world, caplog):
    caplog.set_level(logging.DEBUG, logger="devagent")
    w = world(lifetime_s=7200)  # no renewal falls due during the test: only the CA checks run
    cfg = w.config("", **{"renewal.retry_base_s": 60.0, "renewal.retry_cap_s": 600.0})
    t = [1000.0]
    d = w.daemon(cfg, mono=lambda: t[0], ca_warn_interval_s=900.0)

    def tick_at(s: float) -> None:
        t[0] = 1000.0 + s
        asyncio.run(d.tick())

    w.sim.down = True
    tick_at(0)
    assert len(_warnings(caplog)) == 1 and "connection refused" in _warnings(caplog)[0]
    for s in range(60, 900, 60):  # 14 more failed checks within the interval: debug only
        tick_at(s)
    assert len(_warnings(caplog)) == 1
    assert w.sim.calls.count("ca_certs") == 15
    tick_at(900)  # the interval has passed: one warning with the count
    msgs = _warnings(caplog)
    assert len(msgs) == 2 and "still failing: 16 failure(s)" in msgs[1]
    tick_at(960)
    assert len(_warnings(caplog)) == 2

    w.sim.down = False  # back: one line that says so, with the count
    tick_at(1020)
    back = [r.getMessage() for r in caplog.records if "CA reachable again after 17 failed" in r.getMessage()]
    assert len(back) == 1

    w.sim.down = True  # a new outage is a new state: warned at once
    tick_at(1020 + cfg.renewal.ca_check_interval_s)
    msgs = _warnings(caplog)
    assert len(msgs) == 3 and "CA certificate check failed" in msgs[2]

    # Another kind of error (the CA answers, but none of its roots has the operator's fingerprint) is a change of
    # state: warned at once.
    w.sim.down = False
    d.cfg = dataclasses.replace(cfg, ca_fingerprint="sha256:" + "0" * 64)
    tick_at(1020 + cfg.renewal.ca_check_interval_s + 60)
    msgs = _warnings(caplog)
    assert len(msgs) == 4 and "fails differently (1 failure(s)" in msgs[3]
    assert w.ks.get(NAME).version == 1  # nothing renewed meanwhile
