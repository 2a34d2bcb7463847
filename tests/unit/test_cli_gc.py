"""The CLI's start-up pause of the cyclic garbage collector (agent.cli.main): it always ends, and a long-running
command resumes collection as soon as it loads. Run in a child interpreter: the pause is process-wide."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CODE = r"""
import gc
import click
import agent.cli as c

import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    try:
        c.main(["--help"])
    except SystemExit:
        pass
print("after-main", gc.isenabled(), gc.get_freeze_count() > 0)
c.pause_gc()
c.cli.get_command(click.Context(c.cli), "profile")  # a lazily loaded command (serve, run, clm ... alike)
print("lazy-command", gc.isenabled())
c.pause_gc()
c.cli.get_command(click.Context(c.cli), "status")  # a command of agent.cli itself: still paused
print("own-command", gc.isenabled())
t = __import__("threading").Thread(target=c.resume_gc)  # what main's timer does after GC_PAUSE_MAX_S
t.start(); t.join()
print("timer-thread", gc.isenabled())
gc.disable()  # turned off by someone else: left off
c.cli.get_command(click.Context(c.cli), "clm")
c.resume_gc()
print("not-ours", gc.isenabled())
"""


def test_gc_pause_ends_and_lazy_commands_resume_it():
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines() if " " in line)
    assert lines["after-main"] == "True True"
    assert lines["lazy-command"] == "True"
    assert lines["own-command"] == "False"
    assert lines["timer-thread"] == "True"
    assert lines["not-ours"] == "False"


def test_pause_is_bounded():
    import agent.cli

    assert 0 < agent.cli.GC_PAUSE_MAX_S <= 60
