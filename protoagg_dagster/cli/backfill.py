"""The ``protoagg backfill`` command: plan, skip what is archived, queue, follow with progress."""

from __future__ import annotations

import argparse
import time
import uuid

from dagster_graphql import DagsterGraphQLClient
from tqdm import tqdm

from protoagg_dagster.archive.ledger import begin_partition, ledger_connection, read_progress
from protoagg_dagster.backfill.submit import follow, resolve_ranges, submit
from protoagg_dagster.core import settings
from protoagg_dagster.core.planning import OffsetRange, split_range
from protoagg_dagster.resources import KafkaResource, PostgresResource


def run_backfill(args: argparse.Namespace) -> int:
    kafka = KafkaResource.from_env(topics=args.topic)
    wanted = resolve_ranges(
        kafka,
        args.topic,
        args.partitions,
        args.from_offset,
        args.to_offset,
        args.from_time,
        args.to_time,
    )
    with ledger_connection(PostgresResource(dsn=settings.POSTGRES_DSN.read())) as conn:
        for whole in wanted:
            begin_partition(conn, whole.topic, whole.partition, whole.start)
        progress = read_progress(conn, args.topic)
    to_run: list[OffsetRange] = []
    for whole in wanted:
        state = progress.get(whole.partition)
        archived_to = state.next_offset if state is not None else None
        pending = state is not None and state.pending is not None
        if archived_to is not None and archived_to >= whole.end and not pending:
            print(f"{whole}: already archived (up to offset {archived_to}); nothing to append")
            continue
        if archived_to is not None and archived_to > whole.start:
            print(
                f"{whole}: offsets before {archived_to} are already archived; they append nothing"
            )
        size = args.max_batch_messages or settings.MAX_BATCH_MESSAGES.read_int()
        to_run += split_range(whole, size)
    if not to_run:
        print("nothing to backfill")
        return 0
    host, _, port = args.dagster.rpartition(":")
    client = DagsterGraphQLClient(host or "127.0.0.1", port_number=int(port))
    label = uuid.uuid4().hex[:8]
    runs = submit(client, to_run, label)
    total = sum(batch.size for batch in to_run)
    print(f"queued {len(runs)} runs (tag protoagg/backfill={label}) for {total} offsets")
    if args.no_wait:
        return 0
    started = time.monotonic()
    with tqdm(total=total, unit="msg", unit_scale=True) as bar:

        def show(done: int, failed: int, offsets: int) -> None:
            bar.update(offsets - bar.n)
            rate = offsets / max(time.monotonic() - started, 1e-9)
            bar.set_postfix_str(f"runs {done}/{len(runs)}, failed {failed}, {rate:,.0f} msg/s")

        status = follow(client, runs, show)
    failed = [r for r in runs if status[r.run_id].value != "SUCCESS"]
    for run in failed:
        print(f"run {run.run_id} for {run.batch} ended {status[run.run_id].value}")
    return 1 if failed else 0
