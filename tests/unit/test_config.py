"""agent.config: precedence CLI > DEVAGENT_* env > agent.toml > board profile > default; clear errors."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, strategies as st

from agent.config import KEYS, ConfigError, coerce, load_config, KEY_BY_NAME

PROFILE = {"profile": "rpizero2w"}


def cfgfile(tmp_path, text: str):
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_defaults_come_from_the_profile(tmp_path):
    c = load_config(PROFILE, env={}, config_path=cfgfile(tmp_path, ""))
    assert c.profile == "rpizero2w"
    assert c.coap.ack_timeout_s == 3.0 and c.coap.max_retransmit == 5
    assert c.sources["coap.ack_timeout_s"] == "profile rpizero2w"
    assert c.renewal.rekey is True and c.sources["renewal.rekey"] == "default"
    assert dataclasses.is_dataclass(c) and c.__dataclass_params__.frozen


def test_precedence_cli_env_file_profile(tmp_path):
    f = cfgfile(tmp_path, "[coap]\nack_timeout_s = 5\nmax_retransmit = 6\nack_random_factor = 2.0\n")
    env = {"DEVAGENT_COAP_MAX_RETRANSMIT": "7", "DEVAGENT_COAP_ACK_TIMEOUT_S": "8"}
    c = load_config({**PROFILE, "coap.ack_timeout_s": "9"}, env=env, config_path=f)
    assert c.coap.ack_timeout_s == 9.0 and c.sources["coap.ack_timeout_s"] == "command line"
    assert c.coap.max_retransmit == 7 and c.sources["coap.max_retransmit"] == "environment DEVAGENT_COAP_MAX_RETRANSMIT"
    assert c.coap.ack_random_factor == 2.0 and c.sources["coap.ack_random_factor"] == str(f)
    assert c.coap.bind == "[::]:5684" and c.sources["coap.bind"] == "profile rpizero2w"


def test_profile_choice_follows_precedence(tmp_path):
    f = cfgfile(tmp_path, 'profile = "rpi3b"\n')
    assert load_config({}, env={}, config_path=f).profile == "rpi3b"
    assert load_config({}, env={"DEVAGENT_PROFILE": "rpi5"}, config_path=f).profile == "rpi5"
    assert load_config({"profile": "cm4"}, env={"DEVAGENT_PROFILE": "rpi5"}, config_path=f).profile == "cm4"


def test_profile_detected_from_a_faked_board(tmp_path):
    """No Pi here: the board is faked by a device-tree model file under a temporary root."""
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi Zero 2 W Rev 1.0\0")
    c = load_config({}, env={}, config_path=cfgfile(tmp_path, ""), profile_root=tmp_path)
    assert c.profile == "rpizero2w" and c.sources["profile"].startswith("detected")


def test_config_path_from_env_and_missing_files(tmp_path):
    f = cfgfile(tmp_path, "[renewal]\nfraction = 0.5\n")
    assert load_config(PROFILE, env={"DEVAGENT_CONFIG": str(f)}).renewal.fraction == 0.5
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PROFILE, env={"DEVAGENT_CONFIG": str(tmp_path / "nope.toml")})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PROFILE, env={}, config_path=tmp_path / "nope.toml")


def test_state_dir_env_alias(tmp_path):
    c = load_config(PROFILE, env={"DEVAGENT_STATE_DIR": "/srv/ks"}, config_path=cfgfile(tmp_path, ""))
    assert str(c.keystore_path) == "/srv/ks"


def test_unrelated_devagent_env_is_ignored(tmp_path):
    load_config(PROFILE, env={"DEVAGENT_FAULT": "write:EIO", "DEVAGENT_PKCS11_PIN": "x"},
                config_path=cfgfile(tmp_path, ""))


@pytest.mark.parametrize("text,msg", [
    ("[renewal]\nfractoin = 0.5\n", r"unknown key \[renewal\] fractoin; known keys in \[renewal\]: .*fraction"),
    ("[renewal]\nfraction = 2\n", r"\[renewal\]: renewal.fraction = 2: must be between 0.1 and 0.95"),
    ("[renewal]\nfraction = \"half\"\n", r"must be a number"),
    ("[renewal]\nrekey = \"yes please\"\n", r"must be true or false"),
    ("[coap]\nsecurity = \"tls\"\n", r"must be one of oscore"),
    ("[renewal]\nretry_base_s = 100\nretry_cap_s = 10\n", r"retry_cap_s .* must be >= renewal.retry_base_s"),
    ("[renewal]\nfraction = 0.2\njitter = 0.3\n", r"jitter .* must be smaller"),
    ("[ca]\nfingerprint = \"AB:CD\"\n", r"sha256: followed by 64 hex"),
    ("[keystore]\npath = \"relative\"\n", r"must be absolute"),
    ("[bogus]\nx = 1\n", r"unknown key \[bogus\] x; known sections"),
    ("fraction = 0.5\n", r"not a setting"),
    ("[renewal\n", r"not valid TOML"),
    ("profile = \"rpi9\"\n", r"unknown board profile 'rpi9'"),
    ("[credential.mqtt]\nrekey = 1\n", r"\[credential.mqtt\] rekey must be true or false"),
    ("[credential.mqtt]\nhook = []\n", r"unknown key 'hook'"),
    ("[credential.mqtt]\ndeploy = {type = \"pem\"}\n", r"write \[\[credential.mqtt.deploy\]\]"),
    ("[[credential.mqtt.deploy]]\ntype = \"jks\"\n", r"deploy #1: type = 'jks'"),
    ("[[credential.mqtt.deploy]]\ntype = \"pem\"\n", r"needs at least one of cert"),
    ("[[credential.mqtt.deploy]]\ntype = \"pem\"\ncert = \"rel/c.pem\"\n", r"must be an absolute path"),
    ("[[credential.mqtt.deploy]]\ntype = \"pem\"\ncert = \"/c.pem\"\nkey_mode = \"0666\"\n", r"lets others write"),
    ("[[credential.mqtt.deploy]]\ntype = \"p12\"\npath = \"/a.p12\"\npassword = \"secret\"\n", r"env:VAR"),
    ("[[credential.mqtt.deploy]]\ntype = \"opcua\"\n", r"needs pki_dir"),
])
def test_file_errors_name_file_and_key(tmp_path, text, msg):
    f = cfgfile(tmp_path, text)
    with pytest.raises(ConfigError, match=msg) as e:
        load_config({}, env={"DEVAGENT_PROFILE": "rpi4b"} if "profile" not in text else {}, config_path=f)
    assert str(f) in str(e.value)


def test_env_and_cli_errors_name_their_source(tmp_path):
    f = cfgfile(tmp_path, "")
    with pytest.raises(ConfigError, match="environment DEVAGENT_RENEWAL_JITTER"):
        load_config(PROFILE, env={"DEVAGENT_RENEWAL_JITTER": "lots"}, config_path=f)
    with pytest.raises(ConfigError, match=r"--set renewal.fraction"):
        load_config({**PROFILE, "renewal.fraction": "0.99"}, env={}, config_path=f)
    with pytest.raises(ConfigError, match=r"--set renewal.fractoin: unknown key"):
        load_config({**PROFILE, "renewal.fractoin": "0.5"}, env={}, config_path=f)


def test_credential_policies(tmp_path):
    f = cfgfile(tmp_path, """
[credential.mqtt]
rekey = false
fraction = 0.5
hooks = ["systemctl reload mosquitto"]
[[credential.mqtt.deploy]]
type = "pem"
cert = "/etc/mosquitto/certs/device.crt"
key = "/etc/mosquitto/certs/device.key"
key_mode = "0640"
[[credential.opcua]]
""".replace("[[credential.opcua]]\n", "[credential.opcua]\nenabled = false\n"))
    c = load_config(PROFILE, env={}, config_path=f)
    p = c.policy_for("mqtt")
    assert p.rekey is False and p.fraction == 0.5 and p.hooks == ("systemctl reload mosquitto",)
    assert p.deploy[0].key_mode == 0o640 and p.deploy[0].cert.endswith("device.crt")
    assert c.policy_for("opcua").enabled is False
    assert c.policy_for("other").enabled is True and c.policy_for("other").rekey is None


@given(st.sampled_from([k for k in KEYS if k.type in (int, float)]), st.floats(-1e7, 1e7, allow_nan=False))
def test_numbers_in_bounds_parse_out_of_bounds_fail(key, x):
    v = int(x) if key.type is int else x
    if key.lo <= v <= key.hi:
        assert coerce(key, str(v), "t") == v
    else:
        with pytest.raises(ConfigError, match=f"t: {key.name}"):
            coerce(key, str(v), "t")


@pytest.mark.parametrize("raw,want", [("1", True), ("yes", True), ("TRUE", True), ("off", False), ("0", False)])
def test_booleans_from_env(raw, want):
    assert coerce(KEY_BY_NAME["clock.trusted"], raw, "env") is want


def test_every_key_has_documentation():
    import pathlib

    doc = (pathlib.Path(__file__).parents[2] / "docs/operations.md").read_text()
    for k in KEYS:
        assert f"`{k.name}`" in doc and f"`{k.env}`" in doc
