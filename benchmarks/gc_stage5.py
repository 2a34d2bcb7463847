"""Does the cyclic garbage collector run inside Table 1's enrollments, and inside stage (5)?

A pytest plugin for the real benchmark (the one-process rig of ``bench_table1.py``), like ``spans_stage5.py``::

    PYTHONPATH=. python -m pytest benchmarks/bench_table1.py -q --timeout=0 --benchmark-only \\
        -k p256-dtls-psk-aes128-soft-lab -p no:cacheprovider -p benchmarks.gc_stage5

``gc.callbacks`` records every collection (generation, thread, start and end on ``perf_counter``); the intervals of
``DeviceService._verify_and_store`` (stage (5), on its worker thread) and of ``Rig.enroll`` (one whole enrollment)
are recorded alike, and a collection counts for an interval it overlaps (any thread: the collector holds the GIL,
so a collection on the event loop's thread stalls the worker too). Each collection is also attributed to the side
whose code triggered it, by the frames on the collecting thread's stack: ``device`` (``coap_services/device.py``,
``server.py`` or ``keystore/``), ``clm`` (``agent/clm.py``, ``coap_services/client.py``), else ``other`` (aiocoap,
asyncio, the lab CA...). ``GC_FREEZE=1`` calls ``gc.freeze()`` once the rig has started (what a service would do
after its start-up); ``GC_THRESHOLD=T0,T1,T2`` sets ``gc.set_threshold`` then. The rig's own ``gc.collect()``
after each enrollment (outside the stages) is counted apart. Writes a summary to ``$GC_OUT`` (default ``benchmarks/results/gc-stage5.txt``).
"""
from __future__ import annotations

import collections
import gc
import os
import statistics
import sys
import threading
import time

_gcs: list[tuple] = []  # (gen, side, thread, t0, t1, collected)
_open: dict[int, tuple] = {}
_verify: list[tuple[float, float]] = []
_enroll: list[tuple[float, float]] = []
_startup: dict[str, object] = {}

_DEVICE = ("coap_services/device.py", "coap_services/server.py", "/keystore/")
_CLM = ("agent/clm.py", "coap_services/client.py")


def _side() -> str:
    f = sys._getframe(0)
    seen = "other"
    while f is not None:
        fn = f.f_code.co_filename
        if any(s in fn for s in _DEVICE):
            return "device"
        if any(s in fn for s in _CLM):
            seen = "clm"
        f = f.f_back
    return seen


_explicit = [False]


class _RigGc:
    """Stands in for ``gc`` in bench_table1: its explicit ``gc.collect()`` after each enrollment is marked."""

    def __getattr__(self, name):
        return getattr(gc, name)

    @staticmethod
    def collect(*a):
        _explicit[0] = True
        try:
            return gc.collect(*a)
        finally:
            _explicit[0] = False


def _cb(phase, info):
    if phase == "start":
        side = "explicit" if _explicit[0] else _side()
        _open[threading.get_ident()] = (info["generation"], side, time.perf_counter())
    else:
        t1 = time.perf_counter()
        o = _open.pop(threading.get_ident(), None)
        if o is not None:
            _gcs.append((o[0], o[1], threading.get_ident(), o[2], t1, info.get("collected", 0)))


def install(bench_table1) -> None:
    from coap_services.device import DeviceService

    inner_v = DeviceService._verify_and_store

    def verify_and_store(self, certs_, peer):
        t = time.perf_counter()
        try:
            return inner_v(self, certs_, peer)
        finally:
            _verify.append((t, time.perf_counter()))

    DeviceService._verify_and_store = verify_and_store
    inner_e = bench_table1.Rig.enroll

    async def enroll(self):
        t = time.perf_counter()
        try:
            return await inner_e(self)
        finally:
            _enroll.append((t, time.perf_counter()))

    bench_table1.Rig.enroll = enroll
    inner_s = bench_table1.Rig.start

    async def start(self):
        await inner_s(self)
        gc.collect()
        _startup["tracked_objects"] = len(gc.get_objects())
        _startup["count_after_collect"] = gc.get_count()
        _startup["threshold"] = gc.get_threshold()
        if os.environ.get("GC_FREEZE") == "1":
            gc.freeze()
        if os.environ.get("GC_THRESHOLD"):
            gc.set_threshold(*(int(x) for x in os.environ["GC_THRESHOLD"].split(",")))
        _startup["freeze_count"] = gc.get_freeze_count()
        gc.callbacks.append(_cb)

    bench_table1.Rig.start = start
    bench_table1.gc = _RigGc()


def pytest_collection_modifyitems(session, config, items):
    # bench_table1 is imported by pytest under its own module name (benchmarks/ has no __init__.py): patch that one.
    mods = {it.module for it in items if getattr(it, "module", None) is not None
            and it.module.__name__.endswith("bench_table1")}
    for m in mods:
        install(m)


def _inside(intervals, skip_first=True):
    """Per interval: the collections overlapping it, and the part of their time that falls inside it."""
    out = []
    for a, b in intervals[1:] if skip_first else intervals:
        hits = [g for g in _gcs if g[3] < b and g[4] > a and g[1] != "explicit"]
        out.append((hits, sum(min(b, g[4]) - max(a, g[3]) for g in hits), b - a))
    return out


def _write(f, title, rows):
    n = len(rows)
    if not n:
        return
    per_gen = collections.Counter()
    per_side = collections.Counter()
    dur = collections.defaultdict(list)
    for hits, _, _ in rows:
        for g in hits:
            per_gen[g[0]] += 1
            per_side[g[1]] += 1
            dur[g[0]].append(g[4] - g[3])
    with_gc = [r for r in rows if r[0]]
    f.write(f"## {title}: {n} intervals, {len(with_gc)} with >= 1 collection\n")
    f.write("   collections by generation: " + ", ".join(f"gen{k}: {per_gen[k]}" for k in sorted(per_gen)) + "\n")
    f.write("   collections by side: " + ", ".join(f"{k}: {v}" for k, v in sorted(per_side.items())) + "\n")
    for k in sorted(dur):
        d = sorted(dur[k])
        f.write(f"   gen{k} collected: median {statistics.median(g[5] for h, _, _ in rows for g in h if g[0] == k)}\n")
        f.write(f"   gen{k} duration ms: median {statistics.median(d) * 1e3:.3f} mean {statistics.mean(d) * 1e3:.3f}"
                f" max {d[-1] * 1e3:.3f}\n")
    gct = [r[1] for r in rows]
    wall = [r[2] for r in rows]
    f.write(f"   gc time inside, ms per interval: mean {statistics.mean(gct) * 1e3:.3f}, max {max(gct) * 1e3:.3f};"
            f" interval median {statistics.median(wall) * 1e3:.3f} mean {statistics.mean(wall) * 1e3:.3f}\n")
    if with_gc:
        a = [r[2] for r in with_gc]
        b = [r[2] for r in rows if not r[0]]
        f.write(f"   interval with gc: median {statistics.median(a) * 1e3:.3f} ms (n={len(a)})"
                + (f"; without: median {statistics.median(b) * 1e3:.3f} ms (n={len(b)})" if b else "") + "\n")


def pytest_unconfigure(config):
    if not _enroll:
        return
    out = os.environ.get("GC_OUT", "benchmarks/results/gc-stage5.txt")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(f"# start-up (after the rig started, after a gc.collect): {_startup}\n")
        f.write("# the warm-up enrollment (the first) is left out\n")
        _write(f, "_verify_and_store (stage 5)", _inside(_verify))
        _write(f, "Rig.enroll (one enrollment; the rig's explicit gc.collect() after it left out)",
               _inside(_enroll))
        full = [g for g in _gcs if g[1] == "explicit"]
        if full:
            d = sorted(g[4] - g[3] for g in full)
            f.write(f"# the rig's explicit gc.collect() after each enrollment (outside the stages): {len(full)}, "
                    f"median {statistics.median(d) * 1e3:.3f} ms, collected median "
                    f"{statistics.median(g[5] for g in full)}\n")
