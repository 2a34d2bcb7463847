"""Cisco libest (``estserver``, ``estclient``) as an independent EST peer, built once and run in a network namespace.

Source: ``shared/peers/libest.tar.gz`` (cisco/libest a464ba8, 3.2.0p, unmodified) with the build notes of
``shared/peers/README.md``: Debian's OpenSSL 3, ``./configure --disable-safec`` and ``CFLAGS="-include
fipsstub.h"`` (OpenSSL 3 dropped ``FIPS_mode``/``FIPS_mode_set``; no libest file is edited). Configured with
the cache directory as prefix and installed through ``DESTDIR`` into a staging tree that is renamed into place,
so the binaries' run path points at the cache and a half-built cache never looks complete.

- ``build()``: unpacks and builds ONCE into ``~/.cache/devagent-peers/libest-<hash of inputs>/`` (outside the
  repository; ``$DEVAGENT_PEER_CACHE`` overrides the root), under a lock so parallel test processes build it
  once. ~15 s on an idle machine (over a minute on a loaded one), then free.
- ``make_ca(directory)``: libest's example CA, made by its own unchanged ``createCA.sh`` in a scratch copy of
  ``example/server`` (P-256 root ``CN=estExampleCA``; server certificate for 127.0.0.1/localhost; HTTP user
  ``estuser``/``estpwd``). Fresh per test session: ``openssl ca`` keeps its database there.
- ``Netns``: a private network namespace held by a ``sleep`` process. ``estserver`` binds 0.0.0.0 and has no
  address option, so it runs inside one (``nsenter``); loopback is up and nothing else is reachable. Test code
  joins it per call: ``ns.run(fn)`` runs ``fn`` on a thread that ``setns``-ed into it (the devagent CLI runs there
  in-process through click's CliRunner, so client and server meet on the namespace's 127.0.0.1 while the test's
  assertions, keystore snapshots and files stay in the test process), ``ns.cmd([...])`` prefixes a command with
  ``nsenter`` (curl, openssl, ``estclient``). The namespace outlives a stopped server, so "server stopped" is a
  real refused connection.
- ``EstServer``: one ``estserver`` in a ``Netns`` (``-o``: no HTTP auth when TLS client auth succeeds;
  ``csrattrs_b64``: ``EST_CSR_ATTR``, replacing the built-in answer). ``stop()`` ends exactly that process.
- ``estclient(...)``: libest's reference client, inside the namespace or (``netns=None``) against a server on the
  test process's own loopback (the lab EST server).

Deviations of this server (shared/peers/README.md), and where the tests meet them: its built-in /csrattrs ends in
a NUL byte (tolerated, ``--csrattrs use``); only P-256 is offered as ECDHE group, so a P-384 *client certificate*
gets alert 47 (curl and estclient too: asserted, not worked around); serverkeygen labels a PKCS#1 key
``application/pkcs8`` (accepted: the key still parses); TLS 1.2 only; the example CA drops O= and SANs (tests
use CN-only subjects). No ``/.well-known/est/<label>/`` paths (built without uriparser). Idle, estserver burns
~15 % of a core: servers are module-scoped, never session-wide.

A missing build tool, a failed build or a missing ``unshare``/``nsenter`` FAILS the calling test with what to
install (never a skip).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

from cryptography import x509

from tests.peers.openssl_cmp import run_in_netns

_HERE = Path(__file__).resolve()
FIPSSTUB = "#define FIPS_mode() 0\n#define FIPS_mode_set(x) 0\n"
CONFIGURE = ("--disable-safec",)
RECIPE = f"libest build v2: configure {' '.join(CONFIGURE)}; CFLAGS=-include fipsstub.h ({FIPSSTUB!r}); DESTDIR"
BUILD_TOOLS = ("gcc", "make")
INSTALL_HINT = "apt-get install -y build-essential libssl-dev (Makefile APT_PACKAGES installs them)"
NETNS_HINT = "needs util-linux 'unshare'/'nsenter' and iproute2 'ip', run as root: apt-get install -y util-linux iproute2"
EST_USER, EST_PASSWORD = "estuser", "estpwd"
START_TIMEOUT_S = 60.0  # generous: the CI box may be loaded
# The example's server files (scripts and OpenSSL configs), copied next to the binaries.
EXAMPLE_FILES = ("createCA.sh", "ESTcommon.sh", "estExampleCA.cnf", "extExampleCA.cnf", "ext.cnf")


def _fail(msg: str):
    import pytest

    pytest.fail(msg, pytrace=False)


def peers_dir() -> Path:
    """``shared/peers`` beside the repository (CI lays ``shared/`` next to the clone), or $DEVAGENT_PEERS_DIR."""
    env = os.environ.get("DEVAGENT_PEERS_DIR")
    if env:
        return Path(env)
    repo = _HERE.parents[2]
    for base in (repo.parent, repo.parent.parent, Path("/work")):
        cand = base / "shared" / "peers"
        if (cand / "libest.tar.gz").exists():
            return cand
    return repo.parent / "shared" / "peers"


def cache_root() -> Path:
    return Path(os.environ.get("DEVAGENT_PEER_CACHE") or Path.home() / ".cache" / "devagent-peers")


@dataclasses.dataclass(frozen=True)
class Build:
    dir: Path

    @property
    def estserver(self) -> str:
        return str(self.dir / "bin" / "estserver")

    @property
    def estclient(self) -> str:
        return str(self.dir / "bin" / "estclient")

    @property
    def example(self) -> Path:
        return self.dir / "example-server"


def _run_build(cmd, cwd, log, env=None):
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        r = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        tail = Path(log).read_text(errors="replace")[-2500:]
        _fail(f"building libest failed at '{' '.join(cmd[:2])}' (exit {r.returncode}); {INSTALL_HINT}\n{tail}")


def build() -> Build:
    """The cached build (``bin/estserver``, ``bin/estclient``, ``example-server/``); built on first use."""
    tar = peers_dir() / "libest.tar.gz"
    if not tar.exists():
        _fail(f"libest source not found at {tar} (shared/peers, see its README); set DEVAGENT_PEERS_DIR to the "
              "directory holding libest.tar.gz")
    h = hashlib.sha256(hashlib.sha256(tar.read_bytes()).digest() + RECIPE.encode()).hexdigest()[:16]
    root = cache_root()
    target = root / f"libest-{h}"
    if (target / ".complete").exists():
        return Build(target)
    missing = [t for t in BUILD_TOOLS if shutil.which(t) is None]
    if missing or not Path("/usr/include/openssl/ssl.h").exists():
        _fail(f"cannot build libest: missing {', '.join(missing) or 'OpenSSL headers'}; {INSTALL_HINT}")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".libest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel process may be building it right now
        if (target / ".complete").exists():
            return Build(target)
        for stale in root.glob(".libest-build-*"):  # left by a build that was killed (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".libest-build-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            src = tmp / "src"
            src.mkdir(parents=True)
            with tarfile.open(tar) as t:
                t.extractall(src, filter="data")
            entries = list(src.iterdir())
            if len(entries) == 1 and entries[0].is_dir():  # a top-level folder in the archive
                src = entries[0]
            (src / "fipsstub.h").write_text(FIPSSTUB)
            log = tmp / "build.log"
            env = {**os.environ, "CFLAGS": f"-include {src / 'fipsstub.h'} -O1 -w"}
            _run_build(["sh", "./configure", *CONFIGURE, f"--prefix={target}"], src, log, env)
            _run_build(["make", f"-j{min(2, os.cpu_count() or 1)}"], src, log, env)
            _run_build(["make", "install", f"DESTDIR={tmp / 'stage'}"], src, log, env)
            out = tmp / "stage" / str(target).lstrip("/")  # bin/ lib/ include/ as they will live at target
            (out / "example-server").mkdir()
            for f in EXAMPLE_FILES:
                shutil.copy2(src / "example" / "server" / f, out / "example-server" / f)
            shutil.copy2(log, out / "build.log")
            (out / "RECIPE").write_text(RECIPE + "\n")
            (out / ".complete").write_text(h + "\n")
            os.replace(out, target)  # atomic: a half-built cache never looks complete
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Build(target)


# ---- the example CA ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LibestCA:
    dir: Path

    @property
    def cacert(self) -> Path:
        """The root (``CN=estExampleCA``), PEM: what /cacerts returns and what issued certificates chain to."""
        return self.dir / "estCA" / "cacert.crt"

    @property
    def server_certkey(self) -> Path:
        return self.dir / "estCA" / "private" / "estservercertandkey.pem"

    @property
    def trusted(self) -> Path:
        """Client-certificate trust (the example CA and its 'external' CA), ``EST_TRUSTED_CERTS``."""
        return self.dir / "trustedcerts.crt"

    @property
    def ext_cacert(self) -> Path:
        """The example's second CA (``CN=estEXTERNALCA``): trusted for client certificates, issues nothing."""
        return self.dir / "extCA" / "cacert.crt"

    def root(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cacert.read_bytes())

    def server_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.dir / "estCA" / "estserver.crt").read_bytes())

    def env(self) -> dict:
        """The environment estserver takes its CA from (as the example's runserver.sh sets it)."""
        return {"EST_TRUSTED_CERTS": str(self.trusted), "EST_CACERTS_RESP": str(self.cacert),
                "EST_OPENSSL_CACONFIG": str(self.dir / "estExampleCA.cnf")}


def make_ca(b: Build, directory) -> LibestCA:
    """Run libest's own ``createCA.sh`` (unchanged) in a scratch copy of its example directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for f in EXAMPLE_FILES:
        shutil.copy2(b.example / f, d / f)
    if shutil.which("openssl") is None:
        _fail("libest's example CA needs the openssl command: apt-get install -y openssl")
    # It waits for a key press before wiping its CA directory: stdin is /dev/null.
    r = subprocess.run(["bash", "createCA.sh"], cwd=d, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=60)
    ca = LibestCA(d)
    if r.returncode != 0 or not ca.server_certkey.exists() or not ca.trusted.exists():
        _fail(f"libest's createCA.sh failed (exit {r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
    return ca


# ---- network namespace ---------------------------------------------------------------------------------------
def require_netns() -> None:
    missing = [t for t in ("unshare", "nsenter", "ip") if shutil.which(t) is None]
    if missing:
        _fail(f"missing {', '.join(missing)}: {NETNS_HINT}")


class Netns:
    """A private network namespace with loopback up, held by a ``sleep`` process until ``close()``."""

    def __init__(self):
        require_netns()
        self.proc = subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep 86400"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # up once loopback answers inside
            if self.proc.poll() is not None:
                _fail(f"cannot create a network namespace ({self.proc.stderr.read().decode(errors='replace')}); "
                      f"{NETNS_HINT}")
            try:
                if run_in_netns(self.proc.pid, _lo_up, timeout_s=5):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                _fail(f"network namespace of pid {self.proc.pid} did not come up; {NETNS_HINT}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(self, fn, *args, timeout_s: float = 120.0):
        """``fn(*args)`` on a thread inside the namespace; its result, or its exception re-raised."""
        return run_in_netns(self.pid, fn, *args, timeout_s=timeout_s)

    def cmd(self, argv) -> list[str]:
        """``argv`` prefixed to run inside the namespace."""
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", *map(str, argv)]

    def subprocess(self, argv, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(self.cmd(argv), **kw)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the test process dies (a killed pytest must not leave an estserver
    burning CPU, or a namespace holder, behind). PR_SET_PDEATHSIG survives exec; it fires when the forking thread
    ends, so servers are started from the test's main thread (fixtures)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _lo_up() -> bool:
    with socket.socket() as s:  # binding loopback works only once 'lo' is up
        s.bind(("127.0.0.1", 0))
    return True


def _probe(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        pass


# ---- estserver -----------------------------------------------------------------------------------------------
class EstServer:
    """``estserver`` from the cached build, serving libest's example CA inside ``netns``."""

    def __init__(self, b: Build, ca: LibestCA, netns: Netns, *, port: int = 8085, auth_off_with_cert: bool = False,
                 csrattrs_b64: str | None = None, extra_args=(), log_name: str | None = None):
        self.build, self.ca, self.netns, self.port = b, ca, netns, port
        self.args = ["-c", ca.server_certkey, "-k", ca.server_certkey, "-r", "estrealm", "-v", "-p", str(port)]
        if auth_off_with_cert:
            self.args.append("-o")
        self.args += list(extra_args)
        self.env = {**os.environ, **ca.env()}
        if csrattrs_b64 is not None:
            self.env["EST_CSR_ATTR"] = csrattrs_b64
        self.log_path = ca.dir / (log_name or f"estserver-{port}.log")
        self.proc = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> "EstServer":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.netns.cmd([self.build.estserver, *self.args]), cwd=self.ca.dir,
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                _fail(f"libest estserver exited (code {self.proc.returncode}): {self.log()}")
            try:
                self.netns.run(_probe, self.port, timeout_s=5)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    _fail(f"libest estserver did not listen on port {self.port} within {START_TIMEOUT_S} s: "
                          f"{self.log()}")
                time.sleep(0.02)

    def stop(self) -> None:
        """End the estserver this object started (nsenter execs it: the pid is estserver's own)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---- estclient -----------------------------------------------------------------------------------------------
def estclient(b: Build, args, *, port: int, cacert, outdir, netns: Netns | None = None, timeout_s: float = 60.0
              ) -> subprocess.CompletedProcess:
    """libest's ``estclient -s 127.0.0.1 -p PORT -o OUTDIR ARGS`` trusting ``cacert`` (``EST_OPENSSL_CACERT``)."""
    Path(outdir).mkdir(parents=True, exist_ok=True)
    argv = [b.estclient, "-s", "127.0.0.1", "-p", str(port), "-o", str(outdir), *map(str, args)]
    env = {**os.environ, "EST_OPENSSL_CACERT": str(cacert)}
    cmd = netns.cmd(argv) if netns is not None else argv
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)


def openssl_verify(cert_pem, cafile, untrusted=None) -> subprocess.CompletedProcess:
    """``openssl verify -CAfile CA [-untrusted CHAIN] CERT`` (the independent check of every issued certificate)."""
    cmd = ["openssl", "verify", "-CAfile", str(cafile)]
    if untrusted:
        cmd += ["-untrusted", str(untrusted)]
    return subprocess.run(cmd + [str(cert_pem)], capture_output=True, text=True, timeout=30)
