"""kill -9 during an OPC UA ApplyChanges: the PKI directory holds the old or the new certificate *and* trust list,
never a mix; after a restart the device is entirely on one of them (the new one once the journal was written).

The commit runs in a child (tests/peers/opcua_apply.py). A first run traces every durable write step
(keystore.fsutil: journal, TrustList version, keystore index and certificate files, trust anchors, the PKI
version files and the ``live`` link); then for each rename step N a fresh copy is committed by a child that
SIGKILLs itself at step N (a rename is where on-disk state changes; a kill at write/fsync leaves the state of the
rename before it). Not covered: a reader that opens the certificate and the trust directory at two different
instants can straddle a switch, as with any rename-based scheme; each path it opens is complete.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agent.opcua.trustlist import TrustListStore, thumbprint
from keystore.certs import fingerprint, same_public_key
from keystore.store import Keystore

REPO = Path(__file__).resolve().parents[2]


def _child(mode: str, base: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "tests.peers.opcua_apply", mode, str(base), *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def _deployed(base: Path) -> tuple[x509.Certificate, set[str]]:
    """(own certificate, trusted thumbprints) as the OPC UA application reads them, after checking that every
    path resolves into one version and the key matches the certificate."""
    pki = base / "pki"
    versions = {os.path.realpath(pki / rel).split("/archive/")[1].split("/")[0]
                for rel in ("own/certs/opcua.der", "own/private/opcua.pem", "trusted/certs", "issuers/certs")}
    assert len(versions) == 1, f"the PKI paths resolve into several versions: {versions}"
    cert = x509.load_der_x509_certificate((pki / "own/certs/opcua.der").read_bytes())
    key = load_pem_private_key((pki / "own/private/opcua.pem").read_bytes(), None)
    assert same_public_key(key.public_key(), cert.public_key())
    trusted = {p.stem for p in (pki / "trusted/certs").iterdir()}
    return cert, trusted


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    base = tmp_path_factory.mktemp("opcua-template")
    r = _child("prepare", base)
    assert r.returncode == 0, r.stderr[-3000:]
    return base


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_kill_at_every_apply_step(template, tmp_path):
    import json

    old_cert, old_trusted = _deployed(template)
    staged = json.loads((template / "staged.json").read_text())
    new_cert = x509.load_der_x509_certificate(bytes.fromhex(staged["certificate"]))
    from agent.opcua.trustlist import decode

    new_tl = decode(bytes.fromhex(staged["trustlist"]))[1]
    new_trusted = {thumbprint(d) for d in new_tl.trusted_certificates}
    assert new_trusted != old_trusted

    traced = _copy(template, tmp_path / "trace")
    r = _child("apply", traced, "--trace", str(tmp_path / "trace.txt"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _deployed(traced) == (new_cert, new_trusted)
    steps = (tmp_path / "trace.txt").read_text().splitlines()
    renames = [(int(s.split()[0]), s.split()[2]) for s in steps if s.split()[1] == "replace"]
    assert len(renames) >= 10, steps
    # Files of a PKI version that is not live yet are all alike for a reader: kill at the first of them only.
    archive = [n for n, p in renames if "/.devagent/push/archive/" in p]
    kill_points = [n for n, p in renames if n not in archive[1:]]

    def one(n: int):
        w = _copy(template, tmp_path / f"k{n}")
        r = _child("apply", w, "--kill-at", str(n))
        assert r.returncode == -signal.SIGKILL, (n, r.returncode, r.stderr[-2000:])
        where = steps[n - 1]
        state = _deployed(w)
        assert state in ((old_cert, old_trusted), (new_cert, new_trusted)), f"mixed state after kill at {where}"
        Keystore.open(w / "state").get("opcua")  # the keystore loads
        journal = (w / "state/opcua/apply.json").exists()
        r = _child("restart", w)
        assert r.returncode == 0, (where, r.stderr[-2000:])
        cert, trusted = _deployed(w)
        ks = Keystore.open(w / "state")
        assert ks.check() == []
        live = ks.get("opcua").certificate
        assert live == cert, f"keystore and PKI directory disagree after restart (kill at {where})"
        tl = TrustListStore(w / "state/opcua").load()
        assert {thumbprint(d) for d in tl.trusted_certificates} == trusted
        anchors = {fingerprint(a) for a in ks.trust_anchors("plant")}
        assert anchors == {fingerprint(c) for c in tl.anchors()}
        if journal or state[0] == new_cert:
            assert (cert, trusted) == (new_cert, new_trusted), f"not rolled forward (kill at {where})"
        assert not (w / "state/opcua/apply.json").exists()
        return n

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        done = list(ex.map(one, kill_points))
    assert done == kill_points

