"""The sensor that watches Kafka partitions and launches one run per bounded offset range.

Each tick lists the topics anew (a pattern entry picks up topics created since) and records the
lag of every partition (messages and seconds behind the last stable offset, and the messages open
transactions hold back) as an observation of the archive asset and of each topic entry's asset.
"""

import json
import time
from dataclasses import dataclass
from typing import Any

import dagster as dg
from kafka import KafkaConsumer, TopicPartition

from protoagg_dagster.assets import ARCHIVE_ASSET, topic_asset_key
from protoagg_dagster.core.formats import TopicRule, rule_for
from protoagg_dagster.core.planning import OffsetRange, PartitionView, plan_batch
from protoagg_dagster.jobs import (
    PARTITION_TAG,
    RANGE_TAG,
    archive_kafka_batch,
    range_run_config,
    range_tags,
)
from protoagg_dagster.kafka_reader import offsets_at_time, timestamps_at
from protoagg_dagster.ledger import PartitionProgress, read_progress
from protoagg_dagster.resources import KafkaResource, PostgresResource
from protoagg_dagster.settings_resource import ArchiverSettings


@dataclass
class SensorCursor:
    """Per partition: when unarchived messages were first seen, and a resolved first offset.

    Only a convenience: the ledger's archived position is the truth, so a lost cursor costs at
    most one extra linger period (and, for ``start_from=latest``, a new look at the log end).
    """

    backlog_since: dict[str, float]
    start_at: dict[str, int]

    @classmethod
    def loads(cls, text: str | None) -> "SensorCursor":
        if not text:
            return cls({}, {})
        raw = json.loads(text)
        return cls(dict(raw.get("backlog_since", {})), dict(raw.get("start_at", {})))

    def dumps(self) -> str:
        return json.dumps(
            {"backlog_since": self.backlog_since, "start_at": self.start_at}, sort_keys=True
        )


@dg.sensor(
    job=archive_kafka_batch,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Reads each partition's end offset and archived position, and launches a run "
    "for the next bounded range when batch_size messages wait or linger_seconds have passed.",
)
def kafka_offsets_sensor(
    context: dg.SensorEvaluationContext,
    kafka: KafkaResource,
    postgres: PostgresResource,
    archiver: ArchiverSettings,
) -> dg.SensorResult:
    cursor = SensorCursor.loads(context.cursor)
    limits = archiver.limits()
    rules = archiver.topic_formats(kafka.topics).rules
    now = time.time()
    in_flight = _partitions_in_flight(context.instance)
    with postgres.get_connection() as conn:
        progress = {topic: read_progress(conn, topic) for topic in kafka.topic_list()}
    requests: list[dg.RunRequest] = []
    behind: dict[TopicPartition, tuple[int, int]] = {}  # next offset, messages behind
    held: dict[TopicPartition, int] = {}  # messages of open transactions, past the stable end
    consumer = kafka.get_consumer()
    try:
        for topic, known in progress.items():
            bounds = kafka.offset_bounds(topic)
            for partition, end in kafka.high_watermarks(topic, sorted(bounds)).items():
                held[TopicPartition(topic, partition)] = max(end - bounds[partition][1], 0)
            starts = _next_offsets(consumer, topic, bounds, known, cursor, archiver.start_choice())
            for partition, (_, log_end) in bounds.items():
                key = f"{topic}-{partition}"
                state = known.get(partition)
                view = PartitionView(
                    topic=topic,
                    partition=partition,
                    next_offset=starts[partition],
                    end_offset=log_end,
                    pending=state.pending if state is not None else None,
                    in_flight=key in in_flight,
                    backlog_since=cursor.backlog_since.get(key),
                )
                behind[TopicPartition(topic, partition)] = (
                    view.next_offset,
                    max(log_end - view.next_offset, 0),
                )
                plan = plan_batch(view, limits, now)
                _remember(cursor.backlog_since, key, plan.backlog_since)
                if plan.launch is not None:
                    context.log.info(f"launching {plan.launch}: {plan.reason}")
                    requests.append(_run_request(context.instance, plan.launch))
        oldest = timestamps_at(
            consumer, {tp: offset for tp, (offset, lag) in behind.items() if lag > 0}
        )
    finally:
        consumer.close()
    return dg.SensorResult(
        run_requests=requests,
        cursor=cursor.dumps(),
        asset_events=_lag_observations(rules, behind, oldest, held, now),
    )


def _next_offsets(
    consumer: KafkaConsumer,
    topic: str,
    bounds: dict[int, tuple[int, int]],
    known: dict[int, PartitionProgress],
    cursor: SensorCursor,
    start_from: str | int,
) -> dict[int, int]:
    """The first offset to archive per partition: the ledger's position, else ``start_from``."""
    result: dict[int, int] = {}
    unresolved = []
    for partition, (log_start, log_end) in bounds.items():
        state = known.get(partition)
        key = f"{topic}-{partition}"
        if state is not None and state.next_offset is not None:
            result[partition] = state.next_offset
        elif key in cursor.start_at:
            result[partition] = cursor.start_at[key]
        elif start_from == "earliest":
            result[partition] = log_start
        elif start_from == "latest":
            result[partition] = log_end
        else:
            unresolved.append(partition)
    if unresolved:
        assert isinstance(start_from, int)
        found = offsets_at_time(
            consumer, [TopicPartition(topic, p) for p in unresolved], start_from
        )
        for tp, offset in found.items():
            result[tp.partition] = offset if offset is not None else bounds[tp.partition][1]
    for partition, offset in result.items():
        if known.get(partition) is None or known[partition].next_offset is None:
            cursor.start_at[f"{topic}-{partition}"] = offset
    return result


def _run_request(instance: dg.DagsterInstance, batch: OffsetRange) -> dg.RunRequest:
    # A range relaunched after a failed run needs a fresh run key: Dagster skips a known one.
    attempts = instance.get_runs_count(filters=dg.RunsFilter(tags={RANGE_TAG: batch.run_key}))
    return dg.RunRequest(
        run_key=batch.run_key if attempts == 0 else f"{batch.run_key}-retry{attempts}",
        run_config=range_run_config(batch.topic, batch.partition, batch.start, batch.end),
        tags=range_tags(batch.topic, batch.partition, batch.start, batch.end),
    )


def _lag_observations(
    rules: tuple[TopicRule, ...],
    behind: dict[TopicPartition, tuple[int, int]],
    oldest: dict[TopicPartition, int],
    held: dict[TopicPartition, int],
    now: float,
) -> list[dg.AssetObservation]:
    """One observation for the whole archive, one per topic entry with its partitions only."""
    mine: dict[dg.AssetKey, list[TopicPartition]] = {ARCHIVE_ASSET: sorted(behind)}
    for tp in sorted(behind):
        rule = rule_for(rules, tp.topic)
        if rule is not None:
            mine.setdefault(topic_asset_key(rule), []).append(tp)
    return [
        _lag_observation(key, {tp: behind[tp] for tp in tps}, oldest, held, now)
        for key, tps in mine.items()
    ]


def _lag_observation(
    asset_key: dg.AssetKey,
    behind: dict[TopicPartition, tuple[int, int]],
    oldest: dict[TopicPartition, int],
    held: dict[TopicPartition, int],
    now: float,
) -> dg.AssetObservation:
    seconds = {tp: max(now - ts / 1000, 0.0) for tp, ts in oldest.items() if tp in behind}
    metadata: dict[str, dg.MetadataValue] = {
        "lag_messages": dg.IntMetadataValue(sum(lag for _, lag in behind.values())),
        "lag_seconds_max": dg.FloatMetadataValue(round(max(seconds.values(), default=0.0), 1)),
        # Not yet archivable: an open transaction holds its partition at the last stable offset.
        "open_transaction_messages": dg.IntMetadataValue(sum(held.get(tp, 0) for tp in behind)),
    }
    for tp, (_, lag) in sorted(behind.items()):
        metadata[f"lag_messages[{tp.topic}/{tp.partition}]"] = dg.IntMetadataValue(lag)
        metadata[f"lag_seconds[{tp.topic}/{tp.partition}]"] = dg.FloatMetadataValue(
            round(seconds.get(tp, 0.0), 1)
        )
        if held.get(tp):
            metadata[f"open_transaction_messages[{tp.topic}/{tp.partition}]"] = (
                dg.IntMetadataValue(held[tp])
            )
    return dg.AssetObservation(asset_key=asset_key, metadata=metadata)


def _remember(clocks: dict[str, float], key: str, since: float | None) -> None:
    if since is None:
        clocks.pop(key, None)
    else:
        clocks[key] = since


# Queued and not-yet-started runs count: launching the same range again while one waits in the
# run queue would only queue a twin.
NOT_FINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def _partitions_in_flight(instance: dg.DagsterInstance) -> set[str]:
    runs = instance.get_runs(
        filters=dg.RunsFilter(job_name=archive_kafka_batch.name, statuses=NOT_FINISHED)
    )
    return {key for run in runs if (key := _partition_of(run)) is not None}


def _partition_of(run: dg.DagsterRun) -> str | None:
    """``topic-partition`` of a run: its tag, or its run config.

    Runs launched by hand from the Launchpad usually carry no tags.
    """
    if PARTITION_TAG in run.tags:
        return run.tags[PARTITION_TAG]
    try:
        config: Any = run.run_config["ops"]
        consume = config["consume"]["config"]
        return f"{consume['topic']}-{consume['partition']}"
    except (KeyError, TypeError):
        return None
