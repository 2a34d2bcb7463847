"""The one place that writes secrets and state to disk, and sets permissions.

Invariants:
- Every write goes to a temp file in the same directory, is fsynced, ``os.replace``d over the target, and the
  directory is fsynced; on any error before the replace the temp file is removed and the target is untouched
  (``StorageError``). A failure *after* the replace (the directory fsync) is ``NotDurableError``: the new content
  is live, and callers must treat it as written (never remove what it points at), report it, and retry the sync.
  The exception: ``write_new_files`` creates new files under their final names in a place nothing refers to yet
  (a torn one is garbage there), and the write that will refer to them fsyncs them before it does.
- Files are created 0600 (or 0400), directories 0700. Nothing else in the project calls ``os.chmod`` or
  ``os.open`` for state files.
- Secrets are read through ``read_private``: opened with ``O_NOFOLLOW`` and checked with ``fstat`` on the opened
  descriptor (no stat-then-open by path), refusing group/world-accessible files and naming the fix.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import logging
import os
import stat
import threading
import time
from pathlib import Path

from keystore.errors import KeystorePermissionError, NotDurableError, StorageError

FILE_MODE = 0o600
DIR_MODE = 0o700
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

# Test hook for fault injection: a callable(stage: str, path: str) run between write steps (stages "write",
# "fsync", "replace", "fsync-dir", "unlink"). Tests set it in their own process (or in a forked child) to make a
# step fail with ENOSPC/EIO; it is None in production and nothing outside a test can switch it on (there is no
# environment variable for it, so an installed devagent never injects faults).
_FAULT_HOOK = None


# fsync calls made through this module since import: benchmarks report the count per keystore operation (every
# keystore fsync is made here). Read-only for everyone else.
fsync_count = 0


def _fsync(fd: int) -> None:
    global fsync_count
    fsync_count += 1
    os.fsync(fd)


# ---- deferred close ----------------------------------------------------------------------------------------
# Closing the last descriptor of an unlinked (or replaced) file frees its inode and data blocks; on ext4 mounted
# with ``discard`` (common on SD cards and eMMC, and on the CI host) that costs ~1 ms of synchronous kernel time
# per file (a 0-byte file: ~8 us). It is pure bookkeeping: the file's name is already gone and its content was
# fsynced (or overwritten and fsynced) before, so nothing a crash or another process can observe depends on when
# the space is returned. ``close_later`` hands such a descriptor to one daemon thread, so that a request's answer
# does not wait for it. Bounded: with ``CLOSE_MAX_PENDING`` descriptors already waiting, the caller closes its
# own at once (never more open files than that). ``drain_closes`` waits until every handed descriptor is closed
# (Keystore.close, and at interpreter exit); a forked child closes the descriptors it inherited from the queue.
# A drain never waits on a closer thread that is gone (it closes the queue itself). At interpreter exit it waits at
# most ``EXIT_DRAIN_S``: then it closes the queued descriptors itself and leaves the ones the thread is inside
# close(2) of to the kernel's close at exit, counted in ``exit_left`` and logged (a close that slow is the device's,
# and nothing depends on when the space comes back; see above). An exit never hangs on the closer.
CLOSE_MAX_PENDING = 64
EXIT_DRAIN_S = 10.0
_DRAIN_POLL_S = 0.5  # how often a waiting drain checks that the closer thread is still alive
exit_left = 0  # descriptors the exit drain left to the kernel (the closer thread was still closing them)
_log = logging.getLogger("devagent.keystore")


class _Closer:
    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.fds: collections.deque[int] = collections.deque()
        self.busy = 0  # descriptors taken off the queue and not yet closed
        self.thread: threading.Thread | None = None

    def put(self, fd: int) -> None:
        with self.cond:
            if len(self.fds) + self.busy < CLOSE_MAX_PENDING:
                if self.thread is None or not self.thread.is_alive():
                    try:
                        t = threading.Thread(target=self._run, name="devagent-close", daemon=True)
                        t.start()
                    except RuntimeError:  # interpreter shutting down: no new threads
                        t = None
                    self.thread = t
                if self.thread is not None:
                    self.fds.append(fd)
                    self.cond.notify_all()
                    return
        os.close(fd)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.fds:
                    self.cond.wait()
                fd = self.fds.popleft()
                self.busy += 1
            try:
                os.close(fd)
            except OSError:
                pass
            finally:
                with self.cond:
                    self.busy -= 1
                    self.cond.notify_all()

    def _close_queued(self) -> None:  # with self.cond held: what the worker has not taken is closed here
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.popleft())

    def drain(self, timeout: float | None = None) -> int:
        """Wait until every handed descriptor is closed; return how many are still being closed (0: all are).
        Without a worker (none started, it ended, or this is it) the queue is closed here. After ``timeout``
        seconds the queue is closed here too, and the descriptors the worker is inside close(2) of are left to it
        (never closed twice: their numbers may be reused the moment that close returns)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                t = self.thread
                if t is None or not t.is_alive() or t is threading.current_thread():
                    self._close_queued()
                    return 0
                if not self.fds and not self.busy:
                    return 0
                wait = _DRAIN_POLL_S
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        self._close_queued()
                        return self.busy
                self.cond.wait(wait)

    def drain_at_exit(self) -> None:
        global exit_left
        left = self.drain(EXIT_DRAIN_S)
        if left:
            exit_left += left
            _log.warning("exit: %d descriptor(s) still being closed by the devagent-close thread after %.0f s; "
                         "left to the kernel", left, EXIT_DRAIN_S)

    def after_fork_in_child(self) -> None:
        # The worker does not exist in the child (and its lock may have been held at the fork): start afresh and
        # close the inherited copies here (the parent closes its own).
        inherited = list(self.fds)
        self.__init__()
        for fd in inherited:
            with contextlib.suppress(OSError):
                os.close(fd)


_CLOSER = _Closer()
atexit.register(_CLOSER.drain_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_CLOSER.after_fork_in_child)


def close_later(fd: int) -> None:
    """Close ``fd`` soon, on the closer thread (see above); only for a descriptor nobody uses any more."""
    _CLOSER.put(fd)


def drain_closes() -> None:
    """Return once every descriptor handed to ``close_later`` is closed."""
    _CLOSER.drain()


# ---- concurrent fsync ----------------------------------------------------------------------------------------
# Several fsyncs that must all be done before one later step, with no order among them (the files of a new version
# and the directories that gained their entries, all before the index names them), are issued together: the file
# system commits them in one journal transaction (ext4's jbd2 joins fsyncs that arrive while a commit is being
# prepared) instead of one after another. Each fsync still happens, on its own descriptor; what changes is only
# that the caller waits for all of them at once.
# How they are issued: on Linux, with one ``io_submit`` of IOCB_CMD_FSYNC requests (native AIO, see ``_Aio``): the
# kernel runs each on a workqueue thread (since 4.18, for every file system with an fsync), all of them started at
# once, and the caller waits in one ``io_getevents``. The fallback is a pool of threads, each calling ``os.fsync``:
# a pool thread needs the GIL to start its fsync, so they start one hand-off apart (~0.05 ms each on the CI host),
# and a batch of 7 costs ~3x one fsync there; through AIO it costs ~0.2 ms less (docs/performance.md). The pool is
# used where AIO is not: another OS or machine, no ``syscall`` in libc, io_setup refused (ENOSYS, or EPERM under a
# seccomp filter, EAGAIN: fs.aio-max-nr reached), and for the requests the kernel refuses at io_submit (a
# descriptor without an fsync op, e.g. a pipe: EINVAL; a kernel before 4.18: every fsync) with those after them.
# Neither AIO contexts nor threads exist before the first batch (a command that writes nothing imports no ctypes),
# and a forked child starts without either.
# The largest batch is a renewal with a held software key (Keystore.store_certificate(key=...)): its two version
# files, the key file, the version dir, creds/<name>, keys/ and the index temp file, 7 descriptors; on the pool one
# is synced on the caller's thread, and with fewer threads the rest would queue for a second round.
SYNC_THREADS = 6
# False sends every batch to the thread pool, as when the kernel refuses io_setup. An AIO context has a price at the
# end: the kernel tears it down at exit (exit_aio) or io_destroy and waits for an RCU grace period, ~40 ms on the CI
# host (a process that only calls io_setup exits in 52 ms instead of 12), against ~0.2 ms saved per batch. So the
# ``devagent`` CLI sets False for its one-shot commands (``enroll``, ``renew``, ``keystore ...``: one to a few
# batches each) and back to True for the long-lived ones (``serve``, ``run``, ``clm run``, ``opcua serve``:
# agent.cli.long_lived), in a process its console script (agent.cli.main) runs; a library user, a test and a command
# invoked in-process (click's CliRunner) keep the process's setting. ``aio_fsyncs`` counts the fsyncs submitted
# through AIO (tests check it is really taken).
USE_AIO = True
aio_fsyncs = 0


class _Syncer:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pool = None

    def executor(self):
        with self.lock:
            if self.pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self.pool = ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="devagent-fsync")
            return self.pool

    def after_fork_in_child(self) -> None:
        self.__init__()  # the pool's threads do not exist in the child (and its lock may have been held)


_SYNCER = _Syncer()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_SYNCER.after_fork_in_child)


# Linux native AIO through libc's syscall(2) (no Python module wraps io_setup & co., and libaio is not installed
# by default). Syscall numbers (io_setup, io_submit, io_getevents, io_destroy) from the kernel's tables:
# arch/x86/entry/syscalls/syscall_64.tbl (206, 209, 208, 207; /usr/include/x86_64-linux-gnu/asm/unistd_64.h),
# include/uapi/asm-generic/unistd.h for arm64 (0, 2, 4, 1), arch/arm/tools/syscall.tbl for 32-bit ARM EABI
# (243, 246, 245, 244), which is also what a 32-bit userland (Raspberry Pi OS armhf) uses on an arm64 kernel, whose
# uname says aarch64: the table is chosen by machine *and* pointer size. On 32-bit ARM io_getevents (245) is the
# time32 one, absent from a kernel built without COMPAT_32BIT_TIME: io_setup probes it (and falls back) before
# anything is submitted. struct iocb (64 bytes) and struct io_event (32) as in linux/aio_abi.h, little-endian.
_AIO_NR = {("x86_64", 8): (206, 209, 208, 207), ("aarch64", 8): (0, 2, 4, 1), ("arm64", 8): (0, 2, 4, 1),
           ("aarch64", 4): (243, 246, 245, 244), ("arm", 4): (243, 246, 245, 244)}
_AIO_SLOTS = 16  # requests in flight per context; a larger batch is submitted in rounds of this many
_IOCB_CMD_FSYNC = 2
_AIO = None  # the ctypes bindings (_AioLib), made on first use; False: AIO is unavailable here


class _AioLib:
    def __init__(self, ctypes, nr) -> None:
        self.ctypes = ctypes
        self.setup_nr, self.submit_nr, self.getevents_nr, self.destroy_nr = nr
        libc = ctypes.CDLL(None, use_errno=True)
        self.syscall = libc.syscall  # AttributeError: no syscall(2) in this libc
        self.syscall.restype = ctypes.c_long
        u64, u32 = ctypes.c_uint64, ctypes.c_uint32

        class Iocb(ctypes.Structure):
            _fields_ = [("aio_data", u64), ("aio_key", u32), ("aio_rw_flags", ctypes.c_int32),
                        ("aio_lio_opcode", ctypes.c_uint16), ("aio_reqprio", ctypes.c_int16), ("aio_fildes", u32),
                        ("aio_buf", u64), ("aio_nbytes", u64), ("aio_offset", ctypes.c_int64),
                        ("aio_reserved2", u64), ("aio_flags", u32), ("aio_resfd", u32)]

        class Event(ctypes.Structure):
            _fields_ = [("data", u64), ("obj", u64), ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]

        if ctypes.sizeof(Iocb) != 64 or ctypes.sizeof(Event) != 32:
            raise OSError(errno.ENOSYS, "unexpected struct iocb layout")
        self.Iocb, self.Event = Iocb, Event


def _aio_lib():
    """The AIO bindings, or None where AIO is not available (then every batch goes to the pool)."""
    global _AIO
    if _AIO is None:
        _AIO = False
        if os.name == "posix" and os.uname().sysname == "Linux":
            import ctypes

            machine = os.uname().machine
            key = (machine if not machine.startswith("arm") else "arm", ctypes.sizeof(ctypes.c_void_p))
            if key in _AIO_NR:
                with contextlib.suppress(OSError, AttributeError, ValueError):
                    _AIO = _AioLib(ctypes, _AIO_NR[key])
    return _AIO or None


class _Aio:
    """One AIO context of one thread, with its buffers (the kernel copies the iocbs at io_submit and writes the
    events into ``events`` during io_getevents). What must never be left behind is a submitted request: the
    caller's next step (a replace) waits for its fsync, and its event must not be reaped as a later batch's."""

    def __init__(self, lib: _AioLib, gen: int) -> None:
        c = lib.ctypes
        self.lib, self.gen = lib, gen
        self.ctx = c.c_ulong(0)
        if lib.syscall(c.c_long(lib.setup_nr), c.c_long(_AIO_SLOTS), c.byref(self.ctx)) != 0:
            e = c.get_errno()
            raise OSError(e, os.strerror(e))
        self.iocbs = (lib.Iocb * _AIO_SLOTS)()
        self.ptrs = (c.c_void_p * _AIO_SLOTS)(*(c.addressof(cb) for cb in self.iocbs))
        self.events = (lib.Event * _AIO_SLOTS)()
        for cb in self.iocbs:
            cb.aio_lio_opcode = _IOCB_CMD_FSYNC
        try:
            self._getevents(0)  # the probe: ENOSYS where this io_getevents does not exist
        except OSError:
            self.destroy()
            raise

    def _getevents(self, n: int) -> int:
        lib, c = self.lib, self.lib.ctypes
        r = lib.syscall(c.c_long(lib.getevents_nr), self.ctx, c.c_long(n), c.c_long(n), self.events, None)
        if r < 0:
            e = c.get_errno()
            raise OSError(e, os.strerror(e))
        return r

    def submit(self, fds) -> int:
        """Submit an fsync of each of ``fds`` (at most _AIO_SLOTS); return how many the kernel took, from the first
        (0: it refused the first one: EINVAL, EBADF, EAGAIN, ...). The caller must ``reap`` that many, and
        ``abandon`` the context if anything interrupts it before it knows the count."""
        lib, c = self.lib, self.lib.ctypes
        for i, fd in enumerate(fds):
            cb = self.iocbs[i]
            cb.aio_fildes = fd
            cb.aio_data = i
        return max(lib.syscall(c.c_long(lib.submit_nr), self.ctx, c.c_long(len(fds)), self.ptrs), 0)

    def reap(self, n: int, out: list, base: int) -> None:
        """Wait for the ``n`` submitted requests; ``out[base + i]``: None or the OSError of request i. Returns or
        raises only once all ``n`` are done: EINTR is retried; an exception raised meanwhile (KeyboardInterrupt)
        or an error of io_getevents itself abandons the context, which waits for them (``abandon``)."""
        got = 0
        seen = [False] * n
        try:
            while got < n:
                try:
                    k = self._getevents(n - got)
                except InterruptedError:
                    continue
                for ev in self.events[:k]:
                    seen[ev.data] = True
                    if ev.res < 0:
                        out[base + ev.data] = OSError(-ev.res, os.strerror(-ev.res))
                got += k
        except OSError as e:  # not seen for a valid context; the fsyncs' outcome is unknown: report it as theirs
            self.abandon()
            for i in range(n):
                if not seen[i]:
                    out[base + i] = e
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Destroy this thread's context (io_destroy waits until every request submitted to it is done, so that
        nothing of a batch is left in flight, nor its events for a later batch to reap); the next batch makes a
        new one."""
        if getattr(_AIO_LOCAL, "aio", None) is self:
            _AIO_LOCAL.aio = None
        self.destroy()

    def destroy(self) -> None:
        lib, c = self.lib, self.lib.ctypes
        if self.ctx.value and self.gen == _AIO_GEN[0]:  # a context of the parent process is not ours to destroy
            lib.syscall(c.c_long(lib.destroy_nr), self.ctx)
        self.ctx.value = 0

    def __del__(self) -> None:  # the thread that owned it ended (threading.local dropped it)
        with contextlib.suppress(Exception):
            self.destroy()


# One context per thread (threading.local): a thread's batch waits for its own requests only, and threads writing
# different keystores (or files) never wait for each other's fsyncs, as with the pool. A shared context would need
# either a lock held across the wait (serialising every writer's batch) or a dispatcher of events to waiters; a
# context costs one small ring mapping and _AIO_SLOTS of fs.aio-max-nr (65536 by default), and is destroyed when its
# thread ends. _AIO_GEN changes at fork: the child's mm has no AIO contexts (the kernel does not copy them), so a
# context made before the fork is dropped unused, never destroyed (its id may be a new context's in the child).
_AIO_LOCAL = threading.local()
_AIO_GEN = [0]


def _aio_after_fork_in_child() -> None:
    _AIO_GEN[0] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_aio_after_fork_in_child)


def _aio_context() -> _Aio | None:
    if not USE_AIO:
        return None
    a = getattr(_AIO_LOCAL, "aio", None)
    if a is not None and a.gen == _AIO_GEN[0]:
        return a
    _AIO_LOCAL.aio = None
    if getattr(_AIO_LOCAL, "refused", None) == _AIO_GEN[0]:
        return None
    lib = _aio_lib()
    if lib is None:
        return None
    try:
        a = _Aio(lib, _AIO_GEN[0])
    except OSError:  # ENOSYS, EPERM (seccomp), EAGAIN (aio-max-nr), EINVAL: this thread uses the pool
        _AIO_LOCAL.refused = _AIO_GEN[0]
        return None
    _AIO_LOCAL.aio = a
    return a


def _fsync_pool(fds: list[int], out: list, base: int) -> None:
    """The fallback: fsync ``fds`` on the pool's threads and this one; ``out[base + i]``: None or the error."""
    futures = None
    if len(fds) > 1:
        try:
            ex = _SYNCER.executor()
            futures = [ex.submit(os.fsync, fd) for fd in fds[1:]]
        except RuntimeError:  # interpreter shutting down: no new threads; one after the other
            futures = None
    for i, fd in enumerate(fds if futures is None else fds[:1]):
        try:
            os.fsync(fd)
        except OSError as e:
            out[base + i] = e
    for i, f in enumerate(futures or (), start=1):
        try:
            f.result()
        except OSError as e:
            out[base + i] = e


def fsync_all(fds: list[int]) -> list[OSError | None]:
    """fsync every descriptor in ``fds``, concurrently when there are several; return once all are done, with
    the error of each (None: synced). Never raises for an fsync's failure: the caller names what failed."""
    global fsync_count, aio_fsyncs
    fsync_count += len(fds)
    out: list[OSError | None] = [None] * len(fds)
    a = _aio_context() if len(fds) > 1 else None
    start = 0
    while a is not None and start < len(fds):
        chunk = fds[start:start + _AIO_SLOTS]
        try:
            n = a.submit(chunk)
        except BaseException:  # interrupted right after io_submit: how many went in is unknown; wait for them all
            a.abandon()
            raise
        try:
            aio_fsyncs += n
            if n < len(chunk):  # refused from chunk[n] on: those go the old way while the submitted ones run
                _fsync_pool(fds[start + n:], out, start + n)
        finally:
            a.reap(n, out, start)
        if n < len(chunk):
            return out
        start += n
    if start < len(fds):
        _fsync_pool(fds[start:], out, start)
    return out


def fsync_while(fd: int, fn):
    """fsync ``fd`` while ``fn()`` runs on this thread; return ``fn()``'s result once both are done.
    For work that must not be *answered* before the fsync returns but may be *done* meanwhile (the CSR of a key
    whose directory entry is being synced). If ``fn`` raises, the fsync is still waited for, then ``fn``'s exception
    propagates. Raises the fsync's ``OSError`` (after ``fn`` finished).

    Through AIO (see above) the fsync starts at once on a kernel thread. On the pool, the pool thread needs the GIL
    to start its fsync: it gets it at ``fn``'s first blocking call (a file open, a lock), or when ``fn`` returns;
    worth it there only for an ``fn`` that blocks early and then computes (the CSR: the key's lock file is opened,
    then the CSR is signed)."""
    global fsync_count, aio_fsyncs
    fsync_count += 1
    a = _aio_context()
    try:
        n = a.submit([fd]) if a is not None else 0
    except BaseException:  # as in fsync_all
        a.abandon()
        raise
    if n == 1:
        err: list[OSError | None] = [None]
        try:
            aio_fsyncs += 1
            out = fn()
        except BaseException:
            a.reap(1, err, 0)
            raise
        a.reap(1, err, 0)
        if err[0] is not None:
            raise err[0]
        return out
    try:
        fut = _SYNCER.executor().submit(os.fsync, fd)
    except RuntimeError:  # interpreter shutting down: no new threads; one after the other
        os.fsync(fd)
        return fn()
    try:
        out = fn()
    except BaseException:
        with contextlib.suppress(OSError):
            fut.result()
        raise
    fut.result()
    return out


def _fault(stage: str, path) -> None:
    hook = _FAULT_HOOK
    if hook is not None:
        hook(stage, str(path))


def ensure_dir(path: str | os.PathLike, mode: int = DIR_MODE) -> Path:
    """Create ``path`` (and parents) with ``mode``; tighten an existing directory we own to ``mode``."""
    p = Path(path)
    try:
        missing = []
        q = p
        while not q.exists():
            missing.append(q)
            q = q.parent
        for d in reversed(missing):  # parents too: mkdir(parents=True) would give them the umask's mode
            with contextlib.suppress(FileExistsError):
                d.mkdir(mode=mode)
            os.chmod(d, mode)
        st = p.stat()
        if stat.S_IMODE(st.st_mode) != mode and st.st_uid == os.geteuid():
            os.chmod(p, mode)
    except OSError as e:
        raise StorageError(f"cannot create directory {p}: {e.strerror or e}") from e
    return p


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def sync_parent(path: str | os.PathLike) -> None:
    """fsync the directory holding ``path`` (the "fsync-dir" step, fault-injectable). Raises OSError."""
    p = os.fspath(path)
    _fault("fsync-dir", p)
    fsync_dir(os.path.dirname(p) or ".")


def sync_parent_with(path: str | os.PathLike, files=()) -> list[OSError | None]:
    """fsync the directory holding ``path`` (as ``sync_parent``) together with the open files ``files``
    (``(path, fd)`` pairs), all at once (``fsync_all``): for fsyncs after a replace that have no order among them
    (``Keystore.store_certificate``: the index's directory and the audit line written after the replace). Never
    raises for a failed fsync: returns the directory's error first, then one per file (None: synced). Each step
    is fault-injectable ("fsync-dir" of ``path``, "fsync" of each file's path)."""
    p = os.fspath(path)
    out: list[OSError | None] = [None] * (1 + len(files))
    fds, where = [], []
    dfd = -1
    try:
        _fault("fsync-dir", p)
        dfd = os.open(os.path.dirname(p) or ".", os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
        fds.append(dfd)
        where.append(0)
    except OSError as e:
        out[0] = e
    for i, (fp, fd) in enumerate(files, start=1):
        try:
            _fault("fsync", fp)
        except OSError as e:
            out[i] = e
            continue
        fds.append(fd)
        where.append(i)
    try:
        for i, e in zip(where, fsync_all(fds), strict=True):
            out[i] = e
    finally:
        if dfd >= 0:
            os.close(dfd)
    return out


def not_durable(path: str | os.PathLike, e: OSError) -> NotDurableError:
    """The ``NotDurableError`` for ``path``, replaced in place, whose directory fsync failed with ``e``."""
    p = os.fspath(path)
    return NotDurableError(f"wrote {p} but could not sync its directory ({e.strerror or e}): the change is in place "
                           "but may not survive a power cut", str(p))


def make_dirs(path: str | os.PathLike, top: str | os.PathLike, mode: int = DIR_MODE) -> list[Path]:
    """Create ``path`` and its missing parents below ``top`` with ``mode``; return the directories created, outermost
    first. Their entries are not synced: pass them to ``sync_entries`` before anything durable refers to them.

    Raises:
        StorageError: a directory could not be created (those created so far are removed again).
    """
    p, top = Path(path), Path(top)
    missing = []
    q = p
    while q != top and not q.is_dir():
        missing.append(q)
        q = q.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir(mode=mode)
            except FileExistsError:
                continue
            os.chmod(d, mode)  # mkdir's mode is masked by the umask
            created.append(d)
    except OSError as e:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise StorageError(f"cannot create directory {p}: {e.strerror or e}") from e
    return created


def _entry_dirs(paths) -> dict[str, str]:
    """The distinct directories holding ``paths`` (running each path's "fsync-dir" fault hook).

    Raises:
        StorageError: the hook failed (tests).
    """
    parents: dict[str, str] = {}
    for path in paths:
        p = os.fspath(path)
        try:
            _fault("fsync-dir", p)
        except OSError as e:
            raise StorageError(f"cannot sync the directory of {p}: {e.strerror or e}") from e
        d = os.path.dirname(p) or "."
        parents.setdefault(d, d)
    return parents


def sync_entries(paths, files: "NewFiles | None" = None) -> None:
    """Make the directory entries of ``paths`` durable: one fsync per distinct parent directory (the "fsync-dir"
    step of each path, fault-injectable). Use after writing files with ``atomic_write(..., sync_dir=False)``.

    ``files``: files ``write_new_files`` wrote, fsynced in the same batch (the "fsync" step of each, run first) and
    marked ``synced``; they stay open. For a file made durable on its own before anything names it
    (``Keystore.stage_held_key``: the key file and ``keys/``).

    Raises:
        StorageError: a directory or file fsync failed (the files stay as written: the caller removes them).
    """
    new = files.files if files is not None else []
    for fp, _fd in new:
        try:
            _fault("fsync", fp)
        except OSError as e:
            raise StorageError(f"cannot write {fp}: {e.strerror or e}") from e
    parents = _entry_dirs(paths)
    fds: list[int] = []
    try:
        for d in parents.values():
            try:
                fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC))
            except OSError as e:
                raise StorageError(f"cannot sync directory {d}: {e.strerror or e}") from e
        what = [str(fp) for fp, _fd in new] + [f"directory {d}" for d in parents.values()]
        # together: no order among them (see fsync_all)
        for w, e in zip(what, fsync_all([fd for _fp, fd in new] + fds), strict=True):
            if e is not None:
                raise StorageError(f"cannot sync {w}: {e.strerror or e}") from e
    finally:
        for fd in fds:
            os.close(fd)
    if files is not None:
        files.synced = True


def _mkstemp(p) -> tuple[int, str]:
    """``tempfile.mkstemp(prefix=".NAME.", suffix=".tmp", dir=p.parent)`` (0600, O_EXCL, O_NOFOLLOW) without
    importing tempfile (and shutil, random) into every command."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
    d, name = os.path.split(os.fspath(p))
    for _ in range(100):
        tmp = os.path.join(d, f".{name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, flags, FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", d)


def _fill(fd: int, p, data: bytes, mode: int) -> None:
    """Give the new temp file ``fd`` (for ``p``) its mode and write all of ``data`` (os.write may write less)."""
    os.fchmod(fd, mode)
    _fault("write", p)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = FILE_MODE, *,
                 sync_dir: bool = True, sync_first=(), fsync_files: NewFiles | None = None,
                 keep_open: list | None = None) -> os.stat_result:
    """Write ``data`` to ``path`` atomically and durably (temp → fsync → replace → fsync dir).

    ``sync_dir=False`` leaves the directory fsync to the caller (``sync_entries``), for several files written into
    one directory before anything refers to them: a crash before that sync leaves garbage, never a torn file.

    ``sync_first``: paths whose directory entries must be durable before ``path`` is replaced (``sync_entries`` of
    them): their directories are fsynced together with the temp file (``fsync_all``), all before the replace. A
    failure there is a ``StorageError`` with nothing changed, as for the temp file's own fsync.

    ``fsync_files``: files ``write_new_files`` left unsynced, fsynced in the same batch (before the replace).

    ``keep_open``: a list to which the written file's descriptor (read-write, close-on-exec) is appended once
    everything succeeded, instead of closing it: a caller that keeps the file open anyway (the index cache) does
    not open it again. The caller closes it.

    Returns:
        ``os.fstat`` of the written file (its inode, size and mtime identify this content: see storage.py).
    Raises:
        StorageError: the write failed before the replace; ``path`` still holds its previous content (or does
            not exist).
        NotDurableError: the replace succeeded (``path`` holds ``data``) but the directory fsync failed.
    """
    p = os.fspath(path)
    fd, tmp = -1, None
    dirs = _entry_dirs(sync_first) if sync_first else {}
    dfds: list[int] = []
    try:
        fd, tmp = _mkstemp(p)
        _fill(fd, p, data, mode)
        _fault("fsync", p)
        files = list(fsync_files.files) if fsync_files is not None else []
        for fp, _ffd in files:
            try:
                _fault("fsync", fp)
            except OSError as e:
                raise StorageError(f"cannot write {fp}: {e.strerror or e}; nothing was changed") from e
        if dirs or files:
            for d in dirs.values():
                try:
                    dfds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC))
                except OSError as e:
                    raise StorageError(f"cannot sync directory {d}: {e.strerror or e}; nothing was changed") from e
            errs = fsync_all([fd, *(f[1] for f in files), *dfds])  # together: no order among them
            for (fp, _ffd), e in zip(files, errs[1:1 + len(files)], strict=True):
                if e is not None:
                    raise StorageError(f"cannot write {fp}: {e.strerror or e}; nothing was changed") from e
            for d, e in zip(dirs.values(), errs[1 + len(files):], strict=True):
                if e is not None:
                    raise StorageError(f"cannot sync directory {d}: {e.strerror or e}; nothing was changed") from e
            if errs[0] is not None:
                raise errs[0]
            if fsync_files is not None:
                fsync_files.synced = True
        else:
            _fsync(fd)
        st = os.fstat(fd)
        if keep_open is None:
            os.close(fd)
            fd = -1
        _fault("replace", p)
        os.replace(tmp, p)
        tmp = None
    except OSError as e:
        raise StorageError(f"cannot write {p}: {e.strerror or e}; nothing was changed") from e
    finally:
        if fd >= 0 and tmp is not None:  # failed: the kept descriptor goes too
            os.close(fd)
            fd = -1
        for dfd in dfds:
            os.close(dfd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    if sync_dir:
        try:
            sync_parent(p)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            raise not_durable(p, e) from e
    if fd >= 0:
        keep_open.append(fd)
    return st


class NewFiles:
    """Files ``write_new_files`` wrote under their final names where nothing refers to them yet, still open and not
    yet fsynced: ``atomic_write(..., fsync_files=it)`` fsyncs them together with what it writes, before its replace
    (and then sets ``synced``). ``close()`` closes them (idempotent)."""

    def __init__(self) -> None:
        self.files: list[tuple[Path, int]] = []
        self.synced = False

    def close(self) -> None:
        while self.files:
            os.close(self.files.pop()[1])


class StagedFile(NewFiles):
    """One file written under a temp name in its directory (``stage_file``), open and not yet fsynced, that gets
    its name only in ``commit``. Pass it as ``atomic_write(..., fsync_files=it)`` to have its data fsynced in the
    same batch as that write (the key of a new index record: see ``Keystore.generate_key``).

    Until ``commit`` renames it, the file names nothing: a crash leaves a ``.NAME.*.tmp`` file that ``Keystore.gc``
    securely deletes (and ``discard`` does the same when the write it waited for failed)."""

    def __init__(self, path: Path, tmp: str, fd: int) -> None:
        super().__init__()
        self.path, self.tmp = path, tmp
        self.files.append((path, fd))

    def commit(self, sync_first=(), meanwhile=None):
        """Make the directory entries of ``sync_first`` durable (``sync_entries``: the record naming this file),
        then give the file its name and fsync its directory. Its data is fsynced first if the batch it was
        passed to did not do it (``synced``).

        ``meanwhile``: a callable run after the rename while the directory fsync is in flight (``fsync_while``);
        its result is returned once both are done. If it raises, its exception propagates (after the fsync).

        Raises:
            StorageError: nothing was renamed (the temp file stays: ``discard`` it).
            NotDurableError: renamed, but the directory fsync failed.
        """
        p = self.path
        if not self.synced:
            for fp, fd in self.files:
                try:
                    _fault("fsync", fp)
                    _fsync(fd)
                except OSError as e:
                    raise StorageError(f"cannot write {fp}: {e.strerror or e}; nothing was changed") from e
            self.synced = True
        if sync_first:
            sync_entries(sync_first)
        self.close()
        try:
            _fault("replace", p)
            os.replace(self.tmp, p)
        except OSError as e:
            raise StorageError(f"cannot write {p}: {e.strerror or e}; nothing was changed") from e
        self.tmp = None
        try:
            if meanwhile is None:
                sync_parent(p)
                return None
            _fault("fsync-dir", p)
            dfd = os.open(os.path.dirname(os.fspath(p)) or ".", os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
            try:
                return fsync_while(dfd, meanwhile)
            finally:
                os.close(dfd)
        except OSError as e:
            raise NotDurableError(f"wrote {p} but could not sync its directory ({e.strerror or e}): the change is "
                                  "in place but may not survive a power cut", str(p)) from e

    def discard(self) -> None:
        """Remove the temp file if ``commit`` did not rename it (securely: it may hold a secret). Idempotent."""
        self.close()
        if self.tmp is not None:
            tmp, self.tmp = self.tmp, None
            with contextlib.suppress(StorageError):
                secure_delete(tmp, sync_dir=False)


def stage_file(path: str | os.PathLike, data: bytes, mode: int = FILE_MODE) -> StagedFile:
    """Write ``data`` to a new temp file next to ``path`` (0600 first, then ``mode``), leaving the fsync to the
    write it is passed to (``atomic_write(..., fsync_files=...)``) and the rename to ``StagedFile.commit``.

    Raises:
        StorageError: nothing is left behind.
    """
    p = Path(path)
    fd, tmp = -1, None
    try:
        fd, tmp = _mkstemp(p)
        _fill(fd, p, data, mode)
        return StagedFile(p, tmp, fd)
    except OSError as e:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:  # it may hold part of a secret (a key): as StagedFile.discard, securely
            with contextlib.suppress(StorageError, OSError):
                secure_delete(tmp, sync_dir=False)
        raise StorageError(f"cannot write {p}: {e.strerror or e}; nothing was changed") from e


def _create_new(p: Path) -> int:
    """Create ``p`` (0600, ``O_EXCL``, ``O_NOFOLLOW``) for ``write_new_files``. A name already there is cleared
    first (securely), then created afresh; see ``write_new_files`` for why that is safe and preferred to a temp
    file renamed over it.

    Raises:
        OSError: the create failed (nothing of ours to remove).
        StorageError: what was there could not be removed.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
    try:
        return os.open(p, flags, FILE_MODE)
    except FileExistsError:
        pass
    # A leftover under the final name (a symlink too: O_EXCL never follows one, and secure_delete removes the link,
    # not its target). No directory fsync after the unlink: a power cut that undoes it brings back garbage in a
    # place nothing refers to, and the referring write syncs this directory (with the new entry) before it names it.
    secure_delete(p, sync_dir=False)
    return os.open(p, flags, FILE_MODE)


def write_new_files(items, mode: int = FILE_MODE) -> NewFiles:
    """Write each ``(path, data)`` of ``items`` under its final name (a new file: ``O_CREAT|O_EXCL|O_NOFOLLOW``,
    0600, then ``mode``) into a place nothing refers to yet, and leave the fsyncs to the write that will refer to
    it (``atomic_write(..., fsync_files=..., sync_first=...)``), so that they are issued together with its own.

    No temp file and rename: until something durable names the file (the index replace of
    ``Keystore.store_certificate``, which happens only after every fsync of these files and their directories
    returned), a file a crash or power cut leaves empty or torn is garbage in an unreferenced place -- a version
    directory the index does not name (``gc`` removes it, and ``store_certificate`` clears one it reuses) or a
    ``keys/ID.key`` no key record names (``gc`` securely deletes it). A rename would only give the same garbage
    another name, at the cost of one more directory entry change per file.

    A name already taken (a leftover of a failed or crashed attempt whose removal failed; under the caller's lock
    nothing live can be there: the caller writes only where nothing refers to) is securely deleted first, then
    created afresh, rather than keeping the old temp file + replace for it: a replace would free the leftover's
    blocks without overwriting them, and a leftover ``keys/ID.key`` holds (encrypted) key material.

    Raises:
        StorageError: a step failed; the file of the failing step, if this call created it, is removed securely
            (overwritten first: it may hold part of an encrypted key); files written before it stay (the caller
            removes them). A name that could not be created or cleared is left as it was.
    """
    out = NewFiles()
    for path, data in items:
        p = Path(path)
        fd = -1
        made = False
        try:
            fd = _create_new(p)
            made = True
            _fill(fd, p, data, mode)
            out.files.append((p, fd))
            fd = -1
            made = False
        except (OSError, StorageError) as e:
            out.close()
            if isinstance(e, StorageError):
                raise StorageError(f"cannot write {p}: {e}; nothing was changed") from e
            raise StorageError(f"cannot write {p}: {e.strerror or e}; nothing was changed") from e
        finally:
            if fd >= 0:
                os.close(fd)
            if made:  # created by us and not complete: it may hold part of a secret (a held key's file)
                with contextlib.suppress(StorageError, OSError):
                    secure_delete(p, sync_dir=False)
    return out


def atomic_symlink(target: str, path: str | os.PathLike) -> None:
    """Make ``path`` a symlink to ``target`` atomically (``ln -sfn`` without its unlink window): a new symlink under
    a temp name in the same directory, renamed over ``path`` (rename(2) replaces a file or symlink in one step),
    then the directory is fsynced. A reader opening ``path`` sees the old or the new target, never neither.

    Raises:
        StorageError: nothing was changed.
        NotDurableError: the rename succeeded (``path`` points at ``target``) but the directory fsync failed.
    """
    p = Path(path)
    tmp: Path | None = p.parent / f".{p.name}.{os.urandom(4).hex()}.tmp"
    try:
        os.symlink(target, tmp)
        _fault("replace", p)
        os.replace(tmp, p)
        tmp = None
    except OSError as e:
        raise StorageError(f"cannot point {p} at {target}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    try:
        sync_parent(p)
    except OSError as e:
        raise NotDurableError(f"pointed {p} at {target} but could not sync its directory ({e.strerror or e}): "
                              "the link is in place but may not survive a power cut", str(p)) from e


def append_line(path: str | os.PathLike, line: bytes, mode: int = FILE_MODE, *, sync: bool = True,
                keep_open: list | None = None) -> None:
    """Append one line durably (audit log). A torn last line is tolerated by readers.

    ``sync=False`` leaves the line to the next durable append to the same file (an fsync flushes every earlier
    write of the file): for a line whose loss on a power cut loses nothing a later line does not record.

    ``keep_open``: a list to which the file's descriptor is appended, not synced and not closed, for the caller
    to fsync together with something else (``sync_parent_with``) and close."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_CLOEXEC, mode)
        try:
            os.write(fd, line if line.endswith(b"\n") else line + b"\n")
            if sync and keep_open is None:
                _fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        if keep_open is None:
            os.close(fd)
        else:
            keep_open.append(fd)
    except OSError as e:
        raise StorageError(f"cannot append to {p}: {e.strerror or e}") from e


def _refuse_mode(st: os.stat_result, p: Path, what: str) -> None:
    bad = stat.S_IMODE(st.st_mode) & 0o077
    if bad:
        fix = "700" if stat.S_ISDIR(st.st_mode) else "600"
        raise KeystorePermissionError(
            f"{what} {p} has mode {stat.S_IMODE(st.st_mode):04o}: group/others may access it; "
            f"refusing to use it. Fix with: chmod {fix} {p}"
        )
    if st.st_uid != os.geteuid() and os.geteuid() != 0:
        raise KeystorePermissionError(f"{what} {p} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})")


def check_private(path: str | os.PathLike, what: str = "secret file") -> None:
    """Refuse a directory (or file) that group or others may read or write. Secret *files* are read with
    ``read_private`` instead, which checks the descriptor it reads from.

    Raises:
        FileNotFoundError: it does not exist.
        KeystorePermissionError: with the ``chmod`` command that fixes it.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise KeystorePermissionError(f"cannot access {what} {p}: {e.strerror or e}") from e
    _refuse_mode(st, p, what)


def read_private(path: str | os.PathLike, what: str = "secret file") -> bytes:
    """Read a secret file: ``O_NOFOLLOW`` (a symlink planted in its place is refused), then ``fstat`` of the
    opened descriptor: a regular file, owned by us, not accessible by group/others. What is checked is what is
    read; there is no window between the check and the read.

    Raises:
        FileNotFoundError: it does not exist.
        KeystorePermissionError: a symlink, not a regular file, wrong owner or mode (with the fix).
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise KeystorePermissionError(f"{what} {p} is a symbolic link: refusing to follow it for a secret; "
                                          "put the file itself there") from None
        raise KeystorePermissionError(f"cannot open {what} {p}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeystorePermissionError(f"{what} {p} is not a regular file")
        _refuse_mode(st, p, what)
        chunks = []
        while chunk := os.read(fd, max(st.st_size, 4096)):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise KeystorePermissionError(f"cannot read {what} {p}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def secure_delete(path: str | os.PathLike, *, sync_dir: bool = True) -> None:
    """Overwrite a file with random bytes, fsync, then unlink it.

    The file is opened with ``O_NOFOLLOW`` and its size taken from the opened descriptor: a symlink is unlinked
    (it holds no secret), never followed to overwrite what it points to. ``sync_dir=False`` skips the directory
    fsync after the unlink where losing the unlink on a power cut is harmless (the overwritten file is garbage
    that ``Keystore.gc`` removes); the overwrite itself is always fsynced, or it would never reach the disk.

    On flash with wear levelling or on copy-on-write filesystems the old blocks may survive; this is the
    best a userspace process can do, and keys are encrypted at rest anyway.
    """
    p = Path(path)
    try:
        try:
            fd = os.open(p, os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EACCES):
                raise
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):  # a symlink holds no secret: remove the link only
                _fault("unlink", p)
                p.unlink()
                if sync_dir:
                    fsync_dir(p.parent)
                return
            os.chmod(p, FILE_MODE)  # e.g. master.key (0400): make it writable to overwrite it
            fd = os.open(p, os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size:
                view = memoryview(os.urandom(st.st_size))
                while view:
                    view = view[os.write(fd, view):]
                _fsync(fd)
            _fault("unlink", p)
            p.unlink()  # with the file still open: the inode is freed by the (deferred) close
        except BaseException:
            os.close(fd)
            raise
        close_later(fd)
        if sync_dir:
            fsync_dir(p.parent)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StorageError(f"cannot securely delete {p}: {e.strerror or e}") from e


def _remove(p: Path, remove) -> None:
    """``remove(p)`` (unlink or rmdir) with ``p`` held open across it, so that freeing its inode happens in the
    deferred close (see ``close_later``), not here; a symlink is removed as it is (nothing to hold)."""
    try:
        fd = os.open(p, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return
    except OSError:  # a symlink (ELOOP), a file we may not read, ...: remove it the plain way
        fd = -1
    try:
        remove(p)
    except FileNotFoundError:
        pass
    finally:
        if fd >= 0:
            close_later(fd)


def remove_tree(path: str | os.PathLike, *, secret: bool = True) -> None:
    """Delete every file below ``path`` (securely unless ``secret=False``: certificates are public), then the
    directories. Entries that vanish meanwhile (removed by another process) are not an error."""
    p = Path(path)
    if not p.exists():
        return
    for root, dirs, files in os.walk(p, topdown=False):
        for f in files:
            if secret:
                secure_delete(Path(root) / f, sync_dir=False)
            else:
                _remove(Path(root) / f, os.unlink)
        for d in dirs:
            q = Path(root) / d
            if os.path.islink(q):  # os.walk lists symlinks to directories here; remove the link only
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(q)
            else:
                _remove(q, os.rmdir)
    _remove(p, os.rmdir)
    if secret:
        with contextlib.suppress(OSError):
            fsync_dir(p.parent)
