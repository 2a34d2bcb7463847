"""Reusable CoAP peers for tests: a device service (in-process on its own event-loop thread, or a real
``devagent serve`` subprocess) on loopback with a temp keystore, provisioned OSCORE + DTLS-PSK contexts and the
lab CA's 'plant' root as trust anchor; plus helpers to talk to it.

Import what you use: ``from tests.peers.coap import DeviceThread, device_env, serve_process, coap_call, ...``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from keystore.store import Keystore

DOMAIN = "plant"
ROOT = Path(__file__).resolve().parents[2]
LIBCOAP_HINT = "apt-get install -y libcoap3-bin (provides coap-client-openssl and coap-client-gnutls)"


def require_tool(name: str, hint: str = LIBCOAP_HINT) -> str:
    """Path of a peer tool; a missing one FAILS the test (real peers are never skipped)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is required for this test and is not installed: {hint}")
    return path


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A UDP port P such that P and P+1 are free (CoAP on P, DTLS on P+1)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            p = s.getsockname()[1]
        if p >= 65534:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                a.bind((host, p))
                b.bind((host, p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free UDP port pair on loopback")


@dataclasses.dataclass
class DeviceEnv:
    """A device state directory (keystore + coap/ contexts) and the CLM directory with the other halves."""

    device_id: str
    state: Path
    clm_dir: Path

    @property
    def context(self) -> Path:
        return self.clm_dir / "contexts" / self.device_id

    def keystore(self) -> Keystore:
        return Keystore.open(self.state)


def device_env(base: Path, lab, device_id: str = "dev1", *, clm_dir: Path | None = None,
               trust: bool = True) -> DeviceEnv:
    from coap_services.security import provision

    state = base / device_id
    ks = Keystore.init(state)
    if trust:
        ks.add_trust_anchors(DOMAIN, [lab.domain(DOMAIN).root_cert], source="test")
    ks.close()
    clm_dir = clm_dir or base / "clm"
    provision(device_id, state / "coap", clm_dir, methods=("oscore", "dtls-psk"))
    return DeviceEnv(device_id, state, clm_dir)


class DeviceThread:
    """An in-process device service on its own event loop thread (the test thread stays synchronous).

    ``with DeviceThread(env, insecure=False, **config) as dev: dev.uri, dev.dtls_uri``.
    """

    def __init__(self, env: DeviceEnv, *, insecure: bool = False, methods=("oscore", "dtls-psk"), limits=None,
                 **config):
        self.env = env
        self.insecure = insecure
        self.methods = methods
        self.limits = limits  # coap_services.limits.ServeLimits, or None for the defaults
        self.config = dict(dict(device_id=env.device_id, default_domain=DOMAIN), **config)
        self.port = free_port_pair()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"coap-{env.device_id}")
        self.server = None
        self.ks = None
        self.service = None  # the DeviceService (its pending keys: service._pending())

    @property
    def uri(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    @property
    def dtls_uri(self) -> str:
        return f"coaps://127.0.0.1:{self.port + 1}"

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> "DeviceThread":
        from coap_services.device import DeviceConfig, DeviceService
        from coap_services.security import load_server_security
        from coap_services.server import DeviceServer

        self._thread.start()
        self.ks = self.env.keystore()
        layers = load_server_security(self.env.state / "coap", self.methods)

        async def start():
            svc = self.service = DeviceService(self.ks, DeviceConfig(**self.config))
            return await DeviceServer.start(svc, layers, port=self.port, insecure=self.insecure, limits=self.limits)

        self.server = self.call(start())
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.server is not None:
                self.call(self.server.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self.ks.close()


def coap_call(uri: str, method: str = "none", context: Path | None = None, *, timeout: float = 10.0):
    """Run ``fn(device_client)`` on a fresh CLM-side client context: ``coap_call(...)(lambda d: d.status())``."""
    from coap_services.client import CoapClient

    def runner(fn):
        async def main():
            async with CoapClient(timeout_s=timeout) as c:
                return await fn(c.device(uri, method, context))

        return asyncio.run(main())

    return runner


def raw_request(uri: str, code: str, payload: bytes = b"", content_format: int | None = None, *,
                method: str = "none", context: Path | None = None, timeout: float = 10.0):
    """One raw request (any payload, no client-side validation); returns the aiocoap response."""
    from aiocoap.numbers.codes import Code

    from coap_services.client import CoapClient

    async def main():
        async with CoapClient(timeout_s=timeout) as c:
            base = uri.split("/", 3)
            c.device("/".join(base[:3]), method, context)
            resp, _ = await c.request(uri, getattr(Code, code), payload, content_format)
            return resp

    return asyncio.run(main())


class ServeProcess:
    """``devagent serve`` as a subprocess (``python -m agent.cli``); stop() sends SIGTERM and returns rc."""

    def __init__(self, env: DeviceEnv, *args: str, port: int | None = None):
        self.env = env
        self.port = port or free_port_pair()
        self.ready = env.state.parent / f".{env.device_id}.ready"
        if self.ready.exists():
            self.ready.unlink()
        cmd = [sys.executable, "-m", "agent.cli", "--state-dir", str(env.state), "serve", "--port", str(self.port),
               "--device-id", env.device_id, "--domain", DOMAIN, "--ready-file", str(self.ready), *args]
        self.stderr_path = env.state.parent / f"{env.device_id}.serve.log"
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._err,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        deadline = time.monotonic() + 20
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"devagent serve did not start: {self.stderr_path.read_text()[-2000:]}")
            time.sleep(0.05)

    @property
    def uri(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    @property
    def dtls_uri(self) -> str:
        return f"coaps://127.0.0.1:{self.port + 1}"

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._err.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def serve_process(env: DeviceEnv, *args: str) -> ServeProcess:
    return ServeProcess(env, *args)
