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
