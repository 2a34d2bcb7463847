"""Releasing an OSCORE context (coap_services.security.release_oscore_contexts): the lock goes, and a context
loaded again never reuses a sequence number (nonce), with or without the write-back of the exact number."""
from __future__ import annotations

import json

from aiocoap.oscore import FilesystemSecurityContext

from coap_services.security import provision, release_oscore_contexts


def _clm_context(tmp_path):
    provision("dev1", tmp_path / "dev", tmp_path / "clm", methods=("oscore",))
    return str(tmp_path / "clm" / "contexts" / "dev1" / "oscore") + "/"


def test_released_context_is_unlocked_and_never_reuses_a_sequence_number(tmp_path):
    d = _clm_context(tmp_path)
    used: list[int] = []
    for _ in range(5):  # a CLM renewing one device five times: load, two requests, release
        ctx = FilesystemSecurityContext(d)
        used += [ctx.new_sequence_number(), ctx.new_sequence_number()]
        stored = json.loads((tmp_path / "clm/contexts/dev1/oscore/sequence.json").read_text())
        assert stored["next-to-send"] > max(used)  # persisted before use (aiocoap), kept on release
        release_oscore_contexts({"coap://127.0.0.1/*": ctx})
        assert ctx.lockfile is None
        assert not (tmp_path / "clm/contexts/dev1/oscore/lock").exists()
    assert len(set(used)) == len(used)
    again = FilesystemSecurityContext(d)
    assert again.sender_sequence_number > max(used)
    release_oscore_contexts({"": again})


def test_unused_context_releases_without_writing(tmp_path):
    d = _clm_context(tmp_path)
    ctx = FilesystemSecurityContext(d)
    release_oscore_contexts({"": ctx})
    assert ctx.lockfile is None
    assert FilesystemSecurityContext(d).sender_sequence_number == 0


def test_context_with_an_unpersisted_replay_window_is_written_back(tmp_path):
    d = _clm_context(tmp_path)
    ctx = FilesystemSecurityContext(d)
    n = ctx.new_sequence_number()
    ctx.recipient_replay_window.strike_out(0)  # a request from the peer was accepted (server side)
    assert ctx.replay_window_persisted is False
    release_oscore_contexts({"": ctx})
    stored = json.loads((tmp_path / "clm/contexts/dev1/oscore/sequence.json").read_text())
    assert stored["next-to-send"] == n + 1 and stored["received"] != "unknown"  # aiocoap's exact write-back
    again = FilesystemSecurityContext(d)
    assert again.sender_sequence_number == n + 1 and not again.recipient_replay_window.is_valid(0)
