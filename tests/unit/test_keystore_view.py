"""The keystore's index lookups carried over a write of its own (``_View.after_write``) equal those built afresh
from the written document, after every kind of change a keystore makes: add, renew (replace in place), rekey
(retired key), delete, pending key discarded, trust anchor added."""
from __future__ import annotations

import pytest

from agent.lab.ca import LabCA
from keystore.csr import build_csr, parse_subject
from keystore.store import Keystore, _View

D = "plant"


def _fresh(doc):
    v = _View(doc)
    return v.creds(), v.keys(), sorted(v.retired()), {u: sorted(n) for u, n in v.key_users().items()}, v.trust()


def _carried(v):
    return v.creds(), v.keys(), sorted(v.retired()), {u: sorted(n) for u, n in v.key_users().items()}, v.trust()


@pytest.fixture
def ks(tmp_path):
    lab = LabCA.create(tmp_path / "lab", domains=(D,))
    ks = Keystore.init(tmp_path / "ks")
    ks.add_trust_anchors(D, [lab.domain(D).root_cert], source="test")
    yield ks, lab
    ks.close()


def _issue(ks, lab, name, uri=None):
    uri = uri or ks.generate_key("p256")
    csr = build_csr(ks.private_key(uri), parse_subject(f"CN={name}"), [])
    return uri, lab.issue_from_csr(D, csr)


def test_carried_lookups_equal_fresh_after_every_change(ks):
    ks, lab = ks
    chain = lab.domain(D).chain
    seen = 0

    def check():
        nonlocal seen
        view = ks._view()
        # build every lookup on the current view, so that the next write carries them over
        got = _carried(view)
        assert got == _fresh(view.doc)
        assert list(view.creds()) == list(_View(view.doc).creds())  # same order as a fresh build
        seen += 1

    check()
    for i in range(4):
        uri, cert = _issue(ks, lab, f"c{i}")
        ks.store_certificate(f"c{i}", cert, chain, key_uri=uri, domain=D)
        check()
    uri, cert = _issue(ks, lab, "c1", uri=ks.get("c1").key_uri)  # renew, same key
    ks.store_certificate("c1", cert, chain, key_uri=uri, domain=D)
    check()
    uri, cert = _issue(ks, lab, "c2")  # rekey: the old key is retired
    ks.store_certificate("c2", cert, chain, key_uri=uri, domain=D)
    check()
    ks.delete("c0", force=True)
    check()
    pending = ks.generate_key("p256")
    check()
    ks.discard_key(pending)
    check()
    ks.add_trust_anchors("other", [lab.domain(D).root_cert], source="test")
    check()
    assert seen == 11 and len(ks.list()) == 3
