"""A month at 100 / 1,000 / 10,000 partitions, projected from a measured steady run.

    .venv/bin/python benchmarks/month_projection.py steady.json [--keep-days 14]

``steady.json`` is the last line of ``benchmarks/steady_partitions.py``. From it: archive runs
per minute at its partition count, Dagster bytes per run (DAGSTER_HOME's growth over the whole
measurement, ticks and observations included, divided by its runs), appends (one upload and one
compose, class A) per run. Runs are assumed to grow in proportion to partitions (a run takes at
most ``PROTOAGG_MAX_PARTITIONS_PER_RUN`` of them, of any topics, so one sweep of quiet partitions
needs ``ceil(partitions / PROTOAGG_MAX_PARTITIONS_PER_RUN)`` runs) up to the sensor's cap
(``PROTOAGG_MAX_RUNS_PER_TICK`` runs a tick); past the cap a sweep's ranges grow instead of its
runs. Event rows per run are the measured run's (its event log's rows over its runs, with
``--dagster-storage postgres``), else 58 (four ops, five materializations, fifteen check
evaluations: the job before 3c2fe8b). Bytes per run are the
measured run's, whose runs held up to 1,000 ranges: smaller deployments' runs hold fewer ranges,
so their bytes are overestimated.

Prints a markdown table, then one JSON line ``{"benchmark": "month_projection", ...}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protoagg_dagster.core.settings import (  # noqa: E402
    MAX_PARTITIONS_PER_RUN,
    MAX_RUNS_PER_TICK,
    SENSOR_INTERVAL_SECONDS,
)
from protoagg_dagster.core.storage_bill import CLASS_A_USD_PER_1000  # noqa: E402

EVENTS_PER_RUN_BEFORE = 58
SIZES = (100, 1_000, 10_000)


def project(steady: dict[str, Any], partitions: int, keep_days: float) -> dict[str, Any]:
    measured = steady["partitions"]
    per_run = int(MAX_PARTITIONS_PER_RUN.default)
    scale = math.ceil(partitions / per_run) / math.ceil(measured / per_run)
    # The daemon evaluates sensors every 5 s at the most.
    ticks_per_minute = 60 / max(float(SENSOR_INTERVAL_SECONDS.default), 5.0)
    cap = int(MAX_RUNS_PER_TICK.default) * ticks_per_minute
    runs_per_minute = min(steady["runs_per_minute_steady"] * scale, cap)
    runs_per_day = runs_per_minute * 1440
    bytes_per_day = runs_per_day * steady["dagster_bytes_per_run"]
    operations = runs_per_day * steady["class_a_operations"] / steady["runs"]
    event_rows = steady.get("dagster_breakdown", {}).get("event_rows")
    events_per_run = event_rows / steady["runs"] if event_rows else EVENTS_PER_RUN_BEFORE
    return {
        "partitions": partitions,
        "runs_per_day": runs_per_day,
        "capped": runs_per_minute >= cap,
        "event_rows_per_day": runs_per_day * events_per_run,
        "dagster_gb_per_day": bytes_per_day / 1e9,
        "dagster_gb_kept": bytes_per_day * keep_days / 1e9,
        "dagster_gb_after_a_month_without_retention": bytes_per_day * 30 / 1e9,
        "class_a_per_day": operations,
        "class_a_usd_per_day": operations / 1000 * CLASS_A_USD_PER_1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("steady", type=Path, help="steady_partitions.py's JSON line")
    parser.add_argument("--keep-days", type=float, default=14.0)
    args = parser.parse_args()
    steady = json.loads(args.steady.read_text().strip().splitlines()[-1])
    rows = [project(steady, p, args.keep_days) for p in SIZES]
    print(
        f"Measured: {steady['partitions']:,} partitions at {steady['achieved_rate']:,.0f} msg/s, "
        f"{steady['runs_per_minute_steady']:.1f} runs a minute, "
        f"{steady['dagster_bytes_per_run'] / 1e3:.0f} KB of Dagster storage per run, "
        f"{steady['class_a_operations'] / steady['runs']:.1f} class A operations per run."
    )
    print()
    print(
        "| partitions | runs a day | event rows a day | Dagster GB a day | kept "
        f"({args.keep_days:g} days) | a month without retention | class A a day | USD a day |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['partitions']:,} | {r['runs_per_day']:,.0f}{' (cap)' if r['capped'] else ''} "
            f"| {r['event_rows_per_day']:,.0f} | {r['dagster_gb_per_day']:.2f} "
            f"| {r['dagster_gb_kept']:.1f} GB "
            f"| {r['dagster_gb_after_a_month_without_retention']:.0f} GB "
            f"| {r['class_a_per_day']:,.0f} | {r['class_a_usd_per_day']:.2f} |"
        )
    print(json.dumps({"benchmark": "month_projection", "measured": steady["code"], "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
