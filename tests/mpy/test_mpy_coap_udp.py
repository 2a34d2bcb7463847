"""CoAP over real UDP: the board agent (MicroPython unix port, and CPython) serves /csr and /verify on
loopback; a CPython client authenticates with the commissioning secret."""
import socket
import subprocess
import sys
import time

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent import cli_mpy
from agent.mpy import coap
from tests.mpy.helpers import der, issue, make_ca, micropython_binary

SECRET = bytes(range(32))


def _free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(params=["micropython", "cpython"])
def server(request, tmp_path):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = make_ca(ca_key, "CoAP CA")
    stage = cli_mpy.stage(tmp_path, {"device_id": "dev-9", "cn": "dev-9", "coap_secret": SECRET.hex()}, ca, "none")
    port = _free_port()
    exe = micropython_binary() if request.param == "micropython" else sys.executable
    code = ("import sys; sys.path.insert(0, %r); from mpy import run; run.coap_main(%r, '127.0.0.1', %d)"
            % (str(stage / "lib"), str(stage / "devagent"), port))
    proc = subprocess.Popen([exe, "-c", code], stderr=subprocess.PIPE)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    counter = [int(time.time() * 1e6)]  # wall-clock microseconds: monotonic across host restarts

    def _answer_to(mid):
        # A retransmitted request is answered again (RFC 7252 4.5), so a late duplicate answer to the previous
        # request can be waiting on the socket: a client matches the ACK's message ID and drops the others.
        while True:
            data, _ = sock.recvfrom(4096)
            if len(data) >= 4 and int.from_bytes(data[2:4], "big") == mid:
                return data

    def call(path, payload, cf, secret=SECRET):
        counter[0] += 1
        dg, tag = coap.make_request(secret, "dev-9", path, payload, cf, counter[0], mid=counter[0] & 0xFFFF,
                                    token=b"tk")
        mid = counter[0] & 0xFFFF
        for _ in range(50):  # the server may still be starting: retransmit as CoAP would
            sock.sendto(dg, ("127.0.0.1", port))
            try:
                sock.settimeout(0.2)
                data = _answer_to(mid)
                break
            except (socket.timeout, ConnectionRefusedError):
                continue
        else:
            died = proc.poll() is not None
            pytest.fail("no CoAP answer" + (": " + proc.stderr.read().decode() if died else ""))
        if secret != SECRET:
            return coap.decode(data)
        return coap.check_response(SECRET, data, tag)

    yield call, ca, ca_key, stage
    proc.kill()
    proc.wait(5)
    sock.close()


def test_coap_enrollment_over_udp(server):
    call, ca, ca_key, stage = server
    m = call("csr", cbor2.dumps({"subject": "CN=dev-9,serialNumber=SN9", "san": ["dns:dev-9.local"]}), 60)
    assert coap.code_str(m.code) == "2.04" and m.content_format() == 286
    csr = x509.load_der_x509_csr(m.payload)
    assert csr.is_signature_valid
    other = ec.generate_private_key(ec.SECP256R1())
    m = call("verify", der(issue(ca, ca_key, other.public_key())), 287)
    assert coap.code_str(m.code) == "4.03" and cbor2.loads(m.payload)["error"] == "key-mismatch"
    m = call("verify", b"\x30\x82\x01", 287)
    assert coap.code_str(m.code) == "4.00"
    m = call("csr", b"\xa0", 60, secret=b"\x00" * 32)
    assert coap.code_str(m.code) == "4.01"
    m = call("verify", der(issue(ca, ca_key, csr.public_key(), cn="dev-9")), 287)
    assert csr.subject.rfc4514_string() == "CN=dev-9,2.5.4.5=SN9"
    assert coap.code_str(m.code) == "2.04", m.payload
    assert cbor2.loads(m.payload)["version"] == 1
    assert (stage / "devagent" / "cert.1").exists()
