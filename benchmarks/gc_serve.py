"""The cyclic garbage collector in a real ``devagent serve`` (DTLS-PSK, P-256), side by side; not a benchmark test.

    PYTHONPATH=. python benchmarks/gc_serve.py --rounds 10 -n 40 --out /tmp/gc-serve.json \\
        base=. freeze=.+freeze thr=.+7000:10:10 [--hook] [--probe]

Each ``NAME=TREE[+freeze][+T0:T1:T2]`` is one ``devagent serve`` child (``python -m agent.cli`` of that tree, its own
keystore, ``--no-oscore``); the CLM runs in this process (``agent.clm.Clm``, lab CA upstream, a fresh CoAP client
per enrollment, as ``bench_table1.py``). ``+freeze`` makes the child ``gc.collect(); gc.freeze()`` when it is ready
(its ready file written: keystore open, security loaded, server listening); ``+T0:T1:T2`` sets
``gc.set_threshold`` at its start. Rounds alternate the children's order; each round runs ``-n`` enrollments per
child and records the medians, means and 90 % trimmed means of stage (5) (``cert_verify_s``, timed on the device) and of the total.
RSS (``/proc/PID/status``) idle (1 s after ready), after the warm-up enrollment, after 50 and at the end.

``--hook`` records in each child every collection (``gc.callbacks``: generation, duration, and whether a thread
was inside ``DeviceService._verify_and_store`` when it started: the collector holds the GIL, so it stalls the stage
from any thread), the tracked objects when ready, and in this process the CLM side's collections. The hook walks
every thread's stack at each collection (before its timer starts): leave it off for timings. ``--probe``: the
types collected by the 20th collection inside ``_verify_and_store`` (``DEBUG_SAVEALL`` for that one).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOOK = r'''
import atexit, collections, gc, json, os, sys, threading, time
recs, _o, _ready, _p = [], {}, {}, {"n": 0, "on": False, "done": False}

def _in_verify():
    for f in sys._current_frames().values():
        while f is not None:
            if f.f_code.co_name == "_verify_and_store":
                return True
            f = f.f_back
    return False

def _cb(phase, info):
    if phase == "start":
        inv = _in_verify()
        if os.environ.get("GCHOOK_PROBE") and inv and not _p["done"]:
            _p["n"] += 1
            if _p["n"] == 20:
                _p["on"] = True
                gc.set_debug(gc.DEBUG_SAVEALL)
        _o[threading.get_ident()] = (info["generation"], inv, time.perf_counter())
        return
    t = time.perf_counter()
    o = _o.pop(threading.get_ident(), None)
    if o is not None:
        recs.append((o[0], o[1], o[2], t, info["collected"]))
    if _p["on"]:
        gc.set_debug(0)
        _p["on"], _p["done"] = False, True
        g = list(gc.garbage)
        gc.garbage.clear()
        _ready["probe"] = [f"gen{info['generation']} collected {info['collected']}",
                           collections.Counter(f"{type(x).__module__}.{type(x).__qualname__}" for x in g).most_common(20),
                           sorted({f"{x.__qualname__} {x.__code__.co_filename}:{x.__code__.co_firstlineno}"
                                   for x in g if type(x).__name__ == "function"})]

def _watch():
    while not os.path.exists(os.environ["GCHOOK_READY"]):
        time.sleep(0.01)
    if os.environ.get("GCHOOK_FREEZE"):
        gc.collect()
        gc.freeze()
    _ready.update(freeze_count=gc.get_freeze_count(), tracked=len(gc.get_objects()), count=gc.get_count(),
                  t=time.perf_counter(), threshold=gc.get_threshold())

def _dump():
    with open(os.environ["GCHOOK_OUT"], "w") as f:
        json.dump({"recs": recs, "ready": _ready}, f)

if os.environ.get("GCHOOK_THRESHOLD"):
    gc.set_threshold(*(int(x) for x in os.environ["GCHOOK_THRESHOLD"].split(":")))
if os.environ.get("GCHOOK_OUT"):
    gc.callbacks.append(_cb)
    atexit.register(_dump)
if os.environ.get("GCHOOK_OUT") or os.environ.get("GCHOOK_FREEZE"):
    threading.Thread(target=_watch, daemon=True).start()
'''
LAUNCH = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import gchook, runpy; sys.argv[0] = 'devagent'; "
          "runpy.run_module('agent.cli', run_name='__main__')")


def _stats(v):
    v = sorted(v)
    return {"median": statistics.median(v), "mean": statistics.mean(v), "p90": v[int(0.9 * len(v))], "max": v[-1]}


def _trim90(v):
    """The mean of the lowest 90 %: what a cost paid by a fraction of the samples adds, without the host's
    outliers (a round's slowest tenth), which swamp a 0.1 ms difference in the plain mean."""
    v = sorted(v)
    return statistics.mean(v[:max(1, int(0.9 * len(v)))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("-n", type=int, default=40)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hook", action="store_true")
    ap.add_argument("--probe", action="store_true")
    a = ap.parse_args()

    from agent.clm import Clm, LabUpstream, open_inventory
    from agent.lab.ca import LabCA
    from coap_services.client import CoapClient
    from tests.peers.coap import DOMAIN, device_env, free_port_pair
    from tests.peers.coap_flood import rss_kib

    tmp = Path(tempfile.mkdtemp(prefix="gc-serve-"))
    (tmp / "hook").mkdir()
    (tmp / "hook" / "gchook.py").write_text(HOOK)
    lab = LabCA.create(tmp / "lab", domains=(DOMAIN,))
    inv = open_inventory(None, tmp / "clm" / "inventory")
    procs, spec = {}, {}
    for v in a.variants:
        name, _, rest = v.partition("=")
        tree, *opts = rest.split("+")
        tree = str(Path(tree).resolve())
        spec[name] = {"tree": tree, "options": opts}
        env = device_env(tmp / name, lab, f"dev-{name}", clm_dir=tmp / "clm")
        port, ready = free_port_pair(), tmp / f"{name}.ready"
        penv = dict(os.environ, PYTHONPATH=tree, GCHOOK_READY=str(ready))
        for o in opts:
            penv["GCHOOK_FREEZE" if o == "freeze" else "GCHOOK_THRESHOLD"] = "1" if o == "freeze" else o
        if a.hook:
            penv["GCHOOK_OUT"] = str(tmp / f"{name}.gc.json")
        if a.probe:
            penv["GCHOOK_PROBE"] = "1"
        p = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, str(tmp / "hook"), "--state-dir", str(env.state), "serve", "--port",
             str(port), "--device-id", env.device_id, "--domain", DOMAIN, "--key-type", "p256", "--no-oscore",
             "--csr-rate", "1e9", "--csr-burst", "100", "--ready-file", str(ready)],
            cwd=tree, env=penv, stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "wb"))
        t0 = time.monotonic()
        while not ready.exists():
            if p.poll() is not None or time.monotonic() - t0 > 30:
                p.kill()
                sys.exit(f"{name}: devagent serve did not start: {(tmp / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.05)
        inv.add(env.device_id, f"coaps://127.0.0.1:{port + 1}", security="dtls-psk",
                context=str(tmp / "clm" / "contexts" / env.device_id), key_type="p256", domain=DOMAIN,
                subject=f"CN={env.device_id}")
        procs[name] = (p, env.device_id)
    time.sleep(1.0)
    rss = {n: {"idle": rss_kib(p.pid)} for n, (p, _) in procs.items()}
    upstream = LabUpstream(lab)

    async def enroll(dev):
        async with CoapClient(timeout_s=60.0) as coap:
            return await Clm(inv, upstream, coap, retries=1).enroll(dev)

    loop = asyncio.new_event_loop()
    for n, (p, dev) in procs.items():
        loop.run_until_complete(enroll(dev))  # warm-up: the service's lazy imports, the first credential version
        rss[n]["after_warmup"] = rss_kib(p.pid)
    names, samples, rounds = list(procs), {n: [] for n in procs}, []
    clm_recs, co = [], {}

    def clm_cb(phase, info):
        if phase == "start":
            co["t"] = (info["generation"], time.perf_counter())
        elif "t" in co:
            g, t = co.pop("t")
            clm_recs.append((g, (time.perf_counter() - t) * 1e3))

    t_timed = time.perf_counter()
    if a.hook:
        gc.callbacks.append(clm_cb)
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]
        row = {"order": order}
        for n in order:
            s = [loop.run_until_complete(enroll(procs[n][1])) for _ in range(a.n)]
            samples[n] += s
            s5, tot = [x["cert_verify_s"] * 1e3 for x in s], [x["total_s"] * 1e3 for x in s]
            row[n] = {"stage5_median": statistics.median(s5), "stage5_mean": statistics.mean(s5),
                      "stage5_trim90": _trim90(s5), "total_median": statistics.median(tot),
                      "total_mean": statistics.mean(tot), "total_trim90": _trim90(tot)}
            if "after_50" not in rss[n] and len(samples[n]) >= 50:
                rss[n]["after_50"] = rss_kib(procs[n][0].pid)
        rounds.append(row)
        print(r, {n: {k: round(v, 2) for k, v in row[n].items()} for n in order}, flush=True)
    if a.hook:
        gc.callbacks.remove(clm_cb)
    for n, (p, _) in procs.items():
        rss[n]["end"] = rss_kib(p.pid)
        p.terminate()
        p.wait(20)
    loop.close()
    res = {"variants": spec, "rounds": a.rounds, "n": a.n, "rss_kib": rss, "per_round_ms": rounds}
    for n in procs:
        d = res[n] = {"stage5_ms": _stats([x["cert_verify_s"] * 1e3 for x in samples[n]]),
                      "total_ms": _stats([x["total_s"] * 1e3 for x in samples[n]]),
                      "samples_ms": {"stage5": [round(x["cert_verify_s"] * 1e3, 4) for x in samples[n]],
                                     "total": [round(x["total_s"] * 1e3, 4) for x in samples[n]]}}
        gj = tmp / f"{n}.gc.json"
        if gj.exists():
            g = json.loads(gj.read_text())
            by: dict[str, list[float]] = {}
            for gen, inside, t0, t1, _ in g["recs"]:
                if t0 >= t_timed:
                    by.setdefault(f"gen{gen}" + ("_in_verify" if inside else "_elsewhere"), []).append((t1 - t0) * 1e3)
            d["gc_when_ready"] = g["ready"]
            d["gc_timed_enrollments"] = {k: {"n": len(v), "median_ms": statistics.median(v), "max_ms": max(v),
                                             "sum_ms": sum(v)} for k, v in sorted(by.items())}
            d["gc_gen1plus_from_ready_s"] = [(gen, inside, round(t0 - g["ready"].get("t", 0), 3),
                                              round((t1 - t0) * 1e3, 3), c) for gen, inside, t0, t1, c in g["recs"]
                                             if gen > 0]
    if a.hook:
        res["clm_side_timed"] = {f"gen{g}": {"n": sum(1 for x in clm_recs if x[0] == g),
                                             "median_ms": statistics.median(x[1] for x in clm_recs if x[0] == g)}
                                 for g in sorted({x[0] for x in clm_recs})}
        res["clm_side_timed"]["enrollments"] = a.rounds * a.n * len(procs)
    for key in ("stage5_median", "total_median", "stage5_mean", "total_mean", "stage5_trim90", "total_trim90"):
        for n in names[1:]:
            res.setdefault("rounds_lower_than_" + names[0], {}).setdefault(n, {})[key] = \
                sum(1 for r in rounds if r[n][key] < r[names[0]][key])
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: ({m: w for m, w in v.items() if m != "samples_ms"} if isinstance(v, dict) else v)
                      for k, v in res.items() if k != "per_round_ms"}, indent=1))


if __name__ == "__main__":
    main()
