"""Separate certificate and key files switch together: a service reading cert + key never gets a mismatched pair.

Two kinds of evidence, both over the real deployment code (agent.hooks.deploy) and real renewals with the lab CA:
- exhaustive: keystore.fsutil's fault-injection hook runs before every durable step of a deployment (write, fsync,
  rename, directory fsync, unlink); there the test reads the configured files as a service would. Every on-disk
  state a reader can meet is checked. The same check applied to the old way (separate atomic writes, one after the
  other) finds the mixed state, so the check can fail.
- concurrent: a reader thread loads cert + key in a loop while the main thread renews and deploys many times.
"""
from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import hooks, lifecycle
from keystore import fsutil
from keystore.certs import same_public_key
from tests.scenario.conftest import NAME

TOML = """
[credential.{name}]
[[credential.{name}.deploy]]
type = "pem"
cert = "{d}/certs/device.crt"
key = "{d}/private/device.key"
chain = "{d}/certs/ca.crt"
fullchain = "{d}/certs/fullchain.pem"
key_mode = "0640"
[[credential.{name}.deploy]]
type = "opcua"
pki_dir = "{d}/pki"
"""


def read_pair(d: Path) -> tuple[str | None, x509.Certificate | None]:
    """What a service sees when it loads its files now: (problem or None, certificate)."""
    try:
        cert = x509.load_pem_x509_certificate((d / "certs/device.crt").read_bytes())
        key = serialization.load_pem_private_key((d / "private/device.key").read_bytes(), None)
        full = x509.load_pem_x509_certificates((d / "certs/fullchain.pem").read_bytes())
        chain = x509.load_pem_x509_certificates((d / "certs/ca.crt").read_bytes())
        ocert = x509.load_der_x509_certificate((d / f"pki/own/certs/{NAME}.der").read_bytes())
        okey = serialization.load_pem_private_key((d / f"pki/own/private/{NAME}.pem").read_bytes(), None)
    except FileNotFoundError as e:
        return f"missing {e.filename}", None
    if not same_public_key(key.public_key(), cert.public_key()):
        return f"key does not match certificate {cert.serial_number:x}", cert
    if full[0] != cert:
        return "fullchain holds another certificate", cert
    if chain[0].subject != cert.issuer:
        return "chain does not belong to the certificate", cert
    if not same_public_key(okey.public_key(), ocert.public_key()):
        return "OPC UA key does not match the OPC UA certificate", cert
    return None, cert


def renew_and_deploy(w, pol) -> None:
    asyncio.run(lifecycle.renew(w.ks, NAME, client=w.sim))
    asyncio.run(hooks.deploy(w.ks, w.ks.get(NAME), pol, event="renewed"))


def _stepped(w, fn) -> list[str]:
    """Run ``fn`` with a read of the deployed files before every durable step under the deploy dir."""
    problems: list[str] = []
    steps = []

    def hook(stage, path):
        if path.startswith(str(w.deploy_dir)):
            steps.append((stage, path))
            err, _ = read_pair(w.deploy_dir)
            if err:
                problems.append(f"before {stage} {path}: {err}")

    fsutil._FAULT_HOOK = hook  # keystore.fsutil's documented fault-injection point
    try:
        fn()
    finally:
        fsutil._FAULT_HOOK = None
    assert len(steps) > 10, steps  # the hook did see the deployment
    return problems


def test_every_intermediate_state_of_a_deployment_is_a_matching_pair(world):
    w = world(lifetime_s=3600)
    pol = w.config(TOML.format(name=NAME, d=w.deploy_dir)).policy_for(NAME)
    asyncio.run(hooks.deploy(w.ks, w.ks.get(NAME), pol, event="deploy"))
    assert read_pair(w.deploy_dir)[0] is None
    for _ in range(3):
        before = read_pair(w.deploy_dir)[1]
        assert _stepped(w, lambda: renew_and_deploy(w, pol)) == []
        err, after = read_pair(w.deploy_dir)
        assert err is None and after == w.ks.get(NAME).certificate != before


def test_the_check_finds_the_mixed_pair_of_separate_writes(world):
    """The old way (each file replaced atomically, one after the other) shows a reader a new key with the old
    certificate: the check above would fail for it."""
    w = world(lifetime_s=3600)
    pol = w.config(TOML.format(name=NAME, d=w.deploy_dir)).policy_for(NAME)
    asyncio.run(hooks.deploy(w.ks, w.ks.get(NAME), pol, event="deploy"))
    asyncio.run(lifecycle.renew(w.ks, NAME, client=w.sim))
    cred = w.ks.get(NAME)

    def separate_writes():
        for target in pol.deploy:
            for f in hooks.render(w.ks, cred, target):
                fsutil.atomic_write(f.path, f.data, mode=f.mode)
    problems = _stepped(w, separate_writes)
    assert any("key does not match certificate" in p for p in problems), problems


def test_a_reader_thread_never_sees_a_mismatched_pair_during_many_renewals(world):
    w = world(lifetime_s=3600)
    pol = w.config(TOML.format(name=NAME, d=w.deploy_dir)).policy_for(NAME)
    asyncio.run(hooks.deploy(w.ks, w.ks.get(NAME), pol, event="deploy"))
    stop = threading.Event()
    seen: set[int] = set()
    problems: list[str] = []
    counts = {"consistent": 0, "switched": 0}

    def reader():
        # A careful service: read the certificate, the key, the certificate again; when the certificate changed in
        # between, a switch happened during the read and it reads again. Otherwise the pair must match.
        d = w.deploy_dir
        while not stop.is_set():
            c1 = (d / "certs/device.crt").read_bytes()
            k = (d / "private/device.key").read_bytes()
            c2 = (d / "certs/device.crt").read_bytes()
            if c1 != c2:
                counts["switched"] += 1
                continue
            cert = x509.load_pem_x509_certificate(c1)
            if not same_public_key(serialization.load_pem_private_key(k, None).public_key(), cert.public_key()):
                problems.append(f"key does not match certificate {cert.serial_number:x}")
            seen.add(cert.serial_number)
            counts["consistent"] += 1

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        for _ in range(30):
            renew_and_deploy(w, pol)
            n = counts["consistent"]
            while counts["consistent"] == n and t.is_alive():  # let the reader see this version (no sleep-based timing)
                os.sched_yield()
    finally:
        stop.set()
        t.join(30)
    assert problems == [], problems[:3]
    assert len(seen) >= 30  # the reader read while renewals switched the files

    # The layout: configured paths are links through one 'live' link; the previous version is kept, older ones not.
    crt = w.deploy_dir / "certs/device.crt"
    assert crt.is_symlink() and ".devagent" in os.readlink(crt)
    store = hooks.store_dir(hooks._group_paths(pol.deploy[0], NAME), NAME)
    assert len(list((store / "archive").iterdir())) == 2
    live = store / "live"
    assert live.is_symlink() and os.readlink(live).startswith("archive/")
    assert stat.S_IMODE((w.deploy_dir / "private/device.key").stat().st_mode) == 0o640
    assert not list(w.deploy_dir.rglob(".*.tmp"))

    removed = hooks.undeploy(pol)
    assert str(store) in removed and not store.exists() and not crt.exists() and not crt.is_symlink()


def test_files_from_an_earlier_deployment_are_adopted_without_a_mixed_moment(world):
    """Plain files written by an older devagent (or by hand) become links to a copy first, then switch at once."""
    w = world(lifetime_s=3600)
    pol = w.config(TOML.format(name=NAME, d=w.deploy_dir)).policy_for(NAME)
    cred = w.ks.get(NAME)
    for target in pol.deploy:
        for f in hooks.render(w.ks, cred, target):
            f.path.parent.mkdir(parents=True, exist_ok=True)
            fsutil.atomic_write(f.path, f.data, mode=f.mode)
    assert not (w.deploy_dir / "certs/device.crt").is_symlink()
    assert _stepped(w, lambda: renew_and_deploy(w, pol)) == []
    assert (w.deploy_dir / "certs/device.crt").is_symlink()
    assert read_pair(w.deploy_dir) == (None, w.ks.get(NAME).certificate)
