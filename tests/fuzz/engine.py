"""The fuzz driver: runs a target's parser on mutants of its seed corpus and counts what escapes.

A ``Target`` names the parser entry point (``run(data)``), the errors its contract allows (the package's own
roots), and its security checks; ``run(data)`` raises ``AcceptedMutant`` when content protected by a MAC or a
signature was changed and still accepted, ``StateChanged`` when a rejected input changed what is stored.
Anything else that escapes is a *foreign exception*: a crash, recorded by kind (exception type + the innermost
devagent source line), with its first input saved under ``tests/fuzz/findings/<target>/`` so it can be committed
as a regression input (``tests/fuzz/regressions/<target>/``) once fixed.

Two engines drive the same targets:
- ``mutate`` (runs everywhere): ``tests.fuzz.mutate`` on the seeds, deterministic for a given ``--seed``.
- ``atheris`` (coverage-guided libFuzzer, where the wheel installs): the same mutator as atheris'
  custom mutator, half of the time, and libFuzzer's own byte mutations otherwise; see ``atheris_run.py``.

Per target the driver reports inputs run, execs/s, distinct crash kinds, foreign exceptions, hangs, accepted
mutants and stored-state changes. A hang is an input that took more than ``HANG_S`` (1 s) of CPU time of the
process, or more than ``HANG_WALL_S`` of wall time (one that waits instead of computing): on a machine shared
with other jobs, wall time alone would count the scheduler's delays as the parser's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

from tests.fuzz import mutate as mut

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CORPUS = HERE / "corpus"
REGRESSIONS = HERE / "regressions"
FINDINGS = HERE / "findings"
HANG_S = 1.0  # CPU seconds of one input
HANG_WALL_S = 10.0  # wall seconds of one input (waiting, not computing)
ABORT_S = 20.0  # an input still running after this is interrupted (counted as a hang)
OWN_DIRS = tuple(str(REPO / d) + os.sep for d in ("agent", "keystore", "enroll_clients", "coap_services",
                                                    "board_profiles"))


class AcceptedMutant(AssertionError):
    """A mutant whose protected or signed content differs from the seed's was accepted."""


class StateChanged(AssertionError):
    """An input that was refused changed what is stored (file snapshot before/after differs)."""


class _Abort(BaseException):
    """Raised by the alarm inside an input that runs for longer than ABORT_S."""


@dataclasses.dataclass
class Target:
    """One parser under fuzz.

    run: the parser entry point for one input; returns normally (accepted) or raises.
    allowed: exception types the parser's contract allows (its package's own errors).
    seeds: corpus directory name under ``tests/fuzz/corpus/`` (default: the target's name).
    prefix: bytes at the front of each input that select a context (kept mostly intact by the mutator).
    setup/teardown: build and release what ``run`` needs (called once per process).
    """

    name: str
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]
    description: str = ""
    seeds: str = ""
    prefix: int = 0
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None
    max_len: int = 65536

    def seed_inputs(self) -> list[bytes]:
        d = CORPUS / (self.seeds or self.name)
        return [p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")] \
            if d.is_dir() else []

    def regression_inputs(self) -> list[tuple[str, bytes]]:
        d = REGRESSIONS / self.name
        return [(p.name, p.read_bytes()) for p in sorted(d.iterdir()) if p.is_file()] if d.is_dir() else []


@dataclasses.dataclass
class Stats:
    target: str
    engine: str
    inputs: int = 0
    seconds: float = 0.0
    accepted: int = 0
    refused: int = 0
    foreign: int = 0
    hangs: int = 0
    accepted_mutants: int = 0
    state_changes: int = 0
    slowest_s: float = 0.0  # CPU time of the slowest input
    slowest_wall_s: float = 0.0
    kinds: dict = dataclasses.field(default_factory=dict)  # kind -> {"count", "example", "message"}

    @property
    def execs_per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not (self.foreign or self.hangs or self.accepted_mutants or self.state_changes)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["execs_per_s"] = round(self.execs_per_s, 1)
        d["crash_kinds"] = len(self.kinds)
        return d


def crash_kind(e: BaseException) -> str:
    """``ExceptionType at file:line`` of the innermost frame in devagent's own code (else the innermost)."""
    tb = traceback.extract_tb(e.__traceback__)
    own = [f for f in tb if f.filename.startswith(OWN_DIRS)]
    frame = (own or tb or [None])[-1]
    where = f"{os.path.relpath(frame.filename, REPO)}:{frame.lineno}" if frame is not None else "?"
    return f"{type(e).__module__}.{type(e).__qualname__} at {where}"


def _save_finding(target: str, kind: str, data: bytes) -> Path:
    d = FINDINGS / target
    d.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in kind.split(" at ")[0].rsplit(".", 1)[-1]).lower()
    p = d / f"{slug}-{hashlib.sha256(kind.encode()).hexdigest()[:10]}.bin"
    if not p.exists():
        p.write_bytes(data)
    return p


def _alarm(signum, frame):
    raise _Abort()


def execute(target: Target, data: bytes, stats: Stats, *, save: bool = True) -> str:
    """Run one input and account for it. Returns "accepted", "refused", "foreign", "hang", "mutant", "state"."""
    use_alarm = USE_ALARM and hasattr(signal, "SIGALRM") and os.getpid() == _MAIN_PID
    if use_alarm:
        signal.setitimer(signal.ITIMER_REAL, ABORT_S)
    t0, c0 = time.perf_counter(), time.process_time()
    outcome = "accepted"
    try:
        target.run(data)
    except target.allowed:
        outcome = "refused"
    except AcceptedMutant as e:
        outcome = "mutant"
        _record(stats, target, f"accepted mutant: {e}"[:200], data, str(e), save)
    except StateChanged as e:
        outcome = "state"
        _record(stats, target, f"stored state changed: {e}"[:200], data, str(e), save)
    except _Abort:
        outcome = "hang"
        _record(stats, target, f"hang > {ABORT_S:g} s", data, "interrupted", save)
    except Exception as e:  # noqa: BLE001 - a foreign exception is the finding
        outcome = "foreign"
        _record(stats, target, crash_kind(e), data, f"{type(e).__name__}: {e}"[:300], save)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    stats.slowest_s = max(stats.slowest_s, dc)
    stats.slowest_wall_s = max(stats.slowest_wall_s, dt)
    stats.inputs += 1
    if outcome == "accepted":
        stats.accepted += 1
    elif outcome == "refused":
        stats.refused += 1
    elif outcome == "foreign":
        stats.foreign += 1
    elif outcome == "mutant":
        stats.accepted_mutants += 1
    elif outcome == "state":
        stats.state_changes += 1
    if outcome in ("accepted", "refused") and (dc > HANG_S or dt > HANG_WALL_S):
        stats.hangs += 1
        kind = f"slow input > {HANG_S:g} s CPU" if dc > HANG_S else f"slow input > {HANG_WALL_S:g} s wall"
        _record(stats, target, kind, data, f"{dc:.2f} s CPU, {dt:.2f} s wall", save)
        outcome = "hang"
    elif outcome == "hang":
        stats.hangs += 1
    return outcome


_MAIN_PID = os.getpid()
USE_ALARM = True  # off under atheris, whose libFuzzer owns SIGALRM


def _record(stats: Stats, target: Target, kind: str, data: bytes, message: str, save: bool) -> None:
    k = stats.kinds.get(kind)
    if k is None:
        path = _save_finding(target.name, kind, data) if save else None
        stats.kinds[kind] = {"count": 1, "example": str(path.relative_to(REPO)) if path else "", "message": message}
    else:
        k["count"] += 1


def run_mutation(target: Target, *, inputs: int, seconds: float | None = None, seed: int = 1,
                 save: bool = True) -> Stats:
    """The fallback engine: seeds first, regression inputs, then ``inputs`` mutants in total (or until
    ``seconds`` have passed)."""
    warnings.simplefilter("ignore")  # cryptography's BER-fallback/negative-serial warnings, once per mutant
    stats = Stats(target.name, "mutate")
    seeds = target.seed_inputs()
    if not seeds:
        raise RuntimeError(f"fuzz target {target.name}: no seed inputs in {CORPUS / (target.seeds or target.name)}")
    rng = mut.Rng(seed)
    t0 = time.perf_counter()
    deadline = t0 + seconds if seconds else None
    for data in seeds + [d for _, d in target.regression_inputs()]:
        execute(target, data, stats, save=save)
    while stats.inputs < inputs and (deadline is None or time.perf_counter() < deadline):
        data = mut.mutate(rng, rng.choice(seeds), seeds, target.prefix)[: target.max_len]
        execute(target, data, stats, save=save)
    stats.seconds = time.perf_counter() - t0
    return stats


def format_table(rows: list[Stats]) -> str:
    head = (f"{'target':22} {'engine':8} {'inputs':>9} {'execs/s':>9} {'crash kinds':>11} {'foreign':>8} "
            f"{'hangs':>6} {'acc.mutants':>11} {'state chg':>9} {'accepted':>9} {'slowest CPU':>11}")
    lines = [head, "-" * len(head)]
    for s in rows:
        lines.append(f"{s.target:22} {s.engine:8} {s.inputs:9d} {s.execs_per_s:9.0f} {len(s.kinds):11d} "
                     f"{s.foreign:8d} {s.hangs:6d} {s.accepted_mutants:11d} {s.state_changes:9d} {s.accepted:9d} "
                     f"{s.slowest_s * 1000:9.0f}ms")
    for s in rows:
        for kind, k in s.kinds.items():
            lines.append(f"  {s.target}: {k['count']}x {kind}: {k['message'][:160]}  [{k['example']}]")
    return "\n".join(lines)
