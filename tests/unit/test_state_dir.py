"""Where the keystore lives: --state-dir > DEVAGENT_STATE_DIR > config file [keystore] path > board profile > default,
through the real command line (click's runner, in-process) and agent.config."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.config import ConfigError, load_config


def _env(**kw) -> dict:
    """A clean DEVAGENT_* environment for the runner (None unsets a variable)."""
    env = {k: None for k in os.environ if k.startswith("DEVAGENT_")}
    env.update(kw)
    return env


def _effective(runner, args, env) -> dict:
    r = runner.invoke(cli, ["--json", *args, "profile", "show", "--effective"], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    return {"path": data["values"]["keystore.path"], "source": data["sources"]["keystore.path"]}


@pytest.fixture
def layers(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'profile = "generic-x86_64"\n[keystore]\npath = "{tmp_path / "from-file"}"\n')
    return tmp_path, cfg


def test_each_layer_wins_over_the_ones_below(layers):
    tmp, cfg = layers
    runner = CliRunner()
    base = ["--config", str(cfg)]
    # --state-dir over everything
    got = _effective(runner, ["--state-dir", str(tmp / "from-cli"), *base], _env(DEVAGENT_STATE_DIR=str(tmp / "from-env")))
    assert got == {"path": str(tmp / "from-cli"), "source": "command line"}
    # DEVAGENT_STATE_DIR over the file (and over DEVAGENT_KEYSTORE_PATH, whose alias it is)
    got = _effective(runner, base, _env(DEVAGENT_STATE_DIR=str(tmp / "from-env"),
                                        DEVAGENT_KEYSTORE_PATH=str(tmp / "other-env")))
    assert got == {"path": str(tmp / "from-env"), "source": "environment DEVAGENT_STATE_DIR"}
    # the file over the profile; the file named by DEVAGENT_CONFIG counts the same as --config
    assert _effective(runner, base, _env()) == {"path": str(tmp / "from-file"), "source": str(cfg)}
    assert _effective(runner, [], _env(DEVAGENT_CONFIG=str(cfg)))["path"] == str(tmp / "from-file")
    # the profile over the built-in default (esp32's keystore path is /devagent)
    empty = tmp / "empty.toml"
    empty.write_text("")
    got = _effective(runner, ["--config", str(empty), "--board-profile", "esp32"], _env())
    assert got == {"path": "/devagent", "source": "profile esp32"}


def test_commands_use_the_effective_directory(layers):
    """keystore init / list / run act on the directory the layers name, not on a hard-wired default."""
    tmp, cfg = layers
    runner = CliRunner()
    r = runner.invoke(cli, ["--config", str(cfg), "keystore", "init"], env=_env(), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (tmp / "from-file" / "keystore.json").exists() and str(tmp / "from-file") in r.output
    r = runner.invoke(cli, ["--config", str(cfg), "--json", "keystore", "list"], env=_env())
    assert r.exit_code == 0 and json.loads(r.output)["credentials"] == []
    # The daemon's pass runs on the same keystore (its metrics file goes to a temp dir here).
    r = runner.invoke(cli, ["--config", str(cfg), "run", "--once", "--set", f"metrics.textfile={tmp}/m.prom"],
                      env=_env())
    assert r.exit_code == 0, r.output
    # The profile layer reaches the keystore too: esp32 names /devagent, which holds no keystore here.
    empty = tmp / "empty.toml"
    empty.write_text("")
    r = runner.invoke(cli, ["--config", str(empty), "--board-profile", "esp32", "keystore", "list"], env=_env())
    assert r.exit_code == 3 and "no keystore at /devagent" in r.output


def test_relative_state_dir_from_cli_and_env_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    r = runner.invoke(cli, ["--state-dir", "ks-cli", "keystore", "init"], env=_env(), catch_exceptions=False)
    assert r.exit_code == 0 and (tmp_path / "ks-cli" / "keystore.json").exists()
    r = runner.invoke(cli, ["keystore", "init"], env=_env(DEVAGENT_STATE_DIR="ks-env"), catch_exceptions=False)
    assert r.exit_code == 0 and (tmp_path / "ks-env" / "keystore.json").exists()


def test_relative_path_in_a_file_is_an_error_naming_it(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[keystore]\npath = "ks"\n')
    r = CliRunner().invoke(cli, ["--config", str(cfg), "--board-profile", "generic-x86_64", "keystore", "list"],
                           env=_env())
    assert r.exit_code == 7 and "keystore.path" in r.output and str(cfg) in r.output and "absolute" in r.output
    assert not (tmp_path / "ks").exists()


def test_non_root_gets_a_per_user_directory_unless_one_is_configured(tmp_path):
    """The profile names the system service's directory; a non-root user keeps their own keystore, unless the
    environment or a file says otherwise."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg")}
    c = load_config({"profile": "generic-x86_64"}, env=env, config_path=empty, euid=1000)
    assert str(c.keystore_path) == str(tmp_path / "xdg" / "devagent")
    assert c.sources["keystore.path"].startswith("default for a non-root user")
    c = load_config({"profile": "generic-x86_64"}, env={"HOME": str(tmp_path)}, config_path=empty, euid=1000)
    assert str(c.keystore_path) == str(tmp_path / ".local" / "share" / "devagent")
    c = load_config({"profile": "generic-x86_64"}, env=env, config_path=empty, euid=0)
    assert str(c.keystore_path) == "/var/lib/devagent" and c.sources["keystore.path"] == "profile generic-x86_64"
    f = tmp_path / "agent.toml"
    f.write_text('[keystore]\npath = "/srv/devagent"\n')
    c = load_config({"profile": "generic-x86_64"}, env=env, config_path=f, euid=1000)
    assert str(c.keystore_path) == "/srv/devagent"
    c = load_config({"profile": "generic-x86_64"}, env={**env, "DEVAGENT_STATE_DIR": "/srv/x"}, config_path=f,
                    euid=1000)
    assert str(c.keystore_path) == "/srv/x"


def test_empty_state_dir_variable_counts_as_unset(tmp_path):
    f = tmp_path / "agent.toml"
    f.write_text('[keystore]\npath = "/srv/devagent"\n')
    c = load_config({"profile": "generic-x86_64"}, env={"DEVAGENT_STATE_DIR": ""}, config_path=f, euid=0)
    assert str(c.keystore_path) == "/srv/devagent"
    with pytest.raises(ConfigError, match="DEVAGENT_KEYSTORE_PATH"):
        load_config({"profile": "generic-x86_64"}, env={"DEVAGENT_KEYSTORE_PATH": ""}, config_path=f, euid=0)
