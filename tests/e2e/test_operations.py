"""Operating the archive: where a fresh sensor starts, lag observations, scheduled maintenance."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import dagster as dg
import pytest
from kafka import KafkaConsumer

from protoagg_dagster.archive import leases
from protoagg_dagster.archive.assets import ARCHIVE_ASSET, topic_asset_key
from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.ledger import ledger_connection
from protoagg_dagster.archive.run_tags import FOLLOWS_TAG, PARTITION_TAG, config_ranges
from protoagg_dagster.archive.upkeep import maintain_archive
from protoagg_dagster.core.archive_object import TEMP_PREFIX
from protoagg_dagster.core.formats import TopicRule
from protoagg_dagster.core.records import format_rfc3339
from protoagg_dagster.resources import GCSResource
from protoagg_dagster.resources import kafka as kafka_resource
from protoagg_dagster.resources.settings import ArchiverSettings
from tests.helpers import (
    Stack,
    create_topic,
    log_value,
    memory_instance,
    produce,
    tick,
    topic_of,
    with_topics,
)


def launched(result: dg.SensorResult) -> list[tuple[int, int]]:
    return [r for request in result.run_requests or [] for r in launched_ranges(request)]


def test_fresh_sensor_with_start_from_latest_skips_history(stack: Stack) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, [log_value() for _ in range(30)])
    latest = replace(
        stack, archiver=ArchiverSettings(batch_size=10, linger_seconds=0, start_from="latest")
    )
    with memory_instance() as instance:
        first = tick(latest, instance, None)
        assert launched(first) == []
        produce(stack.kafka, topic, [log_value() for _ in range(20)])
        # The start is kept in the ledger, not the cursor: a lost cursor does not skip more.
        second = tick(latest, instance, None)
    assert launched(second) == [(30, 50)]


def test_the_cursor_does_not_grow_with_partitions(stack: Stack) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic, partitions=300)
    producer = stack.kafka.get_producer()
    for p in range(300):
        producer.send(topic, value=log_value(), partition=p)
    producer.flush()
    producer.close()
    # 300 partitions with a backlog, lingering: one clock for the topic, none per partition.
    lingering = replace(stack, archiver=ArchiverSettings(linger_seconds=3600))
    with dg.instance_for_test() as instance:
        first = tick(lingering, instance, None)
        second = tick(lingering, instance, first.cursor)
    assert launched(second) == []
    assert second.cursor is not None and len(second.cursor) < 200, second.cursor


def test_fresh_sensor_with_start_from_a_time_starts_at_that_message(stack: Stack) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    producer = stack.kafka.get_producer()
    for i in range(40):
        producer.send(
            topic, value=log_value(), partition=0, timestamp_ms=1_790_000_000_000 + i * 1000
        )
    producer.flush()
    producer.close()
    at_25 = replace(
        stack,
        archiver=ArchiverSettings(
            batch_size=5, linger_seconds=0, start_from=format_rfc3339(1_790_000_025, 0)
        ),
    )
    with memory_instance() as instance:
        result = tick(at_25, instance, None)
    assert launched(result) == [(25, 40)]


def test_each_tick_observes_the_lag_of_every_partition(stack: Stack) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic, partitions=2)
    produce(stack.kafka, topic, [log_value() for _ in range(7)], partition=1)
    waiting = replace(stack, archiver=ArchiverSettings(batch_size=100, linger_seconds=3600))
    with memory_instance() as instance:
        result = tick(waiting, instance, None)
    assert launched(result) == []
    whole, own = result.asset_events
    # The whole archive's asset, and the asset of the topic's own PROTOAGG_TOPICS entry.
    assert (whole.asset_key, own.asset_key) == (
        ARCHIVE_ASSET,
        topic_asset_key(TopicRule("log", name=topic)),
    )
    # Per partition most behind: [messages behind, seconds the oldest waited, open transactions].
    assert own.metadata["most_behind"].value[f"{topic}/1"][0] == 7
    metadata = whole.metadata
    assert metadata["lag_messages"].value == 7
    most_behind = metadata["most_behind"].value
    assert (most_behind[f"{topic}/0"], most_behind[f"{topic}/1"][::2]) == ([0, 0.0, 0], [7, 0])
    assert most_behind[f"{topic}/1"][1] >= 0.0


def test_a_tick_over_several_topics_asks_kafka_through_two_consumers(
    stack: Stack, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new kafka-python consumer waits ~0.1 s before its first topic metadata, and the runs a
    # tick requests are created only when it returns: one consumer per isolation level, however
    # many topics (a tick used to open three per topic).
    opened: list[str] = []

    class CountedConsumer(KafkaConsumer):
        def __init__(self, *topics: str, **config: Any) -> None:
            opened.append(config["isolation_level"])
            super().__init__(*topics, **config)

    several = with_topics(stack, f"/many-{unique}-.*/")
    for name, partitions in (("a", 2), ("b", 1), ("c", 1)):
        create_topic(several.kafka, f"many-{unique}-{name}", partitions=partitions)
        produce(several.kafka, f"many-{unique}-{name}", [log_value() for _ in range(3)])
    monkeypatch.setattr(kafka_resource, "KafkaConsumer", CountedConsumer)
    with memory_instance() as instance:
        result = tick(several, instance, None)
    assert sorted(opened) == ["read_committed", "read_uncommitted"]
    # Their object names no topic: the ranges of every topic share one run.
    [request] = result.run_requests or []
    assert PARTITION_TAG not in request.tags
    assert sorted(launched_ranges(request, with_topic=True)) == [
        (f"many-{unique}-{name}", 0, 0, 3) for name in "abc"
    ]
    metadata = result.asset_events[0].metadata
    assert metadata["lag_messages"].value == 9
    assert metadata["most_behind"].value[f"many-{unique}-a/1"][0] == 0
    assert metadata["open_transaction_messages"].value == 0


def launched_ranges(request: dg.RunRequest, with_topic: bool = False) -> list[Any]:
    ranges = config_ranges(request.run_config)
    if with_topic:
        return [(r.topic, r.partition, r.start, r.end) for r in ranges]
    return [(r.start, r.end) for r in ranges]


def test_maintenance_removes_orphans_and_advances_the_window(stack: Stack, unique: str) -> None:
    # A bucket of its own: sweeping with a zero age must not touch other tests' uploads.
    gcs = GCSResource(
        bucket=f"maint-{unique}", emulator_host=stack.gcs.emulator_host, create_bucket=True
    )
    bucket = gcs.writable_bucket()
    orphan = f"{TEMP_PREFIX}{unique}/0/0-10-deadbeef"
    bucket.blob(orphan).upload_from_string(b"left behind by a dead run")
    with memory_instance() as instance:
        result = maintain_archive.execute_in_process(
            run_config={
                "ops": {
                    "remove_orphans": {"config": {"temp_older_than_seconds": 0}},
                    "advance_dedupe_window": {"config": {"keep_days": 3}},
                }
            },
            resources={"gcs": gcs, "postgres": stack.postgres},
            instance=instance,
        )
        logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    assert result.success
    assert bucket.get_blob(orphan) is None
    assert any(f"removed orphaned temporary object gs://{gcs.bucket}/{orphan}" in m for m in logs)


def test_a_run_not_yet_started_counts_as_in_flight(stack: Stack) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, [log_value() for _ in range(150)])
    with memory_instance() as instance:
        first = tick(stack, instance, None)
        [request] = first.run_requests or []
        assert launched(first) == [(0, 100)]
        instance.create_run_for_job(
            archive_kafka_batch,
            run_config=request.run_config,
            tags=request.tags,
            status=dg.DagsterRunStatus.NOT_STARTED,
        )
        # Not the same range again: the range after it, as a follow-up.
        second = tick(stack, instance, first.cursor)
        assert launched(second) == [(100, 150)]
        [follow_up] = second.run_requests or []
        assert follow_up.tags[FOLLOWS_TAG] == "true"
        instance.create_run_for_job(
            archive_kafka_batch,
            run_config=follow_up.run_config,
            tags=follow_up.tags,
            status=dg.DagsterRunStatus.NOT_STARTED,
        )
        produce(stack.kafka, topic, [log_value() for _ in range(150)])
        # Never a second follow-up.
        assert launched(tick(stack, instance, second.cursor)) == []


def test_a_run_launched_without_tags_counts_as_in_flight(stack: Stack) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, [log_value() for _ in range(150)])
    with memory_instance() as instance:
        first = tick(stack, instance, None)
        [request] = first.run_requests or []
        # As from the Launchpad: the same config, no protoagg tags; its range is in the config.
        instance.create_run_for_job(
            archive_kafka_batch,
            run_config=request.run_config,
            status=dg.DagsterRunStatus.STARTED,
        )
        assert launched(tick(stack, instance, first.cursor)) == [(100, 150)]


def test_no_follow_up_after_a_run_of_unknown_range(stack: Stack) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, [log_value() for _ in range(150)])
    with memory_instance() as instance:
        first = tick(stack, instance, None)
        # Another deployment's run is seen only by the partition's lease.
        with ledger_connection(stack.postgres) as conn:
            leases.hold(conn, leases.partition_lease(f"{topic}-0"), wait_seconds=0.0)
            assert launched(tick(stack, instance, first.cursor)) == []
