"""The CLI's AIO policy (keystore.fsutil.USE_AIO): a one-shot command batches its fsyncs on the thread pool and
makes no AIO context (whose teardown at exit costs ~40 ms: the kernel waits for an RCU grace period); the
long-lived commands (serve, run, clm run, opcua serve) call ``agent.cli.long_lived`` and batch through AIO; a command
invoked in-process (click's CliRunner, as some tests and embedding programs do) leaves the process's setting alone.
Checked in a fresh interpreter with the module's own counters (``aio_fsyncs``, ``fsync_count``)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

AIO_HERE = sys.platform.startswith("linux") and os.uname().machine in ("x86_64", "aarch64", "armv7l", "armv6l")

CODE = """
import os, sys
from agent.cli import long_lived, main
from keystore import fsutil
d = sys.argv[1]
try:
    main(["--state-dir", d + "/state", "keystore", "init"])
except SystemExit as e:
    assert e.code in (0, None), e.code
fds = [os.open(f"{d}/f{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(3)]
before = fsutil.fsync_count
fsutil.fsync_all(fds)
one_shot = (fsutil.USE_AIO, fsutil.aio_fsyncs, fsutil.fsync_count - before, fsutil._SYNCER.pool is not None)
long_lived()
fsutil.fsync_all(fds)
print("RESULT", repr(one_shot), repr((fsutil.USE_AIO, fsutil.aio_fsyncs)))
"""


@pytest.mark.skipif(not AIO_HERE, reason="Linux native AIO is used on x86_64/arm64/32-bit ARM Linux only")
def test_one_shot_commands_batch_on_threads_long_lived_ones_on_aio(tmp_path):
    r = subprocess.run([sys.executable, "-c", CODE, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    assert line == "RESULT (False, 0, 3, True) (True, 3)", r.stdout
    # one-shot: USE_AIO off, no AIO fsync, the pool synced all three; after long_lived(): the batch through AIO



IN_PROCESS = """
import sys
from click.testing import CliRunner
from agent.cli import cli, long_lived
from keystore import fsutil
r = CliRunner().invoke(cli, ["--state-dir", sys.argv[1] + "/state", "keystore", "init"])
assert r.exit_code == 0, r.output
before = fsutil.USE_AIO
fsutil.USE_AIO = "sentinel"
long_lived()
print("RESULT", before, fsutil.USE_AIO)
"""


def test_a_command_invoked_in_process_leaves_the_setting_alone(tmp_path):
    r = subprocess.run([sys.executable, "-c", IN_PROCESS, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    assert line == "RESULT True sentinel", r.stdout
