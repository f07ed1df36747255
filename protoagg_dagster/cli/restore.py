"""The ``protoagg restore`` command: a progress bar over ``restore.restore`` and its summary."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from protoagg_dagster.core.restore import RestoreSpec, Selection, summary
from protoagg_dagster.resources import KafkaResource
from protoagg_dagster.restore.writer import list_sources, plan_restore, restore


def spec_from_args(args: argparse.Namespace) -> RestoreSpec:
    return RestoreSpec(
        sources=tuple(args.sources),
        to_topic=args.to_topic,
        selection=Selection(
            args.partition, args.from_offset, args.to_offset, args.from_time, args.to_time
        ),
        partitioner=args.partitioner,
        key=args.key,
        source_headers=args.source_headers,
    )


def run_restore(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    if args.dry_run:
        tallies, bad_frame = plan_restore(list_sources(spec.sources), spec)
        print(f"would restore {tallies.records} records ({tallies.bytes / 1e6:.2f} MB)")
        print("\n".join(tallies.lines()))
        if bad_frame is not None:
            print(f"and stop at: {bad_frame}")
        return 0
    kafka = KafkaResource.from_env(bootstrap=args.bootstrap)
    bars: list[tqdm] = []  # type: ignore[type-arg]

    def progress(done: int, written: int, _seconds: float, total: int) -> None:
        # The bar appears once writing starts, so an early refusal prints one clean line.
        if not bars:
            bars.append(tqdm(total=total, unit=" records", unit_scale=True, file=sys.stderr))
        bars[0].update(done - bars[0].n)
        bars[0].set_postfix_str(f"{written / 1e6:.1f} MB")

    try:
        result = restore(spec, kafka, args.create_topic, progress, args.transaction_records)
    finally:
        for bar in bars:
            bar.close()
    print(summary(result.restored, result.skipped, result.already_done))
    return 0
