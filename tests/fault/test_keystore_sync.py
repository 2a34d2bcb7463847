"""Write faults at every step of every keystore write, the directory fsync included (issue 13, hole 5).

``fsutil._FAULT_HOOK`` fails one step (write, fsync, replace, fsync-dir) of one file with ENOSPC or EIO. Before
the index replace nothing may change (file snapshot); once the index replace succeeded the new version is live
and a failing directory fsync must neither remove it nor destroy what a power cut could bring back.

A version's files and a held key's file are created under their final names (``fsutil.write_new_files``): they
have no "replace" step, so the matrix does not list one for them (``STORE_STEPS``), and
``test_the_store_matrix_lists_exactly_the_steps_a_store_makes`` fails if the code makes a step the matrix
misses or the matrix lists one the code does not make.
"""
from __future__ import annotations

import errno
import os
import stat

import pytest

from keystore import fsutil
from keystore.csr import build_csr, parse_subject
from keystore.errors import KeystorePermissionError, StorageError
from keystore.store import Keystore
from tests.conftest import DOMAIN, snapshot

STAGES = ["write", "fsync", "replace", "fsync-dir"]
# The steps of each file store_certificate writes, as the code makes them: the index through a temp file renamed
# over it; the version's files and a held key's file created under their final names (no rename).
NEW_FILE_STAGES = ["write", "fsync", "fsync-dir"]
STORE_STEPS = {"keystore.json": STAGES, "cert.pem": NEW_FILE_STAGES, "chain.pem": NEW_FILE_STAGES,
               ".key": NEW_FILE_STAGES}


def store_matrix(targets):
    """``(target, stage)`` parameters for the targets' steps (``STORE_STEPS``)."""
    return [pytest.param(t, s, id=f"{t}-{s}") for t in targets for s in STORE_STEPS[t]]
ERRNOS = [errno.ENOSPC, errno.EIO]


def _issue(ks, lab, name="dev"):
    uri = ks.generate_key("p256")
    csr = build_csr(ks.private_key(uri), parse_subject(f"CN={name}"))
    return uri, lab.issue(DOMAIN, csr.public_key(), csr.subject)


class Fault:
    """Fail ``stage`` of writes whose path ends with ``suffix``: ``times`` times (None: every time)."""

    def __init__(self, stage, suffix, err, times=None):
        self.stage, self.suffix, self.err, self.left, self.hits = stage, suffix, err, times, 0

    def __call__(self, s, path):
        if s == self.stage and path.endswith(self.suffix) and (self.left is None or self.left > 0):
            self.hits += 1
            if self.left is not None:
                self.left -= 1
            raise OSError(self.err, os.strerror(self.err), path)

    def __enter__(self):
        fsutil._FAULT_HOOK = self
        return self

    def __exit__(self, *exc):
        fsutil._FAULT_HOOK = None


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("times", [1, None], ids=["transient", "persistent"])
def test_failed_dir_sync_after_index_replace_keeps_the_new_version_live(ks, lab, err, times):
    """Regression (issue 13, hole 5): the commit's directory fsync fails after os.replace of the index.

    Old behaviour: store_certificate's cleanup removed the version the index already pointed at, so the
    credential no longer loaded (CorruptFileError) and 'keystore check' did not repair it."""
    uri1, cert1 = _issue(ks, lab)
    ks.store_certificate("dev", cert1, lab.domain(DOMAIN).chain, key_uri=uri1, domain=DOMAIN)
    uri2, cert2 = _issue(ks, lab)
    with Fault("fsync-dir", "keystore.json", err, times) as f:
        cred = ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key_uri=uri2, domain=DOMAIN)
    assert f.hits >= 1
    assert cred.version == 2 and cred.key_uri == uri2
    opened = Keystore.open(ks.root)
    live = opened.get("dev")
    assert live.version == 2 and live.certificate == cert2 and live.key_uri == uri2
    assert opened.check() == []
    old_key_file = ks.root / uri1.split(":", 1)[1]
    if times is None:
        # Not durable: a power cut could bring back the old index, which needs the old key. It stays until a
        # sync succeeds; the failure is in the audit log.
        assert old_key_file.exists()
        assert [e["sync_error"] for e in _stores(opened, 2, UNSYNCED)]
        assert [e.get("sync_error") for e in _stores(opened, 2)] == [None], "one store line, claiming no sync error"
    else:
        assert not old_key_file.exists(), "the retried sync succeeded: the superseded key is destroyed as usual"
    ks.close()  # the writer's process ends: it no longer holds the key it signed with
    opened.gc()  # syncs the directory again, then destroys the retired key nobody holds
    assert not old_key_file.exists()
    assert opened.check() == [] and opened.get("dev").version == 2


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
def test_gc_removes_nothing_while_the_directory_cannot_be_synced(ks, lab, err):
    uri1, cert1 = _issue(ks, lab)
    ks.store_certificate("dev", cert1, lab.domain(DOMAIN).chain, key_uri=uri1, domain=DOMAIN)
    uri2, cert2 = _issue(ks, lab)
    with Fault("fsync-dir", "keystore.json", err):
        ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key_uri=uri2, domain=DOMAIN)
    before = snapshot(ks.root)
    with Fault("fsync-dir", "keystore.json", err):  # the disk keeps failing
        with pytest.raises(StorageError, match="nothing was removed"):
            Keystore.open(ks.root).gc()
    assert snapshot(ks.root) == before


class Faults:
    """Several ``Fault``s at once (each fails its own step)."""

    def __init__(self, *faults):
        self.faults = faults

    def __call__(self, s, path):
        for f in self.faults:
            f(s, path)

    def __enter__(self):
        fsutil._FAULT_HOOK = self
        return self

    def __exit__(self, *exc):
        fsutil._FAULT_HOOK = None


UNSYNCED = "certificate-store-unsynced"


def _stores(ks, version, action="certificate-store"):
    """The audit lines of ``action`` for ``version`` (by default the store's own line, not its unsynced one)."""
    return [e for e in ks.audit_entries() if e["action"] == action and e.get("version") == version]


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
def test_failed_audit_fsync_in_the_commit_wait_reports_it_and_the_store_stands(ks, lab, err):
    """The certificate-store line is fsynced together with the index's directory (one wait): its fsync failing
    is the StorageError it always was (naming the audit log), raised once the store is done. The directory's
    fsync succeeded, so the commit is durable: the new version is live and the superseded key destroyed; the line
    itself is in the file (written, not known to be durable) and claims no more than it did before the sync."""
    uri1, cert1 = _issue(ks, lab)
    ks.store_certificate("dev", cert1, lab.domain(DOMAIN).chain, key_uri=uri1, domain=DOMAIN)
    uri2, cert2 = _issue(ks, lab)
    with Fault("fsync", "audit.log", err) as f:
        with pytest.raises(StorageError, match=f"audit.log: {os.strerror(err)}"):
            ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key_uri=uri2, domain=DOMAIN)
    assert f.hits == 1
    assert ks.durable
    opened = Keystore.open(ks.root)
    assert opened.check() == []
    live = opened.get("dev")
    assert live.version == 2 and live.key_uri == uri2 and live.certificate == cert2
    assert not (ks.root / uri1.split(":", 1)[1]).exists(), "the commit is durable: the old key goes as usual"
    [line] = _stores(opened, 2)
    assert line["rekeyed"] is True and "sync_error" not in line


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
def test_failed_dir_and_audit_fsync_in_the_commit_wait_keep_the_old_key_and_say_why(ks, lab, err):
    """Both fsyncs of the joint wait fail (the directory's persistently): the version is live but not durable,
    so the superseded key stays; a certificate-store-unsynced line names the sync error, and the audit's own
    failure is raised."""
    uri1, cert1 = _issue(ks, lab)
    ks.store_certificate("dev", cert1, lab.domain(DOMAIN).chain, key_uri=uri1, domain=DOMAIN)
    uri2, cert2 = _issue(ks, lab)
    with Faults(Fault("fsync-dir", "keystore.json", err), Fault("fsync", "audit.log", err, times=1)):
        with pytest.raises(StorageError, match=f"audit.log: {os.strerror(err)}"):
            ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key_uri=uri2, domain=DOMAIN)
    assert not ks.durable
    opened = Keystore.open(ks.root)
    assert opened.check() == [] and opened.get("dev").version == 2 and opened.get("dev").key_uri == uri2
    assert (ks.root / uri1.split(":", 1)[1]).exists(), "not durable: a power cut could bring back the old index"
    [first] = _stores(opened, 2)
    [second] = _stores(opened, 2, UNSYNCED)
    assert "sync_error" not in first and os.strerror(err) in second["sync_error"]
    assert second["serial"] == first["serial"] and second["fingerprint"] == first["fingerprint"]


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
def test_a_failed_commit_sync_is_a_second_line_never_a_changed_first_one(ks, lab, err):
    """The certificate-store line is written before the directory fsync it joins, so it cannot say how that
    ended: it says what is known (stored, rekeyed), and a failed sync is a second, durable line of its own action
    (certificate-store-unsynced, so a reader counting stores counts one) naming the error for the same version,
    serial and fingerprint."""
    uri1, cert1 = _issue(ks, lab)
    ks.store_certificate("dev", cert1, lab.domain(DOMAIN).chain, key_uri=uri1, domain=DOMAIN)
    uri2, cert2 = _issue(ks, lab)
    with Fault("fsync-dir", "keystore.json", err):
        ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key_uri=uri2, domain=DOMAIN)
    opened = Keystore.open(ks.root)
    [first] = _stores(opened, 2)  # exactly one store line for the version
    [second] = _stores(opened, 2, UNSYNCED)
    assert first["rekeyed"] is True and "sync_error" not in first
    assert "may not survive a power cut" in second["sync_error"]
    assert {k: second[k] for k in ("name", "version", "serial", "fingerprint")} == \
        {k: first[k] for k in ("name", "version", "serial", "fingerprint")}
    assert [e["action"] for e in opened.audit_entries()][-2:] == ["certificate-store", UNSYNCED]
    uri3, cert3 = _issue(ks, lab)  # the next store syncs again: one line, as usual
    ks.store_certificate("dev", cert3, lab.domain(DOMAIN).chain, key_uri=uri3, domain=DOMAIN)
    opened = Keystore.open(ks.root)
    [third] = _stores(opened, 3)
    assert "sync_error" not in third and ks.durable and _stores(opened, 3, UNSYNCED) == []


def store_steps(ks, store, key_file=None) -> dict[str, set[str]]:
    """The fault-hook steps ``store`` makes for each ``STORE_STEPS`` target, by running it with a recording hook;
    for ".key" only those of ``key_file`` (the held key's file; the superseded key's destruction is not a write)."""
    seen: dict[str, set[str]] = {t: set() for t in STORE_STEPS}

    def hook(stage, path):
        for t in STORE_STEPS:
            if path.endswith(t) and (t != ".key" or path == str(key_file)):
                seen[t].add(stage)

    fsutil._FAULT_HOOK = hook
    try:
        store()
    finally:
        fsutil._FAULT_HOOK = None
    return seen


def test_the_store_matrix_lists_exactly_the_steps_a_store_makes(ks, lab):
    """The fault matrices below fail one step per target; each listed step must be one the code makes (a fault at a
    step that never fires would test nothing) and every step the code makes must be listed."""
    uri1, cert1 = _issue(ks, lab)
    ks.store_certificate("dev", cert1, lab.domain(DOMAIN).chain, key_uri=uri1, domain=DOMAIN)
    uri2, cert2 = _issue(ks, lab)
    seen = store_steps(ks, lambda: ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key_uri=uri2,
                                                        domain=DOMAIN))
    assert seen.pop(".key") == set()  # a key_uri store writes no key file
    assert seen == {t: set(STORE_STEPS[t]) for t in seen}
    held = ks.generate_held_key("p256")
    csr = build_csr(held.private_key, parse_subject("CN=dev"))
    cert3 = lab.issue(DOMAIN, csr.public_key(), csr.subject)
    seen = store_steps(ks, lambda: ks.store_certificate("dev", cert3, lab.domain(DOMAIN).chain, key=held,
                                                        domain=DOMAIN), key_file=ks.root / held.uri.partition(":")[2])
    assert seen == {t: set(STORE_STEPS[t]) for t in STORE_STEPS}


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize(("target", "stage"), store_matrix(["cert.pem", "chain.pem", "keystore.json"]))
def test_store_fault_matrix(ks, lab, stage, target, err):
    """Renewal with one write step failing: before the index replace nothing changes; after it (fsync-dir of
    the index) the new version is live. Every outcome leaves a keystore that opens and checks clean."""
    uri1, cert1 = _issue(ks, lab)
    ks.store_certificate("dev", cert1, lab.domain(DOMAIN).chain, key_uri=uri1, domain=DOMAIN)
    uri2, cert2 = _issue(ks, lab)
    check_store_fault(ks, stage, target, err, uri1, uri2,
                      lambda: ks.store_certificate("dev", cert2, lab.domain(DOMAIN).chain, key_uri=uri2, domain=DOMAIN))


def check_store_fault(ks, stage, target, err, uri1, uri2, store) -> bool:
    """Run ``store`` (a renewal of "dev" from key ``uri1`` to ``uri2``) with one write step failing: before the
    index replace nothing changes; after it (fsync-dir of the index) the new version is live. Every outcome leaves
    a keystore that opens and checks clean. Returns whether the renewal was committed."""
    before = snapshot(ks.root)
    committed = stage == "fsync-dir" and target == "keystore.json"
    with Fault(stage, target, err) as f:
        if committed:
            store()
        else:
            with pytest.raises(StorageError, match=os.strerror(err)):
                store()
    assert f.hits >= 1
    opened = Keystore.open(ks.root)
    assert opened.check() == []
    if committed:
        assert opened.get("dev").version == 2 and opened.get("dev").key_uri == uri2
    else:
        assert snapshot(ks.root) == before, "a failed write must leave the keystore exactly as it was"
        assert opened.get("dev").version == 1 and opened.get("dev").key_uri == uri1
    return committed


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("target", [".key", "keystore.json"])
def test_generate_key_fault_matrix(ks, lab, stage, target, err):
    """Key generation with one write step failing: no key and no record is left behind (or, when only the
    directory sync failed after both were in place, a complete pending key that can be discarded)."""
    before = snapshot(ks.root)
    with Fault(stage, target, err) as f:
        try:
            uri = ks.generate_key("p256")
        except StorageError as e:
            assert os.strerror(err) in str(e)
            uri = None
    assert f.hits >= 1
    opened = Keystore.open(ks.root)
    assert opened.check() == []
    if uri is None:
        assert opened.pending_keys() == []
        opened.gc()
        assert snapshot(ks.root) == before
    else:
        assert [k["uri"] for k in opened.pending_keys()] == [uri]
        assert build_csr(opened.private_key(uri), parse_subject("CN=x")).is_signature_valid
        opened.discard_key(uri)
        after = snapshot(ks.root)
        assert after.pop("audit.log") != before.pop("audit.log")  # generated and discarded: both recorded
        assert after == before


def test_secret_files_are_not_followed_through_symlinks(ks, tmp_path):
    """Secrets are opened with O_NOFOLLOW and checked on the opened descriptor: a key file replaced by a
    symlink (to a file with perfect permissions) is refused, not read."""
    uri = ks.generate_key("p256")
    key_path = ks.root / uri.split(":", 1)[1]
    elsewhere = tmp_path / "planted.key"
    elsewhere.write_bytes(key_path.read_bytes())
    os.chmod(elsewhere, 0o600)
    key_path.unlink()
    key_path.symlink_to(elsewhere)
    with pytest.raises(KeystorePermissionError, match="symbolic link"):
        Keystore.open(ks.root).private_key(uri)
    master = ks.root / "master.key"
    real = tmp_path / "master.copy"
    real.write_bytes(master.read_bytes())
    os.chmod(real, 0o400)
    os.chmod(master, 0o600)
    master.unlink()
    master.symlink_to(real)
    with pytest.raises(KeystorePermissionError, match="symbolic link"):
        Keystore.open(ks.root).private_key(uri)


def test_secure_delete_of_a_symlink_never_touches_its_target(tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    link = tmp_path / "link.key"
    link.symlink_to(target)
    fsutil.secure_delete(link)
    assert not link.exists() and not link.is_symlink() and target.read_bytes() == b"keep me"


def test_group_readable_secret_is_refused_naming_the_fix(ks):
    uri = ks.generate_key("p256")
    key_path = ks.root / uri.split(":", 1)[1]
    os.chmod(key_path, 0o640)
    with pytest.raises(KeystorePermissionError, match=f"chmod 600 {key_path}"):
        Keystore.open(ks.root).private_key(uri)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o640


def test_no_environment_switch_injects_faults(tmp_path):
    """DEVAGENT_FAULT was a live fault-injection switch in every installed devagent; it is gone."""
    import subprocess
    import sys

    code = ("import sys; from keystore import fsutil; assert fsutil._FAULT_HOOK is None; "
            "fsutil.atomic_write(sys.argv[1], b'data')")
    env = dict(os.environ, DEVAGENT_FAULT="write:EIO")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], env=env, check=True, timeout=60)
    assert (tmp_path / "f").read_bytes() == b"data"
