"""Memory and log bounds of the device's CoAP server (``devagent serve``), independent of aiocoap.

Everything a request leaves behind in the server lives in one of these, each with a fixed capacity, so memory is
bounded under any request pattern (a flood, abandoned block-wise uploads, many source ports); docs/coap.md lists
the bounds and what happens when one is reached:

- ``ExpiringLru``: a mapping whose entries expire after a lifetime and whose least recently used entry is evicted
  when it is full. No timer per entry (aiocoap schedules one per received message): expiry is checked lazily,
  from the oldest end, on every insertion and lookup.
- ``DedupCache``: CoAP message deduplication (RFC 7252 §4.5) in two such tiers: one for answers that must not be
  lost (a 2.xx or empty answer to an unsafe method: executing the request again would change state again; every
  OSCORE exchange looks like that from outside), one for everything else (safe methods, error answers, exchanges
  still in progress). A flood of unauthenticated requests only gets error answers, so it can evict only the
  second tier, never an authenticated CLM's answer.
- ``LogSummary``: the first occurrence of each kind of event is logged; repeats within ``interval_s`` are counted
  and reported as one summary line (a flood of refused requests costs one line per interval, not one per request).

Pure: the clock is injected, so tests need no sleeping. Not thread safe (one event loop).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """Bounds of one device server. The defaults keep the server's memory growth under a flood to a few MB.

    dedup_entries: exchanges remembered for deduplication (safe methods, error answers, in progress).
    dedup_keep: answers to unsafe methods remembered for deduplication (the CLM's /csr and /verify, OSCORE).
    in_flight: requests being rendered at once; more are answered 5.03 + Max-Age at once.
    uploads: Block1 uploads being reassembled per resource (each at most the resource's size bound).
    block2_answers: answers kept per resource for a client fetching them block by block.
    log_interval_s: how often repeated refusals are summarised in the log.
    """

    dedup_entries: int = 2048
    dedup_keep: int = 256
    in_flight: int = 32
    uploads: int = 16
    block2_answers: int = 8
    log_interval_s: float = 60.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not v > 0:
                raise ValueError(f"serve limit {f.name} must be > 0, not {v!r}")


class ExpiringLru:
    """``capacity`` entries at most, each living ``lifetime_s`` (refreshed on access when ``refresh``)."""

    def __init__(self, capacity: int, lifetime_s: float, *, refresh: bool = False, clock=time.monotonic):
        if capacity < 1 or lifetime_s <= 0:
            raise ValueError("capacity must be >= 1 and lifetime > 0")
        self.capacity = int(capacity)
        self.lifetime_s = float(lifetime_s)
        self.refresh = refresh
        self._clock = clock
        self._items: OrderedDict = OrderedDict()  # key -> [expires_at, value]; oldest first
        self.evicted = 0  # entries dropped before their lifetime because the mapping was full

    def _expire(self, now: float) -> None:
        items = self._items
        while items:
            key, (expires, _) = next(iter(items.items()))
            if expires > now:
                break
            del items[key]

    def put(self, key, value, lifetime_s: float | None = None) -> None:
        now = self._clock()
        self._expire(now)
        items = self._items
        if key in items:
            del items[key]
        elif len(items) >= self.capacity:
            items.popitem(last=False)
            self.evicted += 1
        items[key] = [now + (self.lifetime_s if lifetime_s is None else lifetime_s), value]

    def get(self, key, default=None):
        entry = self._entry(key)
        return default if entry is None else entry[1]

    def _entry(self, key, touch: bool = True):
        now = self._clock()
        self._expire(now)
        entry = self._items.get(key)
        if entry is None or entry[0] <= now:
            return None
        if self.refresh and touch:
            entry[0] = now + self.lifetime_s
            self._items.move_to_end(key)
        return entry

    def set_value(self, key, value) -> bool:
        """Replace the value of a live entry, keeping its expiry; False when there is none."""
        entry = self._entry(key, touch=False)
        if entry is None:
            return False
        entry[1] = value
        return True

    def __getitem__(self, key):
        entry = self._entry(key)
        if entry is None:
            raise KeyError(key)
        return entry[1]

    def __setitem__(self, key, value) -> None:
        self.put(key, value)

    def pop(self, key, default=None):
        entry = self._items.pop(key, None)
        return default if entry is None or entry[0] <= self._clock() else entry[1]

    def expires_at(self, key) -> float | None:
        entry = self._items.get(key)
        return None if entry is None else entry[0]

    def __contains__(self, key) -> bool:
        return self._entry(key, touch=False) is not None

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._items)


_PENDING = object()  # an exchange seen whose answer is not known yet


class DedupCache:
    """Which (remote, message id) pairs were seen, and the answer sent to each, for resending to duplicates."""

    def __init__(self, entries: int, keep: int, *, clock=time.monotonic):
        self._clock = clock
        self.general = ExpiringLru(entries, 1.0, clock=clock)
        self.keep = ExpiringLru(keep, 1.0, clock=clock)
        self.duplicates = 0

    def seen(self, key, lifetime_s: float):
        """``(True, answer or None)`` for a duplicate; else remembers ``key`` for ``lifetime_s`` and returns
        ``(False, None)``."""
        for tier in (self.keep, self.general):
            if key in tier:
                self.duplicates += 1
                answer = tier.get(key)
                return True, None if answer is _PENDING else answer
        self.general.put(key, _PENDING, lifetime_s)
        return False, None

    def answered(self, key, answer, *, keep: bool) -> None:
        """Remember ``answer`` for a key seen before (a no-op for one never seen or already forgotten)."""
        if self.keep.set_value(key, answer):
            return
        expires = self.general.expires_at(key)
        if expires is None or key not in self.general:
            return
        if keep:
            self.general.pop(key)
            self.keep.put(key, answer, expires - self._clock())
        else:
            self.general.set_value(key, answer)

    @property
    def evicted(self) -> int:
        return self.general.evicted + self.keep.evicted

    def __len__(self) -> int:
        return len(self.general) + len(self.keep)


class LogSummary:
    """Log the first event of each kind; count repeats and report them once per ``interval_s``.

    ``note(key, level, msg, *args)`` logs ``msg % args`` unless an event with the same ``key`` was already logged
    or counted in the current or the previous interval; then it only counts. ``tick()`` (call it at least once per
    interval; ``note`` calls it too) ends the interval and logs one line with the counts, e.g. ``refused 9,214
    more request(s) in the last 60 s: 9,001 × POST /csr 5.03 rate-limited, 213 × POST /verify 4.00 ...``. The
    bookkeeping is one counter per kind seen in the last two intervals; keys must come from a bounded set (a
    resource path, a response code, a stable reason), never from the peer's bytes.
    """

    def __init__(self, logger: logging.Logger, what: str = "refused", unit: str = "request(s)", *,
                 interval_s: float = 60.0, clock=time.monotonic):
        self.log = logger
        self.what = what
        self.unit = unit
        self.interval_s = interval_s
        self._clock = clock
        self._start = clock()
        self._current: dict = {}  # key -> [repeats counted, level]
        self._previous: set = set()
        self.logged = 0
        self.suppressed = 0

    def note(self, key, level: int, msg: str, *args) -> None:
        if self.first(key, level):
            self.log.log(level, msg, *args)

    def first(self, key, level: int = logging.INFO) -> bool:
        """True when an event of kind ``key`` is to be logged now; else it is counted for the summary."""
        self.tick()
        entry = self._current.get(key)
        if entry is None and key not in self._previous:
            self._current[key] = [0, level]
            self.logged += 1
            return True
        if entry is None:
            entry = self._current[key] = [0, level]
        entry[0] += 1
        entry[1] = max(entry[1], level)
        self.suppressed += 1
        return False

    def tick(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._start < self.interval_s:
            return
        counted = [(n, key, level) for key, (n, level) in self._current.items() if n]
        if counted:
            counted.sort(key=lambda t: (-t[0], str(t[1])))
            total = sum(n for n, _, _ in counted)
            parts = ", ".join(f"{n:,} × {self._label(key)}" for n, key, _ in counted)
            self.log.log(max(level for _, _, level in counted), "%s %s more %s in the last %.0f s: %s",
                         self.what, f"{total:,}", self.unit, now - self._start, parts)
        self._previous = set(self._current)
        self._current = {}
        self._start = now

    @staticmethod
    def _label(key) -> str:
        return " ".join(str(k) for k in key) if isinstance(key, tuple) else str(key)
