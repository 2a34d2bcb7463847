"""Who made a pending key, and whether that process still exists.

A pending key (generated, not yet certified) is recorded with its owner: ``pid``, the kernel's ``boot_id``, the
process start time (``/proc/<pid>/stat`` field 22, clock ticks since boot) and the ``command`` (``devagent
<subcommand>``, never its arguments: they may carry secrets). The owner is gone when the machine has rebooted since
(``boot_id`` differs), no process has the pid, or the process with that pid started at another time (the pid was
reused). Only Linux's ``/proc`` gives all three; elsewhere a pid that exists counts as alive.

The pid is the writer's view of it: keystores shared across PID namespaces (containers) need the same namespace.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

COMMAND = ""  # set by the CLI ("devagent renew"); else the program name


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot, or None if there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; fields 1-2 are "pid (comm)"
    except (IndexError, ValueError):
        return None


_BOOT_ID = None


def boot_id() -> str:
    global _BOOT_ID
    if _BOOT_ID is None:
        _BOOT_ID = _boot_id()
    return _BOOT_ID


_START: tuple[int, int | None] | None = None  # (pid, its start ticks): fixed for a process, re-read after a fork


def current() -> dict:
    """This process as the owner of a key it is about to generate."""
    global _START
    pid = os.getpid()
    if _START is None or _START[0] != pid:
        _START = (pid, start_ticks(pid))
    command = COMMAND or os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "python")
    return {"pid": pid, "boot_id": boot_id(), "start": _START[1], "command": command}


def alive(owner: dict | None) -> bool | None:
    """True: the owner process still runs; False: it is gone; None: unknown (no owner recorded)."""
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    if owner.get("boot_id") and boot_id() and owner["boot_id"] != boot_id():
        return False
    pid = owner["pid"]
    if Path("/proc").is_dir() and Path("/proc/self/stat").exists():
        ticks = start_ticks(pid)
        if ticks is None:
            return False
        return owner.get("start") is None or ticks == owner["start"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(owner: dict | None) -> str:
    if not isinstance(owner, dict):
        return "unknown owner"
    state = {True: "running", False: "gone", None: "unknown"}[alive(owner)]
    return f"pid {owner.get('pid')} ({owner.get('command') or '?'}, {state})"
