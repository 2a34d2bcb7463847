"""Demo of CoAP delegated enrollment (seed 003) on loopback, through the real command line:
lab CA + ``devagent clm`` + one ``devagent serve``, printing the five stages and their times.

Called by ``agent.demo`` (``make demo``) as ``run(lab=..., domain=..., state=..., devagent=[...])``, or stand-alone:
``python -m agent.clm_demo [STATE_DIR]`` (creates its own TEST-ONLY lab CA).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from keystore.certs import pem


def _free_port_pair() -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free UDP port pair")


def run(*, lab, domain: str, state: Path, devagent: list[str]) -> dict:
    """Run the demo; returns the CLM's stage durations (seconds).

    Raises:
        SystemExit: a step exited non-zero, the service did not start, or the stored certificate does not pass
            ``openssl verify`` (every check printed is enforced).
    """
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    dev, edge, clm_dir = state / "device", state / "edge", state / "edge" / "clm"

    def da(*args, st: Path, check=True, quiet=False):
        print("$ devagent --state-dir " + shlex.quote(str(st)) + " " + " ".join(shlex.quote(a) for a in args),
              flush=True)
        r = subprocess.run([*devagent, "--state-dir", str(st), *args], capture_output=True, text=True, timeout=120)
        out = (r.stderr if quiet else r.stdout + r.stderr).rstrip()
        if out:
            print("  " + out.replace("\n", "\n  "), flush=True)
        if check and r.returncode != 0:
            raise SystemExit(f"demo step failed (exit {r.returncode})")
        return r

    root_pem = state / "root.pem"
    root_pem.write_bytes(pem([lab.domain(domain).root_cert]))
    da("keystore", "init", st=dev)
    da("keystore", "trust", "--domain", domain, "--add", str(root_pem), st=dev)
    da("coap", "provision", "pump-7", "--clm-dir", str(clm_dir), st=dev)
    port = _free_port_pair()
    ready = state / "serve.ready"
    ready.unlink(missing_ok=True)
    cmd = [*devagent, "--state-dir", str(dev), "serve", "--port", str(port), "--device-id", "pump-7", "--domain",
           domain, "--ready-file", str(ready)]
    print(f"$ devagent --state-dir {dev} serve --port {port} --device-id pump-7 --domain {domain} &", flush=True)
    log = open(state / "serve.log", "wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"devagent serve did not start; see {state / 'serve.log'}")
            time.sleep(0.05)
        da("clm", "--clm-dir", str(clm_dir), "add-device", "pump-7", "--uri", f"coap://127.0.0.1:{port}",
           "--domain", domain, "--subject", "CN=pump-7,O=Demo Plant", "--san", "dns:pump-7.plant", st=edge)
        r = da("--json", "clm", "--clm-dir", str(clm_dir), "enroll", "pump-7", "--upstream", f"lab:{lab.dir}",
               "--timeout", "10", st=edge, quiet=True)
        stages = json.loads(r.stdout)["enrolled"]["pump-7"]
        print("\n  Delegated enrollment over OSCORE (seed 003, Table 1 stages):")
        for key, label in (("coap_csr_s", "1 CoAP CSR request (CLM <-> device)"),
                           ("keygen_csr_s", "2 key pair + CSR creation (device)"),
                           ("enroll_s", "3 delegated enrollment (CLM <-> CA, + pre-verification)"),
                           ("coap_verify_s", "4 CoAP verify_certificate (CLM <-> device)"),
                           ("cert_verify_s", "5 certificate verification + store (device)"),
                           ("total_s", "  total")):
            print(f"    {label:60} {stages[key] * 1000:8.1f} ms")
        da("clm", "--clm-dir", str(clm_dir), "list", st=edge)
        cert = state / "pump-7.pem"
        cert.write_text(da("clm", "--clm-dir", str(clm_dir), "status", "pump-7", "--pem", st=edge, quiet=True).stdout)
        from agent.demo import openssl_verify_file

        openssl_verify_file(root_pem, lab.dir / domain / "ca.pem", cert)  # SystemExit unless OpenSSL says OK
        return stages
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        print(f"  [devagent serve stopped on SIGTERM, exit {proc.returncode}]", flush=True)


def main(argv=None) -> int:
    from agent.lab.ca import LabCA

    argv = sys.argv[1:] if argv is None else argv
    state = Path(argv[0] if argv else os.environ.get("DEVAGENT_DEMO_DIR", "demo-state/delegated")).resolve()
    exe = Path(sys.executable).with_name("devagent")
    devagent = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli"]
    lab = LabCA.create(state / "lab", ("plant",))
    run(lab=lab, domain="plant", state=state, devagent=devagent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
