"""A results file in a few lines: `python -m fastseg.bench.summary RESULTS.json`.

Made for the end of benchmarks/gpu_check.sh, whose last lines are all a lent device's reply carries back:
one line per (op, pass, dtype) with the geometric-mean speedup, its spread, and failures named.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from fastseg.bench.harness import FAILURE_NOTE_PREFIXES, geometric_mean

FAILURES_SHOWN = 5


def summarize(document: dict[str, Any]) -> str:
    rows = document["rows"]
    tests = document.get("tests")
    copy_GBps = document["ceilings"].get("copy_GBps")
    lines = [
        f"{document['device']}, commit {document['commit']}, {document['date']}",
        "ceilings: " + ", ".join(f"{k} {v}" for k, v in document["ceilings"].items()),
        "tests: " + (", ".join(f"{v} {k}" for k, v in tests.items()) if tests else "not recorded"),
    ]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["op"], row["pass"], row["dtype"])].append(row)

    table = [("op", "pass", "dtype", "rows", "failed", "skipped", "geomean x", "min x", "max x", "median %copy-bw")]
    for (op, pass_, dtype), group in groups.items():
        speedups = [row["speedup"] for row in group if row["speedup"]]
        bandwidth = [row["GBps"] / copy_GBps * 100 for row in group if row["GBps"] and copy_GBps]
        table.append((
            op, pass_, dtype, str(len(group)),
            str(sum(_failed(row) for row in group)),
            str(sum(_has_note(row, ("skipped",)) for row in group)),
            f"{geometric_mean(speedups):.2f}" if speedups else "-",
            f"{min(speedups):.2f}" if speedups else "-",
            f"{max(speedups):.2f}" if speedups else "-",
            f"{statistics.median(bandwidth):.0f}" if bandwidth else "-",
        ))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines += ["  ".join(cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i]) for i, cell in enumerate(line))
              for line in table]

    failures = [row for row in rows if _failed(row)]
    for row in failures[:FAILURES_SHOWN]:
        lines.append(f"FAILED {row['op']} | {row['case']} | {row['dtype']} | {row['layout']}: {row['notes']}")
    if len(failures) > FAILURES_SHOWN:
        lines.append(f"... and {len(failures) - FAILURES_SHOWN} more failed rows (see the results file)")
    return "\n".join(lines)


def _failed(row: dict[str, Any]) -> bool:
    return _has_note(row, FAILURE_NOTE_PREFIXES)


def _has_note(row: dict[str, Any], prefixes: tuple[str, ...]) -> bool:
    return any(note.startswith(prefixes) for note in row["notes"].split("; "))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fastseg.bench.summary RESULTS.json", file=sys.stderr)
        return 2
    print(summarize(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
