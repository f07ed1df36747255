"""The sensor that watches Kafka partitions and launches one run per bounded offset range."""

import json
import time
from dataclasses import dataclass

import dagster as dg
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES

from protoagg_dagster.core.planning import PartitionView, plan_batch
from protoagg_dagster.jobs import (
    PARTITION_TAG,
    RANGE_TAG,
    archive_kafka_batch,
    range_run_config,
    range_tags,
)
from protoagg_dagster.ledger import read_progress
from protoagg_dagster.resources import KafkaResource, PostgresResource
from protoagg_dagster.settings_resource import ArchiverSettings


@dataclass
class SensorCursor:
    """Per partition: when unarchived messages were first seen, and a resolved ``latest`` start.

    Only a convenience: the ledger's archived position is the truth, so a lost cursor costs at
    most one extra linger period.
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
    start_from = archiver.start_choice()
    now = time.time()
    in_flight = _partitions_in_flight(context.instance)
    requests: list[dg.RunRequest] = []
    with postgres.get_connection() as conn:
        progress = {topic: read_progress(conn, topic) for topic in kafka.topic_list()}
    for topic, known in progress.items():
        for partition, (log_start, log_end) in kafka.offset_bounds(topic).items():
            key = f"{topic}-{partition}"
            state = known.get(partition)
            next_offset = state.next_offset if state is not None else None
            if next_offset is None:
                if key not in cursor.start_at:
                    cursor.start_at[key] = log_start if start_from == "earliest" else log_end
                next_offset = cursor.start_at[key]
            view = PartitionView(
                topic=topic,
                partition=partition,
                next_offset=next_offset,
                end_offset=log_end,
                pending=state.pending if state is not None else None,
                in_flight=key in in_flight,
                backlog_since=cursor.backlog_since.get(key),
            )
            plan = plan_batch(view, limits, now)
            _remember(cursor.backlog_since, key, plan.backlog_since)
            if plan.launch is None:
                continue
            batch = plan.launch
            attempts = _earlier_runs(context.instance, batch.run_key)
            run_key = batch.run_key if attempts == 0 else f"{batch.run_key}-retry{attempts}"
            context.log.info(f"launching {batch}: {plan.reason}")
            requests.append(
                dg.RunRequest(
                    run_key=run_key,
                    run_config=range_run_config(topic, partition, batch.start, batch.end),
                    tags=range_tags(topic, partition, batch.start, batch.end),
                )
            )
    return dg.SensorResult(run_requests=requests, cursor=cursor.dumps())


def _remember(clocks: dict[str, float], key: str, since: float | None) -> None:
    if since is None:
        clocks.pop(key, None)
    else:
        clocks[key] = since


def _partitions_in_flight(instance: dg.DagsterInstance) -> set[str]:
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            job_name=archive_kafka_batch.name, statuses=list(IN_PROGRESS_RUN_STATUSES)
        )
    )
    return {run.tags[PARTITION_TAG] for run in runs if PARTITION_TAG in run.tags}


def _earlier_runs(instance: dg.DagsterInstance, range_key: str) -> int:
    return instance.get_runs_count(filters=dg.RunsFilter(tags={RANGE_TAG: range_key}))
