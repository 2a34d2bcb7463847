"""fsutil.close_later: descriptors whose close frees an inode are closed off the request path, boundedly, and
every one is closed by drain_closes (Keystore.close); removals are complete (names gone) when the call returns."""
from __future__ import annotations

import errno
import os

import pytest

from keystore import fsutil


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    return False


def test_a_handed_descriptor_is_closed_by_drain(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 3000)
    fd = os.open(p, os.O_RDONLY)
    p.unlink()
    fsutil.close_later(fd)
    fsutil.drain_closes()
    assert _closed(fd)


def test_never_more_than_the_bound_wait(tmp_path):
    fds = []
    for _ in range(4 * fsutil.CLOSE_MAX_PENDING):
        fd = os.open(os.devnull, os.O_RDONLY)
        fds.append(fd)
        fsutil.close_later(fd)
        assert len(fsutil._CLOSER.fds) + fsutil._CLOSER.busy <= fsutil.CLOSE_MAX_PENDING
    fsutil.drain_closes()
    assert all(_closed(fd) for fd in fds)


@pytest.mark.parametrize("secret", [True, False])
def test_remove_tree_and_secure_delete_leave_nothing_open_or_named(tmp_path, secret):
    d = tmp_path / "v"
    (d / "sub").mkdir(parents=True)
    for q in (d / "cert.pem", d / "sub" / "chain.pem"):
        q.write_bytes(b"y" * 3000)
    (d / "link").symlink_to(d / "cert.pem")
    key = tmp_path / "k.pem"
    key.write_bytes(b"secret" * 500)
    fsutil.drain_closes()
    before = len(os.listdir("/proc/self/fd"))
    fsutil.remove_tree(d, secret=secret)
    fsutil.secure_delete(key)
    assert not d.exists() and not os.path.lexists(d / "link") and not key.exists()  # gone when the call returns
    fsutil.drain_closes()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_keystore_close_closes_every_replaced_index(ks, lab):
    from keystore.csr import build_csr, parse_subject

    ks.close()
    fsutil.drain_closes()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        uri = ks.generate_key("p256")
        cert = lab.issue_from_csr("plant", build_csr(ks.private_key(uri), parse_subject("CN=dev"), []))
        ks.store_certificate("dev", cert, lab.domain("plant").chain, key_uri=uri, domain="plant")
    ks.close()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_the_closer_never_closes_a_descriptor_it_does_not_own(ks, lab, tmp_path):
    """Ownership: each descriptor handed to close_later is closed once, by the closer, and no other.

    A close of a stale number would hit whatever the kernel handed that number to next (a socket, the event loop's
    self-pipe, the DTLS transport). While credentials rotate (each store hands the replaced index's descriptor and
    the superseded key's to the closer), a second thread keeps opening files and checks that each of its own
    descriptors still names its own file (same inode) until it closes it itself."""
    import threading

    from keystore.csr import build_csr, parse_subject

    stop, problems, checked = threading.Event(), [], [0]

    def neighbour():
        n = 0
        while not stop.is_set():
            p = tmp_path / f"n{n % 8}"
            p.write_bytes(b"z" * 100)
            fd = os.open(p, os.O_RDONLY)
            ino = os.stat(p).st_ino
            for _ in range(20):
                try:
                    if os.fstat(fd).st_ino != ino:
                        problems.append(f"descriptor {fd} now names another file")
                except OSError as e:
                    problems.append(f"descriptor {fd} closed under its owner: {e}")
                    break
                checked[0] += 1
            else:
                os.close(fd)
            n += 1

    t = threading.Thread(target=neighbour)
    t.start()
    try:
        for _ in range(12):
            uri = ks.generate_key("p256")
            cert = lab.issue_from_csr("plant", build_csr(ks.private_key(uri), parse_subject("CN=dev"), []))
            ks.store_certificate("dev", cert, lab.domain("plant").chain, key_uri=uri, domain="plant")
        ks.close()
    finally:
        stop.set()
        t.join()
    fsutil.drain_closes()
    assert checked[0] > 0 and not problems, problems[:5]


def _in_thread(fn, *args):
    """Run fn on a thread; (thread, result list): a call that hangs shows as a thread still alive after a join."""
    import threading

    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    return t, out


def test_the_exit_drain_returns_while_the_closer_is_stuck_in_a_close(monkeypatch, caplog):
    """At interpreter exit the drain waits at most EXIT_DRAIN_S: a close(2) that never returns (a stuck device)
    must not hang the process's exit. The queued descriptors are closed by the drain itself; the one the closer is
    inside close(2) of is left to it (closing it here too could close a reused number), counted and logged."""
    import threading

    closer = fsutil._Closer()  # its own closer: the module's one keeps serving everything else
    real_close = os.close
    stuck, queued = os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_RDONLY)
    inside, release = threading.Event(), threading.Event()

    def close(fd):
        if fd == stuck:
            inside.set()
            release.wait(60)
        real_close(fd)

    monkeypatch.setattr(fsutil.os, "close", close)
    monkeypatch.setattr(fsutil, "EXIT_DRAIN_S", 0.2)
    left_before = fsutil.exit_left
    try:
        closer.put(stuck)
        assert inside.wait(10)
        closer.put(queued)  # waits behind the stuck close
        t, _ = _in_thread(closer.drain_at_exit)
        t.join(30)
        assert not t.is_alive(), "the exit drain waited for a close that does not return"
        assert fsutil.exit_left == left_before + 1
        assert "1 descriptor(s) still being closed" in caplog.text
        assert _closed(queued) and not _closed(stuck)
    finally:
        release.set()
    t, out = _in_thread(closer.drain)  # the close returns: a plain drain waits for it, as Keystore.close does
    t.join(30)
    assert out == [0] and _closed(stuck)


def test_a_drain_does_not_wait_for_a_closer_thread_that_ended(tmp_path):
    """A closer thread that ends while a drain waits (the drain saw it alive) leaves the queue to the drain, which
    closes it instead of waiting for a notification that never comes."""
    import threading

    closer = fsutil._Closer()
    end = threading.Event()
    closer.thread = threading.Thread(target=end.wait, daemon=True)  # alive, but takes nothing off the queue
    closer.thread.start()
    fd = os.open(os.devnull, os.O_RDONLY)
    closer.fds.append(fd)
    t, out = _in_thread(closer.drain)
    t.join(2 * fsutil._DRAIN_POLL_S)
    assert t.is_alive() and not _closed(fd)  # still waiting: the thread is alive and may yet take it
    end.set()
    t.join(30)
    assert not t.is_alive(), "the drain waits for a closer thread that ended"
    assert out == [0] and _closed(fd)


_STUCK_AT_EXIT = """
import os, threading
from keystore import fsutil
real_close, inside = os.close, threading.Event()
stuck = os.open(os.devnull, os.O_RDONLY)
def close(fd):
    if fd == stuck:
        inside.set()
        threading.Event().wait()  # a close(2) that never returns
    real_close(fd)
os.close = close
fsutil.EXIT_DRAIN_S = 0.2
fsutil.close_later(stuck)
inside.wait(10)
"""


def test_a_process_exits_while_its_closer_is_stuck():
    """The real exit path (the atexit drain): the process ends, and says what it left to the kernel."""
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-c", _STUCK_AT_EXIT], cwd=repo, capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=repo))
    assert r.returncode == 0, r.stderr
    assert "1 descriptor(s) still being closed by the devagent-close thread" in r.stderr
