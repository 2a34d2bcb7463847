"""`devagent run` with two domains on two EST servers, one of which hangs (accepts TCP, never answers): the other
domain is renewed on time; the hung one shows as in flight, then as a failure with its error, in `devagent status
--json` and in the Prometheus textfile (issue #20). Also: an EST server whose TLS certificate is "expired" by a
wrong local clock is reported as a clock problem, not as an untrusted server.

Real peers: two lab EST servers over TLS on loopback (agent.lab.est_server), the real `devagent` command line in
subprocesses (the daemon) and in-process (enroll, status), libfaketime for the wrong clock. The hang is a TCP
listener on the second server's port that accepts connections and never sends a byte.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from agent.cli import cli
from agent.lab.ca import LabCA
from agent.lab.est_server import start_est_server
from keystore.store import Keystore
from tests.peers import faketime

REPO = Path(__file__).resolve().parents[2]
LIFETIME_S = 40  # issued certificates; renewal.fraction 0.1 makes them due 4 s after issuance
ATTEMPT_TIMEOUT_S = 8  # renewal.attempt_timeout_s: the hung attempt is cut off after this
REQUEST_TIMEOUT_S = 5  # --timeout of each request (3 GET attempts to a hung server would take > 15 s)
DEADLINE_S = 120.0  # for conditions, not a duration


class HungServer:
    """Accepts TCP connections on ``port`` and never answers (a CA whose process is stuck)."""

    def __init__(self, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read from or written to

    def close(self):
        self.sock.close()
        for c in self.accepted:
            c.close()


def _fp(cert) -> str:
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _cli(state: Path, *args: str):
    r = CliRunner().invoke(cli, ["--state-dir", str(state), *args])
    return r


def _enroll(state: Path, lab, server, domain: str, name: str):
    r = _cli(state, "enroll", "--protocol", "est", "--server", server.url, "--label", domain, "--domain", domain,
             "--name", name, "--username", "u", "--password", "pass:p", "--ca-fingerprint",
             _fp(lab.domain(domain).root_cert), "--subject", f"CN=dev1-{domain}", "--timeout", str(REQUEST_TIMEOUT_S))
    assert r.exit_code == 0, r.output


def _status(state: Path) -> dict:
    r = _cli(state, "--json", "status")
    assert r.exit_code == 0, r.output
    return {c["name"]: c for c in json.loads(r.output)["credentials"]}


def _metric(path: Path, metric: str, cred: str) -> list[str]:
    if not path.exists():
        return []
    return [ln for ln in path.read_text().splitlines() if ln.startswith(metric + "{") and f'credential="{cred}"' in ln]


def _value(path: Path, metric: str, cred: str) -> float | None:
    rows = _metric(path, metric, cred)
    return float(rows[0].rsplit(" ", 1)[1]) if rows else None


def wait_for(cond, what: str, proc=None, log: Path | None = None):
    deadline = time.monotonic() + DEADLINE_S
    while True:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"devagent run ended ({proc.returncode}) while waiting for {what}: "
                        f"{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f"; daemon log: {log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.1)


@pytest.fixture
def two_domains(tmp_path):
    lab = LabCA.create(tmp_path / "lab", domains=("plant", "line2"))
    good = start_est_server(lab, "plant", users={"u": "p"}, lifetime_s=LIFETIME_S)
    bad = start_est_server(lab, "line2", users={"u": "p"}, lifetime_s=LIFETIME_S)
    state = tmp_path / "state"
    assert _cli(state, "keystore", "init").exit_code == 0
    # The credential behind the server that will hang is enrolled first and sorts first: a daemon that worked
    # through its credentials one after another would be stuck on it before it reached the other one.
    _enroll(state, lab, bad, "line2", "line2-ldevid")
    _enroll(state, lab, good, "plant", "plant-ldevid")
    port = bad.port
    bad.stop()
    hung = HungServer(port)
    yield lab, good, hung, state, tmp_path
    hung.close()
    good.stop()


def test_one_hung_ca_does_not_delay_the_other_domain(two_domains):
    lab, good, hung, state, tmp = two_domains
    metrics = tmp / "devagent.prom"
    (tmp / "agent.toml").write_text(f"""
[renewal]
fraction = 0.1
jitter = 0.0
retry_base_s = 60
retry_cap_s = 600
check_interval_s = 0.5
attempt_timeout_s = {ATTEMPT_TIMEOUT_S}
parallel = 4
[metrics]
textfile = "{metrics}"
[daemon]
notify = false
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVAGENT_")}
    env.update(PYTHONPATH=str(REPO), DEVAGENT_PROFILE="generic-x86_64")
    log = tmp / "run.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "--state-dir", str(state), "--config",
                                 str(tmp / "agent.toml"), "run"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        # The hung domain's attempt is in flight: status --json and the textfile say since when, where, which try.
        hung_url = f"https://127.0.0.1:{hung.sock.getsockname()[1]}"
        st = wait_for(lambda: (s := _status(state))["line2-ldevid"].get("renewing") and s, "the hung attempt", proc,
                      log)
        r = st["line2-ldevid"]["renewing"]
        assert r["server"] == hung_url and r["attempt"] == 1 and r["of"] >= 1 and not r["stale"]
        assert r["step"] in ("waiting", "ca-check", "request") and r["started"] and r["gives_up_at"]
        assert st["line2-ldevid"].get("last_error") is None
        wait_for(lambda: _value(metrics, "devagent_renewal_in_progress", "line2-ldevid") == 1, "in-progress metric",
                 proc, log)
        assert _value(metrics, "devagent_renewal_attempt_number", "line2-ldevid") == 1
        assert _value(metrics, "devagent_renewal_attempt_started_timestamp_seconds", "line2-ldevid") > 0
        assert any(f'server="{hung_url}"' in ln for ln in _metric(metrics, "devagent_renewal_attempt_info",
                                                                  "line2-ldevid"))

        # Meanwhile the other domain is renewed on time, while the hung attempt is still running.
        def plant_renewed():
            s = _status(state)
            return s if s["plant-ldevid"]["version"] >= 2 else None
        st = wait_for(plant_renewed, "the plant credential to be renewed", proc, log)
        assert st["plant-ldevid"]["last_error"] is None

        # The hung attempt ends as a failure with its error, counted in the textfile.
        def hung_failed():
            s = _status(state)["line2-ldevid"]
            return s if not s.get("renewing") and s.get("last_error") else None
        s = wait_for(hung_failed, "the hung attempt to fail", proc, log)
        assert "did not finish within" in s["last_error"] or "timed out" in s["last_error"], s["last_error"]
        assert hung_url in s["last_error"] and s["version"] == 1
        # "on time": the plant credential's renewal was stored while the hung attempt was still running
        ks = Keystore.open(state)
        try:
            stored = [e for e in ks.audit_entries() if e.get("action") == "certificate-store"
                      and e.get("name") == "plant-ldevid" and e.get("version") == 2]
            failed_at = datetime.datetime.fromisoformat(ks.get("line2-ldevid").record["meta"]["last_attempt"])
        finally:
            ks.close()
        renewed_at = datetime.datetime.fromisoformat(stored[0]["ts"])
        if renewed_at.tzinfo is None:
            renewed_at = renewed_at.replace(tzinfo=datetime.timezone.utc)
        assert renewed_at < failed_at, f"plant renewed at {renewed_at}, after the hung attempt ended at {failed_at}"
        wait_for(lambda: _value(metrics, "devagent_renewal_failures_total", "line2-ldevid") == 1,
                 "the failure in the textfile", proc, log)
        assert _value(metrics, "devagent_renewal_in_progress", "line2-ldevid") == 0
        assert _value(metrics, "devagent_renewal_failures_total", "plant-ldevid") == 0
        text = _cli(state, "status").output
        assert "last error:" in text and "renewing now" not in text.split("line2-ldevid")[1].split("plant-ldevid")[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(10)
    assert rc == 0, log.read_text()[-3000:]
    assert not _status(state)["line2-ldevid"].get("renewing")


def test_est_tls_expired_by_a_wrong_clock_is_reported_as_the_clock(tmp_path):
    """The lab EST server's TLS certificate is valid now; at a local clock 5 years ahead it is "expired": the error
    names the clock, not the trust anchors."""
    lab = LabCA.create(tmp_path / "lab", domains=("plant",))
    with start_est_server(lab, "plant", users={"u": "p"}) as est:
        state = tmp_path / "state"
        assert _cli(state, "keystore", "init").exit_code == 0
        _enroll(state, lab, est, "plant", "ldevid-plant")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVAGENT_")}
        env.update(PYTHONPATH=str(REPO), DEVAGENT_PROFILE="generic-x86_64")
        r = subprocess.run([sys.executable, "-m", "agent.cli", "--state-dir", str(state), "renew", "ldevid-plant"],
                           cwd=REPO, env=faketime.env("+1825d", env), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "expired by this device's clock" in r.stderr and "fix NTP or the RTC" in r.stderr, r.stderr
    assert "not trusted by the EST trust anchor" not in r.stderr


def test_daemon_names_the_clock_when_est_tls_fails_on_validity(tmp_path):
    """`devagent run` on a board whose clock is 5 years behind: the EST server's TLS certificate is "not yet valid";
    the failure recorded for the renewal says the local clock is the likely cause, with the evidence (the notBefore
    of the certificate the device already holds from that CA)."""
    lab = LabCA.create(tmp_path / "lab", domains=("plant",))
    with start_est_server(lab, "plant", users={"u": "p"}, lifetime_s=20) as est:
        state = tmp_path / "state"
        assert _cli(state, "keystore", "init").exit_code == 0
        _enroll(state, lab, est, "plant", "ldevid-plant")
        (tmp_path / "agent.toml").write_text("[renewal]\nfraction = 0.1\njitter = 0.0\ncheck_interval_s = 0.5\n"
                                             "[daemon]\nnotify = false\n[metrics]\ntextfile = \"\"\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVAGENT_")}
        env.update(PYTHONPATH=str(REPO), DEVAGENT_PROFILE="generic-x86_64")
        log = tmp_path / "run.log"
        with open(log, "wb") as errf:
            proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "--state-dir",
                                     str(state), "--config", str(tmp_path / "agent.toml"), "run"], cwd=REPO,
                                    env=faketime.env("-1825d", env),
                                    stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True)
        try:
            wait_for(lambda: "renewal failed" in log.read_text(), "the failed renewal", proc, log)
            err = wait_for(lambda: not _status(state)["ldevid-plant"].get("renewing") and
                           _status(state)["ldevid-plant"].get("last_error"), "the daemon's record of it", proc, log)
        finally:
            # signal the whole group (the daemon's own children too), or something outlives the test
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    assert "not yet valid by this device's clock" in err, err
    assert "the local clock is the likely cause" in err and "when a certificate this device already holds" in err
    assert "likely cause" in log.read_text()
