"""The archive job: bounded offset ranges of many partitions per run."""

from __future__ import annotations

import dagster as dg

from protoagg_dagster.archive.ops import append, consume, dedupe, encode


@dg.job(
    executor_def=dg.in_process_executor,
    # Outputs live in memory (definitions.py), so a retried run re-executes all its steps,
    # which the ledger makes safe.
    tags={"dagster/retry_strategy": "ALL_STEPS"},
    description="Archive offset ranges [start, end) of Kafka partitions (at most one per "
    "partition): consume, dedupe, encode, append to GCS. Launched by kafka_offsets_sensor; "
    "launch it by hand to backfill ranges.",
)
def archive_kafka_batch() -> None:
    append(encode(dedupe(consume())))
