"""DTLS PSK files are checked before the DTLS stack sees them: DTLSSocket's tinydtls copies the PSK into a fixed
buffer without a length check (19+ bytes fail the handshake, 128+ bytes overwrite the stack), so a hand-edited PSK
that is too long is a SecurityConfigError naming the file, on the device and on the CLM side, and nothing is
changed on disk."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from coap_services.errors import SecurityConfigError
from coap_services.security import DTLS_PSK_MAX_BYTES, client_credentials, load_server_security, provision
from keystore import fsutil


def _snapshot(*roots: Path) -> dict:
    out = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                out[str(p)] = p.read_bytes()
    return out


def _edit(path: Path, **changes) -> None:
    d = json.loads(path.read_bytes())
    d.update(changes)
    d = {k: v for k, v in d.items() if v is not None}
    fsutil.atomic_write(path, json.dumps(d).encode(), mode=0o600)


@pytest.fixture()
def pair(tmp_path):
    dev, clm = tmp_path / "dev", tmp_path / "clm"
    provision("dev-psk", dev, clm, methods=("dtls-psk",))
    (dev_file,) = (dev / "dtls").glob("*.json")
    return dev, dev_file, clm / "contexts" / "dev-psk"


def test_provisioned_psk_fits_and_loads(pair):
    dev, dev_file, ctx = pair
    psk = json.loads(dev_file.read_bytes())["psk_ascii"]
    assert len(psk.encode()) == DTLS_PSK_MAX_BYTES
    assert load_server_security(dev, methods=("dtls-psk",))
    creds = client_credentials("coaps://127.0.0.1:5684", "dtls-psk", ctx)
    assert creds["coaps://127.0.0.1:5684/*"]["dtls"]["psk"]["ascii"] == psk


@pytest.mark.parametrize("psk", ["x" * (DTLS_PSK_MAX_BYTES + 1), "k" * 200, ""])
def test_a_psk_the_dtls_stack_cannot_take_is_refused_naming_the_file(pair, psk):
    dev, dev_file, ctx = pair
    _edit(dev_file, psk_ascii=psk)
    _edit(ctx / "dtls.json", psk_ascii=psk)
    before = _snapshot(dev, ctx)
    n = len(psk.encode())
    with pytest.raises(SecurityConfigError, match=rf"DTLS PSK file {dev_file}: 'psk_ascii' is {n} bytes.*1 to 16"):
        load_server_security(dev, methods=("dtls-psk",))
    with pytest.raises(SecurityConfigError, match=rf"DTLS PSK file {ctx / 'dtls.json'}: 'psk_ascii' is {n} bytes"):
        client_credentials("coaps://127.0.0.1:5684", "dtls-psk", ctx)
    assert _snapshot(dev, ctx) == before


def test_a_psk_file_without_the_psk_is_refused_on_the_clm_side_too(pair):
    _dev, _dev_file, ctx = pair
    _edit(ctx / "dtls.json", psk_ascii=None)
    with pytest.raises(SecurityConfigError, match=r"dtls.json needs 'identity' and 'psk_ascii'"):
        client_credentials("coaps://127.0.0.1:5684", "dtls-psk", ctx)


# ---- the CLM's per-file cache of DTLS credentials (coap_services.client._dtls_credentials) ---------------------
URI = "coaps://127.0.0.1:5684"


def _psk_of(items: dict) -> bytes:
    (item,) = items.values()
    return item.as_dtls_psk()[1]


def test_clm_builds_the_dtls_credential_once_per_file_content(pair):
    from coap_services.client import _dtls_credentials

    _dev, _dev_file, ctx = pair
    first, again = _dtls_credentials(URI, ctx), _dtls_credentials(URI, ctx)
    assert list(first) == [f"{URI}/*"] and first[f"{URI}/*"] is again[f"{URI}/*"]
    assert _psk_of(first) == json.loads((ctx / "dtls.json").read_bytes())["psk_ascii"].encode()
    _edit(ctx / "dtls.json", psk_ascii="n" * DTLS_PSK_MAX_BYTES)  # re-commissioned: the new PSK is used
    assert _psk_of(_dtls_credentials(URI, ctx)) == b"n" * DTLS_PSK_MAX_BYTES


@pytest.mark.parametrize("change", ["mode", "too-long", "symlink", "missing"])
def test_a_cached_dtls_credential_is_checked_again_when_its_file_changes(pair, tmp_path, change):
    from coap_services.client import _dtls_credentials

    _dev, _dev_file, ctx = pair
    p = ctx / "dtls.json"
    _dtls_credentials(URI, ctx)
    if change == "mode":
        os.chmod(p, 0o644)
        match = r"has mode 0644: group/others may access it"
    elif change == "too-long":
        _edit(p, psk_ascii="x" * (DTLS_PSK_MAX_BYTES + 1))
        match = r"'psk_ascii' is 17 bytes"
    elif change == "symlink":
        real = tmp_path / "elsewhere.json"
        os.replace(p, real)
        os.symlink(real, p)
        match = "symbolic link"
    else:
        p.unlink()
        match = "missing"
    with pytest.raises(SecurityConfigError, match=match):
        _dtls_credentials(URI, ctx)
