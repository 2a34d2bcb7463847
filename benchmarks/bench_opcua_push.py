"""OPC UA push management (OPC 10000-12 §7.7): the CLM as push server, stage by stage, per key type.

One enrollment = ``agent.opcua.clm_push.enroll_once`` (the CLM's production path) against devagent's device server
(``agent.opcua.server.PushServer`` on asyncua, loopback, its own keystore, Basic256Sha256 SignAndEncrypt) with the
lab CA in-process as upstream. The stages sit next to the CoAP delegated flow's Table 1 in the report:

=================  ======================================================================================
stage              what it covers
=================  ======================================================================================
connect            GetEndpoints, the device certificate's check, secure channel (RSA-2048), session
csr                CreateSigningRequest round trip: key generation and CSR signing on the device inside it
                   (OPC UA has no field for the device to report them apart; compare with stages 1 + 2)
upstream           CLM <-> CA and pre-verification (Table 1 stage 3)
update             UpdateCertificate round trip: the device's verify-before-store checks (≈ stages 4 + 5)
trustlist          TrustList read (OpenWithMasks/Read/Close) and, when it differs, write
apply              ApplyChanges: keystore commit (fsync), PKI directory switch, endpoint re-bind
total              the whole enrollment as the CLM sees it
=================  ======================================================================================

The device renews the same slot every time (new key each time, old one destroyed after the commit), as in
production. The channel's own certificate is RSA-2048 in every configuration (asyncua has no ECC policies); the
key type is that of the certificate being pushed.
"""
from __future__ import annotations

import asyncio

import pytest

from benchmarks.conftest import DOMAIN, n_samples, record

STAGE_KEYS = {"connect": "connect_s", "csr": "csr_s", "upstream": "enroll_s", "update": "update_s",
              "trustlist": "trustlist_s", "apply": "apply_s", "total": "total_s"}
KEY_TYPES = {"rsa2048": "rsa", "p256": "p256", "p384": "p384"}


@pytest.mark.benchmark(group="opcua-push")
@pytest.mark.parametrize("key_type", list(KEY_TYPES))
def test_opcua_push(benchmark, key_type, lab_ca, tmp_path):
    from agent.clm import LabUpstream
    from agent.opcua.clm_push import enroll_once
    from keystore.store import Keystore
    from tests.peers.opcua import GDS_DN, World, device, make_party

    ks = Keystore.init(tmp_path / "state")
    d = lab_ca.domain(DOMAIN)
    ks.add_trust_anchors(DOMAIN, [d.root_cert, d.ca_cert], source="bench")
    gds = make_party(lab_ca, DOMAIN, GDS_DN, "urn:bench:gds")
    w = World(tmp_path, lab_ca, ks, gds, gds, gds)
    up = LabUpstream(lab_ca)
    n = n_samples(30, 2)
    samples: list[dict] = []
    loop = asyncio.new_event_loop()

    async def start():
        cm = device(w)
        srv = await cm.__aenter__()
        return cm, srv

    try:
        cm, srv = loop.run_until_complete(start())
        rec = {"id": "bench", "uri": srv.url, "key_type": KEY_TYPES[key_type], "subject": "CN=bench,O=Plant",
               "opcua": {"server_fingerprint": srv.endpoint_fingerprint}}
        chain: list = []
        try:
            def one():
                r = loop.run_until_complete(enroll_once(rec, up, gds.identity(), domain=DOMAIN, intermediates=chain))
                chain[:] = r["chain"]
                samples.append(r["stages"])

            one()  # warm-up: first TrustList write, first PKI version, lazy imports
            samples.clear()
            benchmark.pedantic(one, rounds=n, iterations=1)
        finally:
            loop.run_until_complete(cm.__aexit__(None, None, None))
    finally:
        loop.close()
    assert len(samples) == n
    record(benchmark, config={"key_type": key_type, "channel": "opcua-basic256sha256", "upstream": "lab",
                              "backend": "soft", "id": f"{key_type}-opcua"},
           stage="total", samples_s=[s["total_s"] for s in samples],
           stages={stage: [s[k] for s in samples] for stage, k in STAGE_KEYS.items()})
