"""`devagent serve` memory under load (issue #20): RSS of a real ``devagent serve`` process before, during and after
a bounded request flood on loopback, then across sequential OSCORE requests.

Flood (``tests.peers.coap_flood``): ``FLOOD_S`` seconds, 50 requests in flight, mixed ``/csr`` (rate limited: 5.03 +
Max-Age), ``/status``, malformed CBOR, unknown paths, garbage datagrams, complete and abandoned Block1 uploads, a
new source port every 100 requests; the service runs with ``--insecure`` so that every request reaches the
resources. Then ``OSCORE_N`` sequential OSCORE ``GET /status`` from the CLM's client. Figures only: the bound
(≤ 10 MB growth) is asserted by ``tests/component/test_coap_load.py``; here RSS is sampled every second.

``make bench``: 30 s and 10,000 requests; ``make bench-ci``: 3 s and 300.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from benchmarks.conftest import CI, record

FLOOD_S = 3.0 if CI else 30.0
OSCORE_N = 300 if CI else 10_000
IN_FLIGHT = 50


def measure(lab) -> dict:
    from tests.peers.coap import ServeProcess, coap_call, device_env
    from tests.peers.coap_flood import flood, rss_kib

    with tempfile.TemporaryDirectory() as tmp:
        env = device_env(Path(tmp), lab, "bench-serve")
        sp = ServeProcess(env, "--insecure", "--no-dtls")
        try:
            pid = sp.proc.pid
            started = rss_kib(pid)
            flood("127.0.0.1", sp.port, seconds=1.0 if CI else 2.0, in_flight=20, seed=1)  # warm-up: lazy imports
            before = rss_kib(pid)
            during: list[int] = []
            res = flood("127.0.0.1", sp.port, seconds=FLOOD_S, in_flight=IN_FLIGHT, seed=2,
                        on_tick=lambda: during.append(rss_kib(pid)))
            after_flood = rss_kib(pid)

            def oscore(dev):
                async def run():
                    t0 = time.perf_counter()
                    for _ in range(OSCORE_N):
                        await dev.status()
                    return time.perf_counter() - t0
                return run()

            coap_call(sp.uri, "oscore", env.context)(lambda d: d.status())
            before_oscore = rss_kib(pid)
            oscore_s = coap_call(sp.uri, "oscore", env.context, timeout=30)(oscore)
            after = rss_kib(pid)
        finally:
            sp.stop()
        log_lines = len(sp.log().splitlines())
    return {"rss_kib": {"started": started, "before": before, "max_during": max(during, default=after_flood),
                        "after_flood": after_flood, "before_oscore": before_oscore, "after_oscore": after},
            "rss_samples_kib": during, "flood_s": res.seconds, "in_flight": IN_FLIGHT, "answered": res.answered,
            "answers_per_s": res.rate_per_s, "answers": dict(res.answers), "timeouts": res.timeouts,
            "peers": res.peers, "kinds": dict(res.by_kind), "oscore_n": OSCORE_N, "oscore_s": oscore_s,
            "log_lines": log_lines}


@pytest.mark.benchmark(group="serve-load")
def test_serve_rss_under_flood(benchmark, lab_ca):
    out = benchmark.pedantic(measure, args=(lab_ca,), rounds=1, iterations=1)
    r = out["rss_kib"]
    print(f"\nserve RSS KiB: before {r['before']}, max during {r['max_during']}, after the {out['flood_s']:.0f} s "
          f"flood {r['after_flood']} (+{r['after_flood'] - r['before']}), after {OSCORE_N} OSCORE requests "
          f"{r['after_oscore']} (+{r['after_oscore'] - r['before_oscore']}); {out['answers_per_s']:.0f} answers/s; "
          f"{out['log_lines']} log lines")
    record(benchmark, config={"flood_s": FLOOD_S, "in_flight": IN_FLIGHT, "oscore_n": OSCORE_N}, **out)
