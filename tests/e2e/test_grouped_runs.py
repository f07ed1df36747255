"""Runs of many partitions: each range is claimed, appended and retried on its own.

Through ``dagster-daemon``: hundreds of partitions archived by a few runs, every offset once, in
offset order per partition, one upload and one compose per run for the shared object.

In process: a grouped run SIGKILLed after some of its ranges were appended and before others;
a group where one partition's object is bad, or another run holds one partition's lease: the
other partitions are archived at once, that one later; a claim failing among the others of
its transaction, or the ledger's connection lost among them; and the Dagster events a grouped
run writes do not grow with its partitions.
"""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
from dagster._core.events import DagsterEventType

from protoagg_dagster.archive import leases, ops
from protoagg_dagster.archive.assets import ARCHIVE_ASSET
from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.ledger import claim_batch, ledger_connection, read_progress
from protoagg_dagster.archive.run_tags import config_ranges, partition_key, ranges_run_config
from protoagg_dagster.core.archive_object import (
    COMPRESSION_METADATA_KEY,
    FORMAT_METADATA_KEY,
    LAST_APPEND_KEY,
)
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.resources import GCSResource
from tests.conftest import Services
from tests.helpers import (
    Stack,
    archive_with_daemon,
    archived_records,
    create_topic,
    run_ranges_in_subprocess,
    tick,
    topic_of,
    with_topics,
)
from tests.support.dagster_deployment import DagsterDeployment, run_summaries

PARTITIONS = 200
PER_PARTITION = 10


def produce_everywhere(stack: Stack, topic: str, partitions: int, per_partition: int) -> None:
    """``per_partition`` records into each partition; values ``p<partition> #<i>``."""
    producer = stack.kafka.get_producer()
    try:
        for i in range(per_partition):
            for p in range(partitions):
                producer.send(topic, value=f"p{p} #{i}".encode(), partition=p)
        producer.flush()
    finally:
        producer.close()


def offsets_by_partition(stack: Stack, name: str) -> dict[int, list[int]]:
    """The offsets per partition of the records in object ``name``, in archive order."""
    found: dict[int, list[int]] = {}
    for record in archived_records(replace_template(stack, name)):
        found.setdefault(record.partition, []).append(record.offset)
    return found


def replace_template(stack: Stack, name: str) -> Stack:
    return replace(
        stack,
        gcs=GCSResource(
            bucket=stack.gcs.bucket,
            object_template=name,
            emulator_host=stack.gcs.emulator_host,
        ),
    )


def test_hundreds_of_partitions_are_archived_by_a_few_runs_exactly_once(
    stack: Stack, services: Services, postgres_dsn: str, tmp_path: Path
) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic, partitions=PARTITIONS)
    produce_everywhere(stack, topic, PARTITIONS, PER_PARTITION)
    env = {
        "PROTOAGG_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
        "PROTOAGG_TOPICS": f"{topic}:record",
        "PROTOAGG_POSTGRES_DSN": postgres_dsn,
        "PROTOAGG_GCS_BUCKET": services.bucket,
        "PROTOAGG_GCS_OBJECT": stack.gcs.object_template,
        "STORAGE_EMULATOR_HOST": services.gcs_url,
        "PROTOAGG_LINGER_SECONDS": "1",
        # Smaller than the default, so that the partitions take several runs sharing the object.
        "PROTOAGG_MAX_PARTITIONS_PER_RUN": "64",
    }
    deployment = DagsterDeployment("many", tmp_path / "many", env)
    archive_with_daemon(deployment, postgres_dsn, topic, PARTITIONS, PER_PARTITION, 600.0)
    runs = [r for r in run_summaries(deployment) if r.job_name == archive_kafka_batch.name]
    for run in runs:
        print(run.line(runs[0].created_time))
    assert [r for r in runs if r.status != "SUCCESS"] == []
    # 64 partitions per run at most: 4 runs, and at most a few more for ranges the sensor saw
    # filling up between two looks.
    assert 4 <= len(runs) <= 12, f"{len(runs)} runs for {PARTITIONS} partitions"
    worked = [r for r in runs if r.materializations]
    assert sum(m["ranges_appended"] for r in worked for m in r.materializations) >= PARTITIONS
    stored = offsets_by_partition(with_topics(stack, f"{topic}:record"), stack.gcs.object_template)
    assert stored == {p: list(range(PER_PARTITION)) for p in range(PARTITIONS)}
    blob = stack.gcs.get_bucket().get_blob(stack.gcs.object_template)
    assert blob is not None
    # The last compose carried a whole run's ranges, all named in the marker.
    assert len(blob.metadata[LAST_APPEND_KEY].split(",")) > 1


def test_a_grouped_run_killed_between_its_objects_leaves_each_range_to_finish_once(
    stack: Stack, unique: str
) -> None:
    topic = topic_of(stack)
    per_partition = with_topics(
        replace_template(stack, f"{unique}/{{partition}}.pb"),
        f"{topic}:record",
        max_batch_messages=10_000,
    )
    create_topic(stack.kafka, topic, partitions=4)
    produce_everywhere(stack, topic, 4, 30)
    # One object per partition: the run appends them one after the other and dies after the
    # first is confirmed in the ledger, with the other three claimed.
    crashed = run_ranges_in_subprocess(
        per_partition, [(topic, p, 0, 20) for p in range(4)], crash_at="after_commit"
    )
    assert crashed.wait(timeout=180) == -signal.SIGKILL
    with ledger_connection(stack.postgres) as conn:
        progress = read_progress(conn, topic)
    assert sorted(p for p, s in progress.items() if s.next_offset == 20) == [0]
    assert sorted(p for p, s in progress.items() if s.pending is not None) == [1, 2, 3]

    with dg.instance_for_test() as instance:
        cursor = None
        for _ in range(10):
            result = tick(per_partition, instance, cursor)
            cursor = result.cursor
            if not result.run_requests:
                break
            for request in result.run_requests:
                outcome = archive_kafka_batch.execute_in_process(
                    run_config=request.run_config,
                    resources=per_partition.resources(),
                    instance=instance,
                    tags=request.tags,
                )
                assert outcome.success
    for p in range(4):
        assert offsets_by_partition(per_partition, f"{unique}/{p}.pb") == {p: list(range(30))}


def test_a_partition_with_a_bad_object_or_a_taken_lease_fails_alone(
    stack: Stack, unique: str
) -> None:
    topic = topic_of(stack)
    grouped = with_topics(
        replace_template(stack, f"{unique}/{{partition}}.pb"),
        f"{topic}:record",
        max_batch_messages=10_000,
    )
    create_topic(stack.kafka, topic, partitions=4)
    produce_everywhere(stack, topic, 4, 10)
    bucket = stack.gcs.get_bucket()
    # Partition 1's object exists compressed with gzip: appending uncompressed pieces to it
    # is refused until a person points the template elsewhere (here: deletes it).
    bad = bucket.blob(f"{unique}/1.pb")
    bad.metadata = {COMPRESSION_METADATA_KEY: "gzip", FORMAT_METADATA_KEY: "record"}
    bad.upload_from_string(b"")
    ranges = [OffsetRange(topic, p, 0, 10) for p in range(4)]
    with dg.instance_for_test() as instance, ledger_connection(stack.postgres) as holder:
        # Another live run (another deployment's) works partition 2.
        leases.hold(holder, leases.partition_lease(partition_key(topic, 2)), wait_seconds=1)
        first = archive_kafka_batch.execute_in_process(
            run_config=ranges_run_config(ranges),
            resources=grouped.resources(),
            instance=instance,
            raise_on_error=False,
        )
        holder.close()
        failure = [e for e in first.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
        [materialization] = [
            m
            for m in first.asset_materializations_for_node("archive")
            if m.asset_key == ARCHIVE_ASSET
        ]
    assert not first.success
    assert "1 ranges cannot be archived" in str(failure[-1].event_specific_data)
    assert materialization.metadata["ranges_appended"].value == 2
    with ledger_connection(stack.postgres) as conn:
        progress = read_progress(conn, topic)
    assert {p: progress[p].next_offset for p in (0, 3)} == {0: 10, 3: 10}
    assert progress.get(2) is None  # left out: its lease was taken
    assert progress[1].pending == OffsetRange(topic, 1, 0, 10)  # claimed, not appended

    bad.delete()
    with dg.instance_for_test() as instance:
        result = tick(grouped, instance, None)
        [request] = result.run_requests or []
        relaunched = archive_kafka_batch.execute_in_process(
            run_config=request.run_config,
            resources=grouped.resources(),
            instance=instance,
            tags=request.tags,
        )
    assert relaunched.success
    assert sorted((r.partition, r.start, r.end) for r in config_ranges(request.run_config)) == [
        (1, 0, 10),
        (2, 0, 10),
    ]
    for p in range(4):
        assert offsets_by_partition(grouped, f"{unique}/{p}.pb") == {p: list(range(10))}


def test_a_grouped_run_writes_as_many_events_as_a_run_of_one_range(stack: Stack) -> None:
    topic = topic_of(stack)
    grouped = with_topics(stack, f"{topic}:record", max_batch_messages=10_000)
    create_topic(stack.kafka, topic, partitions=64)
    produce_everywhere(stack, topic, 64, 5)
    counts = []
    with dg.instance_for_test() as instance:
        for ranges in (
            [OffsetRange(topic, 0, 0, 5)],
            [OffsetRange(topic, p, 0, 5) for p in range(1, 64)],
        ):
            result = archive_kafka_batch.execute_in_process(
                run_config=ranges_run_config(ranges),
                resources=grouped.resources(),
                instance=instance,
            )
            assert result.success
            logs = instance.all_logs(result.run_id)
            counts.append(len(logs))
            # One step: each Dagster step stores about seven events of its own.
            assert {e.step_key for e in logs if e.step_key} == {"archive"}
    assert counts[1] == counts[0], counts


def test_a_range_that_cannot_be_read_fails_alone(stack: Stack, unique: str) -> None:
    topic = topic_of(stack)
    grouped = with_topics(replace_template(stack, f"{unique}/{{partition}}.pb"), f"{topic}:record")
    create_topic(stack.kafka, topic, partitions=3)
    produce_everywhere(stack, topic, 3, 10)
    # Partition 5 does not exist: its range fails in consume, the three others are archived.
    ranges = [OffsetRange(topic, p, 0, 10) for p in (0, 1, 2, 5)]
    with dg.instance_for_test() as instance:
        result = archive_kafka_batch.execute_in_process(
            run_config=ranges_run_config(ranges),
            resources=grouped.resources(),
            instance=instance,
            raise_on_error=False,
        )
        failure = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    assert not result.success
    assert [e.step_key for e in failure] == ["archive"]
    assert "1 ranges cannot be archived" in str(failure[-1].event_specific_data)
    assert f"{topic}[5]" in str(failure[-1].event_specific_data)
    for p in range(3):
        assert offsets_by_partition(grouped, f"{unique}/{p}.pb") == {p: list(range(10))}


def test_a_claim_that_fails_among_others_fails_alone(stack: Stack, unique: str) -> None:
    # The run claims its ranges many to a transaction: partition 1's claim fails (its range
    # would leave a gap), and the claims before and after it in that transaction still hold.
    topic = topic_of(stack)
    grouped = with_topics(replace_template(stack, f"{unique}/{{partition}}.pb"), f"{topic}:record")
    create_topic(stack.kafka, topic, partitions=3)
    produce_everywhere(stack, topic, 3, 10)
    with dg.instance_for_test() as instance:
        first = archive_kafka_batch.execute_in_process(
            run_config=ranges_run_config([OffsetRange(topic, 1, 0, 3)]),
            resources=grouped.resources(),
            instance=instance,
        )
        assert first.success
        ranges = [OffsetRange(topic, 0, 0, 10), OffsetRange(topic, 1, 5, 10)]
        ranges.append(OffsetRange(topic, 2, 0, 10))
        result = archive_kafka_batch.execute_in_process(
            run_config=ranges_run_config(ranges),
            resources=grouped.resources(),
            instance=instance,
        )
        warnings = [e.message for e in instance.all_logs(result.run_id) if "dedupe:" in e.message]
    assert result.success  # a gap is not a setting to fix: a later run archives the range
    assert any(f"{topic}[1]" in w and "would leave a gap" in w for w in warnings), warnings
    assert offsets_by_partition(grouped, f"{unique}/0.pb") == {0: list(range(10))}
    assert offsets_by_partition(grouped, f"{unique}/1.pb") == {1: [0, 1, 2]}
    assert offsets_by_partition(grouped, f"{unique}/2.pb") == {2: list(range(10))}
    with ledger_connection(stack.postgres) as conn:
        progress = read_progress(conn, topic)
    assert {p: (q.next_offset, q.pending) for p, q in progress.items()} == {
        0: (10, None),
        1: (3, None),
        2: (10, None),
    }


def test_a_connection_lost_while_claiming_claims_nothing_twice(
    stack: Stack, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ledger's connection dies between two claims of one transaction: the first claim, made
    # but never committed, must not be appended; the op's retry claims and appends both, once.
    topic = topic_of(stack)
    grouped = with_topics(replace_template(stack, f"{unique}/{{partition}}.pb"), f"{topic}:record")
    create_topic(stack.kafka, topic, partitions=2)
    produce_everywhere(stack, topic, 2, 10)
    calls: list[int] = []

    def claim_then_lose_the_connection(conn: psycopg.Connection, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(calls))
        if len(calls) == 2:
            conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return claim_batch(conn, *args, **kwargs)

    monkeypatch.setattr(ops, "claim_batch", claim_then_lose_the_connection)
    with dg.instance_for_test() as instance:
        result = archive_kafka_batch.execute_in_process(
            run_config=ranges_run_config([OffsetRange(topic, p, 0, 10) for p in (0, 1)]),
            resources=grouped.resources(),
            instance=instance,
        )
        retried = [
            e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY
        ]
    assert result.success
    assert len(retried) == 1 and "connection was lost" in str(retried[0].event_specific_data)
    for p in (0, 1):
        assert offsets_by_partition(grouped, f"{unique}/{p}.pb") == {p: list(range(10))}
    with ledger_connection(stack.postgres) as conn:
        progress = read_progress(conn, topic)
    assert {p: (q.next_offset, q.pending) for p, q in progress.items()} == {
        0: (10, None),
        1: (10, None),
    }
