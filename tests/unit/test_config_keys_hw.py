"""[key] settings for the TPM and PKCS#11 backends: validation, precedence, and what the CLI hands the keystore."""
from __future__ import annotations

import pytest

from agent.config import ConfigError, load_config

PROFILE = {"profile": "generic-x86_64"}


def cfgfile(tmp_path, text):
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_defaults(tmp_path):
    k = load_config(PROFILE, env={}, config_path=cfgfile(tmp_path, "")).key
    assert (k.tpm_parent, k.tpm_persist, k.tpm_handle_base) == ("owner", "blob", "0x81100000")
    assert (k.pkcs11_module, k.pkcs11_token, k.pkcs11_pin) == ("", "", "")


def test_file_and_env(tmp_path):
    f = cfgfile(tmp_path, '[key]\ntpm_parent = "0x81000001"\npkcs11_token = "plant"\npkcs11_pin = "file:/etc/pin"\n')
    c = load_config(PROFILE, env={"DEVAGENT_KEY_PKCS11_PIN": "env:PIN", "DEVAGENT_KEY_TPM_PERSIST": "handle"},
                    config_path=f)
    assert c.key.tpm_parent == "0x81000001" and c.key.pkcs11_token == "plant"
    assert c.key.pkcs11_pin == "env:PIN" and c.sources["key.pkcs11_pin"] == "environment DEVAGENT_KEY_PKCS11_PIN"
    assert c.key.tpm_persist == "handle"


@pytest.mark.parametrize("text,msg", [
    ('[key]\ntpm_parent = "srk"\n', r"key.tpm_parent = 'srk'.*persistent handle 0x81000000-0x81FFFFFF or owner"),
    ('[key]\ntpm_parent = "0x80000001"\n', r"persistent handle"),
    ('[key]\ntpm_handle_base = "12"\n', r"key.tpm_handle_base.*persistent handle"),
    ('[key]\ntpm_persist = "nv"\n', r"must be one of blob, handle"),
    ('[key]\npkcs11_pin = "1234"\n', r"key.pkcs11_pin.*secret source env:VAR or file:PATH, not the PIN itself"),
])
def test_bad_values_are_named(tmp_path, text, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(PROFILE, env={}, config_path=cfgfile(tmp_path, text))


def test_cli_backend_options(tmp_path, monkeypatch):
    from agent.cli import App

    f = cfgfile(tmp_path, '[key]\ntcti = "swtpm:host=127.0.0.1,port=2321"\ntpm_parent = "0x81000001"\n'
                          'pkcs11_module = "/usr/lib/softhsm/libsofthsm2.so"\npkcs11_token = "plant"\n'
                          'pkcs11_pin = "env:PIN"\n')
    for var in [v for v in __import__("os").environ if v.startswith(("DEVAGENT_", "DEVAGENT_TPM_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("DEVAGENT_PKCS11_PIN", "file:/run/pin")  # the older per-option variable still wins
    opts = App(state_dir_option=tmp_path / "ks", config_path=str(f), board_profile="generic-x86_64").backend_options()
    assert opts["tpm"] == {"tcti": "swtpm:host=127.0.0.1,port=2321", "parent": "0x81000001", "persist": "blob",
                           "handle_base": "0x81100000"}
    assert opts["pkcs11"] == {"module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "plant", "pin": "file:/run/pin"}
