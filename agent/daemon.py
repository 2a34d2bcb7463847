"""The lifecycle daemon behind ``devagent run``: renew every managed credential before it expires, deploy it, and
report.

The loop (``run``) schedules; the work runs in one asyncio task per credential and one per domain's CA check, so a
slow or hung CA delays only the credentials it serves: ``tick`` starts a task for each credential whose next check
is due (``agent.policy`` decides renewals and retries with capped exponential backoff), each task renews
(``agent.lifecycle.renew``) and deploys (``agent.hooks``) its credential, checks for new CA certificates
(``agent.lifecycle.ca_update``) and records when it is next due; the loop wakes when a task ends, when the next one
is due, or on SIGTERM. Concurrency is bounded: at most ``renewal.parallel`` attempts talk to CAs at once, and one at
a time per server (a CA sees one request from this device at a time; a hung CA holds only its own slot). Every
attempt is bounded in time twice: per request by the remembered ``--timeout``, and in all by
``renewal.attempt_timeout_s``; either counts as a failed attempt (``last_error``, ``failures_total``).

State lives in the keystore only (``Keystore.set_meta``): ``next_renewal`` + ``schedule_for`` (the certificate
fingerprint the schedule belongs to), ``failures``, ``failures_total``, ``last_error``, ``last_success``,
``deployed`` (fingerprint last deployed), ``deploy_failures_total``, ``deploy_retry_at``, ``renewing`` (the attempt
in progress: started, server, step, attempt n of about m before expiry, gives-up-at, daemon pid; removed when it
ends) and ``clock`` (CA time minus the local clock when they disagree, as last seen). ``devagent status`` and the
Prometheus textfile show all of it.

Invariants:
- The current certificate stays live and deployed until a new one is verified and committed by the keystore; a
  failed renewal changes only bookkeeping.
- A start after a crash (``recover``) rolls back an interrupted renewal (discards its pending key; the keystore's
  atomic commit means the old or the new version is live, never a mix), clears its ``renewing`` mark, collects
  garbage files, and redeploys when the deployed fingerprint is not the live one (an interrupted deployment
  resumes).
- Time: with ``clock.trusted = false`` the CA's time (CMP messageTime, HTTP Date) corrects a clock that is
  obviously wrong; certificates are checked and scheduled in that corrected time, and the correction is logged.
  Certificates are checked at ``reading()``: the estimate with its uncertainty (resolution of the CA's time, round
  trip, drift; the notBefore floor up to an hour), widened only in estimate mode, strict with a trusted clock. A
  failure on a validity period ("not yet valid", "expired", also in EST's TLS) says when the local clock is the
  likely cause (``agent.policy.clock_hint``).
- One credential's failure (or hang) never stops or delays the others; the loop itself only ends on SIGTERM/SIGINT
  (or ``once``), giving attempts in progress ``STOP_GRACE_S`` to finish.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib
import logging
import os
import random
import signal
import socket
import time
from typing import Callable

from agent import hooks, metrics, policy
from agent.config import Config, CredentialPolicy
from enroll_clients.base import (
    CaCertsResult, CertRequest, ClientAuth, EnrollError, EnrollmentClient, EnrollResult, TransportError,
)
from keystore.certs import fingerprint
from keystore.errors import KeystoreError, NotFoundError

log = logging.getLogger("devagent.daemon")
MIN_SLEEP_S = 0.05
STOP_GRACE_S = 5.0  # on SIGTERM, attempts in progress get this long to finish before they are cancelled
# While a CA stays unreachable its check fails every retry_base_s; warn on the first failure and when the error
# changes, then at most this often (with the count), so a long outage does not flood the journal.
CA_DOWN_WARN_INTERVAL_S = 900.0


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _iso(t: datetime.datetime) -> str:
    return t.isoformat()


def _parse(s: str | None) -> datetime.datetime | None:
    if not s:
        return None
    try:
        t = datetime.datetime.fromisoformat(s)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


# ---- sd_notify ---------------------------------------------------------------------------------------
class Notifier:
    """systemd's notify protocol over $NOTIFY_SOCKET (a datagram to a Unix socket; '@' = abstract namespace).
    Without the variable (no systemd, or Type=simple) every call is a no-op."""

    def __init__(self, env=None, enabled: bool = True):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "") if enabled else ""
        self.address = ("\0" + addr[1:]) if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 else None

    def notify(self, **fields) -> bool:
        if not self.address:
            return False
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall(msg)
            return True
        except OSError as e:
            log.debug("sd_notify to %s failed: %s", self.address, e)
            return False


# ---- a client wrapper that learns the CA's time ---------------------------------------------------------
class _TimeObservingClient(EnrollmentClient):
    """Delegates to the real client and feeds every ``server_time`` it sees into the daemon's clock estimate."""

    def __init__(self, inner: EnrollmentClient, observe: Callable[..., None], mono: Callable[[], float]):
        self.inner = inner
        self.protocol = inner.protocol
        self._observe = observe
        self._mono = mono

    async def _seen(self, call):
        # The server stamped its time somewhere within this call: its duration bounds the round trip.
        t0 = self._mono()
        res = await call
        if getattr(res, "server_time", None) is not None:
            self._observe(res.server_time, f"{self.protocol or 'CA'} response time",
                          round_trip_s=max(0.0, self._mono() - t0))
        return res

    async def enroll(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        return await self._seen(self.inner.enroll(request, auth))

    async def request(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        return await self._seen(self.inner.request(request, auth))

    async def renew(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        return await self._seen(self.inner.renew(request, auth))

    async def revoke(self, certificate, auth: ClientAuth, reason: str) -> None:
        await self.inner.revoke(certificate, auth, reason)

    async def ca_certs(self, auth: ClientAuth | None = None, **kw) -> CaCertsResult:
        return await self._seen(self.inner.ca_certs(auth, **kw))  # CMP: old_root= (rootCaCert)


class Daemon:
    """Args:
        ks: an open Keystore.
        config: the effective Config.
        client_factory: credential -> EnrollmentClient (default ``agent.lifecycle.client_for_credential``).
        ops: object with ``renew`` and ``ca_update`` (default the ``agent.lifecycle`` module).
        wall: the system clock (UTC datetimes); mono: monotonic seconds; rng: for jitter.
    """

    def __init__(self, ks, config: Config, *, client_factory=None, ops=None, wall=utcnow, mono=time.monotonic,
                 rng: random.Random | None = None, notifier: Notifier | None = None,
                 ca_warn_interval_s: float = CA_DOWN_WARN_INTERVAL_S):
        self.ks = ks
        self.cfg = config
        self._ops = ops
        self._client_factory = client_factory
        self.wall = wall
        self.mono = mono
        self.rng = rng or random.Random()
        self.notifier = notifier or Notifier(enabled=config.notify)
        self.clock = policy.ClockEstimate()
        self._cert_floor: tuple[datetime.datetime, float] | None = None  # (newest notBefore, monotonic when seen)
        self._floor_warned = False
        self._ca_next: dict[str, float] = {}  # domain -> monotonic time of the next CA check
        self._clock_warned = False
        self._stop: asyncio.Event | None = None
        self.ca_warn_interval_s = ca_warn_interval_s
        # domain -> {"count", "since" (wall ISO), "kind" (error class), "warned" (mono)} while its CA check fails
        self._ca_failing: dict[str, dict] = {}
        self._ca_seen: tuple[datetime.datetime, float, str] | None = None  # last CA time: (its time, mono, source)
        # Concurrency (made per event loop by _prepare): one task per credential ("cred:NAME") and per domain's
        # CA check ("ca:DOMAIN"); when each credential is next due (monotonic).
        self._loop = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._due: dict[str, float] = {}
        self._server_locks: dict[str, asyncio.Lock] = {}
        self._slots: asyncio.Semaphore | None = None
        self._wake: asyncio.Event | None = None
        self.in_flight: dict[str, dict] = {}  # credential -> the attempt in progress (as stored in meta "renewing")

    # ---- collaborators ---------------------------------------------------------------------------
    @property
    def ops(self):
        if self._ops is None:
            self._ops = importlib.import_module("agent.lifecycle")
        return self._ops

    def _client(self, cred) -> EnrollmentClient:
        if self._client_factory is not None:
            inner = self._client_factory(cred)
        else:
            # CMP checks its response signer (and, with a trusted clock, messageTime) at the daemon's time.
            inner = self.ops.client_for_credential(self.ks, cred, {"clock_trusted": self.cfg.clock_trusted,
                                                                   "now": self.reading})
        return _TimeObservingClient(inner, self._observe_time, self.mono)

    # ---- time --------------------------------------------------------------------------------------
    def now(self) -> datetime.datetime:
        """Best estimate of the true time (system clock, corrected by CA time when it is obviously wrong).

        A clock before ``policy.CLOCK_FLOOR`` that no CA time has corrected (EST sends none) is raised to the newest
        notBefore of our certificates plus the time elapsed since we saw it: the true time is at least that, so
        renewals still fall due (late rather than never), and each renewal's fresh notBefore sharpens the estimate.
        """
        t = self.clock.now(self.wall())
        if t < policy.CLOCK_FLOOR and not self.cfg.clock_trusted and self._cert_floor is not None:
            nb, seen_mono = self._cert_floor
            est = nb + datetime.timedelta(seconds=max(0.0, self.mono() - seen_mono))
            if est > t:
                if not self._floor_warned:
                    log.warning("system clock reads %s (never set?) and no CA time is known: assuming it is at least "
                                "%s, the newest notBefore of our certificates; fix NTP/RTC", _iso(t), _iso(est))
                    self._floor_warned = True
                return est
        return t

    def _note_not_before(self, creds) -> None:
        newest = max((c.not_before for c in creds), default=None)
        if newest is not None and (self._cert_floor is None or newest > self._cert_floor[0]):
            self._cert_floor = (newest, self.mono())

    def reading(self):
        """The time to check certificates at (``keystore.validator.ClockReading``): ``now()`` with how far it may be
        off and how it was obtained (docs/trust.md "The time to check at").

        - ``clock.trusted = true``: the system clock, trusted (strict checks).
        - CA time seen (CMP messageTime, HTTP Date): when the system clock was obviously wrong, the CA's time
          carried forward, uncertain by its resolution + the round trip that carried it + drift since; when the
          system clock agreed with it, the system clock, uncertain by that disagreement besides.
        - no CA time, clock never set, a certificate seen: ``policy.floor_window`` of the newest notBefore plus
          the time since (the true time is at least that, and CAs backdate notBefore by up to an hour).
        - no CA time, clock never set, nothing seen: no usable clock ("only after 2024").
        - no CA time yet, a plausible system clock: the system clock, uncertain by ``clock.tolerance_s`` (the
          error the configuration accepts from it before CA time replaces it).
        """
        from keystore.validator import ClockReading

        wall = self.wall()
        if self.cfg.clock_trusted:
            return ClockReading(wall, "trusted", 0.0, "system clock (clock.trusted = true)")
        now = self.now()
        if self._ca_seen is not None:
            ca_t, seen_mono, src, rtt = self._ca_seen
            age = max(0.0, self.mono() - seen_mono)
            u = policy.ca_time_uncertainty(rtt, age)
            if self.clock.offset_s:
                return ClockReading(now, "estimate", u, f"the CA's time ({src}) seen {age:.0f} s ago, carried "
                                    f"forward; the system clock reads {_iso(wall)}")
            off = abs((ca_t + datetime.timedelta(seconds=age) - wall).total_seconds())
            return ClockReading(now, "estimate", u + off, f"system clock, {off:.0f} s from the CA's time ({src}) "
                                f"seen {age:.0f} s ago")
        if now > wall:  # raised to the certificate floor (see now())
            nb, seen_mono = self._cert_floor
            age = max(0.0, self.mono() - seen_mono)
            at, u = policy.floor_window(now, age)
            return ClockReading(at, "estimate", u, f"no CA time and the system clock reads {_iso(wall)}: at least "
                                f"{_iso(now)} (the newest notBefore of our certificates + {age:.0f} s uptime), and "
                                f"CAs backdate notBefore by up to {policy.NOT_BEFORE_SLACK_S:.0f} s")
        if wall < policy.CLOCK_FLOOR:
            return ClockReading.unknown(source=f"no CA time and the system clock reads {_iso(wall)} (never set): "
                                        f"only after {_iso(policy.CLOCK_FLOOR)} is known")
        return ClockReading(wall, "estimate", self.cfg.clock_tolerance_s,
                            "system clock, not yet compared with the CA's time (clock.trusted = false; up to "
                            "clock.tolerance_s off)")

    def _observe_time(self, server_time: datetime.datetime, source: str, round_trip_s: float = 0.0) -> None:
        if server_time.tzinfo is None:
            server_time = server_time.replace(tzinfo=datetime.timezone.utc)
        local = self.wall()
        new = policy.observe_server_time(self.clock, local, server_time, self.mono(), source=source,
                                         trusted_clock=self.cfg.clock_trusted, tolerance_s=self.cfg.clock_tolerance_s)
        if new.offset_s and (not self._clock_warned or abs(new.offset_s - self.clock.offset_s) > self.cfg.clock_tolerance_s):
            log.warning("system clock reads %s but the CA's %s says %s (off by %+.0f s): using CA time to check "
                        "and schedule certificates; fix NTP/RTC", _iso(local), source, _iso(server_time), new.offset_s)
            self._clock_warned = True
        elif self.clock.offset_s and not new.offset_s:
            log.info("system clock agrees with the CA again; using it")
            self._clock_warned = False
        self.clock = new
        self._ca_seen = (server_time, self.mono(), source, round_trip_s)

    def ca_time(self) -> tuple[datetime.datetime, str] | None:
        """The CA's time now as last seen (its time plus the monotonic time since), and where it came from."""
        if self._ca_seen is None:
            return None
        t, seen_mono, source, _rtt = self._ca_seen
        return t + datetime.timedelta(seconds=max(0.0, self.mono() - seen_mono)), source

    def _clock_meta(self) -> dict | None:
        """``{"offset_s", "seen", "source"}`` when the CA's time and the local clock disagree, else None."""
        ca = self.ca_time()
        if ca is None:
            return None
        off = (ca[0] - self.wall()).total_seconds()
        if abs(off) <= self.cfg.clock_tolerance_s:
            return None
        return {"offset_s": round(off, 1), "seen": _iso(self._ca_seen[0]), "source": ca[1]}

    def _checked_meta(self, reading) -> dict | None:
        """meta ``checked_at``: the estimated time the last attempt checked certificates at (None when trusted)."""
        return None if reading is None or reading.trusted else reading.record()

    def _clock_hint(self, e: BaseException) -> str | None:
        """``policy.clock_hint`` for a failure on a validity period (keystore VerificationError reason, or an
        enrollment error flagged ``validity`` such as EST's TLS), else None."""
        validity, cur = None, e
        while cur is not None and validity is None:  # the error, or what it wraps (a VerificationError's reason)
            v = getattr(cur, "validity", None) or getattr(cur, "reason", None)
            validity = v if v in policy.VALIDITY_REASONS else None
            cur = cur.__cause__ or cur.__context__
        if validity is None:
            text = str(e).lower()
            validity = ("not-yet-valid" if "not yet valid" in text or "is not valid before" in text else
                        "expired" if "has expired" in text or "certificate expired" in text or " expired at " in text
                        else None)
        if validity is None:
            return None
        ca = self.ca_time()
        floor = None
        if self._cert_floor is not None:
            nb, seen = self._cert_floor
            floor = nb + datetime.timedelta(seconds=max(0.0, self.mono() - seen))
        return policy.clock_hint(validity, self.wall(), ca_now=ca[0] if ca else None,
                                 ca_source=f"the CA's time ({ca[1]})" if ca else "the CA's time", valid_since=floor,
                                 tolerance_s=self.cfg.clock_tolerance_s)


    # ---- bookkeeping -------------------------------------------------------------------------------
    def managed(self) -> list:
        """Credentials the daemon renews: not IDevIDs, enrolled over a protocol, not disabled in the config."""
        out = []
        for c in self.ks.list():
            if c.kind == "idevid" or not c.record.get("protocol"):
                continue
            if not self.cfg.policy_for(c.name).enabled:
                continue
            if (c.record.get("meta") or {}).get("revoked"):
                continue  # revoked: neither renewed nor deployed (status shows it as REVOKED)
            out.append(c)
        return out

    async def _meta(self, name: str, **fields) -> None:
        await asyncio.to_thread(self.ks.set_meta, name, **fields)

    def _policy(self, name: str) -> CredentialPolicy:
        return self.cfg.policy_for(name)

    def _schedule(self, cred, pol: CredentialPolicy) -> datetime.datetime:
        return policy.renewal_time(cred.not_before, cred.not_after,
                                   fraction=pol.fraction or self.cfg.renewal.fraction,
                                   jitter=min(self.cfg.renewal.jitter, (pol.fraction or self.cfg.renewal.fraction) / 2),
                                   u=self.rng.random())

    @staticmethod
    def server_of(cred) -> str:
        """The server a credential is renewed at (the unit of "one at a time per server")."""
        return str(cred.record.get("server") or (cred.record.get("meta") or {}).get("enroll", {}).get("server")
                   or f"domain {cred.domain or cred.name}")

    # ---- start-up recovery ---------------------------------------------------------------------------
    async def recover(self) -> dict:
        """Roll back interrupted renewals and collect garbage; deployments are reconciled by ``tick``.

        Returns what was done (for the log and tests).
        """
        from keystore import owner

        removed = await asyncio.to_thread(self.ks.gc)  # discards pending keys whose owner is gone, or too old
        discarded = []
        names = {c.name for c in self.ks.list()}
        for k in self.ks.pending_keys():
            pf = k.get("pending_for") or {}
            target = pf.get("name") or pf.get("credential")
            if owner.alive(k.get("owner")):
                continue  # another running devagent's enrollment in progress: not ours to roll back
            if pf.get("op") == "renew" or target in names:
                await asyncio.to_thread(self.ks.discard_key, k["uri"])
                discarded.append(k["uri"])
        interrupted = []
        for c in self.ks.list():
            if (c.record.get("meta") or {}).get("renewing"):
                await self._meta(c.name, renewing=None)  # that attempt died with the previous daemon
                interrupted.append(c.name)
        for pol in self.cfg.credentials:
            removed += await asyncio.to_thread(hooks.remove_temp_files, pol)
        if removed or discarded or interrupted:
            self.ks.audit("renewal-recover", garbage=removed, discarded_pending=discarded, interrupted=interrupted)
            log.warning("recovered from an interrupted run: removed %d stray file(s), discarded %d pending key(s)%s",
                        len(removed), len(discarded),
                        f", renewal(s) of {', '.join(interrupted)} interrupted" if interrupted else "")
        return {"garbage": removed, "discarded": discarded, "interrupted": interrupted}

    # ---- scheduling ----------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Make the concurrency primitives for the running event loop (``tick`` may be called from several
        ``asyncio.run`` in tests; tasks of a finished loop are gone)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._tasks = {}
            self._server_locks = {}
            self._slots = asyncio.Semaphore(self.cfg.renewal.parallel)
            self._wake = asyncio.Event()

    def _busy(self, key: str) -> bool:
        t = self._tasks.get(key)
        return t is not None and not t.done()

    def _spawn(self, key: str, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"devagent-{key}")
        self._tasks[key] = task

        def done(t: asyncio.Task) -> None:
            if self._tasks.get(key) is t:
                del self._tasks[key]
            if self._wake is not None:
                self._wake.set()

        task.add_done_callback(done)
        return task

    @contextlib.asynccontextmanager
    async def _server_slot(self, server: str):
        """One attempt at a time per server, at most ``renewal.parallel`` in all; waiting for a busy server does
        not hold one of the shared slots."""
        lock = self._server_locks.setdefault(server, asyncio.Lock())
        async with lock, self._slots:
            yield

    async def tick(self, *, wait: bool = True) -> float:
        """Start a task for every credential and CA check that is due and not already running; with ``wait``
        (``run(once=True)``, tests) wait for them. Returns seconds until something idle is next due."""
        self._prepare()
        creds = self.managed()
        self._note_not_before(creds)
        started = []
        now = self.mono()
        for domain in sorted({c.domain for c in creds if c.domain}):
            key = f"ca:{domain}"
            if not self._busy(key) and now >= self._ca_next.get(domain, 0.0):
                cred = next(c for c in creds if c.domain == domain)
                started.append(self._spawn(key, self._ca_task(domain, cred)))
        for cred in creds:
            key = f"cred:{cred.name}"
            if not self._busy(key) and now >= self._due.get(cred.name, 0.0):
                started.append(self._spawn(key, self._service_task(cred)))
        if wait and started:
            await asyncio.gather(*started, return_exceptions=True)
        self._write_metrics()
        return self._next_wait(creds)

    def _next_wait(self, creds) -> float:
        waits = [self.cfg.renewal.check_interval_s]
        now = self.mono()
        for domain in {c.domain for c in creds if c.domain}:
            if not self._busy(f"ca:{domain}"):
                waits.append(self._ca_next.get(domain, 0.0) - now)
        for cred in creds:
            if not self._busy(f"cred:{cred.name}"):
                waits.append(self._due.get(cred.name, 0.0) - now)
        return max(MIN_SLEEP_S, min(waits))

    async def _ca_task(self, domain: str, cred) -> None:
        try:
            try:
                async with asyncio.timeout(self.cfg.renewal.attempt_timeout_s), self._server_slot(self.server_of(cred)):
                    if self.mono() < self._ca_next.get(domain, 0.0):
                        return  # a renewal's own CA check ran while this one waited for the server
                    await self._ca_check(domain, cred)
            except TimeoutError:
                raise TransportError(f"{self.server_of(cred)}: no answer to the CA certificate request within "
                                     f"{self.cfg.renewal.attempt_timeout_s:g} s (renewal.attempt_timeout_s)") from None
        except Exception as e:  # a broken client must not stop the loop; renewals report it per credential
            if domain not in self._ca_failing:
                log.exception("domain %s: CA certificate check failed", domain)
            self._ca_check_failed(domain, e)
            self._ca_next[domain] = self.mono() + self.cfg.renewal.retry_base_s

    async def _service_task(self, cred) -> None:
        try:
            wait = await self._service(cred)
        except NotFoundError:
            self._due.pop(cred.name, None)  # deleted meanwhile (decommission)
            return
        except Exception as e:  # one credential's bug must not stop the others
            log.exception("credential %s: unexpected error", cred.name)
            with contextlib.suppress(Exception):
                await self._meta(cred.name, last_error=f"{_iso(self.now())}: internal error: {e}", renewing=None)
            wait = self.cfg.renewal.retry_base_s
        self._due[cred.name] = self.mono() + max(MIN_SLEEP_S, min(wait, self.cfg.renewal.check_interval_s))

    async def _ca_check(self, domain: str, cred, client: EnrollmentClient | None = None) -> None:
        """Ask the CA for its certificates (rollover; also teaches us its time). Transport errors propagate only
        when ``client`` is given (a renewal is about to use it: the CA is down, count it as a failed renewal)."""
        propagate = client is not None
        try:
            client = client or self._client(cred)
            added = await self.ops.ca_update(self.ks, domain, client=client,
                                             ca_fingerprint=self.cfg.ca_fingerprint or None, now=self.reading)
            self._ca_next[domain] = self.mono() + self.cfg.renewal.ca_check_interval_s
            if added:
                log.info("domain %s: new CA certificate(s) accepted: %s", domain, ", ".join(added))
            self._ca_check_ok(domain)
        except (EnrollError, KeystoreError) as e:
            self._ca_next[domain] = self.mono() + self.cfg.renewal.retry_base_s
            self._ca_check_failed(domain, e)
            if propagate and isinstance(e, TransportError):
                raise

    def _ca_check_failed(self, domain: str, e: Exception) -> None:
        """Log a failed CA check: a warning on the first failure and whenever the kind of error changes, then at
        most every ``ca_warn_interval_s`` with the count so far; the checks in between go to debug."""
        kind = type(e).__name__
        st = self._ca_failing.get(domain)
        now = self.mono()
        if st is None or st["kind"] != kind:
            if st is not None:
                log.warning("domain %s: CA certificate check now fails differently (%d failure(s) since %s): %s",
                            domain, st["count"], st["since"], e)
            else:
                log.warning("domain %s: CA certificate check failed: %s; retrying every %g s (further failures are "
                            "reported at most every %g s)", domain, e, self.cfg.renewal.retry_base_s,
                            self.ca_warn_interval_s)
            self._ca_failing[domain] = {"count": (st or {}).get("count", 0) + 1, "kind": kind, "warned": now,
                                        "since": (st or {}).get("since") or _iso(self.now())}
            return
        st["count"] += 1
        if now - st["warned"] >= self.ca_warn_interval_s:
            log.warning("domain %s: CA certificate check still failing: %d failure(s) since %s; last: %s",
                        domain, st["count"], st["since"], e)
            st["warned"] = now
        else:
            log.debug("domain %s: CA certificate check failed again (%d): %s", domain, st["count"], e)

    def _ca_check_ok(self, domain: str) -> None:
        st = self._ca_failing.pop(domain, None)
        if st is not None:
            log.info("domain %s: CA reachable again after %d failed check(s) since %s", domain, st["count"],
                        st["since"])

    async def _service(self, cred) -> float:
        pol = self._policy(cred.name)
        m = cred.record.get("meta") or {}
        fp = fingerprint(cred.certificate)
        due = _parse(m.get("next_renewal")) if m.get("schedule_for") == fp else None
        if due is None:
            # A certificate we have not scheduled yet: first start, or a renewal committed just before a crash
            # (or by 'devagent renew'); either way any earlier failure streak is over.
            due = self._schedule(cred, pol)
            await self._meta(cred.name, next_renewal=_iso(due), schedule_for=fp,
                             **({"failures": 0} if m.get("failures") else {}))
        now = self.now()
        if (pol.deploy or pol.hooks) and m.get("deployed") != fp:
            retry_at = _parse(m.get("deploy_retry_at"))
            if retry_at is None or now >= retry_at:
                await self._deploy(cred, pol, "deploy" if m.get("deployed") is None else "redeploy")
        if now >= due:
            await self._renew(cred, pol)
            cred = self.ks.get(cred.name)
            m = cred.record.get("meta") or {}
            due = _parse(m.get("next_renewal")) or self.now()
        out = (due - self.now()).total_seconds()
        m = self.ks.get(cred.name).record.get("meta") or {}
        retry_at = _parse(m.get("deploy_retry_at"))
        if retry_at is not None and m.get("deployed") != fingerprint(cred.certificate):
            out = min(out, (retry_at - self.now()).total_seconds())
        return out

    async def _renew(self, cred, pol: CredentialPolicy) -> None:
        """One renewal attempt, visible while it runs (meta ``renewing``, metrics), bounded by
        ``renewal.attempt_timeout_s`` from the moment it is due (waiting for a busy server counts)."""
        name = cred.name
        server = self.server_of(cred)
        r = self.cfg.renewal
        rekey = r.rekey if pol.rekey is None else pol.rekey
        m = cred.record.get("meta") or {}
        failures = int(m.get("failures", 0))
        started = self.now()
        lock = self._server_locks.get(server)
        busy = (lock is not None and lock.locked()) or self._slots.locked()
        attempt = {"started": _iso(started), "server": server, "attempt": failures + 1,
                   "of": policy.attempts_before_expiry(started, failures, cred.not_after, base_s=r.retry_base_s,
                                                       cap_s=r.retry_cap_s),
                   "step": "waiting" if busy else ("ca-check" if cred.domain else "request"),
                   "gives_up_at": _iso(started + datetime.timedelta(seconds=r.attempt_timeout_s)),
                   "pid": os.getpid()}
        self.in_flight[name] = attempt
        await self._meta(name, renewing=attempt)
        self._write_metrics()
        log.info("credential %s: renewing at %s (attempt %d of about %d before it expires %s, rekey=%s)%s", name,
                 server, attempt["attempt"], attempt["of"], _iso(cred.not_after), rekey,
                 "; waiting for another request to that server to end" if busy else "")

        async def step(what: str) -> None:
            if attempt["step"] != what:
                attempt["step"] = what
                await self._meta(name, renewing=attempt)
                self._write_metrics()

        new = None
        try:
            try:
                async with asyncio.timeout(r.attempt_timeout_s), self._server_slot(server):
                    if fingerprint(self.ks.get(name).certificate) != fingerprint(cred.certificate):
                        log.info("credential %s: renewed meanwhile by another process; nothing to do", name)
                    else:
                        client = self._client(cred)
                        if cred.domain:
                            await step("ca-check")
                            await self._ca_check(cred.domain, cred, client)
                        await step("request")
                        # Checked at the daemon's time as it is after the exchange (with this response's CA time).
                        new = await self.ops.renew(self.ks, name, client=client, rekey=rekey, now=self.reading)
                        self._note_not_before([new])  # at once: the clock estimate without CA time leans on it
            except TimeoutError:
                what = {"waiting": f"waiting for another request to {server} to end",
                        "ca-check": f"{server} did not answer the CA certificate request in time",
                        "request": f"{server} did not answer the renewal request in time"}.get(attempt["step"], "")
                raise _AttemptTimeout(f"renewal attempt did not finish within {r.attempt_timeout_s:g} s "
                                      f"(renewal.attempt_timeout_s; step {attempt['step']}: {what})") from None
        except (EnrollError, KeystoreError, OSError, _AttemptTimeout) as e:
            failures += 1
            now = self.now()
            retry = policy.next_retry(now, failures, cred.not_after, base_s=r.retry_base_s, cap_s=r.retry_cap_s,
                                      u=self.rng.random())
            left = (cred.not_after - now).total_seconds()
            hint = self._clock_hint(e)
            err = f"{e}; {hint}" if hint else str(e)
            log.warning("credential %s: renewal failed (%d in a row): %s; %s; retrying at %s", name, failures, err,
                        f"current certificate valid for {left:.0f} s more" if left > 0 else "CURRENT CERTIFICATE EXPIRED",
                        _iso(retry))
            if isinstance(e, _AttemptTimeout):
                await asyncio.to_thread(self._discard_pending, name)
            await self._meta(name, failures=failures, failures_total=int(m.get("failures_total", 0)) + 1,
                             last_error=f"{_iso(now)}: {err}", last_attempt=_iso(now), next_renewal=_iso(retry),
                             schedule_for=fingerprint(cred.certificate), renewing=None, clock=self._clock_meta(),
                             checked_at=self._checked_meta(self.reading()))
            return
        finally:
            self.in_flight.pop(name, None)
            if new is None:
                self._write_metrics()
        if new is None:  # renewed by someone else while this attempt waited for the server
            await self._meta(name, renewing=None)
            return
        now = self.now()
        nxt = self._schedule(new, pol)
        checked = self._checked_meta(self.reading())
        await self._meta(name, failures=0, last_success=_iso(now), last_attempt=_iso(now), last_error=None,
                         next_renewal=_iso(nxt), schedule_for=fingerprint(new.certificate), deploy_retry_at=None,
                         renewing=None, clock=self._clock_meta(), checked_at=checked)
        self._write_metrics()
        log.info("credential %s: renewed, version %d, valid from %s until %s, next renewal %s%s", name, new.version,
                 _iso(new.not_before), _iso(new.not_after), _iso(nxt),
                 f"; validity checked at the estimated time {checked['at']} +- {checked['uncertainty_s']:.0f} s "
                 f"({checked['source']})" if checked else "")
        if pol.deploy or pol.hooks:
            await self._deploy(self.ks.get(name), pol, "renewed")

    def _discard_pending(self, name: str) -> None:
        """After an attempt was cut off: a key generated for it in a worker thread that finished after the cut."""
        for k in self.ks.pending_keys():
            pf = k.get("pending_for") or {}
            if pf.get("op") == "renew" and pf.get("name") == name:
                with contextlib.suppress(KeystoreError):
                    self.ks.discard_key(k["uri"])

    async def _deploy(self, cred, pol: CredentialPolicy, event: str) -> bool:
        m = cred.record.get("meta") or {}
        try:
            await hooks.deploy(self.ks, cred, pol, timeout_s=self.cfg.hooks_timeout_s, event=event)
        except (hooks.DeployError, KeystoreError, OSError) as e:
            n = int(m.get("deploy_failures", 0)) + 1
            retry = policy.next_retry(self.now(), n, cred.not_after, base_s=self.cfg.renewal.retry_base_s,
                                      cap_s=self.cfg.renewal.retry_cap_s, u=self.rng.random())
            log.error("credential %s: deployment failed: %s; retrying at %s", cred.name, e, _iso(retry))
            await self._meta(cred.name, deploy_failures=n,
                             deploy_failures_total=int(m.get("deploy_failures_total", 0)) + 1,
                             last_error=f"{_iso(self.now())}: deploy: {e}", deploy_retry_at=_iso(retry))
            return False
        stale = " deploy: " in (m.get("last_error") or "")
        await self._meta(cred.name, deployed=fingerprint(cred.certificate), deploy_failures=0, deploy_retry_at=None,
                         **({"last_error": None} if stale else {}))
        log.info("credential %s: deployed (%s)", cred.name, event)
        return True

    def _write_metrics(self) -> None:
        if not self.cfg.metrics_textfile:
            return
        try:
            now = self.now()
            text = metrics.render(self.ks.list(), now, clock_offset_s=(now - self.wall()).total_seconds(),
                                  in_flight=self.in_flight)
            metrics.write(self.cfg.metrics_textfile, text)
        except KeystoreError as e:
            log.warning("metrics textfile %s not written: %s", self.cfg.metrics_textfile, e)

    # ---- the loop --------------------------------------------------------------------------------------------
    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def run(self, *, once: bool = False) -> int:
        """Recover, then tick until stopped (SIGTERM/SIGINT or ``stop()``); with ``once`` a single pass that waits
        for every attempt it starts.

        Returns the process exit status (0; 1 when a managed credential has expired)."""
        self._stop = asyncio.Event()
        self._prepare()
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop)
                installed.append(sig)
        try:
            await self.recover()
            self.notifier.notify(ready=1, status="checking credentials")
            while True:
                self._wake.clear()
                wait = await self.tick(wait=once)
                if self.notifier.watchdog_s:
                    self.notifier.notify(watchdog=1)
                    wait = min(wait, self.notifier.watchdog_s / 2)
                self.notifier.notify(status=self._status_line(wait))
                if once:
                    break
                stop, wake = loop.create_task(self._stop.wait()), loop.create_task(self._wake.wait())
                try:
                    await asyncio.wait((stop, wake), timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                    wake.cancel()
                if self._stop.is_set():
                    break
        finally:
            self.notifier.notify(stopping=1, status="stopping")
            await self._finish_tasks()
            for sig in installed:
                loop.remove_signal_handler(sig)
        expired = [c.name for c in self.managed() if c.not_after <= self.now()]
        if expired:
            log.error("expired credential(s): %s", ", ".join(expired))
        return 1 if expired else 0

    async def _finish_tasks(self) -> None:
        """Give tasks in progress ``STOP_GRACE_S`` to finish, then cancel them (a cancelled renewal discards its
        pending key; the keystore's commit is never cut in half) and clear their in-progress marks."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
        if not pending:
            return
        cut = sorted(self.in_flight)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        log.warning("stopping: cut off %d task(s) still waiting for a CA%s", len(pending),
                    f" (renewal of {', '.join(cut)}: retried at the next start)" if cut else "")
        for name in cut:
            with contextlib.suppress(KeystoreError):
                self.ks.set_meta(name, renewing=None)
        self._write_metrics()

    def _status_line(self, wait: float) -> str:
        creds = self.managed()
        failing = sum(1 for c in creds if (c.record.get("meta") or {}).get("failures"))
        busy = f", renewing {', '.join(sorted(self.in_flight))}" if self.in_flight else ""
        return f"{len(creds)} credential(s), {failing} failing{busy}, next check in {wait:.0f} s"


class _AttemptTimeout(Exception):
    """A renewal attempt exceeded ``renewal.attempt_timeout_s``."""
