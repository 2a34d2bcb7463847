"""A damaged or hostile keystore index (keystore.json): every command that reads it refuses with a keystore error
(exit 3) naming the file, the record and the field, and changes nothing stored; ``keystore check`` names what is
inconsistent and then removes nothing (files an inconsistent index does not name may be what it lost).

Real keystore (software keys) with a credential issued by the lab CA; the CLI runs in-process through click.
The fuzz target ``keystore_index`` (tests/fuzz) feeds the same commands mutated indexes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec

from agent.cli import cli
from agent.lab.ca import LabCA
from keystore.csr import build_csr, parse_san, parse_subject
from keystore.store import Keystore

COMMANDS = (["keystore", "list"], ["status"], ["keystore", "check"])


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ks-index")
    lab = LabCA.create(work / "lab", domains=("plant",))
    root = work / "ks"
    ks = Keystore.init(root)
    ks.add_trust_anchors("plant", [lab.domain("plant").root_cert], source="test")
    uri = ks.generate_key("p256")
    csr = build_csr(ks.private_key(uri), parse_subject("CN=dev-1"), [parse_san("dns:dev-1.plant")])
    ks.store_certificate("ldevid-plant", lab.issue("plant", csr.public_key(), csr.subject), lab.domain("plant").chain,
                         key_uri=uri, domain="plant")
    idev_key = ec.generate_private_key(ec.SECP256R1())
    idev = lab.issue("plant", idev_key.public_key(), parse_subject("CN=dev-1 IDevID,serialNumber=SN1"))
    ks.import_idevid("idevid", idev, lab.domain("plant").chain, private_key=idev_key, source="test")
    ks.close()
    return root


def _copy(template: Path, dest: Path, edit=None) -> Path:
    import shutil

    shutil.copytree(template, dest)
    if edit is not None:
        doc = json.loads((dest / "keystore.json").read_text())
        edit(doc)
        (dest / "keystore.json").write_text(json.dumps(doc))
        os.chmod(dest / "keystore.json", 0o600)
    return dest


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file() and rel != "audit.log" and not rel.startswith("locks/") and rel != ".lock":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(root: Path, *args: str):
    return CliRunner().invoke(cli, ["--state-dir", str(root), *args])


def _set(path: tuple, value):
    def edit(doc):
        o = doc
        for k in path[:-1]:
            o = o[k]
        o[path[-1]] = value
    return edit


def _record(doc: dict, table: str, **match) -> dict:
    return next(r for r in doc[table].values() if all(r.get(k) == v for k, v in match.items()))


def _cred(field, value):
    return lambda doc: _record(doc, "credentials", name="ldevid-plant").__setitem__(field, value)


HOSTILE = {
    "version is text": (_cred("version", "2"), r"credentials record \d+: 'version' is a str, not int"),
    "versions not a list": (_cred("versions", 1), r"'versions' is a int, not list"),
    "versions holds text": (_cred("versions", ["1"]), r"'versions' holds something other than ints"),
    "key_uri missing": (lambda d: _record(d, "credentials", name="ldevid-plant").pop("key_uri"),
                        r"credentials record \d+: 'key_uri' is missing"),
    "naive time": (_cred("not_after", "2030-01-01T00:00:00"), r"'not_after' '2030-01-01T00:00:00' is not an ISO "
                                                              r"8601 time with a UTC offset"),
    "not a time": (_cred("created", "yesterday"), r"'created' 'yesterday' is not an ISO 8601 time"),
    "record not an object": (_set(("keys", "1"), [1, 2]), r"keys record 1 is a list, not an object"),
    "table not an object": (_set(("trust",), []), r"table 'trust' is a list, not an object of records"),
    "record id not a number": (lambda d: d["trust"].__setitem__("x", d["trust"].pop("1")),
                               r"trust record id 'x' is not a number"),
    "trust file outside trust/": (lambda d: d["trust"]["1"].__setitem__("file", "../../etc/passwd"),
                                  r"trust record 1: 'file' '../../etc/passwd' is not a path inside trust/"),
    "bool as version": (_cred("version", True), r"'version' is a bool, not int"),
    "key_type null": (_cred("key_type", None), r"'key_type' is a NoneType, not str"),
    "destroying not text": (lambda d: d["meta"]["1"].__setitem__("destroying", [["x"]]),
                            r"meta record 1: 'destroying' holds something other than strs"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_index_is_one_clear_error_and_nothing_changes(template, tmp_path, case):
    edit, message = HOSTILE[case]
    root = _copy(template, tmp_path / "ks", edit)
    before = _snapshot(root)
    for args in COMMANDS:
        r = _run(root, *args)
        assert r.exit_code == 3, (args, r.output)
        assert "internal error" not in r.output
        assert f"keystore index {root / 'keystore.json'} is corrupt" in r.output, (args, r.output)
        assert re.search(message, r.output), (args, r.output)
        assert _snapshot(root) == before, args


def test_nested_json_is_a_corrupt_index(template, tmp_path):
    root = _copy(template, tmp_path / "ks")
    (root / "keystore.json").write_text("[" * 100_000 + "]" * 100_000)
    before = _snapshot(root)
    r = _run(root, "keystore", "list")
    assert r.exit_code == 3 and "is corrupt" in r.output, r.output
    assert _snapshot(root) == before


INCONSISTENT = {
    "two records, one name": (lambda d: _record(d, "credentials", name="idevid").__setitem__("name", "ldevid-plant"),
                              r"credentials records \d+ and \d+ have the same name 'ldevid-plant'"),
    "version not in versions": (_cred("version", 7), r"ldevid-plant: version 7 is not in its versions \[1\]"),
    "trust anchor file missing": (lambda d: d["trust"]["1"].__setitem__("file", "trust/plant/gone.pem"),
                                  r"trust anchor sha256:\w+ of domain plant \(.*trust/plant/gone.pem\) is missing"),
    "trust anchor fingerprint": (lambda d: d["trust"]["1"].__setitem__("fingerprint", "sha256:00"),
                                 r"trust anchor sha256:00 of domain plant .* holds no certificate with that "
                                 r"fingerprint"),
}


@pytest.mark.parametrize("case", sorted(INCONSISTENT))
def test_keystore_check_names_what_is_inconsistent_and_removes_nothing(template, tmp_path, case):
    edit, message = INCONSISTENT[case]
    root = _copy(template, tmp_path / "ks", edit)
    leftover = root / "keys" / "0123456789abcdef.key"  # a key file the index does not name: kept while inconsistent
    leftover.write_bytes(b"x")
    os.chmod(leftover, 0o600)
    before = _snapshot(root)
    r = _run(root, "keystore", "check")
    assert r.exit_code == 3, r.output
    assert re.search(message, r.output), r.output
    assert "nothing was removed" in r.output
    assert _snapshot(root) == before


def test_keystore_check_on_a_consistent_keystore_still_removes_leftovers(template, tmp_path):
    root = _copy(template, tmp_path / "ks")
    leftover = root / "keys" / "0123456789abcdef.key"
    leftover.write_bytes(b"x")
    os.chmod(leftover, 0o600)
    r = _run(root, "keystore", "check")
    assert r.exit_code == 0 and "keystore OK (1 leftover file(s) removed" in r.output, r.output
    assert not leftover.exists()
