"""libfaketime (Debian ``faketime``/``libfaketime``) for commands that must see a wrong clock.

The library is preloaded directly (``LD_PRELOAD`` + ``FAKETIME``) instead of through the ``faketime`` wrapper: the
wrapper creates a POSIX semaphore and shared-memory segment named after its pid (``/dev/shm/sem.faketime_sem_<pid>``)
and leaves them behind when it is killed, and a later wrapper that gets the same pid then fails with
"faketime: sem_open: File exists". The preloaded library alone needs neither, and gives the same clock: ``@<time>``
starts the clock at that time and lets it run, ``+Nd``/``-Nd`` offsets it."""
from __future__ import annotations

import glob
import os

_LIB = "libfaketime.so.1"


def library() -> str:
    """The path of libfaketime on this machine (any Debian multiarch directory)."""
    found = sorted(glob.glob(f"/usr/lib/*/faketime/{_LIB}") + glob.glob(f"/usr/lib/faketime/{_LIB}"))
    assert found, f"{_LIB} is missing: apt-get install -y faketime (make test installs it)"
    return found[0]


def env(spec: str, base: dict | None = None) -> dict:
    """``base`` (default: this process's environment) with libfaketime preloaded at ``spec``: ``"@1970-01-02
    00:00:00"`` (start there, the clock runs) or ``"+1825d"`` / ``"-1825d"`` (an offset)."""
    out = dict(os.environ if base is None else base)
    pre = out.get("LD_PRELOAD")
    out["LD_PRELOAD"] = library() + (f":{pre}" if pre else "")
    out["FAKETIME"] = spec
    out.pop("FAKETIME_SHARED", None)
    return out
