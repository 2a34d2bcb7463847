"""One fuzz target under atheris (libFuzzer, coverage-guided), in its own process: ``python -m tests.fuzz`` runs it.

    python -m tests.fuzz.atheris_run TARGET INPUTS SECONDS STATS_JSON

The target's modules are imported (and one seed run) before ``atheris.instrument_all()``, so coverage covers
devagent and the libraries it parses with. Half of the mutants come from ``tests.fuzz.mutate`` (DER-tree aware,
as a custom mutator), half from libFuzzer's own. Every input goes through ``engine.execute``: a foreign exception
is recorded by kind and the run goes on (libFuzzer would stop at the first), and the figures are written to
STATS_JSON every 500 inputs and at the end.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time

import atheris

from tests.fuzz import engine
from tests.fuzz import mutate as mut


def main() -> None:
    name, n, secs, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    from tests.fuzz.targets import all_targets

    t = all_targets()[name]
    if t.setup:
        t.setup()
    seeds = t.seed_inputs()
    engine.USE_ALARM = False  # libFuzzer owns SIGALRM (-timeout)
    warm = engine.Stats(name, "atheris")
    for d in seeds[:3]:
        engine.execute(t, d, warm, save=False)
    atheris.instrument_all()
    stats = engine.Stats(name, "atheris")
    t0 = time.perf_counter()

    def dump():
        stats.seconds = time.perf_counter() - t0
        with open(out, "w") as f:
            json.dump(stats.as_dict(), f)

    def one(data: bytes) -> None:
        engine.execute(t, bytes(data)[: t.max_len], stats)
        if stats.inputs % 500 == 0 or stats.inputs >= n:
            dump()

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        if seed % 2:
            return atheris.Mutate(data, max_size)
        return mut.mutate(mut.Rng(seed), bytes(data), seeds, t.prefix)[:max_size]

    corpus = tempfile.mkdtemp(prefix=f"fuzz-{name}-")
    for i, d in enumerate(seeds + [x for _, x in t.regression_inputs()]):
        with open(f"{corpus}/seed{i:03d}", "wb") as f:
            f.write(d)
    argv = [sys.argv[0], f"-runs={n}", "-timeout=30", "-rss_limit_mb=8192", f"-max_len={t.max_len}",
            "-print_final_stats=0", corpus]
    if secs > 0:
        argv.insert(2, f"-max_total_time={int(secs)}")
    import atexit

    atexit.register(dump)
    atexit.register(shutil.rmtree, corpus, True)
    atheris.Setup(argv, one, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
