"""A key the index no longer references is destroyed only when no process can still be using it (issue 20, item 1).

Two ``Keystore`` objects on one directory stand for two processes: every lock here is an ``flock`` on a file each
object opened itself, which conflicts between open files exactly as between processes (tests/fault and
tests/component run the same with real processes).
"""
from __future__ import annotations

import asyncio
import os

import pytest

from agent import lifecycle
from enroll_clients.est.transport import TlsConfig, make_ssl_context
from keystore.csr import build_csr, parse_subject
from keystore.errors import KeyGoneError
from keystore.store import Keystore
from tests.conftest import DOMAIN


def _renew(ks, lab, name="dev"):
    uri = ks.generate_key("p256")
    csr = build_csr(ks.private_key(uri), parse_subject(f"CN={name}"))
    cert = lab.issue(DOMAIN, csr.public_key(), csr.subject)
    return ks.store_certificate(name, cert, lab.domain(DOMAIN).chain, key_uri=uri, domain=DOMAIN)


def _file(ks, uri):
    return ks.root / uri.split(":", 1)[1]


def test_a_held_key_is_retired_not_destroyed_and_goes_when_released(ks, lab):
    v1 = _renew(ks, lab)
    ks.close()  # the enrolling process has ended
    user = Keystore.open(ks.root)  # e.g. an EST request authenticating with the LDevID
    auth = lifecycle.auth_for(user, user.get("dev"))
    renewer = Keystore.open(ks.root)
    v2 = _renew(renewer, lab)
    assert v2.version == 2
    assert _file(ks, v1.key_uri).exists(), "the renewal must not destroy a key another process is using"
    assert renewer.key_record(v1.key_uri)["state"] == "retired"
    # The user's TLS stack can still load it, by the path the keystore gave.
    make_ssl_context(TlsConfig(trust_anchors=(lab.domain(DOMAIN).root_cert,), client_certificate=v1.certificate,
                               client_chain=v1.chain, key_file=auth.key_file, key_password=auth.key_password))
    assert build_csr(auth.private_key, parse_subject("CN=dev")).is_signature_valid
    user.release_key(v1.key_uri)
    assert not _file(ks, v1.key_uri).exists(), "the last holder's release destroys a retired key"
    assert Keystore.open(ks.root).check() == []


def test_a_killed_holder_pins_nothing(ks, lab):
    v1 = _renew(ks, lab)
    ks.close()
    user = Keystore.open(ks.root)
    user.hold_key(v1.key_uri)
    _renew(Keystore.open(ks.root), lab)
    assert _file(ks, v1.key_uri).exists()
    user.close()  # what the kernel does to a killed process's flocks
    removed = Keystore.open(ks.root).gc()
    assert f"retired key {v1.key_uri}" in removed and not _file(ks, v1.key_uri).exists()
    assert Keystore.open(ks.root).key_record(v1.key_uri) is None


def test_the_next_commit_destroys_what_was_retired(ks, lab):
    v1 = _renew(ks, lab)
    ks.close()
    user = Keystore.open(ks.root)
    user.hold_key(v1.key_uri)
    renewer = Keystore.open(ks.root)
    _renew(renewer, lab)
    user.close()
    v3 = _renew(renewer, lab)  # commits reap retired keys nobody holds
    assert not _file(ks, v1.key_uri).exists()
    assert {k["state"] for k in (renewer.key_record(u) or {"state": "gone"} for u in (v1.key_uri,))} == {"gone"}
    assert renewer.get("dev").version == v3.version == 3


def test_credential_renewed_and_key_destroyed_before_we_hold_it_is_read_again(ks, lab):
    v1 = _renew(ks, lab)
    ks.close()
    stale_reader = Keystore.open(ks.root)
    stale = stale_reader.get("dev")  # read, not yet holding the key
    v2 = _renew(Keystore.open(ks.root), lab)  # nobody held v1's key: destroyed at once
    assert not _file(ks, v1.key_uri).exists()
    with pytest.raises(KeyGoneError, match="renewed or deleted"):
        stale_reader.hold_key(stale.key_uri)
    auth, held, cred = lifecycle._auth(stale_reader, stale)  # what every flow uses: one retry, new version
    assert cred.version == v2.version and auth.certificate == v2.certificate
    held.release()


def test_credential_renewed_and_its_key_forgotten_by_the_index_before_we_hold_it_is_read_again(ks, lab):
    """The CI race (test_n_processes_on_one_keystore[soft-N10]: "private key file:keys/<id>.key is missing" in a
    request): the LDevID read by a request, then renewed by another process that destroyed the old key, and a
    later write of the index dropped every trace of that key (its record and its meta.destroying entry) before the
    request held it. The hold must not take it for a key that is merely not recorded yet."""
    v1 = _renew(ks, lab)
    ks.close()
    stale_reader = Keystore.open(ks.root)
    stale = stale_reader.get("dev")
    renewer = Keystore.open(ks.root)
    v2 = _renew(renewer, lab)  # destroyed at once, named in meta.destroying until the next write
    renewer.set_meta("dev", touched=True)  # any later write (another command's commit or gc) forgets it
    assert not _file(ks, v1.key_uri).exists() and stale_reader.key_record(v1.key_uri) is None
    assert v1.key_uri not in (stale_reader.meta().get("destroying") or ())
    auth, held, cred = lifecycle._auth(stale_reader, stale)  # what every flow uses: one retry, new version
    assert cred.version == v2.version and auth.certificate == v2.certificate
    held.release()
    with pytest.raises(KeyGoneError, match=r"\(dev\) was renewed or deleted"):
        stale_reader.hold_key(stale.key_uri, credential="dev")
    # The same when the credential is checked by `keystore check` from a stale read: its new version is checked.
    assert stale_reader.check() == []


def test_a_key_not_recorded_yet_is_used_without_a_hold(ks):
    """``--key-uri`` of a key the index does not name yet (its first certificate not stored): no lock, no error."""
    be = ks.backend("soft")
    uri = be.generate("p256", "external")
    ks.hold_key(uri)
    assert ks.private_key(uri) is not None and not ks._locks.held(uri)


def test_deleting_a_credential_whose_key_is_held_retires_the_key(ks, lab):
    v1 = _renew(ks, lab)
    ks.close()
    user = Keystore.open(ks.root)
    user.hold_key(v1.key_uri)
    Keystore.open(ks.root).delete("dev")
    assert _file(ks, v1.key_uri).exists() and not (ks.root / "creds" / "dev").exists()
    user.release_key(v1.key_uri)
    assert not _file(ks, v1.key_uri).exists()
    opened = Keystore.open(ks.root)
    opened.gc()
    assert opened.key_record(v1.key_uri) is None and list((ks.root / "locks").iterdir()) == []


def test_renewal_in_one_process_destroys_its_own_old_key_at_once(ks, lab):
    """The common case: one process renews, holding the old key for the exchange; it releases it before the
    commit, so the commit destroys it (no retired record left for later)."""
    _renew(ks, lab)
    old = ks.get("dev")

    class Renewer:
        protocol = "sim"

        async def renew(self, req, auth):
            from enroll_clients.base import EnrollResult

            assert ks._locks.in_use(old.key_uri), "the exchange runs with the old key held"
            cert = lab.issue(DOMAIN, req.csr.public_key(), req.csr.subject)
            return EnrollResult(cert, tuple(lab.domain(DOMAIN).chain), ())

    new = asyncio.run(lifecycle.renew(ks, "dev", client=Renewer()))
    assert new.version == 2 and not _file(ks, old.key_uri).exists()
    assert ks.key_record(old.key_uri) is None or ks.key_record(old.key_uri)["state"] == "retired"
    ks.set_meta("dev", touched=True)  # any next write drops the destroyed key's record
    assert Keystore.open(ks.root).key_record(old.key_uri) is None


def test_discarding_a_pending_key_leaves_no_lock_file(ks):
    uri = ks.generate_key("p256")
    lock_files = list((ks.root / "locks").iterdir())
    assert len(lock_files) == 1
    ks.discard_key(uri)
    assert list((ks.root / "locks").iterdir()) == [] and ks.key_record(uri) is None
    assert not _file(ks, uri).exists()


def test_keystores_from_before_lock_files_still_work(ks, lab):
    v1 = _renew(ks, lab)
    ks.close()
    for p in (ks.root / "locks").iterdir():
        os.unlink(p)
    os.rmdir(ks.root / "locks")
    user = Keystore.open(ks.root)
    user.hold_key(v1.key_uri)  # creates the missing lock file under the keystore lock
    _renew(Keystore.open(ks.root), lab)
    assert _file(ks, v1.key_uri).exists()
    user.release_key(v1.key_uri)
    assert not _file(ks, v1.key_uri).exists()


def test_a_keystore_object_dropped_without_close_holds_nothing(ks, lab):
    """Like a process's exit: a Keystore that goes out of use releases its holds and its open files (no cycles keep
    it alive), so long-running callers that open keystores repeatedly pin no keys and leak no descriptors."""
    v1 = _renew(ks, lab)
    ks.close()
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        user = Keystore.open(ks.root)
        user.private_key(v1.key_uri)
        user.check()
        del user
    assert len(os.listdir("/proc/self/fd")) <= fds
    _renew(Keystore.open(ks.root), lab)
    assert not _file(ks, v1.key_uri).exists(), "nobody holds the old key any more: destroyed at once"


def test_deleting_a_credential_destroys_its_key_even_if_this_process_holds_it(ks, lab):
    """An explicit delete is this process's decision: its own holds (a ClientAuth it built) do not keep the key,
    other processes' do."""
    from agent import lifecycle

    v1 = _renew(ks, lab)
    lifecycle.auth_for(ks, ks.get("dev"))  # held explicitly by this Keystore object
    ks.delete("dev")
    assert not _file(ks, v1.key_uri).exists()


def test_with_block_closes_the_keystore_when_it_raises(ks, lab):
    """``with Keystore.open(root) as ks:`` closes the keystore however the block ends: on an exception the error
    propagates and the holds on keys are released, so another process's renewal destroys the superseded key at once
    instead of retiring it (a keystore left open would keep its hold until the process exits)."""
    v1 = _renew(ks, lab)
    ks.close()
    with pytest.raises(RuntimeError, match="in the block"):
        with Keystore.open(ks.root) as user:
            assert isinstance(user, Keystore)
            user.private_key(v1.key_uri)  # holds the key from now on, until close
            raise RuntimeError("in the block")
    renewer = Keystore.open(ks.root)
    try:
        _renew(renewer, lab)
        assert not _file(ks, v1.key_uri).exists(), "closed on the exception: nobody holds the old key any more"
        assert renewer.key_record(v1.key_uri) is None
    finally:
        renewer.close()


def test_with_block_closes_the_keystore_when_it_ends(ks, lab):
    """The same on a normal end of the block: ``__exit__`` closes, the holds are gone."""
    v1 = _renew(ks, lab)
    ks.close()
    with Keystore.open(ks.root) as user:
        user.hold_key(v1.key_uri)
    renewer = Keystore.open(ks.root)
    try:
        _renew(renewer, lab)
        assert not _file(ks, v1.key_uri).exists()
    finally:
        renewer.close()
