"""devagent profile list|show|detect through the real CLI (the board is faked under --root, no Pi here)."""
from __future__ import annotations

import json

from click.testing import CliRunner

from agent.cli import cli


def run(*args, env=None):
    r = CliRunner().invoke(cli, list(args), env={"DEVAGENT_CONFIG": None, **(env or {})}, catch_exceptions=False)
    return r


def test_profile_list_json(tmp_path):
    r = run("--state-dir", str(tmp_path), "--json", "profile", "list")
    assert r.exit_code == 0, r.output
    names = {p["name"] for p in json.loads(r.output)}
    assert {"rpi4b", "cm4-tpm", "esp32", "generic-x86_64"} <= names


def test_profile_detect_faked_cm4_with_tpm(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi Compute Module 4 Rev 1.0\0")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/tpmrm0").touch()
    r = run("--json", "profile", "detect", "--root", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["profile"] == "cm4-tpm"


def test_profile_show_and_effective(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[coap]\nmax_retransmit = 8\n")
    r = run("--state-dir", str(tmp_path), "--config", str(cfg), "--board-profile", "rpizero2w", "profile", "show",
            "--effective")
    assert r.exit_code == 0, r.output
    assert f"coap.max_retransmit = 8    # {cfg}" in r.output
    assert "coap.ack_timeout_s = 3.0    # profile rpizero2w" in r.output
    r = run("profile", "show", "picow")
    assert "[coap]" in r.output and "ack_timeout_s = 4.0" in r.output


def test_unknown_profile_is_a_config_error(tmp_path):
    r = CliRunner().invoke(cli, ["--state-dir", str(tmp_path), "profile", "show", "--effective", "rpi9"])
    assert r.exit_code != 0 and "unknown board profile 'rpi9'" in r.output
