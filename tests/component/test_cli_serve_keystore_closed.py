"""`devagent coap serve` and `devagent opcua serve` close their keystore (``with Keystore``, as every other
command) however a start fails: a port another socket holds (exit 6), a missing or unreadable CoAP security
context (exit 7), a key backend that cannot make the OPC UA bootstrap key (exit 3). The commands run in-process
(click's CliRunner), so what an unclosed keystore leaves behind is visible: its index file and the lock files of
the keys it holds stay open in this process (and a PKCS#11 session, a TPM context with other backends)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import App
from keystore.store import Keystore
from tests.peers.opcua import APP_URI, DOMAIN, GDS_DN, make_world


def open_in(root: Path) -> list[str]:
    """The files under ``root`` this process has open."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used, closed meanwhile
            continue
        if target.startswith(f"{root}/"):
            out.append(target)
    return sorted(out)


def invoke(command, root: Path, *args: str, config: Path | None = None):
    env = {"DEVAGENT_STATE_DIR": None, "DEVAGENT_CONFIG": str(config) if config else None,
           "DEVAGENT_PROFILE": "generic-x86_64"}
    return CliRunner().invoke(command, list(args), obj=App(state_dir_option=root, json=False), env=env)


@pytest.fixture
def state(tmp_path):
    root = tmp_path / "state"
    Keystore.init(root).close()
    assert open_in(root) == []
    return root


@pytest.fixture
def busy_port():
    """A port bound by another socket, UDP and TCP (CoAP listens on UDP, OPC UA on TCP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", port))
            tcp.listen(1)
            yield port


def test_coap_serve_that_cannot_listen_closes_the_keystore(state, busy_port):
    from agent.cli_coap import serve

    r = invoke(serve, state, "--insecure", "--port", str(busy_port))
    assert r.exit_code == 6 and "cannot listen" in r.output, r.output
    assert open_in(state) == []


@pytest.mark.parametrize("case", ["none-provisioned", "unreadable"])
def test_coap_serve_without_a_usable_security_context_closes_the_keystore(state, tmp_path, case):
    from agent.cli_coap import serve

    sec = tmp_path / "coap"
    sec.mkdir(mode=0o700)
    if case == "unreadable":
        (sec / "dtls-psk.json").write_text("{not json")
        (sec / "dtls-psk.json").chmod(0o600)
    r = invoke(serve, state, "--security-dir", str(sec), "--no-oscore")
    assert r.exit_code == 7 and "configuration error" in r.output, r.output
    assert open_in(state) == []


def test_opcua_serve_that_cannot_listen_closes_the_keystore(tmp_path, lab, busy_port):
    from agent.cli_opcua import opcua

    w = make_world(tmp_path / "w", lab)
    w.ks.close()
    r = invoke(opcua, w.state, "serve", "--port", str(busy_port), "--domain", DOMAIN, "--application-uri", APP_URI,
               "--hostname", "127.0.0.1", "--admin-subject", GDS_DN)
    assert r.exit_code == 6 and "cannot listen" in r.output, r.output
    assert open_in(w.state) == []  # the bootstrap key it made and held too


def test_opcua_serve_whose_key_backend_fails_closes_the_keystore(tmp_path, lab):
    from agent.cli import cli

    w = make_world(tmp_path / "w", lab)
    w.ks.close()
    (tmp_path / "none.toml").write_text("")
    r = CliRunner().invoke(cli, ["--state-dir", str(w.state), "opcua", "serve", "--port", "4840", "--domain", DOMAIN,
                                 "--application-uri", APP_URI, "--admin-subject", GDS_DN, "--key-backend", "pkcs11"],
                           env={"DEVAGENT_STATE_DIR": None, "DEVAGENT_CONFIG": str(tmp_path / "none.toml"),
                                "DEVAGENT_PROFILE": "generic-x86_64"})
    assert r.exit_code == 3, r.output
    assert open_in(w.state) == []
