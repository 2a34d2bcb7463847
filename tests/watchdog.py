"""Run a Python child process so that a hang fails with what every thread was doing, not just "timed out".

``run_watched(cmd, timeout=...)`` is ``subprocess.run(cmd, capture_output=True, text=True, timeout=...)`` with the
child's faulthandler on (``PYTHONFAULTHANDLER=1``: installed from the interpreter's start to its finalisation, so it
also covers pytest's session end and the atexit handlers, which pytest's own faulthandler plugin does not). When the
timeout expires, before the child is ended:

1. the process tree below it: each process's command line and each thread's kernel wait channel and syscall
   (``/proc``), which shows a child still running, a ``futex`` or ``close`` that does not return;
2. the native stacks of every thread (``gdb -batch -ex "thread apply all bt"``, if gdb is installed): where in C
   (libsofthsm2's C_Finalize, OpenSSL's exit handlers, io_destroy) a thread waits, including after Python's own
   finalisation, when faulthandler is gone (with the interpreter's python-gdb.py, ``py-bt`` as well);
3. SIGABRT: faulthandler prints every Python thread's stack to the child's stderr, and the child ends.

then it raises ``AssertionError`` with all of that and the child's stdout and stderr.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else ():
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError as e:
        return f"({e.strerror})"


def process_tree(pid: int) -> str:
    """Each process below and including ``pid``: its command line, and each thread's name, wait channel and the
    syscall it is in (number and arguments, from /proc/<pid>/task/<tid>/syscall)."""
    lines, todo = [], [(pid, 0)]
    while todo:
        p, depth = todo.pop()
        lines.append(f"{'  ' * depth}pid {p}: {_read(f'/proc/{p}/cmdline')[:300]}")
        try:
            tasks = sorted(os.listdir(f"/proc/{p}/task"), key=int)
        except OSError:
            continue
        for t in tasks:
            d = f"/proc/{p}/task/{t}"
            lines.append(f"{'  ' * depth}  tid {t} {_read(d + '/comm')!r} wchan={_read(d + '/wchan')} "
                         f"syscall={_read(d + '/syscall')[:60]}")
        todo += [(c, depth + 1) for c in _children(p)]
    return "\n".join(lines)


def native_stacks(pid: int, timeout: float = 60) -> str:
    gdb = shutil.which("gdb")
    if gdb is None:
        return "(gdb is not installed: no native stacks)"
    try:
        # The interpreter's python-gdb.py (if installed next to it) adds py-bt: the Python stacks from gdb too,
        # which still works after faulthandler is uninstalled at the end of finalisation.
        r = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-iex", "set auto-load safe-path /",
                            "-ex", "set pagination off", "-ex", "thread apply all bt",
                            "-ex", "thread apply all py-bt"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"(gdb did not finish in {timeout:.0f} s)"
    return r.stdout + r.stderr


def run_watched(cmd: list[str], *, timeout: float, env: dict | None = None, abort_wait: float = 20,
                **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree, stacks = process_tree(p.pid), native_stacks(p.pid)
        p.send_signal(signal.SIGABRT)
        try:
            out, err = p.communicate(timeout=abort_wait)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        raise AssertionError(
            f"{cmd!r} did not finish in {timeout:.0f} s (ended with SIGABRT: returncode {p.returncode})\n"
            f"--- processes and threads at the timeout ---\n{tree}\n"
            f"--- native stacks at the timeout (gdb) ---\n{stacks}\n"
            f"--- stdout ---\n{out}\n--- stderr (faulthandler's Python stacks at the end) ---\n{err}") from None
    except BaseException:
        p.kill()
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)
