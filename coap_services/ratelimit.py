"""Token bucket for the expensive /csr resource (key generation is the costliest thing a board does).

Pure: the clock is injected, so tests need no sleeping.
"""
from __future__ import annotations

import math
import time


class TokenBucket:
    """``burst`` requests at once, refilled at ``rate_per_s``. ``take()`` returns 0.0 when allowed, else the
    seconds until the next token (what the device sends as Max-Age with 5.03)."""

    def __init__(self, rate_per_s: float, burst: int, clock=time.monotonic):
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate_per_s = float(rate_per_s)
        self.burst = int(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate_per_s)
        self._last = now

    def take(self) -> float:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s

    @staticmethod
    def max_age(wait_s: float) -> int:
        return max(1, int(math.ceil(wait_s)))
