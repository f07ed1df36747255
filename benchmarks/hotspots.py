"""Top self-time hot spots of the measured (first) archive run in a py-spy speedscope profile.

    .venv/bin/py-spy record --rate 250 --format speedscope -o /tmp/profile.json -- \
        .venv/bin/python benchmarks/run_once.py --messages 100000
    .venv/bin/python benchmarks/hotspots.py /tmp/profile.json [--top 10] [--all-samples]

By default only the main thread's samples of the first ``run_archive -> execute_in_process`` call
(the full run, not the re-run) are counted. Samples are on-CPU unless py-spy ran with ``--idle``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

MARK = "execute_in_process"
PACKAGE = "protoagg_dagster/"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--all-samples", action="store_true", help="whole process, all runs")
    args = parser.parse_args()
    with open(args.profile) as file:
        data = json.load(file)
    frames: list[dict[str, Any]] = data["shared"]["frames"]
    main_profile = max(data["profiles"], key=lambda p: len(p["samples"]))
    samples: list[list[int]] = main_profile["samples"]
    unit = main_profile.get("unit", "none")

    def names(stack: list[int]) -> list[str]:
        return [frames[i]["name"] for i in stack]

    selected = list(range(len(samples)))
    if not args.all_samples:
        inside = [any(MARK in n for n in names(s)) for s in samples]
        first = inside.index(True)
        last = first
        # the first contiguous stretch (allowing short gaps of samples outside, e.g. GC)
        gap = 0
        for i in range(first, len(samples)):
            if inside[i]:
                last, gap = i, 0
            else:
                gap += 1
                if gap > 25:
                    break
        selected = [i for i in range(first, last + 1) if inside[i]]
    total = len(selected)
    self_line: Counter[str] = Counter()
    self_func: Counter[str] = Counter()
    pkg_incl: Counter[str] = Counter()
    for i in selected:
        stack = samples[i]
        leaf = frames[stack[-1]]
        self_line[f"{leaf['name']}  {short(leaf['file'])}:{leaf['line']}"] += 1
        self_func[f"{leaf['name']}  {short(leaf['file'])}"] += 1
        seen = set()
        for index in stack:
            frame = frames[index]
            if PACKAGE in frame["file"]:
                key = f"{frame['name']}  {short(frame['file'])}:{frame['line']}"
                if key not in seen:
                    seen.add(key)
                    pkg_incl[key] += 1
    print(f"{total} samples ({unit}; {'whole process' if args.all_samples else 'first run'})")
    for title, counter in (
        ("self time by line", self_line),
        ("self time by function", self_func),
        ("protoagg_dagster lines, inclusive", pkg_incl),
    ):
        print(f"\n{title}:")
        for key, count in counter.most_common(args.top):
            print(f"  {100 * count / total:5.1f}%  {count:5d}  {key}")
    return 0


def short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


if __name__ == "__main__":
    raise SystemExit(main())
