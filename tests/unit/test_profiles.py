"""board_profiles: every shipped profile validates; bad files get errors naming file and key; detection.

There is no Raspberry Pi here: detection tests fake the *board* by writing /proc/device-tree/model and
/dev/tpmrm0 under a temporary root, which is exactly (and only) what ``detect`` reads.
"""
from __future__ import annotations

import shutil

import pytest

import board_profiles as bp

EXPECTED = {"rpi3b", "rpi4b", "rpi5", "rpizero2w", "cm4", "cm4-tpm", "generic-x86_64", "generic-arm64", "esp32",
            "picow"}


def test_all_shipped_profiles_validate():
    profs = {p.name: p for p in bp.load_all()}
    assert EXPECTED <= set(profs)
    for p in profs.values():
        assert p.get("key", "algorithm") == "p256"  # P-256 unless a CA demands RSA
        assert p.timings["source"]
        assert 0.1 <= p.get("renewal", "fraction") <= 0.95
    assert profs["cm4-tpm"].get("key", "backend") == "tpm"
    assert profs["cm4"].get("key", "backend") == "soft"
    assert profs["esp32"].platform == profs["picow"].platform == "micropython"
    # Wi-Fi-only boards get longer CoAP timeouts than RFC 7252's defaults
    assert profs["rpizero2w"].get("coap", "ack_timeout_s") > 2.0
    assert profs["picow"].get("coap", "max_retransmit") > 4


def test_match_index_is_what_the_files_say():
    """detect() ranks the shipped profiles by MATCH_INDEX without reading them: it must hold every shipped file's
    [profile] match keys (edit it with the files)."""
    assert bp.MATCH_INDEX == tuple(bp.MatchEntry.of(p) for p in bp.load_all())
    assert bp.match_index() is bp.MATCH_INDEX


def test_detect_reads_only_the_profile_it_picks(tmp_path, monkeypatch):
    read = []
    real = bp.load_file
    monkeypatch.setattr(bp, "load_file", lambda path: read.append(path) or real(path))
    assert bp.detect(tmp_path, machine="x86_64").profile.name == "generic-x86_64"
    assert [p.name for p in read] == ["generic-x86_64.toml"]


def test_detect_in_another_directory_reads_its_files(tmp_path):
    """A directory other than the shipped one (or the shipped one with a file added) is ranked from its files."""
    d = tmp_path / "profiles"
    d.mkdir()
    for name in ("generic-x86_64", "rpi4b"):
        shutil.copy(bp.PROFILE_DIR / f"{name}.toml", d)
    text = (d / "rpi4b.toml").read_text().replace('match_model = ["Raspberry Pi 4 Model B"]',
                                                  'match_model = ["Pine64 RockPro64"]')
    (d / "rpi4b.toml").write_text(text)
    (tmp_path / "root").mkdir()
    board = fake_board(tmp_path / "root", "Pine64 RockPro64 v2.1")
    assert bp.detect(board, machine="aarch64", directory=d).profile.name == "rpi4b"
    assert [e.name for e in bp.match_index(d)] == ["generic-x86_64", "rpi4b"]


def fake_board(root, model: str | None, tpm: bool = False):
    """Fake the board (not the code): the files detect() reads."""
    if model is not None:
        (root / "proc/device-tree").mkdir(parents=True)
        (root / "proc/device-tree/model").write_bytes(model.encode() + b"\0")
    if tpm:
        (root / "dev").mkdir()
        (root / "dev/tpmrm0").write_bytes(b"")
    return root


@pytest.mark.parametrize("model,tpm,want", [
    ("Raspberry Pi 3 Model B Rev 1.2", False, "rpi3b"),
    ("Raspberry Pi 3 Model B Plus Rev 1.3", False, "rpi3b"),
    ("Raspberry Pi 4 Model B Rev 1.4", False, "rpi4b"),
    ("Raspberry Pi 5 Model B Rev 1.0", False, "rpi5"),
    ("Raspberry Pi Zero 2 W Rev 1.0", False, "rpizero2w"),
    ("Raspberry Pi Compute Module 4 Rev 1.0", False, "cm4"),
    ("Raspberry Pi Compute Module 4 Rev 1.0", True, "cm4-tpm"),
    ("Raspberry Pi Compute Module 4 Rev 1.1", True, "cm4-tpm"),
])
def test_detect_raspberry_pi(tmp_path, model, tpm, want):
    d = bp.detect(fake_board(tmp_path, model, tpm), machine="aarch64")
    assert d.profile.name == want and d.model == model and d.tpm is tpm


def test_detect_pi_with_tpm_hat_but_soft_profile_says_so(tmp_path):
    d = bp.detect(fake_board(tmp_path, "Raspberry Pi 4 Model B Rev 1.4", tpm=True), machine="aarch64")
    assert d.profile.name == "rpi4b" and any("TPM is present" in n for n in d.notes)


@pytest.mark.parametrize("machine,want", [("x86_64", "generic-x86_64"), ("aarch64", "generic-arm64")])
def test_detect_generic_without_device_tree(tmp_path, machine, want):
    assert bp.detect(tmp_path, machine=machine).profile.name == want


def test_detect_unknown_arm_board_falls_back_with_a_note(tmp_path):
    d = bp.detect(fake_board(tmp_path, "Pine64 RockPro64"), machine="aarch64")
    assert d.profile.name == "generic-arm64" and "no profile of its own" in d.notes[0]


def test_detect_unknown_architecture_is_a_clear_error(tmp_path):
    with pytest.raises(bp.BoardProfileError, match="--profile"):
        bp.detect(tmp_path, machine="riscv64")


def test_unknown_profile_lists_known():
    with pytest.raises(bp.BoardProfileError, match="known: .*rpi4b"):
        bp.load("rpi9")


@pytest.mark.parametrize("name", ["../etc/passwd", "", ".hidden"])
def test_bad_profile_names(name):
    with pytest.raises(bp.BoardProfileError):
        bp.load(name)


def _copy(tmp_path, name="rpi4b"):
    shutil.copy(bp.PROFILE_DIR / f"{name}.toml", tmp_path / f"{name}.toml")
    return tmp_path / f"{name}.toml"


@pytest.mark.parametrize("old,new,msg", [
    ("ack_timeout_s = 2.0", "ack_timeout_s = 100.0", r"\[coap\] ack_timeout_s = 100.0: must be between"),
    ("max_retransmit = 4", "max_retransmit = 4.5", r"\[coap\] max_retransmit .* must be an integer"),
    ('backend = "soft"', 'backend = "hsm"', r"\[key\] backend .* must be one of soft, tpm"),
    ('algorithm = "p256"', 'algorithm = "p521"', r"\[key\] algorithm"),
    ('bind = "[::]:5684"', 'bind = "[::]"', r"\[coap\] bind"),
    ("fraction = 0.667", "fractoin = 0.667", r"unknown key \[renewal\] fractoin; known keys in \[renewal\]"),
    ("fraction = 0.667", "", r"missing \[renewal\] fraction"),
    ("retry_base_s = 60", "retry_base_s = 7200", r"retry_cap_s must be >= retry_base_s"),
    ('name = "rpi4b"', 'name = "rpi4"', r"must match the file name"),
    ("[timings]", "[timings]\nkeygen = 3", r"\*_s"),
    ("[coap]", "[coapp]\n[coap]", r"unknown key|known sections"),
    ("[serial]", "[serial", r"not valid TOML"),
])
def test_invalid_profile_errors_name_file_and_key(tmp_path, old, new, msg):
    p = _copy(tmp_path)
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new, 1))
    with pytest.raises(bp.BoardProfileError, match=msg) as e:
        bp.load_file(p)
    assert str(p) in str(e.value)


def test_tpm_backend_needs_tcti(tmp_path):
    p = _copy(tmp_path, "cm4-tpm")
    p.write_text(p.read_text().replace('tcti = "device:/dev/tpmrm0"\n', ""))
    with pytest.raises(bp.BoardProfileError, match="tcti"):
        bp.load_file(p)


def test_settings_are_flat_dotted_keys():
    s = bp.load("rpizero2w").settings()
    assert s["coap.ack_timeout_s"] == 3.0 and s["key.backend"] == "soft" and "profile.name" not in s
