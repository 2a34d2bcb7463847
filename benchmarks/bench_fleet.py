"""Fleet renewal: one CLM re-enrolling N devices (N = 10, 100, 1,000) against the lab CA.

Seed 003 (§VII) leaves open whether frequent re-enrolment of short-lived certificates "might become a
bottleneck". Here one ``agent.clm.Clm`` runs its production renewal pass (``Clm.run(once=True)``, default
parallelism) over N devices that already hold a certificate. The devices are in-process equivalents of
``devagent serve``: each a ``coap_services`` ``DeviceService`` with its own keystore (software P-256 keys) behind
its own ``DeviceServer`` CoAP endpoint on loopback, protected by OSCORE (the board profiles' default channel),
so every renewal crosses the real CoAP + OSCORE stack twice, writes the device keystore and the CLM inventory.

Measured per N: renewals per second (wall), per-device latency (``Clm.enroll`` as the scheduler calls it, so
queueing behind the parallelism bound is excluded) p50/p99, process CPU seconds (CLM + devices + CA: an upper
bound for the CLM), RSS before/after and the peak sampled every 20 ms. Untimed setup: starting the devices and
their first enrollment. CI mode: N = 10.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import threading
import time
from pathlib import Path

import pytest

from tests.peers.coap import free_port_pair
from benchmarks.conftest import DOMAIN, record, sizes

FLEET_SIZES = sizes((10, 100, 1000), (10,))
CHANNEL = "oscore"


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Peak RSS of this process while a block runs (VmHWM is per process lifetime, so sample instead)."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.peak = rss_mb()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())


async def start_fleet(n: int, root: Path, lab):
    """N device services on loopback (each its keystore and OSCORE context) and a CLM inventory listing them."""
    from agent.clm import open_inventory
    from coap_services.device import DeviceConfig, DeviceService
    from coap_services.security import load_server_security, provision
    from coap_services.server import DeviceServer
    from keystore.store import Keystore

    clm_dir = root / "clm"
    inventory = open_inventory(None, clm_dir / "inventory")
    anchor = lab.domain(DOMAIN).root_cert
    servers, stores = [], []
    for i in range(n):
        dev_id = f"dev{i:04d}"
        ddir = root / "devices" / dev_id
        ks = Keystore.init(ddir / "state")
        ks.add_trust_anchors(DOMAIN, [anchor], source="bench")
        stores.append(ks)
        service = DeviceService(ks, DeviceConfig(device_id=dev_id, default_domain=DOMAIN, default_key_type="p256",
                                                 csr_rate_per_min=1e9, csr_burst=10 ** 6))
        provision(dev_id, ddir / "security", clm_dir, methods=(CHANNEL,))
        layers = load_server_security(ddir / "security", methods=(CHANNEL,))
        server = await DeviceServer.start(service, layers, host="127.0.0.1", port=free_port_pair())
        servers.append(server)
        inventory.add(dev_id, server.uri, security=CHANNEL, context=str(clm_dir / "contexts" / dev_id),
                      key_type="p256", domain=DOMAIN, subject=f"CN={dev_id}")
    return inventory, servers, stores


@pytest.mark.benchmark(group="fleet")
@pytest.mark.parametrize("n", FLEET_SIZES, ids=lambda n: f"N{n}")
def test_fleet_renewal(benchmark, n, lab_ca, tmp_path):
    from agent.clm import Clm, LabUpstream
    from coap_services.client import CoapClient

    loop = asyncio.new_event_loop()
    latencies: list[float] = []
    out: dict = {}
    try:
        inventory, servers, stores = loop.run_until_complete(start_fleet(n, tmp_path, lab_ca))
        coap = loop.run_until_complete(CoapClient(timeout_s=120.0).__aenter__())
        try:
            clm = Clm(inventory, LabUpstream(lab_ca), coap, retries=2, retry_delay_s=0.2)
            first = loop.run_until_complete(clm.run(once=True))  # first enrollment: untimed setup
            bad = {d: r for d, r in first.items() if r != "ok"}
            assert not bad, f"first enrollment failed for {len(bad)} device(s): {list(bad.items())[:3]}"
            past = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)).isoformat()
            for rec in inventory.list():
                inventory.update(rec["id"], next_renewal=past)  # every certificate is now due for renewal
            assert len(clm.due()) == n

            gc.collect()

            def renew_all():
                rss0, cpu0, t0 = rss_mb(), time.process_time(), time.perf_counter()
                with RssSampler() as sampler:
                    results = loop.run_until_complete(clm.run(once=True))
                out.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - cpu0, rss_start_mb=rss0,
                           rss_end_mb=rss_mb(), rss_peak_mb=sampler.peak, results=results)

            benchmark.pedantic(renew_all, rounds=1, iterations=1)
        finally:
            loop.run_until_complete(coap.__aexit__(None, None, None))
            for s in servers:
                loop.run_until_complete(s.stop())
            for ks in stores:
                with contextlib.suppress(Exception):
                    ks.close()
    finally:
        loop.close()
    latencies += [r["last_duration_s"] for r in inventory.list()]
    ok = sum(1 for r in out["results"].values() if r == "ok")
    assert ok == n, f"{n - ok} renewal(s) failed: {[r for r in out['results'].values() if r != 'ok'][:3]}"
    versions = {ks.get('ldevid').version for ks in stores}
    assert versions == {2}, f"every device should hold version 2 of its LDevID, got {versions}"
    record(benchmark, samples_s=latencies, stage="renewal_latency", devices=n, channel=CHANNEL,
           parallel=_default_parallel(), renewals=ok, attempted=n, wall_s=out["wall_s"],
           renewals_per_s=ok / out["wall_s"], cpu_s=out["cpu_s"], rss_start_mb=out["rss_start_mb"],
           rss_end_mb=out["rss_end_mb"], rss_peak_mb=out["rss_peak_mb"], latencies_s=latencies)


def _default_parallel() -> int:
    import inspect

    from agent.clm import Clm

    return inspect.signature(Clm.run).parameters["parallel"].default
