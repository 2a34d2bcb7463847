"""A real PKCS#11 token for tests: SoftHSM2 with its token directory in a temp dir.

Plain helper (usable outside pytest)::

    with softhsm_token(label="devagent", pin="1234") as tok:
        tok.options            # {"module": ..., "token_label": ..., "pin": "env:DEVAGENT_TEST_PKCS11_PIN"}
        tok.objects()          # labels of the objects on the token (to check nothing was left behind)
        tok.unreadable()       # how many objects SoftHSM2 left half-created (see ``scan_objects``)

SoftHSM2 reads ``SOFTHSM2_CONF`` once, when the module is initialised in this process; the helper therefore
sets it process-wide, and one token serves all tests of the process (each test cleans up its objects).
Only one ``softhsm_token`` may be active per process: a second one would set ``SOFTHSM2_CONF`` to a new token
directory that child processes (the ``devagent`` CLI) use while this process keeps using the first one, a token
with the same label but other objects. It raises instead.

Pytest fixtures (``from tests.peers.pkcs11 import softhsm, pkcs11_options``):

- ``softhsm``         the process's one ``SoftHsmToken``. A session fixture imported into several test modules is a
                      fixture of each module (pytest sets each up once), so the token is kept here, shared by all
                      of them, and removed when the last of them is torn down (at the end of the session).
- ``pkcs11_options``  backend options for ``Keystore(..., backend_options={"pkcs11": pkcs11_options})``.

A missing ``softhsm2-util`` or module is a test *failure* naming the apt-get command, never a skip.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SOFTHSM_HINT = "apt-get install -y softhsm2"
MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                     "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so", "/usr/local/lib/softhsm/libsofthsm2.so")
PIN_ENV = "DEVAGENT_TEST_PKCS11_PIN"
_active: list[str] = []  # token directory of the softhsm_token active in this process (at most one)
_shared: dict = {}  # the softhsm fixture's token, its ExitStack and how many fixture instances use it


def scan_objects(session, attrs: dict | None = None) -> tuple[list, int]:
    """(objects, number of unreadable objects) of a search on ``session``, one object per ``C_FindObjects`` batch;
    an object is readable when its class, CKA_ID and CKA_LABEL can be read.

    SoftHSM2 (2.6.1 here; P11Objects.cpp) creates an object's file, rewrites it once for each default attribute
    it gives the object (the key type, CKA_CLASS, ..., an empty CKA_ID and CKA_LABEL), and only then, in one
    write (a transaction), with the template's CKA_ID and CKA_LABEL. A process SIGKILLed inside
    ``C_GenerateKeyPair`` (tests/fault/test_kill_pending.py kills devagent at random points) can therefore leave
    an object with some of the defaults and none of the template: one left by such a kill here held only
    CKA_KEY_TYPE. C_FindObjects returns it, reading its class fails (CKR_ATTRIBUTE_VALUE_INVALID here; a helper
    saw CKR_GENERAL_ERROR), and that ends python-pkcs11's ``get_objects()`` for every object after it. No label
    or ID names such an object (devagent finds its keys by class and CKA_ID); it is counted here instead of
    hiding the objects after it.
    """
    from pkcs11 import Attribute, PKCS11Error
    from pkcs11._pkcs11 import SearchIter

    out, unreadable = [], 0
    with SearchIter(session, attrs or {}, 1) as op:
        for batch in op:  # a batch of one object: a failure to read it ends only its batch
            try:
                for o in batch:
                    o[Attribute.ID], o[Attribute.LABEL]  # noqa: B018  (what the callers read)
                    out.append(o)
            except PKCS11Error:
                unreadable += 1
    return out, unreadable


def find_module() -> str | None:
    for p in MODULE_CANDIDATES:
        if os.path.exists(p):
            return p
    return None


class SoftHsmToken:
    def __init__(self, directory: str, module: str, label: str, pin: str, so_pin: str):
        self.dir = directory
        self.module = module
        self.label = label
        self.pin = pin
        self.so_pin = so_pin
        self.restored = 0  # how often restore_token_file() put the token's file back
        found = glob.glob(os.path.join(directory, "tokens", "*", "token.object"))
        self._token_file = found[0] if len(found) == 1 else None
        self._token_saved = Path(self._token_file).read_bytes() if self._token_file else b""

    def restore_token_file(self) -> bool:
        """Put back the token's own file (``token.object``) as ``--init-token`` left it if it is empty: SoftHSM2
        rewrites it in place (truncate, then write) on every successful C_Login, and a process SIGKILLed in
        between (tests/fault/test_kill_pending.py kills devagent at random points) leaves it empty, which loses
        the token (label, flags, the PIN blobs that unwrap every key): new processes find no token with the label
        and this one gets CKR_GENERAL_ERROR. No caller can prevent that (docs/hardware-keys.md); what SoftHSM2
        writes there after a successful login equals what init left, and only SoftHSM2 writes that file."""
        if self._token_file is None or os.path.getsize(self._token_file) != 0:
            return False
        with open(self._token_file, "r+b") as f:
            f.write(self._token_saved)
            f.flush()
            os.fsync(f.fileno())
        self.restored += 1
        return True

    @property
    def options(self) -> dict:
        return {"module": self.module, "token_label": self.label, "pin": f"env:{PIN_ENV}"}

    def init_token(self, label: str, pin: str, so_pin: str = "5678") -> None:
        """Initialise another token in a free slot (visible to this process after re-scanning slots)."""
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                        "--so-pin", so_pin], check=True, capture_output=True, env=os.environ.copy())

    def _scan(self) -> tuple[list[tuple[str, str]], int]:
        import pkcs11
        from pkcs11 import Attribute

        tok = pkcs11.lib(self.module).get_token(token_label=self.label)
        try:
            session = tok.open(user_pin=self.pin)
        except pkcs11.UserAlreadyLoggedIn:  # login state is per process: a backend's session holds it
            session = tok.open()
        with session as s:
            objs, unreadable = scan_objects(s)
            return sorted((o.object_class.name, o[Attribute.LABEL]) for o in objs), unreadable

    def objects(self) -> list[tuple[str, str]]:
        """(class, label) of every readable object on the token, read through the module (``scan_objects``)."""
        return self._scan()[0]

    def unreadable(self) -> int:
        """How many objects on the token cannot be read: SoftHSM2's half-created ones (``scan_objects``)."""
        return self._scan()[1]


@contextlib.contextmanager
def softhsm_token(label: str = "devagent-test", pin: str = "1234", so_pin: str = "5678"):
    """Create a SoftHSM2 token in a temp dir, point SOFTHSM2_CONF at it (process-wide), yield it."""
    if shutil.which("softhsm2-util") is None:
        raise FileNotFoundError(f"softhsm2-util is not installed: {SOFTHSM_HINT}")
    module = find_module()
    if module is None:
        raise FileNotFoundError(f"libsofthsm2.so not found in {', '.join(MODULE_CANDIDATES)}: {SOFTHSM_HINT}")
    if _active:
        raise RuntimeError(f"a SoftHSM2 token ({_active[0]}) is already active in this process: SoftHSM2 reads "
                           "SOFTHSM2_CONF once per process, so a second token directory would be used by child "
                           "processes only; use the first token (the softhsm fixture) instead")
    old = {k: os.environ.get(k) for k in ("SOFTHSM2_CONF", PIN_ENV)}
    with tempfile.TemporaryDirectory(prefix="softhsm-") as d:
        os.makedirs(os.path.join(d, "tokens"), mode=0o700)
        conf = os.path.join(d, "softhsm2.conf")
        with open(conf, "w") as f:
            f.write(f"directories.tokendir = {d}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n"
                    "slots.removable = false\n")
        os.environ["SOFTHSM2_CONF"] = conf
        os.environ[PIN_ENV] = pin
        _active.append(d)
        try:
            subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                            "--so-pin", so_pin], check=True, capture_output=True)
            yield SoftHsmToken(d, module, label, pin, so_pin)
        finally:
            with contextlib.suppress(Exception):
                import pkcs11

                pkcs11.unload(module)
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _active.clear()


@pytest.fixture(scope="session")
def softhsm():
    if shutil.which("softhsm2-util") is None or find_module() is None:
        pytest.fail(f"SoftHSM2 is not installed; CI needs it: {SOFTHSM_HINT}", pytrace=False)
    if not _shared:
        stack = contextlib.ExitStack()
        _shared.update(token=stack.enter_context(softhsm_token()), stack=stack, users=0)
    _shared["users"] += 1
    try:
        yield _shared["token"]
    finally:
        _shared["users"] -= 1
        if not _shared["users"]:
            stack = _shared["stack"]
            _shared.clear()
            stack.close()


@pytest.fixture
def pkcs11_options(softhsm):
    return dict(softhsm.options)
