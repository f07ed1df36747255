"""The archive job: bounded offset ranges of many partitions per run."""

from __future__ import annotations

import dagster as dg

from protoagg_dagster.archive.ops import archive


@dg.job(
    executor_def=dg.in_process_executor,
    description="Archive offset ranges [start, end) of Kafka partitions (at most one per "
    "partition) in one op: consume, dedupe, encode, append to GCS. Launched by "
    "kafka_offsets_sensor; launch it by hand to backfill ranges.",
)
def archive_kafka_batch() -> None:
    archive()
