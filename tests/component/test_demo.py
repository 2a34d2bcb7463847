"""`make demo` must keep working: run it (real CLI, lab EST/CMP servers, CoAP delegated enrollment) and check
that every protocol section completed and every certificate passed `openssl verify`."""
from __future__ import annotations

import os
import subprocess
import sys


def test_make_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ, DEVAGENT_DEMO_DIR=str(tmp_path / "demo-state"))
    r = subprocess.run([sys.executable, "-m", "agent.demo"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for section in ("EST (RFC 7030)", "CMP (RFC 9483", "CoAP delegated enrollment"):
        assert section in out, f"demo section {section!r} missing:\n{out[-3000:]}"
    assert "unavailable" not in out, out[-3000:]
    assert out.count(": OK") >= 3, "each protocol's certificate must pass openssl verify"
    assert "revoked tls-client" in out and "renewed ldevid-line2" in out and "renewed ldevid-plant" in out
