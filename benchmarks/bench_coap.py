"""Per-stage timing of one delegated enrollment (seed 003, Table 1) per CoAP security layer, on the production
path: ``agent.clm.Clm.enroll`` -> ``coap_services`` device service (in-process, own event-loop thread) -> lab CA.

Channels: plain CoAP (``--insecure``), DTLS-PSK with a fresh client per enrollment (stage 1 includes the
handshake, "first") and with one client for all enrollments (session reused, "later"), and OSCORE. The full
Table-1 matrix (key types, AES sizes, backends, EST upstream) lives in ``bench_table1.py``; this file is the
CoAP layer's own figure and the reusable ``measure()`` for other reports.

``measure(channel, n, key_type)`` returns one dict of stage durations (seconds) per enrollment.
"""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from benchmarks.conftest import DOMAIN, n_samples, record

CHANNELS = ("plain", "dtls-psk-first", "dtls-psk-later", "oscore")
STAGES = ("coap_csr_s", "keygen_csr_s", "enroll_s", "coap_verify_s", "cert_verify_s", "total_s")


def measure(lab, channel: str, n: int, key_type: str = "p256") -> list[dict]:
    """``n`` delegated enrollments of one device over ``channel``; returns the CLM's stage dicts."""
    from agent.clm import Clm, LabUpstream, open_inventory
    from coap_services.client import CoapClient
    from tests.peers.coap import DeviceThread, device_env

    with tempfile.TemporaryDirectory() as tmp:
        env = device_env(Path(tmp), lab, "bench")
        insecure = channel == "plain"
        with DeviceThread(env, insecure=insecure, csr_burst=10_000, csr_rate_per_min=1e6,
                          default_key_type=key_type, allow_weak_keys=key_type == "rsa1024") as dev:
            inv = open_inventory(None, env.clm_dir)
            if channel.startswith("dtls"):
                inv.add("bench", dev.dtls_uri, security="dtls-psk", context=str(env.context), domain=DOMAIN)
            else:
                inv.add("bench", dev.uri, security="none" if insecure else "oscore",
                        context=None if insecure else str(env.context), domain=DOMAIN)
            up = LabUpstream(lab)

            async def run():
                out = []
                if channel == "dtls-psk-later":
                    async with CoapClient(timeout_s=30) as c:
                        await Clm(inv, up, c, retries=1).enroll("bench")  # handshake outside the samples
                        for _ in range(n):
                            out.append(await Clm(inv, up, c, retries=1).enroll("bench"))
                    return out
                for _ in range(n + 1):
                    async with CoapClient(timeout_s=30) as c:
                        out.append(await Clm(inv, up, c, retries=1).enroll("bench"))
                return out[1:]  # the first one pays lazy imports

            return asyncio.run(run())


@pytest.mark.benchmark(group="coap")
@pytest.mark.parametrize("channel", CHANNELS)
def test_delegated_enrollment_stages(benchmark, lab_ca, channel):
    n = n_samples(full=30, ci=2)
    samples = benchmark.pedantic(measure, args=(lab_ca, channel, n), rounds=1, iterations=1)
    record(benchmark, stages={k: [s[k] for s in samples] for k in STAGES},
           config={"channel": channel, "key_type": "p256", "backend": "soft", "upstream": "lab"})
