"""``make demo``: the main job on the embedded default, end to end on loopback, printing each step.

A TEST-ONLY lab CA serves EST (HTTPS) and CMP (HTTP, RFC 6712) on 127.0.0.1; a device keystore in
``demo-state/`` is driven through the real ``devagent`` command line: onboarding (LDevID), an application
credential, renewal with a new key, revocation where the protocol allows it, and finally a CoAP delegated
enrollment (seed 003) with per-stage timings. Nothing leaves this machine.

Every check the demo prints is also enforced: a ``devagent`` step with an unexpected exit code, an ``openssl
verify`` that does not answer OK, or a section that cannot run ends the demo with a non-zero exit status
(``SystemExit`` naming the failed step), so ``make demo`` fails when what it shows fails.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

STATE = Path(os.environ.get("DEVAGENT_DEMO_DIR", "demo-state")).resolve()
DEVAGENT = [str(Path(sys.executable).with_name("devagent"))]
if not Path(DEVAGENT[0]).exists():
    DEVAGENT = [sys.executable, "-m", "agent.cli"]


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def devagent(*args: str, state: Path, check: bool = True, quiet: bool = False,
             expect_exit: int | None = None) -> subprocess.CompletedProcess:
    """Run one ``devagent`` command and print it. ``check``: exit 0 required; ``expect_exit``: that exit code is
    required instead (a refusal the demo shows on purpose). Raises SystemExit otherwise."""
    shown = "devagent --state-dir " + shlex.quote(str(state.relative_to(Path.cwd()) if state.is_relative_to(Path.cwd())
                                                       else state)) + " " + " ".join(shlex.quote(a) for a in args)
    print(f"$ {shown}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run([*DEVAGENT, "--state-dir", str(state), *args], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    out = (r.stdout + r.stderr).rstrip()
    if out and not quiet:
        print("  " + out.replace("\n", "\n  "))
    print(f"  [exit {r.returncode}, {dt * 1000:.0f} ms]", flush=True)
    if expect_exit is not None:
        if r.returncode != expect_exit:
            raise SystemExit(f"demo step failed: {shown} exited {r.returncode}, expected {expect_exit}")
    elif check and r.returncode != 0:
        raise SystemExit(f"demo step failed: {shown}")
    return r


def openssl_verify_file(root: Path, untrusted: Path, leaf: Path) -> str:
    """``openssl verify -CAfile root -untrusted untrusted leaf``, printed; its output line.

    Raises:
        SystemExit: openssl's exit status is not 0 or it does not print ``leaf: OK`` (the certificate does not
            verify with OpenSSL), naming the file and OpenSSL's reason.
    """
    r = subprocess.run(["openssl", "verify", "-CAfile", str(root), "-untrusted", str(untrusted), str(leaf)],
                       capture_output=True, text=True)
    text = (r.stdout + r.stderr).strip()
    print(f"$ openssl verify -CAfile {root.name} -untrusted {untrusted.name} {leaf.name}\n  {text}", flush=True)
    if r.returncode != 0 or f"{leaf}: OK" not in r.stdout:
        raise SystemExit(f"demo check failed: openssl verify of {leaf} (exit {r.returncode}): {text}")
    return text


def openssl_verify(lab, domain: str, pem_text: str, label: str) -> None:
    leaf = STATE / f"{label}.pem"
    leaf.write_text(pem_text)
    openssl_verify_file(lab.dir / domain / "root.pem", lab.dir / domain / "ca.pem", leaf)


def est_demo(lab, domain: str) -> None:
    from agent.lab.est_server import start_est_server

    banner(f"EST (RFC 7030) against the lab CA, domain {domain!r}")
    dev = STATE / "device-est"
    with start_est_server(lab, domain, users={"pump-7": "one-time-secret"}) as est:
        root_fp = "sha256:" + __import__("hashlib").sha256(
            lab.domain(domain).root_cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        print(f"lab EST server {est.url}/.well-known/est/{domain}/  (root {root_fp[:23]}...)")
        devagent("keystore", "init", state=dev)
        devagent("enroll", "--protocol", "est", "--server", est.url, "--label", domain, "--domain", domain,
                 "--username", "pump-7", "--password", "env:DEMO_EST_PASSWORD", "--ca-fingerprint", root_fp,
                 "--subject", "CN=pump-7,O=Demo Plant", "--san", "dns:pump-7.plant.example", state=dev)
        devagent("request", "opcua-server", "--domain", domain, "--subject", "CN=pump-7 OPC UA",
                 "--san", "uri:urn:demo:pump-7", state=dev)
        # The certificate profile as a path segment: /.well-known/est/<label>/tls-client/simpleenroll.
        devagent("request", "tls-client", "--domain", domain, "--profile", "tls-client", "--subject", "CN=pump-7 TLS",
                 state=dev)
        devagent("renew", f"ldevid-{domain}", state=dev)
        # EST has no revocation (RFC 7030): the demo shows the refusal, which must be exit 5 (not supported).
        devagent("revoke", f"ldevid-{domain}", "--reason", "superseded", state=dev, expect_exit=5)
        devagent("status", state=dev)
        pem_text = devagent("keystore", "show", f"ldevid-{domain}", "--pem", state=dev, quiet=True).stdout
        openssl_verify(lab, domain, pem_text, "est-ldevid")


def cmp_demo(lab, domain: str) -> None:
    try:
        from agent.lab import cmp_server
    except ImportError as e:
        raise SystemExit(f"demo section CMP cannot run: lab CMP server unavailable ({e})") from e
    banner(f"CMP (RFC 9483 lightweight profile) against the lab CA, domain {domain!r}")
    dev = STATE / "device-cmp"
    with cmp_server.start_cmp_server(lab, domain, secrets={b"pump-7": b"cmp-demo-secret"}) as srv:
        print(f"lab CMP server {srv.url}")
        devagent("keystore", "init", state=dev)
        trust = lab.dir / domain / "root.pem"
        devagent("enroll", "--protocol", "cmp", "--server", srv.url, "--domain", domain, "--ref", "pump-7",
                 "--secret", "env:DEMO_CMP_SECRET", "--trust", str(trust), "--subject", "CN=pump-7,O=Demo Plant",
                 state=dev)
        devagent("request", "tls-client", "--domain", domain, "--subject", "CN=pump-7 TLS", state=dev)
        devagent("renew", f"ldevid-{domain}", state=dev)
        devagent("revoke", "tls-client", "--reason", "cessationOfOperation", state=dev)
        devagent("ca-update", "--domain", domain, state=dev)
        devagent("status", state=dev)
        pem_text = devagent("keystore", "show", f"ldevid-{domain}", "--pem", state=dev, quiet=True).stdout
        openssl_verify(lab, domain, pem_text, "cmp-ldevid")


def delegated_demo(lab, domain: str) -> None:
    try:
        from agent import clm_demo
    except ImportError as e:
        raise SystemExit(f"demo section CoAP delegated enrollment cannot run ({e})") from e
    banner("CoAP delegated enrollment (seed 003): CLM asks the device for a CSR, enrolls it, pushes the certificate")
    clm_demo.run(lab=lab, domain=domain, state=STATE / "delegated", devagent=DEVAGENT)


def main() -> int:
    from agent.lab.ca import LabCA

    if STATE.exists():
        shutil.rmtree(STATE)
    STATE.mkdir(mode=0o700, parents=True)
    os.environ.setdefault("DEMO_EST_PASSWORD", "one-time-secret")
    os.environ.setdefault("DEMO_CMP_SECRET", "cmp-demo-secret")
    banner("lab CA (TEST ONLY): a root and an issuing CA per domain")
    lab = LabCA.create(STATE / "lab", domains=("plant", "line2", "edge"))
    for d in lab.domains:
        print(f"  {d}: {lab.domain(d).ca_cert.subject.rfc4514_string()}")
    est_demo(lab, "plant")
    cmp_demo(lab, "line2")
    delegated_demo(lab, "edge")
    banner(f"done: state in {STATE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
