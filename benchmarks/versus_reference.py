"""protoagg and the reference tool side by side: one invocation, the same services and messages.

    PYTHONPATH=. .venv/bin/python benchmarks/versus_reference.py [--reference-src DIR]
        [--messages N] [--recommended fast] [--part all|targets|plot]
        [--plot-batches 50000,100000,200000] [--plot-messages N] [--plot-path PATH]
        [--bootstrap HOST:PORT] [--gcs http://HOST:PORT] [--admin-dsn postgresql://...]

Issue 15's throughput targets, measured back to back (``--part targets``): on 1 partition the
reference tool at its best setting (``BATCH_SIZE=200000 TIMEOUT=1s``, built and measured by
``benchmarks/reference_tool.py``), protoagg through ``dagster-daemon`` with the default settings
(``defaults-1p``) and with the settings docs/benchmarks.md recommends for throughput
(``--recommended``, default ``fast``: the ``fast-Np`` configurations of
``benchmarks/e2e_dagster.py``); then the same on 4 partitions. N messages
(``benchmarks/run_once.make_values``, the same seed for both tools at a partition count, so the
same messages) are produced before each tool starts. protoagg's seconds run from its first run
created to everything archived (``e2e_dagster.py``); the reference's from its process start,
minus its 10 s start-up sleep, to ``processed_logs`` complete. Each ratio ``protoagg /
reference`` divides msg/s by the reference at its best (its fastest complete run of the
invocation, 1 or 4 partitions) and is printed next to its target (defaults 1p >= 1x, recommended
1p >= 2x, recommended 4p >= 3x; defaults 4p has none and is shown for comparison); also the
ratio of the shares of each topic's own raw consume ceiling (the topics differ), and the ratio
to the reference on the same partition count.

The plot (``--part plot``): msg/s against batch size (``PROTOAGG_MAX_BATCH_MESSAGES`` for
protoagg, ``BATCH_SIZE`` with ``TIMEOUT=1s`` for the reference) on 1 and 4 partitions, both
tools, ``--plot-messages`` each point; written to docs/img/throughput-vs-reference.png.

Full size: 1,000,000 messages for the targets, 300,000 per plot point (about 15 minutes here).
Without a reference source (``--reference-src`` or $PROTOAGG_REFERENCE_SRC) it prints how to
provide one and a JSON line with ``"skipped"``.
The table, then one JSON line ``{"benchmark": "versus_reference", ...}`` (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.e2e_dagster import (  # noqa: E402
    Services,
    Topic,
    add_service_args,
    archive_with_daemon,
    config_named,
    fmt,
    make_topic,
    services_from,
)
from benchmarks.reference_tool import (  # noqa: E402
    BEST,
    HOW_TO,
    build,
    measure,
    parse_settings,
    reference_source,
    skipped,
)
from benchmarks.run_once import _rounded, code_version, make_values  # noqa: E402

PLOT_PATH = ROOT / "docs" / "img" / "throughput-vs-reference.png"
# (protoagg configuration kind, partitions, target ratio to the reference's best setting or None)
TARGETS: tuple[tuple[str, int, float | None], ...] = (
    ("defaults", 1, 1.0),
    ("{recommended}", 1, 2.0),
    ("defaults", 4, None),
    ("{recommended}", 4, 3.0),
)


@dataclass(frozen=True)
class Bench:
    """What every measurement of one invocation shares: services, binary, seed, output places."""

    svc: Services
    binary: Path
    seed: int
    deadline: float
    reference_deadline: float
    home: Path
    topics: dict[tuple[int, int], Topic] = field(default_factory=dict)

    @staticmethod
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def seed_for(self, n: int, partitions: int) -> int:
        # e2e_dagster.py's topic seed, so both tools get the same messages.
        return self.seed + 1000 * partitions + n

    def protoagg(
        self, n: int, partitions: int, label: str, settings: dict[str, str]
    ) -> dict[str, Any]:
        if (n, partitions) not in self.topics:  # configurations share a topic, as in e2e
            seed = self.seed_for(n, partitions)
            self.topics[n, partitions] = make_topic(self.svc, n, partitions, seed, self.log)
        topic = self.topics[n, partitions]
        (result,) = archive_with_daemon(
            self.svc, [topic], label, settings, False, self.deadline, self.home, self.log
        )
        result["raw_consume_msgs_per_s"] = topic.raw_msgs_per_s
        return {"tool": "protoagg", **result}

    def reference(self, n: int, partitions: int, setting: str) -> dict[str, Any]:
        values, _ = make_values(n, 0.05, self.seed_for(n, partitions))
        (parsed,) = parse_settings(setting)
        return measure(
            self.svc,
            self.binary,
            values,
            partitions,
            parsed,
            self.reference_deadline,
            self.home,
            self.log,
        )


def run_targets(bench: Bench, n: int, recommended: str) -> dict[str, Any]:
    """Reference then protoagg, per partition count, and the ratios against the targets."""
    references: dict[int, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    for partitions in sorted({p for _, p, _ in TARGETS}):
        references[partitions] = bench.reference(n, partitions, BEST)
        runs.append(references[partitions])
        for name, p, _ in TARGETS:
            if p == partitions:
                config = config_named(f"{name.format(recommended=recommended)}-{p}p", n)
                runs.append(bench.protoagg(n, p, config.name, config.settings))
    # "The reference at its best": its fastest complete run here, whatever the partition count.
    finished = [r for r in references.values() if r["complete"]]
    best = max(finished, key=lambda r: r["msgs_per_s"], default=None)
    rows = []
    for name, partitions, target in TARGETS:
        label = f"{name.format(recommended=recommended)}-{partitions}p"
        ours = next(r for r in runs if r["tool"] == "protoagg" and r["config"] == label)
        ratio = quotient(ours, best, "msgs_per_s")
        rows.append(
            {
                "protoagg": label,
                "partitions": partitions,
                "reference": f"{best['setting']} {best['partitions']}p" if best else None,
                "ratio": ratio,
                "ratio_of_raw_shares": quotient(ours, best, "ratio_to_raw"),
                "ratio_same_partitions": quotient(ours, references[partitions], "msgs_per_s"),
                "target": target,
                "met": None
                if target is None
                else ratio is not None and ratio >= target and ours["complete"],
            }
        )
    return {"messages": n, "runs": runs, "ratios": rows}


def quotient(ours: dict[str, Any], ref: dict[str, Any] | None, key: str) -> float | None:
    if ref is None or not ours[key] or not ref[key]:
        return None
    return float(ours[key] / ref[key])


def run_plot(bench: Bench, n: int, batches: list[int], path: Path) -> dict[str, Any]:
    points = []
    for partitions in (1, 4):
        for m in batches:
            ours = bench.protoagg(
                n,
                partitions,
                f"plot-m{m}-{partitions}p",
                {"PROTOAGG_MAX_BATCH_MESSAGES": str(m), "PROTOAGG_BATCH_SIZE": str(min(500, m))},
            )
            ref = bench.reference(n, partitions, f"{m}:1s")
            for r in (ours, ref):
                points.append(
                    {
                        "tool": r["tool"],
                        "partitions": partitions,
                        "batch": m,
                        "messages": n,
                        "msgs_per_s": r["msgs_per_s"],
                        "ratio_to_raw": r["ratio_to_raw"],
                        "complete": r["complete"],
                    }
                )
    return {"points": points, "png": save_plot(points, n, path)}


def save_plot(points: list[dict[str, Any]], n: int, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    styles = {"protoagg": ("tab:blue", "o"), "reference": ("tab:orange", "s")}
    for tool, (color, marker) in styles.items():
        for partitions, line in ((1, "-"), (4, "--")):
            good = sorted(
                (p["batch"], p["msgs_per_s"])
                for p in points
                if p["tool"] == tool and p["partitions"] == partitions and p["msgs_per_s"]
            )
            if good:
                xs, ys = zip(*good, strict=True)
                label = f"{tool}, {partitions} partition{'s' if partitions > 1 else ''}"
                face = color if partitions == 1 else "white"
                ax.plot(xs, ys, line, color=color, marker=marker, mfc=face, label=label)
    batches = sorted({p["batch"] for p in points})
    ax.set_xscale("log")
    ax.set_xticks(batches, [f"{b:,}" for b in batches])
    ax.minorticks_off()
    ax.set_xlabel("batch size: PROTOAGG_MAX_BATCH_MESSAGES / reference BATCH_SIZE (TIMEOUT=1s)")
    ax.set_ylabel("messages / second")
    ax.set_title(f"protoagg (dagster-daemon) vs the reference tool, {n // 1000}k messages a point")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, handlelength=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def print_report(report: dict[str, Any]) -> None:
    print()
    print(
        f"protoagg vs the reference tool ({report['cpus']} CPUs shared; code {report['code']}; "
        f"seed {report['seed']})"
    )
    targets = report.get("targets")
    if targets:
        head = f"  {'run':<30}{'part':>5}{'msgs':>11}{'runs':>6}{'seconds':>9}{'msg/s':>9}"
        print(head + f"{'%raw':>7}{'ok':>4}")
        print("  " + "-" * (len(head) + 9))
        for r in targets["runs"]:
            name = (
                f"protoagg {r['config']}"
                if r["tool"] == "protoagg"
                else f"reference {r['setting']}"
            )
            count = r["runs"] if r["tool"] == "protoagg" else r["batches"]
            seconds = r["pipeline_s"] if r["tool"] == "protoagg" else r["seconds"]
            ratio = r["ratio_to_raw"]
            print(
                f"  {name:<30}{r['partitions']:>5}{r['messages']:>11,}{count:>6}"
                f"{fmt(seconds):>9}{fmt(r['msgs_per_s'], ',.0f'):>9}"
                f"{fmt(100 * ratio if ratio else None):>7}{'yes' if r['complete'] else 'NO':>4}"
            )
        print(
            "  (runs: protoagg runs / reference batches; seconds: protoagg first run created -> "
            "archived,\n   reference process start - 10 s sleep -> processed_logs complete)"
        )
        print()
        print(
            f"  {'protoagg / reference at its best':<42}{'ratio':>7}{'target':>9}"
            f"{'raw-share ratio':>17}{'same-partitions ratio':>23}"
        )
        for t in targets["ratios"]:
            label = f"{t['protoagg']} / {t['reference']}"
            target = "-" if t["target"] is None else f">= {t['target']:.0f}x"
            met = "" if t["met"] is None else "met" if t["met"] else "NOT met"
            print(
                f"  {label:<42}{fmt(t['ratio'], '.2f') + 'x':>7}{target:>9}"
                f"{fmt(t['ratio_of_raw_shares'], '.2f') + 'x':>17}"
                f"{fmt(t['ratio_same_partitions'], '.2f') + 'x':>23}  {met}"
            )
    plot = report.get("plot")
    if plot:
        print()
        print("  msg/s vs batch size:")
        print(f"  {'tool':<11}{'part':>5}{'batch':>9}{'msg/s':>9}{'%raw':>7}{'ok':>4}")
        for p in plot["points"]:
            ratio = p["ratio_to_raw"]
            print(
                f"  {p['tool']:<11}{p['partitions']:>5}{p['batch']:>9,}"
                f"{fmt(p['msgs_per_s'], ',.0f'):>9}{fmt(100 * ratio if ratio else None):>7}"
                f"{'yes' if p['complete'] else 'NO':>4}"
            )
        print(f"  plot: {plot['png']}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-src", default=None)
    parser.add_argument("--messages", "-n", type=int, default=1_000_000)
    parser.add_argument(
        "--recommended",
        default="fast",
        help="protoagg's throughput configuration kind (e2e_dagster.py's KIND-Np names)",
    )
    parser.add_argument("--part", choices=("all", "targets", "plot"), default="all")
    parser.add_argument("--plot-messages", type=int, default=300_000)
    parser.add_argument("--plot-batches", default="50000,100000,200000")
    parser.add_argument("--plot-path", default=None)
    parser.add_argument("--deadline", type=float, default=900.0, help="seconds per measurement")
    parser.add_argument(
        "--reference-deadline",
        type=float,
        default=600.0,
        help="seconds per reference measurement: on 4 partitions its commit of one entry per "
        "message stalls it for minutes per batch (benchmarks/reference_tool.md)",
    )
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--home", default=None, help="DAGSTER_HOMEs and tool logs (default: tmp)")
    add_service_args(parser)
    args = parser.parse_args()
    src = reference_source(args.reference_src)
    if src is None:
        return skipped("versus_reference", HOW_TO)
    svc = services_from(parser, args)
    home = Path(args.home or f"/tmp/protoagg-bench-versus-{uuid.uuid4().hex[:6]}")
    log: Callable[[str], None] = Bench.log
    started = time.time()
    bench = Bench(svc, build(src, log), args.seed, args.deadline, args.reference_deadline, home)
    report: dict[str, Any] = {
        "benchmark": "versus_reference",
        "code": code_version(),
        "cpus": os.cpu_count(),
        "seed": args.seed,
        "binary": str(bench.binary),
    }
    if args.part in ("all", "targets"):
        report["targets"] = run_targets(bench, args.messages, args.recommended)
    if args.part in ("all", "plot"):
        batches = [int(b) for b in args.plot_batches.split(",")]
        path = Path(args.plot_path) if args.plot_path else PLOT_PATH
        report["plot"] = run_plot(bench, args.plot_messages, batches, path)
    report["loadavg_end"] = os.getloadavg()
    report["wall_s"] = time.time() - started
    for r in report.get("targets", {}).get("runs", []):
        r.pop("timeline", None)
    print_report(report)
    print(
        f"  whole benchmark: {report['wall_s']:.0f} s; load average at the end "
        f"{report['loadavg_end'][0]:.1f}"
    )
    print(json.dumps(_rounded(report), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
