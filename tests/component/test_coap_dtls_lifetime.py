"""The CLM's DTLS connection to a device lives exactly as long as its CoapClient.

aiocoap's tinydtls transport holds client connections weakly, and each sits in reference cycles. Unheld, a
connection idle between two requests (the CLM's /csr and /verify, with the CA exchange in between) was left to the
cyclic garbage collector, which runs in whichever thread allocates when it is due (in ``make bench-ci``: the CMP
transport's worker, a lab server's request thread). Its finalizer then reset the live tinydtls session from that
thread, beside the event loop that owns it. Once that crashed the process in DTLSSocket (SIGSEGV in resetPeer; the
earlier SIGABRT in the same row fits the same pattern: docs/cmp.md). And the next request needed a new handshake.
Real device server over DTLS-PSK on loopback; the collection runs on another thread, as it did there."""
from __future__ import annotations

import asyncio
import gc
import threading
import warnings
import weakref

from aiocoap.numbers.codes import Code

from coap_services.client import CoapClient
from tests.peers.coap import DeviceThread, device_env


def _collect_on_another_thread() -> None:
    t = threading.Thread(target=gc.collect, name="not-the-loop")
    t.start()
    t.join(30)


def test_a_dtls_connection_outlives_a_collection_and_is_shut_down_on_release_and_close(tmp_path, lab):
    env = device_env(tmp_path, lab, "dev-dtls")
    with DeviceThread(env) as dev, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        async def main():
            async with CoapClient(timeout_s=10) as c:
                c.device(dev.dtls_uri, "dtls-psk", env.context)
                resp, _ = await c.request(f"{dev.dtls_uri}/status", Code.GET)
                assert resp.code.is_successful()
                conn = weakref.ref(resp.remote)
                del resp
                _collect_on_another_thread()  # as the CMP worker's allocations did during the CA exchange
                assert conn() is not None, "the idle DTLS connection was collected (on a thread not the loop's)"
                resp, _ = await c.request(f"{dev.dtls_uri}/status", Code.GET)
                assert resp.code.is_successful()
                assert resp.remote is conn(), "the second request needed a new DTLS connection and handshake"
                del resp
                c.release(dev.dtls_uri)  # the CLM, after a renewal: the session is shut down here, not by a finalizer
                await asyncio.sleep(0)
                _collect_on_another_thread()
                assert conn() is None
                c.device(dev.dtls_uri, "dtls-psk", env.context)
                resp, _ = await c.request(f"{dev.dtls_uri}/status", Code.GET)
                assert resp.code.is_successful()
                conn = weakref.ref(resp.remote)
                del resp
            return conn

        conn = asyncio.run(main())
        _collect_on_another_thread()
        assert conn() is None  # released by close ...
    # ... after close had shut its tinydtls session down on the loop's thread: no finalizer touched it later
    late = [str(w.message) for w in caught if "did not shut down the DTLSSocket" in str(w.message)]
    assert not late, late
