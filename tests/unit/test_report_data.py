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
