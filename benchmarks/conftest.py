"""Shared benchmark fixtures: collection of ``bench_*.py``, the CI-mode flag, a session lab CA, host facts.

- ``make bench``    full runs: n = 100 samples per Table-1 cell, fleet N = 10/100/1,000, keystores to 1,000.
- ``make bench-ci`` ``DEVAGENT_BENCH_CI=1``: the same code paths with small n and sizes, so CI exercises every
  suite and the report pipeline in seconds. Figures only: nothing here fails on a time.

The repository's pytest configuration collects ``tests/`` with the default ``test_*.py`` pattern; this
conftest registers ``benchmarks/bench_*.py`` as test modules itself, so ``pytest benchmarks`` works from the
repository root whatever ``python_files`` says (and never collects a file twice).

Stage samples for the Table-1 report travel in ``benchmark.extra_info`` (see ``record``): pytest-benchmark's own
statistics describe the whole measured call; ``benchmarks/report.py`` computes mean, sd and the 95 % CI per stage
and configuration from the raw samples.
"""
from __future__ import annotations

import fnmatch
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CI = os.environ.get("DEVAGENT_BENCH_CI", "") not in ("", "0")
DOMAIN = "plant"


def n_samples(full: int = 100, ci: int = 3) -> int:
    """Samples per cell: ``full`` for ``make bench`` (the paper's 100), ``ci`` for ``make bench-ci``.

    ``DEVAGENT_BENCH_N`` overrides the full-mode value (to bound a run on a slow board).
    """
    if CI:
        return ci
    env = os.environ.get("DEVAGENT_BENCH_N")
    return max(2, int(env)) if env else full


def sizes(full, ci):
    """Problem sizes (fleet N, keystore size): the full list, or the small CI list."""
    return tuple(ci if CI else full)


# ---- collection -----------------------------------------------------------------------------------------------
def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if file_path.parent != HERE:
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest's python plugin collects it already
    patterns = parent.config.getini("python_files") or []
    if any(fnmatch.fnmatch(file_path.name, p) for p in patterns):
        return None  # the configured pattern collects it already
    return pytest.Module.from_parent(parent, path=file_path)


# ---- host facts (pytest-benchmark's machine_info, shown in the report header) ---------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key in ("model name", "hardware", "model") and ":" in line:
                v = line.split(":", 1)[1].strip()
                if v and not v.isdigit():
                    return v
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fsync_ms(rounds: int = 20) -> float | None:
    """Median time of a 4 KiB write + fsync in the temp directory: the keystore's writes are bound by it."""
    import statistics
    import tempfile

    times = []
    try:
        with tempfile.NamedTemporaryFile() as f:
            for _ in range(rounds):
                t0 = time.perf_counter()
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
                times.append(time.perf_counter() - t0)
    except OSError:
        return None
    return round(statistics.median(times) * 1000, 3)


def host_facts() -> dict:
    import ssl

    facts = {"cpu_model": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
             "python": sys.version.split()[0], "python_impl": platform.python_implementation(),
             "ssl_openssl": ssl.OPENSSL_VERSION, "kernel": platform.release(), "ci_mode": CI}
    try:
        from cryptography.hazmat.backends.openssl import backend

        import cryptography

        facts["cryptography"] = cryptography.__version__
        facts["cryptography_openssl"] = backend.openssl_version_text()
    except Exception as e:  # the report shows what could not be found
        facts["cryptography"] = f"unavailable ({type(e).__name__})"
    try:
        import aiocoap

        facts["aiocoap"] = aiocoap.meta.version
    except Exception:
        facts["aiocoap"] = "unavailable"
    try:
        import board_profiles

        facts["board_profile"] = board_profiles.detect().profile.name
    except Exception as e:
        facts["board_profile"] = f"none ({type(e).__name__})"
    try:
        facts["devagent_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                                  capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        facts["devagent_commit"] = ""
    facts["fsync_ms"] = fsync_ms()
    try:
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
        facts["mem_total_mb"] = round(mem_kb / 1024)
    except (OSError, StopIteration, ValueError):
        pass
    return facts


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["devagent_host"] = host_facts()


# ---- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def bench_ci() -> bool:
    return CI


@pytest.fixture(scope="session")
def lab_ca(tmp_path_factory):
    """A lab CA (P-256 root + issuing CA) with the 'plant' domain: the CA of every delegated enrollment."""
    from agent.lab.ca import LabCA

    return LabCA.create(tmp_path_factory.mktemp("bench-lab"), domains=(DOMAIN,))


def record(benchmark, *, stages: dict[str, list[float]] | None = None, config: dict | None = None,
           samples_s: list[float] | None = None, stage: str | None = None, **extra) -> None:
    """Attach raw samples to the benchmark's JSON entry for ``report.py`` (the group comes from
    ``@pytest.mark.benchmark(group=...)``: ``table1``, ``fleet``, ``footprint``, ``keystore`` ...).

    Args:
        stages: stage name -> per-run seconds (Table-1 stages of one configuration).
        config: the configuration's facts (key type, channel, AES bits, backend, upstream ...).
        samples_s: per-run seconds of the benchmark's main quantity; ``stage`` names it.
    """
    ei = benchmark.extra_info
    if config is not None:
        ei["config"] = config
    if stages is not None:
        ei["stages"] = {k: [float(x) for x in v] for k, v in stages.items()}
    if samples_s is not None:
        ei["samples_s"] = [float(x) for x in samples_s]
    if stage is not None:
        ei["stage"] = stage
    ei.update(extra)
