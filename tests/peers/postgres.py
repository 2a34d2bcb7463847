"""A real PostgreSQL server for tests and benchmarks: Debian's ``postgresql`` binaries, a fresh cluster
(``initdb``) in a temp directory, the postmaster on 127.0.0.1 (free port) and a private unix socket directory,
stopped with ``pg_ctl stop``; the postmaster is a child of the test process and dies with it.

PostgreSQL refuses to run as root. As root the server runs as the ``postgres`` user the Debian package creates
(else ``nobody``), through ``setpriv``; as any other user it runs as that user. The cluster's superuser is
``devagent`` with a random password, checked with SCRAM over TCP (unix-socket connections are trusted: the
socket directory is 0700 and owned by the server's user). ``stop()`` stops the server and removes the
directory; the session fixture calls it at the end.

``PostgresServer(durable=False)`` (tests) turns off fsync for speed on a loaded machine; benchmarks use the
durable defaults.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

HINT = "apt-get install -y postgresql (Debian's PostgreSQL server: initdb, pg_ctl, postgres)"
USER = "devagent"


def pg_bindir() -> Path:
    """The newest installed PostgreSQL server's bin directory. A missing server FAILS the test."""
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if cands:
        return Path(cands[-1]).parent
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    pytest.fail(f"PostgreSQL server binaries (initdb, pg_ctl) are required and not installed: {HINT}")


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the server when the test process dies (as root, ``setpriv --pdeathsig`` does it after
    changing the user, since a change of user clears a signal set before)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, durable: bool = False):
        self.bindir = pg_bindir()
        self.durable = durable
        self.password = secrets.token_urlsafe(16)
        self.port = 0
        self.base = Path(tempfile.mkdtemp(prefix="devagent-pg-"))
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.log = self.base / "server.log"
        self._prefix: list[str] = []
        self._proc: subprocess.Popen | None = None
        if os.geteuid() == 0:
            name = "postgres"
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                name, pw = "nobody", pwd.getpwnam("nobody")
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.fail("setpriv (util-linux) is needed to run PostgreSQL as a non-root user: "
                            "apt-get install -y util-linux")
            self._prefix = [setpriv, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self.sock.mkdir(mode=0o700)
        if self._prefix:
            os.chown(self.sock, int(self._prefix[1].split("=")[1]), int(self._prefix[2].split("=")[1]))
        self._initdb()

    def _run(self, *args, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8", HOME=str(self.base))
        env.pop("PGDATA", None)
        return subprocess.run([*self._prefix, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              check=check, env=env, cwd=self.base)

    def _initdb(self) -> None:
        pwfile = self.base / "pw"
        pwfile.write_text(self.password + "\n")
        if self._prefix:
            os.chown(pwfile, int(self._prefix[1].split("=")[1]), int(self._prefix[2].split("=")[1]))
        try:
            self._run(self.bindir / "initdb", "-D", self.data, "-U", USER, f"--pwfile={pwfile}",
                      "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync")
        except subprocess.CalledProcessError as e:
            pytest.fail(f"initdb failed: {e.stderr.strip()[-2000:]}")
        finally:
            pwfile.unlink()

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> "PostgresServer":
        """Run the postmaster in the foreground as a child that dies with this process (PR_SET_PDEATHSIG: a
        killed pytest leaves no server behind); wait until it accepts connections."""
        if not self.port:
            self.port = _free_tcp_port()
        opts = ["-c", "listen_addresses=127.0.0.1", "-p", str(self.port), "-k", str(self.sock),
                "-c", "max_connections=100"]
        if not self.durable:
            opts += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        # PR_SET_PDEATHSIG fires when the *thread* that started the child ends: only bind the server's life to the
        # main thread's (a start() from a worker thread would have the server killed when that thread exits).
        bind = threading.current_thread() is threading.main_thread()
        prefix = (self._prefix[:1] + (["--pdeathsig", "SIGKILL"] if bind else []) + self._prefix[1:]
                  if self._prefix else [])
        env = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8", HOME=str(self.base))
        env.pop("PGDATA", None)
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen([*prefix, str(self.bindir / "postgres"), "-D", str(self.data), *opts],
                                          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.base,
                                          preexec_fn=_die_with_parent if bind and not self._prefix else None)
        deadline = time.monotonic() + 120
        while True:
            r = self._run(self.bindir / "pg_isready", "-h", "127.0.0.1", "-p", self.port, check=False)
            if r.returncode == 0:
                return self
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text()[-2000:] if self.log.exists() else ""
                self.stop("immediate")
                pytest.fail(f"PostgreSQL did not start: {tail}")
            time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server with pg_ctl (``fast``: disconnect clients, like a restart of the database host's
        service) and reap the postmaster."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._run(self.bindir / "pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", self.data, check=False)
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    # ---- clients ------------------------------------------------------------------------------------------
    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        auth = f"{USER}:{self.password}" if password else USER
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh database ``name`` (dropped first if it exists); returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = self._run(self.bindir / "pg_isready", "-h", "127.0.0.1", "-p", self.port, check=False)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        pytest.fail(f"PostgreSQL on 127.0.0.1:{self.port} not ready after {timeout_s:.0f} s")


def start_server(durable: bool = False) -> PostgresServer:
    srv = PostgresServer(durable=durable)
    try:
        srv.start()
    except BaseException:
        srv.close()
        raise
    return srv
