"""Where the test suite's time goes, by test file, from pytest's ``--durations=0`` output.

    python benchmarks/suite_time.py BEFORE.log [AFTER.log]

Each log is the output of ``scripts/test --durations=0`` (or ``pytest --durations=0``). Every
reported phase of a test (setup, call, teardown) counts towards its file, so a module- or
session-scoped fixture counts where it is set up. Prints a Markdown table, slowest file first
(of the last log), with pytest's own closing line (tests passed) and wall-clock total.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

DURATION = re.compile(r"^\s*(?P<seconds>[0-9.]+)s (?P<phase>setup|call|teardown)\s+(?P<node>\S+)")
# pytest's closing line, e.g. "===== 414 passed, 2 warnings in 1523.41s (0:25:23) =====".
TOTAL = re.compile(r"^=+ (?P<outcome>.*) in (?P<seconds>[0-9.]+)s")


@dataclass
class SuiteTime:
    """Seconds and tests per file of one run; ``total`` is pytest's wall clock, if it finished."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    total: float | None = None
    outcome: str = ""


def parse(text: str) -> SuiteTime:
    suite = SuiteTime()
    for line in text.splitlines():
        if match := DURATION.match(line):
            suite.seconds[match["node"].split("::", 1)[0]] += float(match["seconds"])
        elif match := TOTAL.match(line):
            suite.total, suite.outcome = float(match["seconds"]), match["outcome"]
    return suite


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s ({seconds / 60:.1f} min)" if seconds >= 60 else f"{seconds:.1f} s"


def table(runs: list[SuiteTime]) -> str:
    last = runs[-1]
    files = sorted({f for run in runs for f in run.seconds}, key=lambda f: -last.seconds.get(f, 0))
    heads = ["file", "before", "after"] if len(runs) == 2 else ["file", "time"]
    rows = [heads, ["---"] + ["---:"] * (len(heads) - 1)]
    for path in files:
        row = [path]
        for run in runs:
            row.append(minutes(run.seconds.get(path)))
        rows.append(row)
    rows.append(["sum of the files", *(minutes(sum(run.seconds.values())) for run in runs)])
    rows.append(["pytest's total", *(minutes(run.total) for run in runs)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    runs = [parse(Path(name).read_text(errors="replace")) for name in argv]
    for name, run in zip(argv, runs, strict=True):
        if not run.seconds:
            print(f"{name}: no durations (run pytest with --durations=0)", file=sys.stderr)
            return 1
        print(f"{name}: {run.outcome or 'unfinished'}")
    print()
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
