"""The systemd units in deploy/systemd: systemd's own checker accepts them, and their command lines parse."""
from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "deploy" / "systemd").iterdir())


def _unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(path.read_text())
    return cp


def test_systemd_analyze_verify_reports_nothing(tmp_path):
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing (Debian: systemd)"
    devagent = Path(sys.executable).parent / "devagent"
    assert devagent.exists(), "pip install -e . provides the devagent command"
    for u in UNITS:  # the real binary path, so that verify can check that ExecStart exists
        (tmp_path / u.name).write_text(u.read_text().replace("/usr/local/bin/devagent", str(devagent)))
    r = subprocess.run([tool, "verify", *[str(tmp_path / u.name) for u in UNITS]], capture_output=True, text=True,
                       timeout=60)
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if str(tmp_path) in ln or "devagent" in ln]
    assert r.returncode == 0 and ours == [], r.stdout + r.stderr


@pytest.mark.parametrize("name", ["devagent.service", "devagent-renew.service"])
def test_exec_start_parses_and_leaves_the_state_dir_to_the_configuration(name):
    svc = _unit(REPO / "deploy" / "systemd" / name)
    argv = shlex.split(svc["Service"]["ExecStart"])
    assert argv[0] == "/usr/local/bin/devagent"
    assert "--state-dir" not in argv  # agent.toml [keystore] path / the profile decide (README precedence)
    r = subprocess.run([str(Path(sys.executable).parent / "devagent"), *argv[1:], "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_timer_starts_the_one_pass_service_which_conflicts_with_the_daemon():
    timer = _unit(REPO / "deploy" / "systemd" / "devagent-renew.timer")
    assert timer["Timer"].get("Unit", "devagent-renew.service") == "devagent-renew.service"
    svc = _unit(REPO / "deploy" / "systemd" / "devagent-renew.service")
    assert svc["Service"]["Type"] == "oneshot" and "run --once" in svc["Service"]["ExecStart"]
    assert "devagent.service" in svc["Unit"]["Conflicts"]
    daemon = _unit(REPO / "deploy" / "systemd" / "devagent.service")
    assert daemon["Service"]["Type"] == "notify"  # the daemon sends READY=1 (agent.daemon.Notifier)
