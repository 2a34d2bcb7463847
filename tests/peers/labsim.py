"""Simulator transport: an ``EnrollmentClient`` over an in-process LabCA, for scenario and fault tests.

It implements the production interface (enroll_clients.base.EnrollmentClient), so the daemon code under test is
the code that runs on a device; only the network is replaced. Knobs a test turns:

- ``fail_next(n)`` / ``down = True``: the CA is unreachable (TransportError) for n calls / until cleared;
- ``rollover()``: the lab CA replaces root and issuing CA and publishes newWithOld/oldWithNew links;
- ``clock_offset_s``: the CA's clock (messageTime / HTTP Date it reports) differs from real time.

Certificates are issued for the public key in the CSR (proof of possession checked) or in
``CertRequest.private_key``; ``renew`` requires ``auth.certificate`` to be one this CA (either generation) issued
and not revoked. The lab CA backdates by a minute; certificates living seconds need a small backdate, so the
simulator shifts ``not_before`` to ``backdate_s`` before now (the lab CA itself is unchanged).

Run as a program (``python -m tests.peers.labsim DAEMON-ARGS``) it is the child process of tests/fault: the real
daemon against a keystore and this simulator, optionally killed (SIGKILL) at the N-th durable write.
"""
from __future__ import annotations

import asyncio
import datetime

from cryptography import x509

from agent.lab.ca import BACKDATE_S, LabCA
from enroll_clients.base import (
    CaCertsResult, CertRequest, ClientAuth, EnrollmentClient, EnrollResult, ProtocolError, ServerError,
    TransportError,
)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class LabSimClient(EnrollmentClient):
    protocol = "sim"

    def __init__(self, ca: LabCA, domain: str = "plant", *, lifetime_s: float = 3600, backdate_s: int = 1,
                 profile: str = "ldevid", clock_offset_s: float = 0.0, latency_s: float = 0.0):
        self.ca = ca
        self.domain = domain
        self.lifetime_s = lifetime_s
        self.backdate_s = backdate_s
        self.profile = profile
        self.clock_offset_s = clock_offset_s
        self.latency_s = latency_s
        self.down = False
        self._fail = 0
        self.calls: list[str] = []
        self.issued: list[x509.Certificate] = []

    # ---- knobs ------------------------------------------------------------------------------------
    def fail_next(self, n: int) -> None:
        self._fail = n

    def rollover(self):
        return self.ca.rollover(self.domain)

    def server_time(self) -> datetime.datetime:
        return _now() + datetime.timedelta(seconds=self.clock_offset_s)

    # ---- transport behaviour ----------------------------------------------------------------------
    async def _exchange(self, op: str) -> None:
        self.calls.append(op)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.down or self._fail > 0:
            self._fail = max(0, self._fail - 1)
            raise TransportError(f"POST labsim://{self.domain}/{op}: connection refused (simulated CA outage)")

    def _issue(self, request: CertRequest) -> EnrollResult:
        if request.csr is not None:
            if not request.csr.is_signature_valid:
                raise ProtocolError("CSR signature does not verify")
            pub, subject = request.csr.public_key(), request.csr.subject
            try:
                sans = tuple(request.csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
            except x509.ExtensionNotFound:
                sans = ()
        elif request.private_key is not None:
            pub, subject, sans = request.private_key.public_key(), request.subject, request.sans
        else:
            raise ProtocolError("request carries neither a CSR nor a key")
        now = self.server_time().replace(microsecond=0)
        # LabCA.issue sets notBefore = not_before - BACKDATE_S and notAfter = not_before + lifetime.
        nb = now - datetime.timedelta(seconds=self.backdate_s)
        cert = self.ca.issue(self.domain, pub, subject, sans, request.profile or self.profile,
                             lifetime_s=int(round(self.lifetime_s + self.backdate_s - BACKDATE_S)),
                             not_before=nb + datetime.timedelta(seconds=BACKDATE_S))
        self.issued.append(cert)
        dom = self.ca.domain(self.domain)
        return EnrollResult(cert, tuple(dom.chain), tuple(dom.chain), server_time=self.server_time())

    def _check_ours(self, cert: x509.Certificate | None) -> None:
        if cert is None:
            raise ServerError("renewal needs the current certificate for authentication", status=401)
        dom = self.ca.domain(self.domain)
        issuers = [dom.ca_cert]
        old = self.ca.dir / self.domain / "old" / "ca.pem"
        if old.exists():
            issuers.append(x509.load_pem_x509_certificate(old.read_bytes()))
        for ca in issuers:
            try:
                cert.verify_directly_issued_by(ca)
                break
            except Exception:
                continue
        else:
            raise ServerError("client certificate not issued by this CA", status=403, fail_info=("badRequest",))
        if self.ca.is_revoked(cert.serial_number):
            raise ServerError("client certificate revoked", status=403, fail_info=("certRevoked",))

    async def enroll(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        await self._exchange("enroll")
        return self._issue(request)

    async def request(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        await self._exchange("request")
        self._check_ours(auth.certificate)
        return self._issue(request)

    async def renew(self, request: CertRequest, auth: ClientAuth) -> EnrollResult:
        await self._exchange("renew")
        self._check_ours(auth.certificate)
        return self._issue(request)

    async def revoke(self, certificate: x509.Certificate, auth: ClientAuth, reason: str) -> None:
        await self._exchange("revoke")
        self._check_ours(certificate)
        self.ca.revoke(certificate.serial_number, reason)

    async def ca_certs(self, auth: ClientAuth | None = None) -> CaCertsResult:
        await self._exchange("ca_certs")
        dom = self.ca.domain(self.domain)
        return CaCertsResult(tuple(dom.chain), new_root=dom.root_cert if dom.new_with_old else None,
                             new_with_old=dom.new_with_old, old_with_new=dom.old_with_new,
                             server_time=self.server_time())


# ---- child process for tests/fault -----------------------------------------------------------------
def main(argv=None) -> int:
    """``python -m tests.peers.labsim --state DIR --lab DIR --config FILE [--kill-at N] [--once]``"""
    import argparse
    import os
    import signal

    from agent.config import load_config
    from agent.daemon import Daemon
    from keystore import fsutil
    from keystore.store import Keystore

    ap = argparse.ArgumentParser()
    ap.add_argument("--state", required=True)
    ap.add_argument("--lab", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--lifetime", type=float, default=4)
    ap.add_argument("--kill-at", type=int, default=0, help="SIGKILL ourselves at the N-th durable write step")
    ap.add_argument("--trace", help="append each write step (stage path) to this file")
    ap.add_argument("--once", action="store_true")
    args = ap.parse_args(argv)
    count = 0

    def hook(stage, path):
        nonlocal count
        count += 1
        if args.trace:
            with open(args.trace, "a") as f:
                f.write(f"{count} {stage} {path}\n")
        if count == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    fsutil._FAULT_HOOK = hook  # the documented fault-injection point of keystore.fsutil
    cfg = load_config({"keystore.path": args.state}, env={}, config_path=args.config)
    ks = Keystore.open(cfg.keystore_path)
    client = LabSimClient(LabCA(args.lab), lifetime_s=args.lifetime)
    d = Daemon(ks, cfg, client_factory=lambda cred: client)
    return asyncio.run(d.run(once=args.once))


if __name__ == "__main__":
    raise SystemExit(main())
