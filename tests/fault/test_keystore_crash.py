"""Crash safety and concurrency of the keystore (issue 2).

A forked child keeps enrolling and renewing credentials and reports each commit on a pipe *after*
``store_certificate`` returned; the parent SIGKILLs it at a random instant. Afterwards the keystore must open,
pass ``check()``, and hold every reported commit intact. Forking (instead of spawning python) keeps 200+ trials
within seconds; the kill is a real SIGKILL of a real process writing real files.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import time

import pytest

from keystore import fsutil
from keystore.csr import build_csr, parse_subject
from keystore.errors import StorageError
from keystore.store import Keystore
from tests.conftest import DOMAIN, snapshot

TRIALS = int(os.environ.get("DEVAGENT_CRASH_TRIALS", "200"))


def _writer(root, lab, wfd, seed):
    """Child: renew/enroll forever, writing 'name version fingerprint' after each commit."""
    rnd = random.Random(seed)
    ks = Keystore.open(root)
    chain = lab.domain(DOMAIN).chain
    while True:
        name = f"c{rnd.randrange(4)}"
        uri = ks.generate_key("p256")
        csr = build_csr(ks.private_key(uri), parse_subject(f"CN={name}"))
        cert = lab.issue(DOMAIN, csr.public_key(), csr.subject)
        cred = ks.store_certificate(name, cert, chain, key_uri=uri, domain=DOMAIN)
        os.write(wfd, (json.dumps([name, cred.version, cred.record["fingerprint"]]) + "\n").encode())


def _run_and_kill(root, lab, seed, delay_s):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            _writer(root, lab, w, seed)
        finally:
            os._exit(0)
    os.close(w)
    time.sleep(delay_s)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    commits = {}
    for line in data.decode().splitlines():
        if line.endswith("]"):
            name, version, fp = json.loads(line)
            commits[name] = (version, fp)
    return commits


def _commit_time_s(ks, lab) -> float:
    """How long one generate+issue+store cycle takes on this machine now (the kill window scales with it)."""
    t0 = time.perf_counter()
    for _ in range(3):
        uri = ks.generate_key("p256")
        csr = build_csr(ks.private_key(uri), parse_subject("CN=calibrate"))
        ks.store_certificate("calibrate", lab.issue(DOMAIN, csr.public_key(), csr.subject), lab.domain(DOMAIN).chain,
                             key_uri=uri, domain=DOMAIN)
    ks.delete("calibrate")
    return (time.perf_counter() - t0) / 3


def test_sigkill_at_random_points_loses_no_committed_credential(ks, lab):
    rnd = random.Random(1234)
    window_s = 4 * _commit_time_s(ks, lab)  # kills land anywhere in the first few commits, also on a loaded machine
    committed: dict[str, tuple[int, str]] = {}
    for trial in range(TRIALS):
        got = _run_and_kill(ks.root, lab, seed=trial, delay_s=rnd.uniform(0.0, window_s))
        committed.update(got)
        opened = Keystore.open(ks.root)
        assert opened.check() == [], f"trial {trial}: {opened.check()}"
        for name, (version, fp) in committed.items():
            cred = opened.get(name)
            assert cred.version >= version, f"trial {trial}: {name} went back from v{version} to v{cred.version}"
            if cred.version == version:
                assert cred.record["fingerprint"] == fp
            # The live key is usable: it signs, and it is the certificate's key.
            assert build_csr(opened.private_key(cred.key_uri), cred.certificate.subject).is_signature_valid
        committed = {c.name: (c.version, c.record["fingerprint"]) for c in opened.list()}
    assert committed, "the writer never committed anything: the test did not exercise the keystore"
    # Leftovers of interrupted writes are garbage that gc removes, never something live.
    Keystore.open(ks.root).gc()
    assert Keystore.open(ks.root).check() == []


@pytest.mark.parametrize("stage", ["write", "fsync", "replace"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_write_failure_keeps_old_state(ks, lab, stage, err):
    uri = ks.generate_key("p256")
    csr = build_csr(ks.private_key(uri), parse_subject("CN=dev"))
    ks.store_certificate("dev", lab.issue(DOMAIN, csr.public_key(), csr.subject), lab.domain(DOMAIN).chain,
                         key_uri=uri, domain=DOMAIN)
    uri2 = ks.generate_key("p256")
    csr2 = build_csr(ks.private_key(uri2), parse_subject("CN=dev"))
    cert2 = lab.issue(DOMAIN, csr2.public_key(), csr2.subject)
    before = snapshot(ks.root)
    calls = []

    def hook(s, path):
        calls.append((s, path))
        if s == stage and path.endswith("keystore.json"):  # fail the commit itself
            raise OSError(err, os.strerror(err), path)

    fsutil._FAULT_HOOK = hook
    try:
        with pytest.raises(StorageError, match=os.strerror(err)):
            ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key_uri=uri2, domain=DOMAIN)
    finally:
        fsutil._FAULT_HOOK = None
    assert snapshot(ks.root) == before, "a failed write must leave the keystore exactly as it was"
    cred = Keystore.open(ks.root).get("dev")
    assert cred.version == 1 and cred.key_uri == uri


def test_two_processes_never_lose_an_update(ks, lab):
    per_proc = 15
    pids = []
    for p in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                k = Keystore.open(ks.root)
                for i in range(per_proc):
                    uri = k.generate_key("p256")
                    csr = build_csr(k.private_key(uri), parse_subject(f"CN=p{p}-{i}"))
                    k.store_certificate(f"p{p}-{i}", lab.issue(DOMAIN, csr.public_key(), csr.subject),
                                        lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    opened = Keystore.open(ks.root)
    names = {c.name for c in opened.list()}
    assert names == {f"p{p}-{i}" for p in range(2) for i in range(per_proc)}
    assert opened.pending_keys() == [] and opened.check() == []


def test_sigkill_between_the_answer_and_the_deferred_destroy_is_finished_by_gc(ks, lab):
    """store_certificate(defer_cleanup=True) returned (the device answered /verify) and the process is killed
    before its flush: the new version is live and usable, the superseded key is listed in meta.destroying, and
    the next gc destroys it and removes the version beyond KEEP_VERSIONS; nothing live is lost."""
    chain = lab.domain(DOMAIN).chain

    def renew(k, **kw):
        uri = k.generate_key("p256")
        csr = build_csr(k.private_key(uri), parse_subject("CN=dev"))
        return k.store_certificate("dev", lab.issue(DOMAIN, csr.public_key(), csr.subject), chain, key_uri=uri,
                                   domain=DOMAIN, **kw)

    for _ in range(3):
        old = renew(ks)
    ks.close()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the device service, killed right after answering
        try:
            os.close(r)
            cred = renew(Keystore.open(ks.root), defer_cleanup=True)
            os.write(w, (json.dumps([cred.version, cred.key_uri, cred.record["fingerprint"]]) + "\n").encode())
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    with os.fdopen(r) as f:
        version, key_uri, fp = json.loads(f.readline())
    old_file = ks.root / old.key_uri.split(":", 1)[1]
    opened = Keystore.open(ks.root)
    assert old_file.exists(), "the kill must land before the deferred destroy"
    assert opened.meta().get("destroying") == [old.key_uri]
    assert sorted(int(p.name) for p in (ks.root / "creds" / "dev").iterdir()) == [1, 2, 3, 4]
    cred = opened.get("dev")
    assert (cred.version, cred.key_uri, cred.record["fingerprint"]) == (version, key_uri, fp) == (4, key_uri, fp)
    assert build_csr(opened.private_key(cred.key_uri), cred.certificate.subject).is_signature_valid
    assert opened.check() == []
    opened.close()
    removed = Keystore.open(ks.root).gc()
    assert f"retired key {old.key_uri}" in removed
    assert not old_file.exists() and Keystore.open(ks.root).meta().get("destroying") is None
    assert sorted(int(p.name) for p in (ks.root / "creds" / "dev").iterdir()) == [2, 3, 4]
    after = Keystore.open(ks.root)
    assert after.get("dev").version == 4 and after.check() == []
    assert build_csr(after.private_key(key_uri), after.get("dev").certificate.subject).is_signature_valid
