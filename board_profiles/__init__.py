"""Board profiles: per-board defaults as TOML data files, a validating loader, and board detection.

A profile (``<name>.toml`` next to this module) sets the key backend and TCTI, the default key algorithm,
the keystore path, the serial port, the CoAP bind address, security and transmission parameters, the
renewal policy and reference timings. ``agent.config`` uses a profile as the lowest-precedence layer.

Invariants:
- Pure data: loading a profile never touches the device; ``detect`` only reads ``<root>/proc/device-tree/model``
  and tests for ``<root>/dev/tpmrm0``, so tests fake a board under a temporary directory.
- Every profile is validated completely; an error names the file, the ``[section] key`` and the allowed values.
- Imported by ``agent`` only (and read as data by the ``agent/mpy`` tooling); imports nothing from the project.
"""
from __future__ import annotations

import dataclasses
import os
import platform as _platform
import tomllib
from pathlib import Path
from typing import Any, NamedTuple

PROFILE_DIR = Path(__file__).resolve().parent
PLATFORMS = ("linux", "micropython")
KEY_BACKENDS = ("soft", "tpm", "pkcs11", "mpy")
KEY_ALGORITHMS = ("p256", "p384", "rsa2048", "rsa3072", "rsa4096", "ed25519")
COAP_SECURITY = ("oscore", "edhoc", "dtls", "none")
MODEL_FILE = "proc/device-tree/model"
TPM_DEVICE = "dev/tpmrm0"


class BoardProfileError(Exception):
    """A profile file is missing, unreadable, or fails validation (the message names file and key)."""


def _num(lo: float, hi: float, integer: bool = False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            return f"must be {'an integer' if integer else 'a number'}"
        if not lo <= v <= hi:
            return f"must be between {lo} and {hi}"
        return None
    return check


def _choice(options):
    def check(v):
        return None if v in options else f"must be one of {', '.join(options)}"
    return check


def _string(v):
    return None if isinstance(v, str) and v else "must be a non-empty string"


def _strings(v):
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        return "must be a list of non-empty strings"
    return None


def _boolean(v):
    return None if isinstance(v, bool) else "must be true or false"


def _bind(v):
    if not isinstance(v, str) or ":" not in v:
        return "must be HOST:PORT (e.g. \"[::]:5684\" or \"0.0.0.0:5683\")"
    port = v.rsplit(":", 1)[1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        return "must end in a port number 1-65535"
    return None


# (section, key) -> (validator, required). Anything not listed here is an error (catches typos).
SCHEMA: dict[tuple[str, str], tuple[Any, bool]] = {
    ("profile", "name"): (_string, True),
    ("profile", "description"): (_string, True),
    ("profile", "platform"): (_choice(PLATFORMS), True),
    ("profile", "match_model"): (_strings, True),
    ("profile", "tpm"): (_boolean, False),
    ("profile", "machine"): (_strings, False),
    ("key", "backend"): (_choice(KEY_BACKENDS), True),
    ("key", "tcti"): (_string, False),
    ("key", "algorithm"): (_choice(KEY_ALGORITHMS), True),
    ("keystore", "path"): (_string, True),
    ("serial", "port"): (_string, True),
    ("coap", "bind"): (_bind, True),
    ("coap", "security"): (_choice(COAP_SECURITY), True),
    ("coap", "ack_timeout_s"): (_num(0.5, 60.0), True),
    ("coap", "ack_random_factor"): (_num(1.0, 4.0), True),
    ("coap", "max_retransmit"): (_num(0, 10, integer=True), True),
    ("renewal", "fraction"): (_num(0.1, 0.95), True),
    ("renewal", "jitter"): (_num(0.0, 0.5), True),
    ("renewal", "retry_base_s"): (_num(1, 86400), True),
    ("renewal", "retry_cap_s"): (_num(1, 7 * 86400), True),
    ("renewal", "rekey"): (_boolean, False),
    ("timings", "source"): (_string, True),
}


@dataclasses.dataclass(frozen=True)
class BoardProfile:
    """One validated profile. ``data`` is the parsed TOML ({section: {key: value}})."""

    name: str
    description: str
    platform: str
    path: Path
    data: dict

    def get(self, section: str, key: str, default=None):
        return self.data.get(section, {}).get(key, default)

    @property
    def match_model(self) -> tuple[str, ...]:
        return tuple(self.get("profile", "match_model", ()))

    @property
    def timings(self) -> dict:
        """Reference timings: ``source`` plus numeric figures (seconds), possibly none yet."""
        return dict(self.data.get("timings", {}))

    def settings(self) -> dict:
        """Flat ``section.key`` view of everything but [profile] and [timings] (what agent.config layers)."""
        return {f"{s}.{k}": v for s, table in self.data.items() if s not in ("profile", "timings")
                for k, v in table.items()}


def _validate(data: dict, where: str) -> None:
    if not isinstance(data, dict):
        raise BoardProfileError(f"{where}: not a TOML table")
    for section, table in data.items():
        if not isinstance(table, dict):
            raise BoardProfileError(f"{where}: {section} must be a [section] table")
        sections = {s for s, _ in SCHEMA}
        if section not in sections:
            raise BoardProfileError(f"{where}: unknown section [{section}]; known sections: {', '.join(sorted(sections))}")
        for key, value in table.items():
            if section == "timings" and key != "source":
                err = _num(0.0, 3600.0)(value)
                if not key.endswith("_s"):
                    err = "timing figures are seconds: name them *_s"
            elif (section, key) not in SCHEMA:
                known = sorted(k for s, k in SCHEMA if s == section)
                raise BoardProfileError(f"{where}: unknown key [{section}] {key}; known keys in [{section}]: "
                                        f"{', '.join(known)}")
            else:
                err = SCHEMA[(section, key)][0](value)
            if err:
                raise BoardProfileError(f"{where}: [{section}] {key} = {value!r}: {err}")
    for (section, key), (_, required) in SCHEMA.items():
        if required and key not in data.get(section, {}):
            raise BoardProfileError(f"{where}: missing [{section}] {key}")
    if data["key"]["backend"] == "tpm" and "tcti" not in data["key"]:
        raise BoardProfileError(f"{where}: [key] backend = \"tpm\" needs [key] tcti (e.g. \"device:/dev/tpmrm0\")")
    if data["renewal"]["retry_cap_s"] < data["renewal"]["retry_base_s"]:
        raise BoardProfileError(f"{where}: [renewal] retry_cap_s must be >= retry_base_s")


def load_file(path: str | os.PathLike) -> BoardProfile:
    """Load and validate one profile file.

    Raises:
        BoardProfileError: unreadable, not TOML, or invalid (naming file and key).
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise BoardProfileError(f"cannot read board profile {p}: {e.strerror or e}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BoardProfileError(f"{p}: not valid TOML: {e}") from e
    _validate(data, str(p))
    if data["profile"]["name"] != p.stem:
        raise BoardProfileError(f"{p}: [profile] name = {data['profile']['name']!r} must match the file name "
                                f"({p.stem!r})")
    return BoardProfile(data["profile"]["name"], data["profile"]["description"], data["profile"]["platform"], p, data)


def names(directory: str | os.PathLike = PROFILE_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.toml"))


def load(name: str, directory: str | os.PathLike = PROFILE_DIR) -> BoardProfile:
    """Load the profile called ``name``.

    Raises:
        BoardProfileError: unknown name (listing the known ones) or invalid file.
    """
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise BoardProfileError(f"invalid board profile name {name!r}")
    p = Path(directory) / f"{name}.toml"
    if not p.is_file():
        raise BoardProfileError(f"unknown board profile {name!r}; known: {', '.join(names(directory))} "
                                "(see 'devagent profile list')")
    return load_file(p)


def load_all(directory: str | os.PathLike = PROFILE_DIR) -> list[BoardProfile]:
    return [load(n, directory) for n in names(directory)]


class MatchEntry(NamedTuple):
    """What ``detect`` ranks a profile by: its [profile] platform, match_model, tpm (None: no condition) and machine."""

    name: str
    platform: str
    match_model: tuple[str, ...] = ()
    tpm: bool | None = None
    machine: tuple[str, ...] = ()

    @classmethod
    def of(cls, p: BoardProfile) -> "MatchEntry":
        return cls(p.name, p.platform, p.match_model, p.get("profile", "tpm"), tuple(p.get("profile", "machine", ())))


# The shipped profiles' match keys, in file-name order, so that detection (on every command that loads the
# configuration) parses and validates only the profile it picks instead of all ten files (~3 ms of a command's
# start-up). tests/unit/test_profiles.py checks this against the files: a profile added, removed or with changed
# [profile] keys needs its entry here.
MATCH_INDEX: tuple[MatchEntry, ...] = (
    MatchEntry("cm4", "linux", ("Raspberry Pi Compute Module 4",), tpm=False),
    MatchEntry("cm4-tpm", "linux", ("Raspberry Pi Compute Module 4",), tpm=True),
    MatchEntry("esp32", "micropython"),
    MatchEntry("generic-arm64", "linux", machine=("aarch64", "arm64")),
    MatchEntry("generic-x86_64", "linux", machine=("x86_64", "amd64")),
    MatchEntry("picow", "micropython"),
    MatchEntry("rpi3b", "linux", ("Raspberry Pi 3 Model B",)),
    MatchEntry("rpi4b", "linux", ("Raspberry Pi 4 Model B",)),
    MatchEntry("rpi5", "linux", ("Raspberry Pi 5",)),
    MatchEntry("rpizero2w", "linux", ("Raspberry Pi Zero 2 W",)),
)


def match_index(directory: str | os.PathLike = PROFILE_DIR) -> tuple[MatchEntry, ...]:
    """The match keys of every profile in ``directory``, in name order: ``MATCH_INDEX`` for the shipped directory
    while it holds exactly the indexed files; otherwise (another directory, a profile file added or removed) read
    from the files, each loaded and validated."""
    if Path(directory) == PROFILE_DIR and names(directory) == [e.name for e in MATCH_INDEX]:
        return MATCH_INDEX
    return tuple(MatchEntry.of(p) for p in load_all(directory))


@dataclasses.dataclass(frozen=True)
class Detection:
    """What ``detect`` found: the profile, the evidence, and notes for the operator."""

    profile: BoardProfile
    model: str | None
    tpm: bool
    machine: str
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"profile": self.profile.name, "description": self.profile.description, "model": self.model,
                "tpm": self.tpm, "machine": self.machine, "notes": list(self.notes)}


def read_model(root: str | os.PathLike = "/") -> str | None:
    """The device-tree model string (NUL-terminated in the kernel's file), or None without a device tree."""
    try:
        raw = (Path(root) / MODEL_FILE).read_bytes()
    except OSError:
        return None
    model = raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return model or None


def detect(root: str | os.PathLike = "/", machine: str | None = None,
           directory: str | os.PathLike = PROFILE_DIR) -> Detection:
    """Pick the profile for the board we run on.

    Match order: a Linux profile whose ``match_model`` prefix matches the device-tree model, preferring the one
    whose ``tpm`` condition holds over one without a condition (longest prefix first); otherwise the generic
    profile for the CPU architecture (``machine``, default ``platform.machine()``). The candidates' match keys come
    from ``match_index``; only the profile picked is read and validated.

    Raises:
        BoardProfileError: nothing fits (e.g. an unknown architecture without a device tree), or the picked
            profile is invalid.
    """
    model = read_model(root)
    tpm = (Path(root) / TPM_DEVICE).exists()
    machine = machine or _platform.machine()
    entries = [e for e in match_index(directory) if e.platform == "linux"]
    notes = []
    pick, best_rank = None, None
    if model:
        for e in entries:
            if e.tpm is not None and e.tpm != tpm:
                continue
            for prefix in e.match_model:
                if model.startswith(prefix):
                    rank = (len(prefix), e.tpm is not None)
                    if best_rank is None or rank > best_rank:
                        pick, best_rank = e, rank
    if pick is None:
        pick = next((e for e in entries if machine in e.machine), None)
        if pick is None:
            raise BoardProfileError(f"no board profile fits model {model!r}, machine {machine!r}; choose one with "
                                    "--profile (see 'devagent profile list')")
        if model:
            notes.append(f"device-tree model {model!r} has no profile of its own; using {pick.name}")
    best = load(pick.name, directory)
    if tpm and best.get("key", "backend") != "tpm":
        notes.append(f"a TPM is present ({'/' + TPM_DEVICE}) but profile {best.name} uses "
                     f"{best.get('key', 'backend')} keys; set key.backend = \"tpm\" to use it")
    if not tpm and best.get("key", "backend") == "tpm":
        notes.append(f"profile {best.name} expects a TPM but /{TPM_DEVICE} is missing (is the overlay enabled?)")
    return Detection(best, model, tpm, machine, tuple(notes))
