"""``python -m tests.fuzz``: run fuzz targets and print, per target, inputs, execs/s and what escaped.

    python -m tests.fuzz                              # every target, 100000 inputs each, best engine
    python -m tests.fuzz --targets est_certs,cmp_accept --inputs 2000 --engine mutate
    python -m tests.fuzz --mpy --inputs 100000        # also the board parsers under the MicroPython unix port

``--engine auto`` uses atheris (coverage-guided) where it is installed, else the mutation engine. Exit status 1
when any target had a foreign exception, a hang, an accepted mutant or a stored-state change; the first input of
each kind is in ``tests/fuzz/findings/<target>/`` (copy it to ``tests/fuzz/regressions/<target>/`` with the fix).
``--json FILE`` writes the figures with what they were measured on (``run_info``: commit, whether the tree had
uncommitted changes, engine, Python and MicroPython versions, CPU count, load average); ``python -m
tests.fuzz.figures`` merges such files into ``tests/fuzz/data/long-run.json`` and prints the table the docs quote.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from tests.fuzz import engine, mpy_host


def _atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def run_atheris(name: str, inputs: int, seconds: float | None) -> engine.Stats:
    """One target in a child process under atheris (libFuzzer exits the process when done)."""
    out = engine.FINDINGS / f"{name}.atheris.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    cmd = [sys.executable, "-m", "tests.fuzz.atheris_run", name, str(inputs), str(seconds or 0), str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=engine.REPO, capture_output=True, text=True)
    if not out.exists():
        raise RuntimeError(f"atheris run of {name} wrote no figures (exit {r.returncode}): {r.stderr[-2000:]}")
    d = json.loads(out.read_text())
    s = engine.Stats(name, "atheris")
    for k in ("inputs", "accepted", "refused", "foreign", "hangs", "accepted_mutants", "state_changes", "slowest_s",
              "slowest_wall_s", "kinds"):
        setattr(s, k, d[k])
    s.seconds = d.get("seconds") or (time.perf_counter() - t0)
    return s


def main(argv=None) -> int:
    from tests.fuzz.targets import all_targets, cleanup

    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="", help="comma-separated target names (default: all)")
    ap.add_argument("--inputs", type=int, default=100_000, help="inputs per target (default 100000)")
    ap.add_argument("--seconds", type=float, default=None, help="time bound per target")
    ap.add_argument("--engine", choices=("auto", "mutate", "atheris"), default="auto")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mpy", action="store_true", help="also run the board parsers under MicroPython")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    targets = all_targets()
    if a.list:
        for t in targets.values():
            print(f"{t.name:20} {t.description}")
        return 0
    names = [n for n in a.targets.split(",") if n] or list(targets)
    unknown = [n for n in names if n not in targets]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; --list shows them")
    eng = a.engine
    if eng == "auto":
        eng = "atheris" if _atheris_available() else "mutate"
        if eng == "mutate":
            print("atheris is not installed here (no wheel for this platform/Python): using the mutation engine",
                  file=sys.stderr)
    rows = []
    try:
        for n in names:
            t = targets[n]
            print(f"fuzzing {n} ({eng}, {a.inputs} inputs)...", file=sys.stderr, flush=True)
            if eng == "atheris":
                rows.append(run_atheris(n, a.inputs, a.seconds))
            else:
                if t.setup:
                    t.setup()
                try:
                    rows.append(engine.run_mutation(t, inputs=a.inputs, seconds=a.seconds, seed=a.seed))
                finally:
                    if t.teardown:
                        t.teardown()
            print(engine.format_table(rows[-1:]).splitlines()[2], file=sys.stderr, flush=True)
        if a.mpy:
            print(f"fuzzing mpy_parsers under MicroPython ({a.inputs} inputs)...", file=sys.stderr, flush=True)
            rows.append(mpy_host.run_mpy(a.inputs, a.seed))
    finally:
        cleanup()
    print(engine.format_table(rows))
    bad = [r.target for r in rows if not r.ok]
    print(f"{len(rows)} targets, {sum(r.inputs for r in rows)} inputs; "
          + ("all clean: 0 foreign exceptions, 0 hangs, 0 accepted mutants, 0 stored-state changes" if not bad
             else f"FINDINGS in {', '.join(bad)} (inputs under tests/fuzz/findings/)"))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"run": run_info(eng, a), "rows": [r.as_dict() for r in rows]}, f, indent=1)
            f.write("\n")
    return 1 if bad else 0


def run_info(eng: str, a) -> dict:
    """What the figures were measured on: the commit (and whether the tree differed from it), engine, runtimes."""
    import datetime
    import platform

    def git(*args):
        r = subprocess.run(["git", *args], cwd=engine.REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "agent", "keystore", "enroll_clients",
                     "coap_services", "board_profiles", "tests/fuzz"))
    mpy = ""
    try:
        mpy = subprocess.run([mpy_host.micropython(), "-c", "import sys; print(sys.version)"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (RuntimeError, OSError, subprocess.SubprocessError):
        pass
    return {"commit": git("rev-parse", "HEAD"), "dirty": dirty,
            "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "engine": eng, "inputs_per_target": a.inputs, "seed": a.seed, "python": platform.python_version(),
            "micropython": mpy, "machine": platform.machine(), "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "nice": os.nice(0)}


if __name__ == "__main__":
    sys.exit(main())
