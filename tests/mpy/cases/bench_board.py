"""Board-side measurements, run under MicroPython or CPython:

    micropython bench_board.py VECTOR_DIR OPERATION [ROUNDS]
Prints one JSON line: {op, runtime, ms (median), ms_min, rounds, heap_alloc, heap_base}. On MicroPython
heap_base is gc.mem_alloc() before the operation and heap_alloc the bytes it allocates with the GC paused
(its garbage churn; None if that exceeds the heap); the peak that matters for fitting is found by the
benchmark with -X heapsize. On CPython heap_alloc is tracemalloc's peak.
OPERATION: noop (imports and setup only), table, keygen, sign, csr, verify_ec, verify_rsa, or "all". ROUNDS 0: run once, GC on, and
print {"ok": true} (for finding the smallest heap that fits, with -X heapsize=...).
"""
import json
import sys

import os  # noqa: E402

HERE = sys.argv[0].rsplit("/", 1)[0] if "/" in sys.argv[0] else "."
# DEVAGENT_MPY_LIB: a directory holding mpy/ as .mpy files (as deployed), else the source tree
sys.path.insert(0, os.getenv("DEVAGENT_MPY_LIB") or HERE + "/../../../agent")

from mpy import compat, csr, ec, ecdsa, x509  # noqa: E402

try:
    import tracemalloc
except ImportError:
    tracemalloc = None


def _read(vec, name):
    with open(vec + "/" + name, "rb") as f:
        return f.read()


def setup(vec):
    key = csr.key_from_der(_read(vec, "dev.key"))
    key.public  # noqa: B018 - warm the key's cached public point
    return {"key": key, "leaf_ec": _read(vec, "leaf_ec.der"), "leaf_rsa": _read(vec, "leaf_rsa.der"),
            "ca_ec": x509.Certificate(_read(vec, "ca_ec.der")), "ca_rsa": x509.Certificate(_read(vec, "ca_rsa.der"))}


def op_fn(name, s):
    if name == "noop":
        return lambda: None
    if name == "table":
        def f():
            ec.set_comb_width(0)
            ec.mul_base(1)
        return f
    if name == "keygen":
        return lambda: ecdsa.PrivateKey.generate().public
    if name == "sign":
        return lambda: s["key"].sign(b"benchmark message")
    if name == "csr":
        return lambda: csr.build(s["key"], cn="dev-1", serial="SN-0001", sans=["dev-1.plant.example"])
    if name == "verify_ec":
        return lambda: x509.verify_for_key([s["leaf_ec"]], s["ca_ec"], s["key"].public, None)
    if name == "verify_rsa":
        return lambda: x509.verify_for_key([s["leaf_rsa"]], s["ca_rsa"], s["key"].public, None)
    raise ValueError("unknown operation " + name)


def heap(fn):
    """(bytes in use before, bytes allocated by fn) on MicroPython; traced peak on CPython."""
    compat.collect()
    if compat.mem_alloc() is not None:
        import gc

        base = gc.mem_alloc()
        gc.disable()
        try:
            fn()
            used = gc.mem_alloc() - base
        except MemoryError:  # churn larger than this heap: only the base figure is meaningful
            used = None
        finally:
            gc.enable()
        return base, used
    if tracemalloc is not None:
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return None, peak
    return None, None


def measure(name, s, rounds):
    fn = op_fn(name, s)
    fn()  # warm up (comb table, caches)
    times = []
    for _ in range(rounds):
        t = compat.ticks_us()
        fn()
        times.append(compat.ticks_diff(compat.ticks_us(), t) / 1000)
    times.sort()
    base, used = heap(fn)
    return {"op": name, "runtime": sys.implementation.name, "ms": times[len(times) // 2], "ms_min": times[0],
            "rounds": rounds, "heap_alloc": used, "heap_base": base, "comb_width": ec.comb_width()}


def main():
    vec, which = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    s = setup(vec)
    if rounds == 0:  # "does it fit": one plain run with the GC on (used with -X heapsize=...)
        op_fn(which, s)()
        print(json.dumps({"op": which, "ok": True}))
        return
    names = ["table", "keygen", "sign", "csr", "verify_ec", "verify_rsa"] if which == "all" else [which]
    for n in names:
        print(json.dumps(measure(n, s, rounds)))


main()
