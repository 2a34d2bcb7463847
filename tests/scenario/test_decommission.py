"""Decommissioning over the simulator: revoked at the CA, keys and deployed copies gone, audit record left."""
from __future__ import annotations

import asyncio

from agent.cli_ops import decommission_keystore
from tests.scenario.conftest import NAME
from tests.scenario.test_daemon_scenarios import deploy_toml


def test_decommission_revokes_deletes_and_audits(world):
    w = world(lifetime_s=60)
    cfg = w.config(deploy_toml(w))
    asyncio.run(w.daemon(cfg).run(once=True))  # deploy first
    assert (w.deploy_dir / "key.pem").exists()
    cred = w.ks.get(NAME)
    key_file = w.ks.root / cred.key_uri.split(":", 1)[1]
    assert key_file.exists()

    report = asyncio.run(decommission_keystore(w.ks, cfg, client_factory=lambda c: w.sim))

    assert report["revoked"] == [NAME] and report["not_revoked"] == {}
    assert w.ca.is_revoked(cred.certificate.serial_number)
    assert w.ks.list() == [] and w.ks.trust_records() == [] and w.ks.pending_keys() == []
    assert not key_file.exists()
    for f in ("key.pem", "cert.pem", "bundle.pem", "pki/own/private/mqtt.pem"):
        assert not (w.deploy_dir / f).exists()
    audit = [e for e in w.ks.audit_entries() if e["action"] == "decommission"]
    assert audit and audit[-1]["revoked"] == [NAME] and audit[-1]["deleted"] == [NAME]


def test_decommission_with_ca_down_still_wipes_and_names_the_serial(world):
    w = world(lifetime_s=60)
    cfg = w.config("")
    serial = w.ks.get(NAME).certificate.serial_number
    w.sim.down = True
    report = asyncio.run(decommission_keystore(w.ks, cfg, client_factory=lambda c: w.sim))
    assert NAME in report["not_revoked"] and "outage" in report["not_revoked"][NAME]
    assert w.ks.list() == [] and not w.ca.is_revoked(serial)


# ---- wipe: with and without the IDevID; kill -9 during the wipe ------------------------------------------------
import concurrent.futures  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from agent.lab.ca import LabCA  # noqa: E402
from keystore.csr import parse_subject  # noqa: E402
from keystore.errors import KeystoreError, KeystoreNotInitializedError  # noqa: E402
from keystore.store import Keystore  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _with_idevid(w):
    """The world's keystore plus a manufacturer IDevID (software key) and a pending key of an unfinished request."""
    mfg = LabCA.create(w.root / "mfg", domains=("mfg",))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = mfg.issue("mfg", key.public_key(), parse_subject("CN=dev1 IDevID,serialNumber=0001"), lifetime_s=86400 * 365)
    w.ks.import_idevid("idevid", cert, mfg.domain("mfg").chain, private_key=key)
    w.ks.generate_key("p256", label="unfinished", pending_for={"name": "x", "domain": "plant", "op": "request"})
    from keystore import fsutil

    for sub in ("coap/oscore/clm1", "clm/contexts/dev9"):  # CoAP security contexts and a CLM inventory: secrets
        fsutil.ensure_dir(w.ks.root / sub)
        fsutil.atomic_write(w.ks.root / sub / "settings.json", b'{"secret_hex": "00112233"}')
    return cert


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def test_decommission_keeps_the_idevid_and_a_usable_keystore(world):
    w = world(lifetime_s=60)
    idevid = _with_idevid(w)
    ldevid_key = w.ks.root / w.ks.get(NAME).key_uri.split(":", 1)[1]
    cfg = w.config("")
    report = asyncio.run(decommission_keystore(w.ks, cfg, client_factory=lambda c: w.sim))
    assert report["deleted"] == [NAME] and report["include_idevid"] is False
    assert len(report["keys_destroyed"]) == 2  # the LDevID's and the pending one; not the IDevID's
    assert not ldevid_key.exists()

    ks = Keystore.open(w.ks.root)  # still a keystore
    assert [c.name for c in ks.list()] == ["idevid"] and ks.pending_keys() == [] and ks.check() == []
    assert ks.get("idevid").certificate == idevid
    assert [t["domain"] for t in ks.trust_records()] == ["idevid-idevid"]
    assert ks.private_key(ks.get("idevid").key_uri).public_key() == idevid.public_key()  # master key kept
    files = _files(ks.root)
    assert [f for f in files if f.startswith("keys/")] == [ks.get("idevid").key_uri.split(":", 1)[1]]
    assert {f.split("/")[1] for f in files if f.startswith("creds/")} == {"idevid"}
    assert "wipe-pending.json" not in files
    assert not (ks.root / "coap").exists() and not (ks.root / "clm").exists()
    # ... and usable: onboard again into the domain
    ks.add_trust_anchors("plant", [w.ca.domain("plant").root_cert], source="test")
    asyncio.run(lifecycle_enroll(ks, w.sim))
    assert {c.name for c in ks.list()} == {"idevid", NAME}
    rec = [e for e in ks.audit_entries() if e["action"] == "decommission"][-1]
    assert rec["deleted"] == [NAME] and rec["kept"] == ["idevid"] and rec["revoked"] == [NAME]


def lifecycle_enroll(ks, sim):
    from agent import lifecycle

    return lifecycle.enroll(ks, sim, name=NAME, domain="plant", subject=parse_subject("CN=dev1"),
                            remember={"server": "labsim://plant"})


def _env(base: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVAGENT_")}
    (base / "none.toml").write_text("")
    env.update(PYTHONPATH=str(REPO), DEVAGENT_PROFILE="generic-x86_64", DEVAGENT_CONFIG=str(base / "none.toml"))
    return env


# The CLI in a child that counts keystore.fsutil's durable steps (its fault-injection point) and SIGKILLs itself
# at step N (0: never); with a trace file it writes each step.
CHILD = """
import os, signal, sys
from keystore import fsutil
n, trace, count = int(sys.argv[1]), sys.argv[2], [0]
def hook(stage, path):
    count[0] += 1
    if trace:
        with open(trace, "a") as f:
            f.write(f"{count[0]} {stage} {path}\\n")
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
fsutil._FAULT_HOOK = hook
from agent.cli import main
main(sys.argv[3:])
"""


def _decommission(base: Path, *, include: bool, kill_at: int = 0, trace: str = "") -> subprocess.CompletedProcess:
    args = ["--state-dir", str(base / "state"), "decommission", "--yes", "--no-revoke"]
    args += ["--include-idevid"] if include else []
    return subprocess.run([sys.executable, "-c", CHILD, str(kill_at), trace, *args], cwd=REPO, env=_env(base),
                          capture_output=True, text=True, timeout=120)


def _check_final(base: Path, include: bool) -> None:
    state = base / "state"
    if include:
        assert _files(state) == ["audit.log"], _files(state)  # master key, keys, index, lock: all gone
        assert [p.name for p in state.iterdir()] == ["audit.log"]
        with pytest.raises(KeystoreNotInitializedError):
            Keystore.open(state)
        import json

        last = json.loads((state / "audit.log").read_text().splitlines()[-1])
        assert last["action"] == "decommission" and last["include_idevid"] is True
        assert set(last["deleted"]) == {"idevid", NAME}
    else:
        ks = Keystore.open(state)
        assert [c.name for c in ks.list()] == ["idevid"] and ks.check() == [] and ks.pending_keys() == []
        assert ks.gc() == [] and not (state / "coap").exists() and not (state / "clm").exists()


@pytest.fixture
def template(world, tmp_path_factory):
    w = world(lifetime_s=3600)
    _with_idevid(w)
    w.ks.close()
    tpl = tmp_path_factory.mktemp("decommission-template")
    shutil.copytree(w.ks.root, tpl / "state", symlinks=True)
    return tpl


@pytest.mark.parametrize("include", [True, False], ids=["include-idevid", "keep-idevid"])
def test_kill_during_decommission_then_rerun_completes(template, tmp_path, include):
    traced = tmp_path / "traced"
    shutil.copytree(template, traced, symlinks=True)
    r = _decommission(traced, include=include, trace=str(tmp_path / "trace.txt"))
    assert r.returncode == 0, r.stderr
    _check_final(traced, include)
    steps = (tmp_path / "trace.txt").read_text().splitlines()
    kill_points = [int(s.split()[0]) for s in steps if s.split()[1] in ("replace", "fsync-dir", "unlink")]
    assert len(kill_points) >= 8, steps

    def one(n: int) -> int:
        base = tmp_path / f"k{n}"
        shutil.copytree(template, base, symlinks=True)
        r = _decommission(base, include=include, kill_at=n)
        assert r.returncode == -signal.SIGKILL, (steps[n - 1], r.returncode, r.stderr[-2000:])
        state = base / "state"
        if Keystore.wipe_pending(state) is not None:
            with pytest.raises(KeystoreError, match="run 'devagent decommission' again"):
                Keystore.open(state)  # nothing may use a half-wiped keystore
        else:
            assert Keystore.open(state).get("idevid")  # killed before the wipe began: intact
        r = _decommission(base, include=include)
        assert r.returncode == 0, (steps[n - 1], r.stderr[-2000:])
        try:
            _check_final(base, include)
        except AssertionError as e:
            raise AssertionError(f"after a kill at step {steps[n - 1]} and a re-run: {e}") from e
        return n

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        assert list(ex.map(one, kill_points)) == kill_points
