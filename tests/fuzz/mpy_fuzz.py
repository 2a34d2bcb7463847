"""The board parsers' fuzz run under the MicroPython unix port (and CPython): same targets, same mutator.

    micropython tests/fuzz/mpy_fuzz.py INPUTS [SEED] [trace | dump N]

Reads the seeds of ``corpus/mpy_parsers/`` and ``regressions/mpy_parsers/``, runs them and INPUTS mutants
through ``mpy_targets.run`` and prints one JSON line of figures (inputs, accepted, refused, foreign, hangs,
kinds, seconds, slowest_ms). A foreign exception's kind is its type and message head; the first input of each
kind is written to ``findings/mpy_parsers/``. Exit status 1 if anything foreign escaped.

MicroPython prints some faults as a warning instead of raising (``Warning: Comparison between bytes and str``),
which no ``except`` sees. ``trace`` prints ``#N`` to stderr before input N, so the host driver
(``tests/fuzz/mpy_host.py``) can tie each warning to its input; ``dump N`` writes input N (the same
deterministic sequence for the same INPUTS and SEED) to ``findings/mpy_parsers/input-N.bin`` and exits.
"""
import os
import sys
import time

HERE = sys.argv[0].rsplit("/", 1)[0] if "/" in sys.argv[0] else "."
ROOT = HERE + "/../.."
sys.path.insert(0, ROOT + "/agent")  # the board package imports as "mpy", as on a board
sys.path.insert(0, HERE)

import mpy_targets  # noqa: E402
import mutate  # noqa: E402

HANG_MS = 1000


def _ticks_ms():
    try:
        return time.ticks_ms()
    except AttributeError:
        return int(time.time() * 1000)


def _diff(a, b):
    try:
        return time.ticks_diff(a, b)
    except AttributeError:
        return a - b


def _files(d):
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return []
    out = []
    for n in names:
        if n.startswith("."):
            continue
        with open(d + "/" + n, "rb") as f:
            out.append(f.read())
    return out


def _save(kind, data):
    d = _mkdirs()
    h = 0
    for c in kind.encode():
        h = (h * 31 + c) & 0xFFFFFFFF
    with open("%s/mpy-%08x.bin" % (d, h), "wb") as f:
        f.write(data)


def _mkdirs():
    d = HERE + "/findings"
    for p in (d, d + "/mpy_parsers"):
        try:
            os.mkdir(p)
        except OSError:
            pass
    return d + "/mpy_parsers"


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    mode = sys.argv[3] if len(sys.argv) > 3 else ""
    dump = int(sys.argv[4]) if mode == "dump" else -1
    trace = mode == "trace"
    seeds = _files(HERE + "/corpus/mpy_parsers")
    if not seeds:
        print("no seeds in corpus/mpy_parsers")
        sys.exit(2)
    rng = mutate.Rng(seed)
    st = {"inputs": 0, "accepted": 0, "refused": 0, "foreign": 0, "hangs": 0, "kinds": {}, "slowest_ms": 0}
    t0 = _ticks_ms()
    queue = seeds + _files(HERE + "/regressions/mpy_parsers")
    total = n + len(queue)
    while st["inputs"] < total:
        if st["inputs"] < len(queue):
            data = queue[st["inputs"]]
        else:
            data = mutate.mutate(rng, rng.choice(seeds), seeds, 1)
        if dump >= 0:
            if st["inputs"] == dump:
                with open("%s/input-%d.bin" % (_mkdirs(), dump), "wb") as f:
                    f.write(data)
                return
            st["inputs"] += 1
            continue
        if trace:
            sys.stderr.write("#%d\n" % st["inputs"])
        s = _ticks_ms()
        try:
            mpy_targets.run(data)
            st["accepted"] += 1
        except mpy_targets.Refused:
            st["refused"] += 1
        except Exception as e:  # noqa: BLE001 - a foreign exception is the finding
            st["foreign"] += 1
            kind = "%s: %s (parser %s)" % (type(e).__name__, str(e)[:60], mpy_targets.PARSERS[data[0] % 6])
            k = st["kinds"].get(kind)
            if k is None:
                st["kinds"][kind] = {"count": 1, "example": "tests/fuzz/findings/mpy_parsers/", "message": kind}
                _save(kind, data)
            else:
                k["count"] += 1
        dt = _diff(_ticks_ms(), s)
        if dt > st["slowest_ms"]:
            st["slowest_ms"] = dt
        if dt > HANG_MS:
            st["hangs"] += 1
        st["inputs"] += 1
    st["seconds"] = _diff(_ticks_ms(), t0) / 1000.0
    st["runtime"] = sys.implementation.name
    import json

    print(json.dumps(st))
    sys.exit(1 if st["foreign"] or st["hangs"] else 0)


main()
