"""fsync batches through Linux native AIO (``fsutil.fsync_all`` / ``fsync_while``): on this host the AIO path is
really taken (``fsutil.aio_fsyncs``, a counter of the module, not a mock), each descriptor's error is its own
whether the batch went through AIO or the thread pool (a pipe has no fsync: EINVAL), a forked child and many
threads at once get their own contexts, and where the kernel refuses io_setup the pool does the work."""
from __future__ import annotations

import errno
import os
import sys
import threading

import pytest

from keystore import fsutil

AIO_HERE = sys.platform.startswith("linux") and os.uname().machine in ("x86_64", "aarch64", "armv7l", "armv6l")


@pytest.fixture
def files(tmp_path):
    fds = [os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(3)]
    fds.append(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY))
    for fd in fds[:3]:
        os.write(fd, b"x" * 100)
    r, w = os.pipe()
    yield fds, r
    for fd in (*fds, r, w):
        os.close(fd)


@pytest.fixture
def no_aio():
    saved, fsutil.USE_AIO = fsutil.USE_AIO, False  # as where the kernel refuses io_setup (a seccomp'd container)
    try:
        yield
    finally:
        fsutil.USE_AIO = saved


@pytest.mark.skipif(not AIO_HERE, reason="Linux native AIO is used on x86_64/arm64/32-bit ARM Linux only")
def test_a_batch_goes_through_aio_on_this_host(files):
    fds, _pipe = files
    before, count = fsutil.aio_fsyncs, fsutil.fsync_count
    assert fsutil.fsync_all(fds) == [None] * 4
    assert fsutil.aio_fsyncs - before == 4 and fsutil.fsync_count - count == 4
    before = fsutil.aio_fsyncs
    assert fsutil.fsync_all(fds[:1]) == [None]  # one descriptor: synced on this thread, no AIO
    assert fsutil.aio_fsyncs == before


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "pool"])
def test_a_pipe_in_a_batch_fails_alone_with_einval(files, aio, request):
    fds, pipe = files
    if not aio:
        request.getfixturevalue("no_aio")
    elif not AIO_HERE:
        pytest.skip("no AIO here")
    before, count = fsutil.aio_fsyncs, fsutil.fsync_count
    errs = fsutil.fsync_all([fds[0], fds[1], pipe, fds[2], fds[3]])
    assert [e is None for e in errs] == [True, True, False, True, True]
    assert isinstance(errs[2], OSError) and errs[2].errno == errno.EINVAL
    assert fsutil.fsync_count - count == 5
    # via AIO the kernel takes the two before the pipe and refuses the pipe's; the pipe and the rest go to the pool
    assert fsutil.aio_fsyncs - before == (2 if aio else 0)
    errs = fsutil.fsync_all([pipe, fds[0], fds[1]])
    assert errs[0].errno == errno.EINVAL and errs[1:] == [None, None]
    assert fsutil.fsync_all(fds) == [None] * 4  # the context is still good after a refusal
    assert fsutil.aio_fsyncs - before == (6 if aio else 0)


@pytest.mark.skipif(not AIO_HERE, reason="no AIO here")
def test_a_batch_larger_than_a_context_is_submitted_in_rounds(files):
    fds, pipe = files
    batch = fds * 10 + [pipe] + fds  # 45 descriptors: 16 + 16 + 8, then the pipe and the rest on the pool
    before = fsutil.aio_fsyncs
    errs = fsutil.fsync_all(batch)
    assert [i for i, e in enumerate(errs) if e is not None] == [40] and errs[40].errno == errno.EINVAL
    assert fsutil.aio_fsyncs - before == 40


def test_a_forked_child_makes_its_own_context(files):
    fds, pipe = files
    assert fsutil.fsync_all(fds) == [None] * 4  # the parent's context (or threads) exist now
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            before = fsutil.aio_fsyncs
            errs = fsutil.fsync_all([*fds, pipe])
            ok = errs[:4] == [None] * 4 and errs[4].errno == errno.EINVAL
            code = 0 if ok and (fsutil.aio_fsyncs - before == (4 if AIO_HERE else 0)) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child must sync through a context of its own"
    assert fsutil.fsync_all(fds) == [None] * 4  # the parent's context is untouched by the child


def test_many_threads_at_once_each_get_their_own_results(files):
    """Threads each submit batches with the pipe at a different place: every thread gets EINVAL exactly where its
    own pipe is (no thread reaps another's events), and every other fsync succeeds."""
    fds, pipe = files
    wrong: list = []
    start = threading.Barrier(8)
    before = fsutil.aio_fsyncs

    def worker(k: int) -> None:
        start.wait()
        for j in range(30):
            batch = list(fds)
            at = (k + j) % 5
            batch.insert(at, pipe)
            errs = fsutil.fsync_all(batch)
            bad = [i for i, e in enumerate(errs) if e is not None]
            if bad != [at] or errs[at].errno != errno.EINVAL:
                wrong.append((k, j, errs))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    if AIO_HERE:
        assert fsutil.aio_fsyncs > before  # the fsyncs before each pipe went through AIO


def test_where_io_setup_is_refused_the_pool_syncs(files):
    """A kernel that refuses io_setup (here: more events than fs.aio-max-nr allows, EAGAIN; ENOSYS or a seccomp
    EPERM elsewhere) leaves the thread on the pool, with the same results."""
    fds, pipe = files
    out: dict = {}

    def run() -> None:  # a new thread: no context yet
        before = fsutil.aio_fsyncs
        out["errs"] = fsutil.fsync_all([*fds, pipe])
        out["aio"] = fsutil.aio_fsyncs - before

    saved, fsutil._AIO_SLOTS = fsutil._AIO_SLOTS, 1 << 30
    try:
        t = threading.Thread(target=run)
        t.start()
        t.join()
    finally:
        fsutil._AIO_SLOTS = saved
    assert out["errs"][:4] == [None] * 4 and out["errs"][4].errno == errno.EINVAL
    assert out["aio"] == 0


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "pool"])
def test_fsync_while(files, aio, request):
    fds, pipe = files
    if not aio:
        request.getfixturevalue("no_aio")
    elif not AIO_HERE:
        pytest.skip("no AIO here")
    before, count = fsutil.aio_fsyncs, fsutil.fsync_count
    assert fsutil.fsync_while(fds[0], lambda: 42) == 42
    assert fsutil.aio_fsyncs - before == (1 if aio else 0) and fsutil.fsync_count - count == 1

    def boom():
        raise ValueError("fn failed")

    with pytest.raises(ValueError, match="fn failed"):
        fsutil.fsync_while(fds[1], boom)
    ran = []
    with pytest.raises(OSError) as e:
        fsutil.fsync_while(pipe, lambda: ran.append(1))
    assert e.value.errno == errno.EINVAL and ran == [1]  # fn ran; the fsync's error is raised after it
    assert fsutil.fsync_all(fds) == [None] * 4


@pytest.mark.skipif(not AIO_HERE, reason="no AIO here")
def test_an_abandoned_context_waits_for_its_requests_and_is_replaced(files):
    """What an interrupted wait does (a KeyboardInterrupt in io_getevents, or right after io_submit): io_destroy
    returns once every submitted fsync is done; the thread's next batch makes a new context and reaps only its own."""
    fds, _pipe = files
    fsutil.fsync_all(fds)
    a = fsutil._aio_context()
    assert a is not None and a.submit(fds) == 4  # four fsyncs in flight, never reaped
    a.abandon()
    assert a.ctx.value == 0 and fsutil._aio_context() is not a
    before = fsutil.aio_fsyncs
    assert fsutil.fsync_all(fds) == [None] * 4 and fsutil.aio_fsyncs - before == 4
