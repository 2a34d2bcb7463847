"""The serial link of `devagent mpy bridge` never waits forever: real `micropython` boards on a pty that stop
reading, flood the port, write a long burst while the host writes, or exit; and a host process holding more
than FD_SETSIZE (1024) descriptors, where pyserial's select() fails (the hang seen in full test runs: the host
flooded the board with HELLOs it never read and then spun forever in pyserial's write()).

Every failure is a ``LinkError`` naming the port and what happened (exit code 6 from the CLI), and nothing is
stored on the board. Calls that would hang on a broken link run in a watchdog thread, so such a regression
fails here instead of hanging the suite."""
from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
import time

import pytest
import serial
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import cli_mpy
from agent.mpy import frame
from tests.mpy.helpers import REPO, Board, make_ca, micropython_binary

BIG = os.urandom(30000)  # a CERT frame of ~40 KB: more than a pty buffers in one direction (~17 KB)
WATCHDOG_S = 120  # far beyond every bounded wait below; only a hang reaches it

# Board programs (run under micropython with sys.path at the staged lib and ROOT the state dir).
STOPS_READING = """
import time
from mpy import run, serial_agent
agent = run.make_agent(ROOT)
out = sys.stdout.buffer
serial_agent.serve(agent, sys.stdin.buffer.read, out.write, max_requests=1)  # answers one HELLO ...
while True:  # ... then hangs, never reading again
    time.sleep(1)
"""
FLOODS = """
import time
out = sys.stdout.buffer
line = b"[dbg] sensor loop 0123456789 abcdefghijklmnopqrstuvwxyz " * 4 + b"\\n"
while True:  # a debug build that only prints (~40 KB/s, a fast UART), never reads
    out.write(line)
    time.sleep_ms(5)
"""
BURST_THEN_SERVES = """
out = sys.stdout.buffer
for i in range(3000):  # ~200 KB of boot log before the agent starts
    out.write(("[boot] %05d flash check, mounting /devagent, radio calibration table .......\\n" % i).encode())
from mpy import run
run.serial_main(ROOT)
"""


def _board(tmp_path, program=None):
    micropython_binary()
    staged = cli_mpy.stage(tmp_path / "stage", {"device_id": "board-9", "cn": "board-9", "clock": "auto"},
                           ca_cert=None, main="none")
    return Board("micropython", staged, program)


@pytest.fixture
def make_board(tmp_path):
    boards = []

    def make(program=None):
        b = _board(tmp_path / str(len(boards)), program)
        boards.append(b)
        return b

    yield make
    for b in boards:
        b.close()


def _snapshot(board):
    root = board.staged / "devagent"
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def _bounded(fn, *args, **kw):
    """fn(*args, **kw) in a watchdog thread: its result or exception, or a test failure if it hangs."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(WATCHDOG_S)
    assert not t.is_alive(), f"{fn.__name__} hung for {WATCHDOG_S} s (unbounded wait on the serial link)"
    return out


def test_board_that_stops_reading(make_board):
    board = make_board(STOPS_READING)
    link = cli_mpy.BoardLink(board.ser, timeout_s=3)
    assert _bounded(link.hello)["value"]["agent"] == "devagent-mpy"
    before = _snapshot(board)
    # a small request fits in the buffers but is never answered: a bounded "no reply"
    r = _bounded(link.call, "STATUS")
    assert isinstance(r.get("error"), cli_mpy.LinkError) and r["error"].kind == "no-reply", r
    assert f"{board.tty}: no reply from the board to STATUS within 3 s" in str(r["error"])
    # a large one cannot even be written: a bounded "stuck" (pyserial without write_timeout: forever)
    r = _bounded(link.call, "CERT", BIG)
    e = r.get("error")
    assert isinstance(e, cli_mpy.LinkError) and e.kind == "stuck", r
    assert board.tty in str(e) and "stopped reading" in str(e) and "nothing was stored" in str(e), e
    assert _snapshot(board) == before


def test_cli_on_a_board_that_stops_reading(make_board, tmp_path):
    board = make_board(STOPS_READING)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ca.pem").write_bytes(make_ca(key, "Link Test CA").public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    before = _snapshot(board)
    board.ser.close()  # the CLI opens the port itself
    r = _bounded(CliRunner().invoke, cli_mpy.mpy, [
        "bridge", "--port", board.tty, "--upstream", "local", "--ca-cert", str(tmp_path / "ca.pem"),
        "--ca-key", str(tmp_path / "ca.key"), "--timeout", "2"])
    board.ser = serial.Serial(board.tty, 115200, timeout=0.2)
    res = r["value"]
    assert res.exit_code == 6, res.output  # README: 6 = network error; the serial link is the board's network
    assert f"devagent: board link error: {board.tty}: no reply from the board to CA within 2 s" in res.output
    assert _snapshot(board) == before  # the CA was never read, let alone installed


def _wait_for_output(board, deadline_s=60):
    """Until the board's program has printed something (it may start slowly on a loaded machine)."""
    end = time.monotonic() + deadline_s
    while not board.ser.in_waiting:
        assert time.monotonic() < end, f"the board printed nothing within {deadline_s} s"
        time.sleep(0.05)


def test_board_that_floods_the_port(make_board):
    board = make_board(FLOODS)
    _wait_for_output(board)
    link = cli_mpy.BoardLink(board.ser, timeout_s=2)
    r = _bounded(link.hello, wait_s=3)
    e = r.get("error")
    assert isinstance(e, cli_mpy.LinkError) and e.kind == "no-reply", r
    assert "did not answer HELLO within 3 s" in str(e) and "bytes came from the board meanwhile" in str(e), e
    r = _bounded(link.call, "CERT", BIG)
    assert isinstance(r.get("error"), cli_mpy.LinkError) and r["error"].kind == "stuck", r


def test_host_reads_while_writing_to_a_board_that_is_writing(make_board):
    """Both sides write at once: the board its boot log (blocking once the host's side is full), the host a
    frame larger than the pty buffers. Without reading while writing this deadlocks; with it the write completes
    and the board gets to its agent, which refuses the frame as too large (the board takes at most 8 KB) and then
    answers. (The write gets a generous bound: a loaded machine may run the board's 200 KB slowly.)"""
    board = make_board(BURST_THEN_SERVES)
    link = cli_mpy.BoardLink(board.ser, timeout_s=60)
    r = _bounded(link.send_raw, frame.encode("CERT", 1, BIG))
    assert r == {"value": None}, r
    r = _bounded(link.call, "CERT", BIG[:9000], timeout_s=10)  # the agent reads now: refused, unanswered
    e = r.get("error")
    assert isinstance(e, cli_mpy.LinkError) and e.kind == "no-reply", r
    assert "corrupt frame (4.00 malformed-frame: bad frame length)" in str(e), e
    r = _bounded(link.hello)
    assert r.get("value", {}).get("agent") == "devagent-mpy", r
    assert not [f for f in board.files() if f.startswith(("cert", "key"))]


def test_board_that_exits(make_board):
    board = make_board()
    link = cli_mpy.BoardLink(board.ser, timeout_s=5)
    assert _bounded(link.hello)["value"]["agent"] == "devagent-mpy"
    board.proc.kill()
    board.proc.wait(10)
    r = _bounded(link.call, "STATUS")
    e = r.get("error")
    assert isinstance(e, cli_mpy.LinkError) and e.kind == "closed", r
    assert str(e).startswith(f"{board.tty}: the board closed the connection"), e


# The CLI in a process that holds 1100 descriptors, so the port's is above FD_SETSIZE: what a long pytest
# session (or a CLM process) looks like. pyserial's select() raises ValueError there.
HOLD_FDS = """
import os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < 1200:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
assert held[-1] >= 1024, held[-1]
from agent.cli import main
main(sys.argv[1:])
"""


def test_cli_with_descriptors_above_fd_setsize(make_board, tmp_path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}: no descriptor can pass FD_SETSIZE here, nor the bug")
    board = make_board()
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ca.pem").write_bytes(make_ca(key, "Link Test CA").public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    board.ser.close()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        p = subprocess.run([sys.executable, "-c", HOLD_FDS, "mpy", "bridge", "--port", board.tty,
                            "--upstream", "local", "--ca-cert", str(tmp_path / "ca.pem"),
                            "--ca-key", str(tmp_path / "ca.key"), "--cn", "board-9", "--timeout", "20"],
                           capture_output=True, text=True, timeout=WATCHDOG_S, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"devagent mpy bridge hung for {WATCHDOG_S} s with the port's descriptor >= 1024: {e.stderr}")
    finally:
        board.ser = serial.Serial(board.tty, 115200, timeout=0.2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "board certificate installed: generation 1" in p.stdout
    assert [f for f in board.files() if f.startswith(("cert", "key"))] == ["cert.1", "key.1"]


def test_a_port_that_echoes_is_not_taken_for_a_board():
    """pyserial's loop:// (no descriptor: the pyserial path of BoardLink) hands our HELLO back to us. That is
    one clear error at once, not a HELLO sent again without reading (how the old hello() flooded the board)."""
    port = serial.serial_for_url("loop://", timeout=0.2)
    link = cli_mpy.BoardLink(port, timeout_s=2, name="loop://")
    assert link._fd is None
    r = _bounded(link.hello, wait_s=10)
    e = r.get("error")
    assert type(e) is cli_mpy.BridgeError and "loop://: the board answered HELLO with b''" in str(e), r
    assert link.call("STATUS", b"x") == ("STATUS", b"x")  # what goes out comes back: the I/O itself works
    port.close()


def test_unreachable_upstream_exits_as_a_network_error(make_board, tmp_path):
    """The board answers, the EST server is down: exit 6 (as `devagent enroll` would), naming the server; the
    board keeps nothing (its pending key is discarded at the next CSR)."""
    board = make_board()
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ca.pem").write_bytes(make_ca(key, "Link Test CA").public_bytes(serialization.Encoding.PEM))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"https://127.0.0.1:{s.getsockname()[1]}/.well-known/est"
    board.ser.close()
    r = _bounded(CliRunner().invoke, cli_mpy.mpy, [
        "bridge", "--port", board.tty, "--upstream", "est", "--server", url, "--username", "u",
        "--password", "pass:p", "--ca-cert", str(tmp_path / "ca.pem"), "--timeout", "20"])
    board.ser = serial.Serial(board.tty, 115200, timeout=0.2)
    res = r["value"]
    assert res.exit_code == 6, res.output
    assert "devagent: network error: upstream enrollment at EST" in res.output and url in res.output, res.output
    assert "nothing was sent to the board" in res.output, res.output
    assert not [f for f in board.files() if f.startswith(("cert", "key"))]
