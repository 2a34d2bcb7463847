"""Many ``devagent`` commands on one keystore at once, and commands killed at random points (issue 20).

Used by tests/component/test_keystore_concurrency.py, tests/fault/test_kill_pending.py, ``make soak`` and
benchmarks/bench_keystore.py. A ``World`` is a keystore with a domain LDevID enrolled over CMP from the lab CMP
server (software keys, swtpm or SoftHSM2), and the environment a ``devagent`` process needs for it.

Each command runs as its own process, as an operator's scripts would run it: a fork of a fresh interpreter (the
"zygote", one per worker) that has imported the CLI but initialised no PKCS#11 module and opened no TPM, calling the
real CLI entry point (``agent.cli.main``). The process exits after its command, so everything it held is released
as for a real command.

``leftovers(world)`` is what must be empty after ``keystore check``: pending and retired keys, key files and TPM
blobs no record names, token objects with the world's labels that no record names.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REF, SECRET = "load-ref", "load-secret-not-secret"
DEVICE_DOMAIN = "other"  # the domain of delegated (serve) enrollments: "plant" is the CLI's LDevID domain


@dataclasses.dataclass
class World:
    state: Path
    backend: str  # soft | tpm | pkcs11
    env: dict  # the devagent process environment (keystore, config, key backend)
    cmp_url: str
    prefix: str  # credential names (and so token object labels) of this world start with it
    peer: object = None  # SwtpmServer | SoftHsmToken | None
    options: dict = dataclasses.field(default_factory=dict)  # Keystore backend_options for in-process checks
    protocol: str = "cmp"  # how the LDevID was enrolled; requests and renewals use the same

    @property
    def ldevid(self) -> str:
        return f"{self.prefix}ldevid"

    def keystore(self):
        from keystore.store import Keystore

        return Keystore.open(self.state, self.options)

    def clear(self) -> None:
        """Delete this world's credentials and pending keys with their token objects / TPM blobs (a finalizer:
        the SoftHSM2 token and the swtpm are shared by all tests of the process, later ones expect them empty)."""
        ks = self.keystore()
        try:
            for cred in ks.list():
                ks.delete(cred.name, force=True)
            for rec in ks.pending_keys():
                ks.discard_key(rec["uri"])
        finally:
            ks.close()


EST_USER, EST_PASSWORD = "load-user", "load-password-not-secret"


def backend_peer(request, backend: str):
    """The session's swtpm / SoftHSM2 fixture for ``backend`` (None for software keys); the TPM is flushed first.
    Shared by the concurrency tests and bench_keystore (SoftHSM2 reads its configuration once per process)."""
    if backend == "tpm":
        tpm = request.getfixturevalue("swtpm")
        tpm.flush_all()
        return tpm
    if backend == "pkcs11":
        return request.getfixturevalue("softhsm")
    return None


def make_world(tmp: Path, lab, cmp_url: str, backend: str = "soft", peer=None, est_url: str | None = None) -> World:
    """A keystore trusting the lab root, with an LDevID enrolled over CMP (MAC) in ``backend`` — or, with
    ``est_url``, over EST (HTTP Basic), so that requests and renewals authenticate with the LDevID as TLS client
    certificate (software keys only: the key must reach OpenSSL as a file)."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "agent.toml"
    config.write_text('[metrics]\ntextfile = ""\n')
    env = {"DEVAGENT_CONFIG": str(config), "DEVAGENT_PROFILE": "generic-x86_64", "DEVAGENT_STATE_DIR": str(tmp / "state")}
    options: dict = {}
    if backend == "tpm":
        env["DEVAGENT_TPM_TCTI"] = peer.tcti
        options = {"tpm": dict(peer.options)}
    elif backend == "pkcs11":
        env.update(DEVAGENT_PKCS11_MODULE=peer.module, DEVAGENT_PKCS11_TOKEN_LABEL=peer.label,
                   DEVAGENT_PKCS11_PIN="env:DEVAGENT_LOAD_PKCS11_PIN", DEVAGENT_LOAD_PKCS11_PIN=peer.pin)
        options = {"pkcs11": dict(peer.options)}
    w = World(tmp / "state", backend, env, cmp_url, f"w{secrets.token_hex(3)}-", peer, options,
              protocol="est" if est_url else "cmp")
    root, other = tmp / "root.pem", tmp / "other-root.pem"
    from cryptography.hazmat.primitives import serialization

    root.write_bytes(lab.domain("plant").root_cert.public_bytes(serialization.Encoding.PEM))
    other.write_bytes(lab.domain(DEVICE_DOMAIN).root_cert.public_bytes(serialization.Encoding.PEM))
    for args in (("keystore", "init"), ("keystore", "trust", "--domain", "plant", "--add", str(root)),
                 ("keystore", "trust", "--domain", DEVICE_DOMAIN, "--add", str(other)),
                 # --timeout (remembered for requests and renewals): a loaded CI machine with ten processes at
                 # one in-process lab server must not turn slowness into failures a serial run would not have.
                 ("enroll", "--protocol", "est", "--server", est_url, "--label", "plant", "--domain", "plant",
                  "--name", w.ldevid, "--username", EST_USER, "--password", f"pass:{EST_PASSWORD}",
                  "--subject", f"CN={w.ldevid}", "--key-backend", backend, "--timeout", "120") if est_url else
                 ("enroll", "--protocol", "cmp", "--server", cmp_url, "--domain", "plant", "--name", w.ldevid,
                  "--ref", REF, "--secret", f"pass:{SECRET}", "--subject", f"CN={w.ldevid}",
                  "--key-backend", backend, "--timeout", "120")):
        code, err, _ = run_cli(w, *args)
        assert code == 0, f"devagent {' '.join(args)}: exit {code}: {err}"
    return w


def _child_env(world: World) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEVAGENT_TPM_", "DEVAGENT_PKCS11_"))}
    env.update(world.env)
    env.pop("NOTIFY_SOCKET", None)
    return env


# A fresh interpreter that has imported the CLI (and the key backends' Python modules, but initialised no PKCS#11
# module and opened no TPM) and forks one child per command: each command is its own process running the real
# entry point, started in milliseconds instead of an interpreter's start-up. Protocol on its stdin/stdout, one JSON
# line each: {"args": [...], "out": PATH} -> {"pid": N}; later {"reap": N} -> {"pid": N, "code": C}.
ZYGOTE = r"""
import json, os, sys
import agent.cli, keystore.store, keystore.backends.soft, keystore.backends.pkcs11, keystore.backends.tpm
import enroll_clients.cmp.client, enroll_clients.cmp.messages
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if "reap" in req:
        pid, status = os.waitpid(req["reap"], 0)
        print(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status)}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            fd = os.open(req["out"], os.O_WRONLY | os.O_APPEND)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            try:
                if "call" in req:  # a function of tests.peers.keystore_load (the device side of serve)
                    import importlib
                    mod, _, fn = req["call"].partition(":")
                    getattr(importlib.import_module(mod), fn)(*req["args"])
                else:
                    agent.cli.main(req["args"])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
        finally:
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
"""


class Zygote:
    """One ``ZYGOTE`` process for a world (used by one worker at a time)."""

    def __init__(self, world: World):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=REPO, env=_child_env(world),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline()).get("ready"), "the command zygote did not start"

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the command zygote exited ({self.proc.poll()})")
        return json.loads(line)

    def start(self, args, call: str | None = None) -> tuple[int, Path]:
        fd, out = tempfile.mkstemp(prefix="devagent-load-", suffix=".out")
        os.close(fd)
        req = {"args": list(args), "out": out, **({"call": call} if call else {})}
        return self._ask(req)["pid"], Path(out)

    def reap(self, pid: int) -> int:
        return self._ask({"reap": pid})["code"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


_zygotes: dict[int, Zygote] = {}


def zygote(world: World) -> Zygote:
    """This process's zygote for ``world`` (a worker process makes its own)."""
    key = (os.getpid(), id(world))
    z = _zygotes.get(key)
    if z is None or z.proc.poll() is not None:
        z = _zygotes[key] = Zygote(world)
    return z


def start_cli(world: World, *args: str) -> tuple[int, Path]:
    """Start ``devagent ARGS`` as its own process; returns (pid, file with its output). Reap with ``wait_cli``."""
    return zygote(world).start(args)


def wait_cli(world: World, pid: int, out: Path, timeout_s: float = 120.0) -> tuple[int, str]:
    """(exit code or -signal, output) of a process from ``start_cli``; killed after ``timeout_s``."""
    z = zygote(world)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    timed_out = _alive(pid)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    code = z.reap(pid)
    text = out.read_text(errors="replace")
    out.unlink()
    return code, text + (f"\n(killed: still running after {timeout_s:.0f} s)" if timed_out else "")


def _alive(pid: int) -> bool:
    """Whether ``pid`` (a zygote's child, not ours to wait for) is still running: not a zombie, not gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def run_cli(world: World, *args: str, timeout_s: float = 300.0) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    pid, out = start_cli(world, *args)
    code, text = wait_cli(world, pid, out, timeout_s)
    return code, text, time.perf_counter() - t0


# ---- N processes at once ---------------------------------------------------------------------------------------
def worker_ops(world: World, p: int, rounds: int) -> list[tuple[str, ...]]:
    """What worker ``p`` runs: per round a new application credential, renewals of the shared LDevID and of its own
    credential, status and keystore check; at the end it revokes one credential of its own. None of these fails
    when run one after another."""
    own = f"{world.prefix}app-{p}"
    ops: list[tuple[str, ...]] = [("request", own, "--domain", "plant", "--subject", f"CN={own}",
                                   "--key-backend", world.backend)]
    for r in range(rounds):
        name = f"{world.prefix}app-{p}-{r}"
        ops += [("request", name, "--domain", "plant", "--subject", f"CN={name}", "--key-backend", world.backend),
                ("renew", world.ldevid), ("renew", own), ("status",), ("keystore", "check")]
    if not rounds:  # the short form: the shared LDevID renewed while the others request with it
        ops.append(("renew", world.ldevid))
    if world.protocol == "est":  # EST has no revocation: a second renewal of the shared LDevID instead
        ops.append(("renew", world.ldevid))
    else:
        ops.append(("revoke", revoked_name(world, p, rounds), "--reason", "superseded"))
    return ops


def revoked_name(world: World, p: int, rounds: int) -> str:
    return f"{world.prefix}app-{p}-0" if rounds else f"{world.prefix}app-{p}"


def ops_per_worker(rounds: int) -> int:
    return 5 * rounds + 2 if rounds else 3


def close_zygotes() -> None:
    for key in [k for k in _zygotes if k[0] == os.getpid()]:
        _zygotes.pop(key).close()


def _worker(world: World, p: int, rounds: int, seed: int, out_fd: int) -> None:
    rnd = random.Random(seed)
    ops = worker_ops(world, p, rounds)
    head, body, tail = ops[:1], ops[1:-1], ops[-1:]
    rnd.shuffle(body)  # keep the first (own credential) and the last (revoke after its request) in place
    try:
        for op in head + body + tail:
            code, err, dt = run_cli(world, *op)
            os.write(out_fd, (json.dumps({"p": p, "op": " ".join(op[:2]), "code": code, "s": dt,
                                          "err": err[-2000:] if code else ""}) + "\n").encode())
    finally:
        zygote(world).close()


def run_concurrently(world: World, n: int, rounds: int, seed: int = 0) -> dict:
    """N worker processes, each running ``worker_ops`` in a random order (first and last op fixed). Returns
    ``{"results": [...], "wall_s": s}``; every result has p, op, code, s (seconds), err (stderr if it failed)."""
    r, w = os.pipe()
    pids = []
    t0 = time.perf_counter()
    for p in range(n):
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 1
            try:
                _worker(world, p, rounds, seed * 1000 + p, w)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    for pid in pids:
        os.waitpid(pid, 0)
    wall = time.perf_counter() - t0
    return {"results": [json.loads(line) for line in data.decode().splitlines() if line.strip()], "wall_s": wall}


# ---- what must not be left behind ---------------------------------------------------------------------------------
def token_objects(world: World) -> list[tuple[str, bytes, str]]:
    """(class, CKA_ID, label) of the token objects this world's keys could be (labels starting with its prefix)."""
    import pkcs11
    from pkcs11 import Attribute

    from tests.peers.pkcs11 import scan_objects

    tok = pkcs11.lib(world.peer.module).get_token(token_label=world.peer.label)
    try:
        session = tok.open(user_pin=world.peer.pin)
    except pkcs11.UserAlreadyLoggedIn:
        session = tok.open()
    with session as s:
        out = []
        # Not get_objects(): an object SoftHSM2 left half-created (a kill inside C_GenerateKeyPair; it has no
        # label, so it is none of this world's) would end the listing with an error (see scan_objects).
        for o in scan_objects(s)[0]:
            label = o[Attribute.LABEL]
            if label.startswith(world.prefix):
                out.append((o.object_class.name, bytes(o[Attribute.ID]), label))
        return out


def leftovers(world: World, full_check: bool = False) -> dict:
    """Everything that should not be there after ``keystore check``: ``{}`` when clean (``full_check``: also
    ``Keystore.check()`` in this process)."""
    from keystore.backends.pkcs11 import parse_uri

    ks = world.keystore()
    try:
        doc = ks._storage.read() or {}
        keys = list((doc.get("keys") or {}).values())
        creds = list((doc.get("credentials") or {}).values())
        uris = {k["uri"] for k in keys} | {c["key_uri"] for c in creds}
        out = {}
        pend = [k["uri"] for k in keys if k.get("state") == "pending"]
        if pend:
            out["pending keys"] = pend
        ret = [k["uri"] for k in keys if k.get("state") == "retired"]
        if ret:
            out["retired keys"] = ret
        destroying = (doc.get("meta") or {}).get("1", {}).get("destroying")
        if destroying:
            out["keys being destroyed"] = list(destroying)
        kd = world.state / "keys"
        files = [p.name for p in kd.iterdir()] if kd.is_dir() else []
        stray = [f for f in files if f"file:keys/{f}" not in uris]
        if stray:
            out["key files"] = stray
        td = world.state / "tpm"
        blobs = [p.stem for p in td.iterdir() if p.suffix == ".tss"] if td.is_dir() else []
        stray = [b for b in blobs if f"tpm:blob/{b}" not in uris]
        if stray:
            out["tpm blobs"] = stray
        if world.backend == "pkcs11":
            ids = {parse_uri(u)["id"] for u in uris if u.startswith("pkcs11:")}
            stray = [o for o in token_objects(world) if o[1] not in ids]
            if stray:
                out["token objects"] = stray
        if full_check:
            problems = ks.check()
            if problems:
                out["check"] = problems
        return out
    finally:
        ks.close()


def check_clean(world: World) -> dict:
    """``devagent keystore check`` (its own process), then ``leftovers``."""
    code, err, _ = run_cli(world, "keystore", "check")
    out = leftovers(world)
    if code != 0:
        out["keystore check"] = f"exit {code}: {err[-1500:]}"
    return out


# ---- kill -9 at a random point ------------------------------------------------------------------------------------
KILL_OPS = ("enroll", "request", "renew", "serve", "run")


def device_enrollments(state: str, lab_dir: str, backend: str, options_json: str, name: str, rounds: str) -> None:
    """The device side of ``devagent serve`` (coap_services.device.DeviceService, the code behind /csr and
    /verify) for ``rounds`` delegated enrollments of credential ``name``, the CA step done by the lab CA: what a
    ``serve`` process does to its keystore, without the CoAP transport in front."""
    import asyncio

    from agent.lab.ca import LabCA
    from coap_services import codec
    from coap_services.device import DeviceConfig, DeviceService
    from cryptography import x509
    from keystore.store import Keystore

    lab = LabCA(lab_dir)
    ks = Keystore.open(state, json.loads(options_json))
    svc = DeviceService(ks, DeviceConfig(device_id=name, default_domain=DEVICE_DOMAIN, key_backend=backend,
                                         csr_rate_per_min=1e9, csr_burst=10 ** 6))

    async def go():
        for _ in range(int(rounds)):
            res = await svc.csr(codec.CsrRequest(name=name, domain=DEVICE_DOMAIN, subject=f"CN={name}"), peer="load")
            cert = lab.issue_from_csr(DEVICE_DOMAIN, x509.load_der_x509_csr(res.csr_der))
            await svc.verify([cert, *lab.domain(DEVICE_DOMAIN).chain[:1]], peer="load")

    asyncio.run(go())


def make_due(world: World) -> None:
    """Make the LDevID due for renewal now (for ``devagent run --once``)."""
    import datetime

    from keystore.certs import fingerprint

    ks = world.keystore()
    try:
        cred = ks.get(world.ldevid)
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
        ks.set_meta(world.ldevid, next_renewal=past.isoformat(), schedule_for=fingerprint(cred.certificate))
    finally:
        ks.close()


def kill_trial(world: World, op: str, delay_s: float, n: int, lab_dir: str = "") -> tuple[int, str]:
    """Start ``op`` (a fresh credential name per trial ``n`` where it makes one), SIGKILL it after ``delay_s``,
    return (exit code, output); -9 if it was killed."""
    name = f"{world.prefix}k{n}"
    call = None
    args = {
        "enroll": ("enroll", "--protocol", "cmp", "--server", world.cmp_url, "--domain", "plant", "--name", name,
                   "--ref", REF, "--secret", f"pass:{SECRET}", "--subject", f"CN={name}",
                   "--key-backend", world.backend, "--timeout", "120"),
        "request": ("request", name, "--domain", "plant", "--subject", f"CN={name}", "--key-backend", world.backend),
        "renew": ("renew", world.ldevid),
        "run": ("run", "--once"),
    }.get(op)
    if op == "run":
        make_due(world)
    elif op == "serve":
        call = "tests.peers.keystore_load:device_enrollments"
        args = (str(world.state), lab_dir, world.backend, json.dumps(world.options), f"{world.prefix}dev", "1")
    elif args is None:
        raise ValueError(f"kill_trial: unknown op {op!r}")
    pid, out = zygote(world).start(args, call)
    deadline = time.monotonic() + delay_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.001)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    result = wait_cli(world, pid, out)
    if world.backend == "pkcs11":  # a kill inside SoftHSM2's C_Login empties its token file: the peer's defect
        world.peer.restore_token_file()
    return result
