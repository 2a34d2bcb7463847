"""The Siemens cmp-test-suite MockCA (an independent CMP server with real issuance) as a test peer.

Source: ``shared/peers/cmp-test-suite.tar.gz`` (unmodified upstream snapshot) and
``shared/peers/siemens-mockca-run.py`` (runs it as one process, no Flask reloader/debugger); see
``shared/peers/README.md``.

- ``build()``: unpacks the source and builds its venv (Python 3.13 from pyenv, the pinned ``dependencies`` of
  its ``pyproject.toml``) ONCE into ``~/.cache/devagent-peers/mockca-<hash of inputs>/``, outside the
  repository, under a lock (parallel test processes build it once). ~30-60 s the first time, then free.
- ``MockCA``: a running server on 127.0.0.1 (a free port), started from a scratch copy of the source tree
  (the MockCA writes CRL files below ``data/``); ``url`` is the ``/issuing`` endpoint, ``root`` its root
  certificate (``GET /root-cert``). Use as a context manager; ``stop()`` ends exactly the process it started.
- ``robot(...)``: runs the suite's own client tests (``client_tests/cmp_tests_jinja.robot``) with a client
  template added to a scratch copy of ``client_tests/cmp_client.py``.

A missing Python 3.13 or a failed build FAILS the calling test with what to install (never a skip).
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

from cryptography import x509

SECRET = "SiemensIT"
RECIPIENT = "CN=Mock-CA"
_HERE = Path(__file__).resolve()
START_TIMEOUT_S = 90.0


def peers_dir() -> Path:
    """``shared/peers`` next to the repository (CI lays ``shared/`` beside the clone), or $DEVAGENT_PEERS_DIR."""
    env = os.environ.get("DEVAGENT_PEERS_DIR")
    if env:
        return Path(env)
    repo = _HERE.parents[2]
    for base in (repo.parent, repo.parent.parent, Path("/work")):
        cand = base / "shared" / "peers"
        if (cand / "cmp-test-suite.tar.gz").exists():
            return cand
    return repo.parent / "shared" / "peers"


def cache_root() -> Path:
    return Path(os.environ.get("DEVAGENT_PEER_CACHE") or Path.home() / ".cache" / "devagent-peers")


def _fail(msg: str):
    import pytest

    pytest.fail(msg, pytrace=False)


def python313() -> str:
    """The real Python 3.13 interpreter (pyenv's, not its shim); fails the test if there is none."""
    cands = []
    if os.environ.get("DEVAGENT_PYTHON313"):
        cands.append(os.environ["DEVAGENT_PYTHON313"])
    pyenv = shutil.which("pyenv")
    if pyenv:
        r = subprocess.run([pyenv, "which", "python3.13"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            cands.append(r.stdout.strip())
        r = subprocess.run([pyenv, "root"], capture_output=True, text=True)
        if r.returncode == 0:
            root = Path(r.stdout.strip()) / "versions"
            cands += sorted(str(p) for p in root.glob("3.13*/bin/python3.13"))
    cands += [str(p) for p in sorted(Path.home().glob(".pyenv/versions/3.13*/bin/python3.13"))]
    w = shutil.which("python3.13")
    if w:
        cands.append(w)
    for c in cands:
        if c and os.access(c, os.X_OK) and "shims" not in c:
            return c
    _fail("the Siemens MockCA needs Python >= 3.13 and none was found: install it with pyenv "
          "('pyenv install 3.13.0') or set DEVAGENT_PYTHON313 to a python3.13 interpreter")


def _inputs() -> tuple[Path, Path]:
    d = peers_dir()
    tar, runner = d / "cmp-test-suite.tar.gz", d / "siemens-mockca-run.py"
    if not tar.exists() or not runner.exists():
        _fail(f"Siemens MockCA source not found: {tar} and {runner} are needed (shared/peers, see its README); "
              "set DEVAGENT_PEERS_DIR to the directory holding them")
    return tar, runner


def _dependencies(pyproject: Path) -> list[str]:
    import tomllib

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [d for d in deps if "@" not in d]  # the pq extra is a git URL (and not in this list anyway)


def build() -> Path:
    """The cache directory holding ``src/`` (unpacked) and ``venv/``; built on first use."""
    tar, runner = _inputs()
    py = python313()
    h = hashlib.sha256()
    for p in (tar, runner):
        h.update(hashlib.sha256(p.read_bytes()).digest())
    h.update(py.encode())
    root = cache_root()
    target = root / f"mockca-{h.hexdigest()[:16]}"
    if (target / ".complete").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".mockca.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target
        tmp = root / f".mockca-build-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            src = tmp / "src"
            src.mkdir(parents=True)
            with tarfile.open(tar) as t:
                t.extractall(src, filter="data")
            entries = list(src.iterdir())
            if len(entries) == 1 and entries[0].is_dir():  # a top-level folder in the archive
                inner = entries[0]
                for e in inner.iterdir():
                    e.rename(src / e.name)
                inner.rmdir()
            shutil.copy2(runner, src / "siemens-mockca-run.py")
            r = subprocess.run([py, "-m", "venv", str(tmp / "venv")], capture_output=True, text=True)
            if r.returncode != 0:
                _fail(f"creating the MockCA venv with {py} failed: {r.stderr[-1500:]}")
            r = subprocess.run([str(tmp / "venv/bin/pip"), "install", "-q", "--disable-pip-version-check",
                                *_dependencies(src / "pyproject.toml")], capture_output=True, text=True)
            if r.returncode != 0:
                _fail(f"installing the MockCA's dependencies failed (needs PyPI): {r.stderr[-2000:]}")
            (tmp / ".complete").write_text("ok\n")
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # The venv's scripts hard-code the build path; we only ever call venv/bin/python by path.
    return target


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the MockCA when the test process dies (a killed pytest must not leave it running)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MockCA:
    """One MockCA process on 127.0.0.1, run from a scratch copy of the source tree in ``workdir``.

    Args:
        workdir: scratch directory (a pytest tmp dir).
        allow_same_key: pass ``--allow-same-key`` (re-issue for the same CN and key).
        trust_anchors: extra certificates (PEM files are written) for signature-protected requests, placed in
            ``data/mock_ca/trustanchors/`` before start.
    """

    def __init__(self, workdir, *, allow_same_key: bool = True, trust_anchors=()):
        self.cache = build()
        self.workdir = Path(workdir)
        self.src = self.workdir / "mockca"
        self.allow_same_key = allow_same_key
        self.trust_anchors = tuple(trust_anchors)
        self.port = 0
        self.proc = None
        self.root: x509.Certificate | None = None
        self.log_path = self.workdir / "mockca.log"

    @property
    def python(self) -> str:
        return str(self.cache / "venv" / "bin" / "python")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/issuing"

    def start(self) -> "MockCA":
        if not self.src.exists():
            shutil.copytree(self.cache / "src", self.src, symlinks=True)
        from cryptography.hazmat.primitives.serialization import Encoding

        ta_dir = self.src / "data" / "mock_ca" / "trustanchors"
        ta_dir.mkdir(parents=True, exist_ok=True)
        for i, c in enumerate(self.trust_anchors):
            (ta_dir / f"devagent-test-{i}.pem").write_bytes(c.public_bytes(Encoding.PEM))
        self.port = free_port()
        args = [self.python, "siemens-mockca-run.py", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.allow_same_key:
            args.append("--allow-same-key")
        self._log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        self.proc = subprocess.Popen(args, cwd=self.src, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                _fail(f"the MockCA exited with {self.proc.returncode} at start-up: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.base}/root-cert", timeout=2) as r:
                    data = r.read()
                self.root = x509.load_der_x509_certificate(base64.b64decode(data.strip()))
                return self
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    self.stop()
                    _fail(f"the MockCA did not answer GET /root-cert within {START_TIMEOUT_S:g} s: {self.log()}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- its own client test suite ------------------------------------------------------------------
    def robot(self, client_name: str, template: str, outdir, *, timeout_s: float = 600.0):
        """Run ``client_tests/cmp_tests_jinja.robot`` with ``template`` registered as ``client_name`` in a
        scratch copy of ``client_tests``. Returns the CompletedProcess (``outdir`` gets output.xml/log)."""
        out = Path(outdir)
        suite = out / "client_tests"
        if suite.exists():
            shutil.rmtree(suite)
        shutil.copytree(self.src / "client_tests", suite)
        with open(suite / "cmp_client.py", "a") as f:
            f.write(f"\n\n# added by devagent's tests/peers/mockca.py\n{client_name} = {template!r}\n")
        cmd = [self.python, "-m", "robot", "--outputdir", str(out), "--variable", f"CMP_CLIENT:{client_name}",
               "--variable", f"CMP_URL:{self.url}", "cmp_tests_jinja.robot"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        return subprocess.run(cmd, cwd=suite, capture_output=True, text=True, timeout=timeout_s, env=env)
