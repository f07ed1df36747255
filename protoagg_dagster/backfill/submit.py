"""Backfilling offset ranges: bounded runs queued through a Dagster deployment's GraphQL API.

Runs go through the instance's run queue, so they show in the UI and obey the same one-run-per-
partition limit as the sensor's. Offsets already archived are recognised by the ledger and append
nothing.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dagster import DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError
from kafka import TopicPartition

from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.run_tags import (
    BACKFILL_PARTITION_TAG,
    partition_key,
    range_run_config,
    range_tags,
)
from protoagg_dagster.core.errors import BackendError, ConfigError
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.resources.kafka import KafkaResource

BACKFILL_TAG = "protoagg/backfill"
# Dagster's run queue starts the highest priority first, then the oldest. A partition's later
# ranges rank lower, so a range retried after a crash (its retry queued last, with its tags)
# still starts before them instead of letting them reach the ledger first and spend their own
# retries on "would leave a gap".
PRIORITY_TAG = "dagster/priority"
FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


@dataclass(frozen=True)
class Submitted:
    batch: OffsetRange
    run_id: str


def resolve_ranges(
    kafka: KafkaResource,
    topic: str,
    partitions: Sequence[int] | None,
    from_offset: int | None,
    to_offset: int | None,
    from_time_ms: int | None,
    to_time_ms: int | None,
) -> list[OffsetRange]:
    """The wanted range of each partition, clamped to what Kafka still holds.

    Times are translated with Kafka's offsets-for-times: the first offset at or after the time.
    """
    bounds = kafka.offset_bounds(topic)
    chosen = sorted(bounds) if partitions is None else list(partitions)
    unknown = [p for p in chosen if p not in bounds]
    if unknown:
        raise ConfigError(f"topic {topic!r} has no partition {unknown}; it has {sorted(bounds)}")
    starts = _offsets_for_time(kafka, topic, chosen, from_time_ms)
    ends = _offsets_for_time(kafka, topic, chosen, to_time_ms)
    ranges = []
    for partition in chosen:
        log_start, log_end = bounds[partition]
        start = from_offset if from_offset is not None else starts.get(partition, log_start)
        end = to_offset if to_offset is not None else ends.get(partition, log_end)
        start, end = max(start, log_start), min(end, log_end)
        if end > start:
            ranges.append(OffsetRange(topic, partition, start, end))
    return ranges


def _offsets_for_time(
    kafka: KafkaResource, topic: str, partitions: Sequence[int], time_ms: int | None
) -> dict[int, int]:
    if time_ms is None:
        return {}
    consumer = kafka.get_consumer()
    try:
        bounds = kafka.offset_bounds(topic)
        found = consumer.offsets_for_times({TopicPartition(topic, p): time_ms for p in partitions})
        # None: no message at or after the time, so the range ends at the log end.
        return {
            tp.partition: (value.offset if value is not None else bounds[tp.partition][1])
            for tp, value in found.items()
        }
    finally:
        consumer.close()


def submit(
    client: DagsterGraphQLClient, batches: Sequence[OffsetRange], label: str
) -> list[Submitted]:
    """Queue one run per batch, in offset order."""
    submitted = []
    position: Counter[tuple[str, int]] = Counter()
    for batch in batches:
        rank = position[(batch.topic, batch.partition)]
        position[(batch.topic, batch.partition)] += 1
        try:
            run_id = client.submit_job_execution(
                archive_kafka_batch.name,
                run_config=range_run_config(batch.topic, batch.partition, batch.start, batch.end),
                tags={
                    **range_tags(batch.topic, batch.partition, batch.start, batch.end),
                    BACKFILL_TAG: label,
                    BACKFILL_PARTITION_TAG: partition_key(batch.topic, batch.partition),
                    PRIORITY_TAG: str(-rank),
                },
            )
        except DagsterGraphQLClientError as exc:
            raise BackendError(
                f"the Dagster deployment refused the run for {batch}: {exc}"
            ) from exc
        submitted.append(Submitted(batch, run_id))
    return submitted


def follow(
    client: DagsterGraphQLClient,
    runs: Sequence[Submitted],
    on_progress: Callable[[int, int, int], None],
    poll_seconds: float = 1.0,
) -> dict[str, DagsterRunStatus]:
    """Poll until every run has finished; report (runs done, runs failed, offsets done)."""
    status: dict[str, DagsterRunStatus] = {}
    while len(status) < len(runs):
        for run in runs:
            if run.run_id not in status:
                current = client.get_run_status(run.run_id)
                if current in FINISHED:
                    status[run.run_id] = current
        done_offsets = sum(r.batch.size for r in runs if r.run_id in status)
        failed = sum(1 for s in status.values() if s != DagsterRunStatus.SUCCESS)
        on_progress(len(status), failed, done_offsets)
        if len(status) < len(runs):
            time.sleep(poll_seconds)
    return status
