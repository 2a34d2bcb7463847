"""The daemon names the local clock as the likely cause of a validity-period failure only with evidence: the CA's
time it saw (from the simulator's responses over the real lab CA), the notBefore of a certificate it holds, or a
clock that was never set; a failure for another reason gets no clock hint (issue #20)."""
from __future__ import annotations

import asyncio
import datetime

from enroll_clients.base import ProtectionError
from keystore.errors import VerificationError
from tests.scenario.conftest import utcnow


def _wrapped(reason: str) -> ProtectionError:
    try:
        try:
            raise VerificationError(reason, "CMP response signer certificate is not valid at the time checked")
        except VerificationError as inner:
            raise ProtectionError("the CA's response protection could not be verified") from inner
    except ProtectionError as e:
        return e


def test_clock_hint_needs_evidence(world):
    w = world(lifetime_s=3600)
    skew = datetime.timedelta(days=3)
    d = w.daemon(w.config("", **{"clock.trusted": True}), wall=lambda: utcnow() + skew)
    assert d._clock_hint(_wrapped("expired")) is None  # no CA time seen yet, clock after 2024: no evidence
    asyncio.run(d.run(once=True))  # one pass: the CA check teaches the daemon the CA's time
    hint = d._clock_hint(_wrapped("expired"))
    assert hint and "likely cause" in hint and "3 days ahead of the CA's time" in hint
    assert d._clock_hint(ProtectionError("wrong MAC in the CA's response")) is None
    assert d._clock_hint(_wrapped("untrusted")) is None
    # a board whose clock was never set: the reading itself is the evidence
    d = w.daemon(w.config(""), wall=lambda: datetime.datetime(1970, 1, 2, tzinfo=datetime.timezone.utc))
    hint = d._clock_hint(ProtectionError("TLS to https://est: certificate is not yet valid"))
    assert hint and "never set" in hint
