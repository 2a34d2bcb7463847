"""tests/watchdog.py: a child that hangs fails with every thread's stack (Python and native), its threads' kernel
waits, and its output so far; one that finishes is a plain CompletedProcess."""
from __future__ import annotations

import shutil
import sys

import pytest

from tests.watchdog import run_watched

_HANGS_AT_EXIT = """
import atexit, threading
def stuck_in_a_thread():
    threading.Event().wait()
def stuck_at_exit():
    threading.Event().wait()
threading.Thread(target=stuck_in_a_thread, name="helper", daemon=True).start()
atexit.register(stuck_at_exit)
print("all done", flush=True)
"""


def test_a_hang_after_the_output_fails_with_every_thread_s_stack():
    with pytest.raises(AssertionError) as e:
        run_watched([sys.executable, "-c", _HANGS_AT_EXIT], timeout=3, abort_wait=20)
    msg = str(e.value)
    assert "did not finish in 3 s" in msg and "all done" in msg  # the output before the hang
    assert "Fatal Python error: Aborted" in msg  # faulthandler, from SIGABRT
    assert "in stuck_at_exit" in msg and "in stuck_in_a_thread" in msg  # both threads' Python stacks
    assert "wchan=" in msg and "syscall=" in msg
    if shutil.which("gdb"):
        assert "Thread 2 " in msg and "#0 " in msg  # native stacks of both threads


def test_a_process_that_finishes_is_returned():
    r = run_watched([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=60)
    assert (r.returncode, r.stdout) == (3, "out\n")
