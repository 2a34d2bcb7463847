"""`make demo` enforces what it prints: an `openssl verify` that fails ends the demo with a non-zero status."""
from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.demo import openssl_verify_file
from agent.lab.ca import LabCA
from keystore.certs import pem


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return LabCA.create(tmp_path_factory.mktemp("lab"), domains=("plant", "other"))


def _leaf(lab, domain, path):
    cert = lab.issue(domain, ec.generate_private_key(ec.SECP256R1()).public_key(),
                     x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pump-7")]))
    path.write_bytes(pem([cert]))
    return path


def test_openssl_verify_ok_passes(lab, tmp_path):
    leaf = _leaf(lab, "plant", tmp_path / "leaf.pem")
    assert openssl_verify_file(lab.dir / "plant" / "root.pem", lab.dir / "plant" / "ca.pem", leaf).endswith("OK")


def test_openssl_verify_failure_ends_the_demo(lab, tmp_path, capsys):
    leaf = _leaf(lab, "plant", tmp_path / "leaf.pem")
    with pytest.raises(SystemExit) as e:  # another domain's root: OpenSSL cannot build the path
        openssl_verify_file(lab.dir / "other" / "root.pem", lab.dir / "other" / "ca.pem", leaf)
    assert "openssl verify" in str(e.value.code) and str(leaf) in str(e.value.code)
    assert "error" in capsys.readouterr().out  # OpenSSL's reason is printed too


def test_demo_module_exits_non_zero_on_a_failed_check(lab, tmp_path):
    """The check through the interpreter, as `make demo` sees it: exit status 1 and the failed step named."""
    leaf = _leaf(lab, "plant", tmp_path / "leaf.pem")
    code = ("import sys; from pathlib import Path; from agent.demo import openssl_verify_file as v; "
            f"v(Path({str(lab.dir / 'other' / 'root.pem')!r}), Path({str(lab.dir / 'other' / 'ca.pem')!r}), "
            f"Path({str(leaf)!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "demo check failed: openssl verify" in r.stderr
