"""The lifecycle daemon behind ``devagent run``: renew every managed credential before it expires, deploy it, and
report.

One asyncio task loops: ``tick`` looks at each credential, renews the due ones (``agent.lifecycle.renew``), retries
failures with capped exponential backoff, checks the CA for new CA certificates (``agent.lifecycle.ca_update``),
deploys and runs hooks (``agent.hooks``), writes the Prometheus textfile, then sleeps until the next event or
SIGTERM. Scheduling rules are the pure functions of ``agent.policy``.

State lives in the keystore only (``Keystore.set_meta``): ``next_renewal`` + ``schedule_for`` (the certificate
fingerprint the schedule belongs to), ``failures``, ``failures_total``, ``last_error``, ``last_success``,
``deployed`` (fingerprint last deployed), ``deploy_failures_total``, ``deploy_retry_at``.

Invariants:
- The current certificate stays live and deployed until a new one is verified and committed by the keystore; a
  failed renewal changes only bookkeeping.
- A start after a crash (``recover``) rolls back an interrupted renewal (discards its pending key; the keystore's
  atomic commit means the old or the new version is live, never a mix), collects garbage files, and redeploys when
  the deployed fingerprint is not the live one (an interrupted deployment resumes).
- Time: with ``clock.trusted = false`` the CA's time (CMP messageTime, HTTP Date) corrects a clock that is
  obviously wrong; certificates are checked and scheduled in that corrected time, and the correction is logged.
- One credential's failure never stops the others; the loop itself only ends on SIGTERM/SIGINT (or ``once``).
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

    def __init__(self, inner: EnrollmentClient, observe: Callable[[datetime.datetime, str], None]):
        self.inner = inner
        self.protocol = inner.protocol
        self._observe = observe

    def _seen(self, res):
        if getattr(res, "server_time", None) is not None:
            self._observe(res.server_time, f"{self.protocol or 'CA'} response time")
        return res

    async def enroll(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        return self._seen(await self.inner.enroll(request, auth))

    async def request(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        return self._seen(await self.inner.request(request, auth))

    async def renew(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        return self._seen(await self.inner.renew(request, auth))

    async def revoke(self, certificate, auth: ClientAuth, reason: str) -> None:
        await self.inner.revoke(certificate, auth, reason)

    async def ca_certs(self, auth: ClientAuth | None = None, **kw) -> CaCertsResult:
        return self._seen(await self.inner.ca_certs(auth, **kw))  # CMP: old_root= (rootCaCert)


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
            inner = self.ops.client_for_credential(self.ks, cred, {})
        return _TimeObservingClient(inner, self._observe_time)

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

    def _observe_time(self, server_time: datetime.datetime, source: str) -> None:
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

    # ---- start-up recovery ---------------------------------------------------------------------------
    async def recover(self) -> dict:
        """Roll back interrupted renewals and collect garbage; deployments are reconciled by ``tick``.

        Returns what was done (for the log and tests).
        """
        removed = await asyncio.to_thread(self.ks.gc)
        discarded = []
        names = {c.name for c in self.ks.list()}
        for k in self.ks.pending_keys():
            pf = k.get("pending_for") or {}
            target = pf.get("name") or pf.get("credential")
            if pf.get("op") == "renew" or target in names:
                await asyncio.to_thread(self.ks.discard_key, k["uri"])
                discarded.append(k["uri"])
        for pol in self.cfg.credentials:
            removed += await asyncio.to_thread(hooks.remove_temp_files, pol)
        if removed or discarded:
            self.ks.audit("renewal-recover", garbage=removed, discarded_pending=discarded)
            log.warning("recovered from an interrupted run: removed %d stray file(s), discarded %d pending key(s)",
                        len(removed), len(discarded))
        return {"garbage": removed, "discarded": discarded}

    # ---- one pass ------------------------------------------------------------------------------------------
    async def tick(self) -> float:
        """Service every managed credential once. Returns seconds until something is next due."""
        waits = [self.cfg.renewal.check_interval_s]
        creds = self.managed()
        self._note_not_before(creds)
        for domain in sorted({c.domain for c in creds if c.domain}):
            if self.mono() >= self._ca_next.get(domain, 0.0):
                cred = next(c for c in creds if c.domain == domain)
                try:
                    await self._ca_check(domain, cred)
                except Exception as e:  # a broken client must not stop the loop; renewals report it per credential
                    if domain not in self._ca_failing:
                        log.exception("domain %s: CA certificate check failed", domain)
                    self._ca_check_failed(domain, e)
                    self._ca_next[domain] = self.mono() + self.cfg.renewal.retry_base_s
            waits.append(self._ca_next[domain] - self.mono())
        for cred in creds:
            try:
                waits.append(await self._service(cred))
            except NotFoundError:
                continue  # deleted meanwhile (decommission)
            except Exception as e:  # one credential's bug must not stop the others
                log.exception("credential %s: unexpected error", cred.name)
                with contextlib.suppress(Exception):
                    await self._meta(cred.name, last_error=f"{_iso(self.now())}: internal error: {e}")
                waits.append(self.cfg.renewal.retry_base_s)
        self._write_metrics()
        return max(MIN_SLEEP_S, min(waits))

    async def _ca_check(self, domain: str, cred, client: EnrollmentClient | None = None) -> None:
        """Ask the CA for its certificates (rollover; also teaches us its time). Transport errors propagate only
        when ``client`` is given (a renewal is about to use it: the CA is down, count it as a failed renewal)."""
        propagate = client is not None
        try:
            client = client or self._client(cred)
            added = await self.ops.ca_update(self.ks, domain, client=client,
                                             ca_fingerprint=self.cfg.ca_fingerprint or None)
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
        name = cred.name
        m = cred.record.get("meta") or {}
        rekey = self.cfg.renewal.rekey if pol.rekey is None else pol.rekey
        client = self._client(cred)
        log.info("credential %s: renewing (expires %s, rekey=%s)", name, _iso(cred.not_after), rekey)
        try:
            if cred.domain:
                await self._ca_check(cred.domain, cred, client)
            new = await self.ops.renew(self.ks, name, client=client, rekey=rekey, now=self.now())
        except (EnrollError, KeystoreError, OSError) as e:
            failures = int(m.get("failures", 0)) + 1
            now = self.now()
            retry = policy.next_retry(now, failures, cred.not_after, base_s=self.cfg.renewal.retry_base_s,
                                      cap_s=self.cfg.renewal.retry_cap_s, u=self.rng.random())
            left = (cred.not_after - now).total_seconds()
            log.warning("credential %s: renewal failed (%d in a row): %s; %s; retrying at %s", name, failures, e,
                        f"current certificate valid for {left:.0f} s more" if left > 0 else "CURRENT CERTIFICATE EXPIRED",
                        _iso(retry))
            await self._meta(name, failures=failures, failures_total=int(m.get("failures_total", 0)) + 1,
                             last_error=f"{_iso(now)}: {e}", last_attempt=_iso(now), next_renewal=_iso(retry),
                             schedule_for=fingerprint(cred.certificate))
            return
        now = self.now()
        self._note_not_before([new])
        nxt = self._schedule(new, pol)
        await self._meta(name, failures=0, last_success=_iso(now), last_attempt=_iso(now), last_error=None,
                         next_renewal=_iso(nxt), schedule_for=fingerprint(new.certificate), deploy_retry_at=None)
        log.info("credential %s: renewed, version %d, valid until %s, next renewal %s", name, new.version,
                 _iso(new.not_after), _iso(nxt))
        if pol.deploy or pol.hooks:
            await self._deploy(self.ks.get(name), pol, "renewed")

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
            text = metrics.render(self.ks.list(), now, clock_offset_s=(now - self.wall()).total_seconds())
            metrics.write(self.cfg.metrics_textfile, text)
        except KeystoreError as e:
            log.warning("metrics textfile %s not written: %s", self.cfg.metrics_textfile, e)

    # ---- the loop --------------------------------------------------------------------------------------------
    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def run(self, *, once: bool = False) -> int:
        """Recover, then tick until stopped (SIGTERM/SIGINT or ``stop()``); with ``once`` a single pass.

        Returns the process exit status (0; 1 when a managed credential has expired)."""
        self._stop = asyncio.Event()
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
                wait = await self.tick()
                if self.notifier.watchdog_s:
                    self.notifier.notify(watchdog=1)
                    wait = min(wait, self.notifier.watchdog_s / 2)
                self.notifier.notify(status=self._status_line(wait))
                if once:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=wait)
                if self._stop.is_set():
                    break
        finally:
            self.notifier.notify(stopping=1, status="stopping")
            for sig in installed:
                loop.remove_signal_handler(sig)
        expired = [c.name for c in self.managed() if c.not_after <= self.now()]
        if expired:
            log.error("expired credential(s): %s", ", ".join(expired))
        return 1 if expired else 0

    def _status_line(self, wait: float) -> str:
        creds = self.managed()
        failing = sum(1 for c in creds if (c.record.get("meta") or {}).get("failures"))
        return f"{len(creds)} credential(s), {failing} failing, next check in {wait:.0f} s"
