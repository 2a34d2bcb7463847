"""benchmarks/report.py: the report regenerates identically from the committed data file it writes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "report.py"


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_report_from_committed_data_is_identical(tmp_path):
    rep = _report()
    raw = {"machine_info": {"node": "host", "cpu": {"brand_raw": "x"}}, "commit_info": {"id": "a" * 40, "dirty": False},
           "datetime": "2026-01-01T00:00:00", "version": "4.0",
           "benchmarks": [{"group": "misc", "name": "test_x", "fullname": "b.py::test_x", "extra_info": {"k": 1},
                           "stats": {"min": 0.001, "max": 0.003, "mean": 0.002, "stddev": 0.0005, "median": 0.002,
                                     "rounds": 3, "iqr": 0.001, "ops": 500.0, "data": [0.001, 0.002, 0.003]}}]}
    src = tmp_path / "latest.json"
    src.write_text(json.dumps(raw))
    data = tmp_path / "data" / "bench.json"
    assert rep.main([str(src), "--out", str(tmp_path / "a" / "REPORT.md"), "--data-out", str(data)]) == 0
    assert rep.main([str(data), "--out", str(tmp_path / "b" / "REPORT.md")]) == 0
    a = (tmp_path / "a" / "REPORT.md").read_text().replace(src.name, "X").replace(data.name, "X")
    b = (tmp_path / "b" / "REPORT.md").read_text().replace(src.name, "X").replace(data.name, "X")
    assert a == b
    text = (tmp_path / "b" / "REPORT.md").read_text()
    assert "Measured on commit `aaaaaaaaaaaa`" in text and rep.DATA_FILE in text
    assert json.loads(data.read_text())["benchmarks"][0]["stats"]["data"] == [0.001, 0.002, 0.003]


def test_validator_section_from_paired_samples(tmp_path):
    """The "Validator" section takes medians and old / new ratios from the paired samples in extra_info (old and
    new timed alternately within one cell), not from pytest-benchmark's statistics (those of one old + new pair)."""
    rep = _report()

    def cell(mode, old_s, new_s):
        return {"group": "validator", "name": f"test_validator[est-tls-server-p256-2-{mode}]",
                "extra_info": {"purpose": "est-tls-server", "key_type": "p256", "depth": 2, "mode": mode,
                               "paired": True, "old_s": old_s, "new_s": new_s},
                "stats": {"min": 1.0, "max": 1.0, "mean": 1.0, "stddev": 0.0, "median": 1.0, "rounds": 3}}

    raw = {"machine_info": {}, "commit_info": {}, "benchmarks": [
        cell("first", [80e-6, 90e-6, 500e-6], [100e-6, 95e-6, 120e-6]),  # medians 90 / 100 µs: 0.90, slower
        cell("repeat", [60e-6, 50e-6, 40e-6], [10e-6, 12e-6, 11e-6])]}   # medians 50 / 11 µs: 4.55
    src = tmp_path / "ci.json"
    src.write_text(json.dumps(raw))
    assert rep.main([str(src), "--out", str(tmp_path / "REPORT.md")]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "timed alternately within a cell" in text
    assert "| est-tls-server | P-256 | 2 | 100.0 µs | 90.0 µs | 0.90 | 11.0 µs | 50.0 µs | 4.55 |" in text
    assert "First validation slower than the old code: est-tls-server P-256 depth 2 (0.90)." in text


def test_readme_block_regenerated_from_the_data(tmp_path):
    """--readme rewrites only the marked Table 1 block of a Markdown file, from the data: means in ms to three
    significant digits, the total in bold, the paper's Pi 3 total for the RSA/PSK cells; text around it is kept."""
    rep = _report()

    def cfg(key_type, mean_s):
        stages = {s: [mean_s, mean_s] for s, _ in rep.STAGES}
        return {"group": "table1", "name": f"test_table1[{key_type}]",
                "extra_info": {"config": {"key_type": key_type, "channel": "dtls-psk", "aes_bits": 128,
                                          "backend": "soft", "upstream": "lab", "paper": True},
                               "stages": stages},
                "stats": {"min": 1.0, "max": 1.0, "mean": 1.0, "stddev": 0.0, "median": 1.0, "rounds": 2}}

    raw = {"machine_info": {"devagent_host": {"devagent_commit": "abc1234", "cores": 2, "cpu_model": "CPU X",
                                              "python": "3.11.7", "board_profile": "generic-x86_64"}},
           "datetime": "2026-12-02T01:00:00", "benchmarks": [cfg("p256", 0.00223), cfg("rsa2048", 0.0529)]}
    src = tmp_path / "latest.json"
    src.write_text(json.dumps(raw))
    md = tmp_path / "README.md"
    md.write_text(f"before\n{rep.README_BEGIN}\nstale\n{rep.README_END}\nafter\n")
    assert rep.main([str(src), "--out", str(tmp_path / "REPORT.md"), "--readme", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("before\n") and text.endswith(f"{rep.README_END}\nafter\n") and "stale" not in text
    assert "Last full run (2026-12-02, commit abc1234): 2 cores, CPU X" in text
    assert "| RSA-2048, DTLS-PSK, AES-128 | 52.9 | 52.9 | 52.9 | 52.9 | 52.9 | **52.9** | 9,516 |" in text
    assert "| P-256, DTLS-PSK, AES-128 | 2.23 | 2.23 | 2.23 | 2.23 | 2.23 | **2.23** | – |" in text
    assert text.index("RSA-2048") < text.index("P-256")  # README_ROWS order, not the data's
    md.write_text("no markers\n")
    assert rep.main([str(src), "--out", str(tmp_path / "REPORT.md"), "--readme", str(md)]) == 1
    assert md.read_text() == "no markers\n"
