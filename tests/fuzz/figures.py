"""Merge the ``--json`` files of long fuzz runs into ``tests/fuzz/data/long-run.json`` and print the table.

    python -m tests.fuzz.figures RUN.json [RUN.json ...]     # merge (later files win per target), print
    python -m tests.fuzz.figures                             # print the committed figures

Each row keeps the commit and engine it was measured with (a target re-run after a fix replaces its row), so the
committed data says exactly which code produced which figure. The printed Markdown table is what
``tests/fuzz/README.md`` quotes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "long-run.json"
KEEP = ("target", "engine", "inputs", "seconds", "execs_per_s", "crash_kinds", "foreign", "hangs", "accepted_mutants",
        "state_changes", "accepted", "refused", "slowest_s", "slowest_wall_s", "kinds")


def merge(paths) -> dict:
    data = json.loads(DATA.read_text()) if DATA.exists() else {"rows": {}}
    for p in paths:
        run = json.loads(Path(p).read_text())
        info = run["run"]
        for row in run["rows"]:
            r = {k: row.get(k) for k in KEEP}
            r["seconds"] = round(r["seconds"] or 0.0, 1)
            r["slowest_s"] = round(r["slowest_s"] or 0.0, 3)
            r["slowest_wall_s"] = round(r["slowest_wall_s"] or 0.0, 3)
            r["run"] = {k: info.get(k) for k in ("commit", "dirty", "finished", "engine", "python", "micropython",
                                                  "machine", "cpus", "loadavg", "nice")}
            key = r["target"] + (" (MicroPython)" if r["engine"] == "mpy-unix" else "")
            data["rows"][key] = r
    data["rows"] = dict(sorted(data["rows"].items()))
    return data


def table(data: dict) -> str:
    head = ("| target | engine | inputs | execs/s | crash kinds | foreign | hangs | accepted mutants | state changes "
            "| accepted | slowest (CPU) | commit |")
    lines = [head, "|" + "---|" * 12]
    for key, r in data["rows"].items():
        commit = (r["run"]["commit"] or "?")[:10] + ("+" if r["run"]["dirty"] else "")
        lines.append(f"| {key} | {r['engine']} | {r['inputs']:,} | {r['execs_per_s']:,.0f} | "
                     f"{r['crash_kinds']} | {r['foreign']} | {r['hangs']} | {r['accepted_mutants']} | "
                     f"{r['state_changes']} | {r['accepted']:,} | {r['slowest_s'] * 1000:,.0f} ms | {commit} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    paths = list(argv if argv is not None else sys.argv[1:])
    if paths:
        data = merge(paths)
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text(json.dumps(data, indent=1) + "\n")
    elif DATA.exists():
        data = json.loads(DATA.read_text())
    else:
        print(f"no figures yet: run 'make fuzz' and then python -m tests.fuzz.figures {DATA.parent}/<run>.json",
              file=sys.stderr)
        return 1
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
