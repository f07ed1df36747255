"""Restore end to end: topics archived by the real pipeline, restored by ``protoagg restore`` run
as a process (killed with SIGKILL mid-way and rerun), read back by a read_committed consumer."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from protoagg_dagster.cli.produce import produce_file
from protoagg_dagster.core.kafka_record import ArchivedKafkaRecord
from protoagg_dagster.core.records import RecordRejected, parse_rfc3339
from protoagg_dagster.core.settings import KAFKA_CLIENT, KAFKA_CLIENTS
from protoagg_dagster.resources import GCSResource
from protoagg_dagster.restore.job import restore_archive
from tests.conftest import ROOT
from tests.e2e.test_record_format import Row, binary, committed, create, producer
from tests.helpers import (
    Stack,
    archived_records,
    memory_instance,
    run_restore,
    run_sensor_until_idle,
    with_topics,
)

EXAMPLES = ROOT / "examples" / "messages.jsonl"


def record_topic(
    stack: Stack,
    topic: str,
    count: int,
    partitions: int = 3,
    batch: int = 2000,
    spacing_ms: int = 1000,
) -> Stack:
    """A record topic of binary keys and values, null keys, tombstones and repeated headers,
    ``spacing_ms`` apart, archived through the sensor and the archive job in batches of at
    most ``batch``; the stack that archives it."""
    stack = with_topics(stack, f"{topic}:record", max_batch_messages=batch, batch_size=batch)
    create(stack, topic, partitions)
    rng = random.Random(13)
    sent = producer(stack)
    for i in range(count):
        key = rng.choice([None, b"", binary(rng, rng.randrange(1, 20))])
        value = rng.choice([None, b"", binary(rng, rng.randrange(1, 200))])
        if key is None and value is None:
            key = b""  # kafka-python refuses a record with neither
        headers = [
            (rng.choice(["h", "h", "trace"]), binary(rng, 4)) for _ in range(rng.randrange(3))
        ]
        sent.send(
            topic,
            key=key,
            value=value,
            headers=headers,
            partition=i % partitions,
            timestamp_ms=1_700_000_000_000 + i * spacing_ms,
        )
    sent.flush()
    sent.close()
    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)
    return stack


def object_named(stack: Stack, template: str) -> GCSResource:
    # A fresh resource: Dagster rebuilds resources from constructor arguments, not model_copy.
    return GCSResource(
        bucket=stack.gcs.bucket, object_template=template, emulator_host=stack.gcs.emulator_host
    )


def url_of(stack: Stack) -> str:
    return f"gs://{stack.gcs.bucket}/{stack.gcs.object_template}"


def written(stack: Stack, topic: str) -> int:
    """Records written to ``topic`` so far, committed or not (the high watermarks' sum)."""
    consumer = KafkaConsumer(bootstrap_servers=stack.kafka.bootstrap_servers)
    try:
        return written_by(consumer, topic)
    finally:
        consumer.close()


def written_by(consumer: KafkaConsumer, topic: str) -> int:
    partitions = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in partitions]
    return sum(consumer.end_offsets(tps).values()) if tps else 0


def contents(rows: list[Row]) -> list[tuple[object, ...]]:
    """Rows without their offsets (a restored topic's offsets are its own)."""
    return [(r[0], r[2], r[3], r[4], r[5], r[6]) for r in rows]


def kill_when_written(stack: Stack, topic: str, at_least: int, args: list[str]) -> bool:
    """Start a restore and SIGKILL it once ``at_least`` records reached the topic (or it ends);
    whether it was still running when killed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.slow_restore", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # One consumer asks for the high watermarks again and again: a new consumer per look took
    # the CPU the restore needed.
    consumer = KafkaConsumer(bootstrap_servers=stack.kafka.bootstrap_servers)
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and written_by(consumer, topic) < at_least:
            assert time.monotonic() < deadline, "restore wrote nothing for two minutes"
            time.sleep(0.02)
        running = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        consumer.close()
    return running


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_restore_killed_mid_way_and_rerun_writes_every_record_once(
    stack: Stack, unique: str, client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The restore processes inherit the setting.
    monkeypatch.setenv(KAFKA_CLIENT.env, client)
    source = f"rsrc-{unique}"
    # Twenty transactions: the kills land inside and between them.
    count, transaction = 3000, 150
    stack = record_topic(stack, source, count)
    target = f"rdst-{unique}"
    args = [url_of(stack), "--to-topic", target, "--create-topic"]
    args += ["--transaction-records", str(transaction)]
    # Killed before anything, then inside or between transactions at growing points.
    killed = [kill_when_written(stack, target, n, args) for n in (0, 1, 450, 1250, 2100)]
    assert sum(killed) >= 3, killed  # most kills hit a restore at work
    assert len(committed(stack, target)) < count
    finished = run_restore(*args)
    assert finished.returncode == 0, finished.stderr
    original = committed(stack, source)
    assert len(original) == count
    restored = committed(stack, target)
    assert contents(restored) == contents(original)
    again = run_restore(*args)
    assert again.returncode == 0, again.stderr
    assert "nothing to restore" in again.stdout
    assert contents(committed(stack, target)) == contents(original)
    # Archiving the restored topic gives the same records (its offsets are its own).
    rearchive = with_topics(stack, f"{target}:record")
    rearchive = replace(rearchive, gcs=object_named(stack, f"{unique}/again.pb"))
    with memory_instance() as instance:
        run_sensor_until_idle(rearchive, instance)

    def same(records: list[ArchivedKafkaRecord]) -> list[tuple[object, ...]]:
        return sorted(
            ((r.partition, r.timestamp_ms, r.key, r.value, r.headers) for r in records),
            key=lambda row: (row[0], row[1]),
        )

    assert same(archived_records(rearchive)) == same(archived_records(stack))


def test_source_headers_and_offset_time_and_partition_selections(stack: Stack, unique: str) -> None:
    source = f"rsel-{unique}"
    stack = record_topic(stack, source, 600)
    original = committed(stack, source)
    target = f"rsel-out-{unique}"
    chosen = run_restore(
        url_of(stack),
        "--to-topic",
        target,
        "--create-topic",
        "--partition",
        "1",
        "--from-offset",
        "10",
        "--to-offset",
        "150",
        "--from-time",
        "2023-11-14T22:20:00Z",
        "--source-headers",
    )
    assert chosen.returncode == 0, chosen.stderr
    start_ms = 1_700_000_400_000
    expected = [r for r in original if r[0] == 1 and 10 <= r[1] < 150 and r[2] >= start_ms]
    assert expected and len(expected) < 140
    restored = committed(stack, target)
    assert [r[4:6] for r in restored] == [r[4:6] for r in expected]
    assert [r[6][-3:] for r in restored] == [
        (
            ("protoagg-source-topic", source.encode()),
            ("protoagg-source-partition", b"1"),
            ("protoagg-source-offset", str(r[1]).encode()),
        )
        for r in expected
    ]


def test_too_few_partitions_refused_unless_partitioned_by_key(stack: Stack, unique: str) -> None:
    source = f"rkey-{unique}"
    stack = record_topic(stack, source, 300)
    target = f"rkey-out-{unique}"
    create(stack, target, 2)
    refused = run_restore(url_of(stack), "--to-topic", target)
    assert refused.returncode == 2
    assert refused.stderr.startswith("protoagg: target topic") and "Traceback" not in refused.stderr
    by_key = run_restore(url_of(stack), "--to-topic", target, "--partitioner", "key")
    assert by_key.returncode == 0, by_key.stderr
    restored = committed(stack, target)
    assert len(restored) == 300
    for partition, _, _, _, key, _, _ in restored:
        if key is not None:
            assert partition == (murmur2(key) & 0x7FFFFFFF) % 2


def test_log_round_trip_with_the_examples_and_dry_run(stack: Stack, unique: str) -> None:
    source = f"rlog-{unique}"
    stack = with_topics(stack, source)
    sent = produce_file(EXAMPLES, source, stack.kafka.bootstrap_servers, partitions=1)
    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)
    target = f"rlog-out-{unique}"
    archived = len(archived_records(stack))
    assert 0 < archived <= sent  # the examples hold invalid lines and repeated logIds
    dry = run_restore(url_of(stack), "--to-topic", target, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would restore {archived} records" in dry.stdout
    assert written(stack, target) == 0
    done = run_restore(url_of(stack), "--to-topic", target, "--create-topic", "--key", "logId")
    assert done.returncode == 0, done.stderr
    inputs = set()
    for text in EXAMPLES.read_text().splitlines():
        try:
            inputs.add(instant(json.loads(text)))
        except (json.JSONDecodeError, KeyError, TypeError, RecordRejected):
            continue
    restored = committed(stack, target)
    assert len(restored) == archived
    for _, _, _, _, key, value, _ in restored:
        line = json.loads(value or b"")
        assert list(line) == ["logId", "timestamp", "message"]
        assert instant(line) in inputs
        assert key == line["logId"].encode()


def instant(line: dict[str, str]) -> tuple[str, tuple[int, int], str]:
    """A log line with its timestamp as an instant: ``.000Z`` and ``Z`` store the same."""
    return line["logId"], parse_rfc3339(line["timestamp"]), line["message"]


def test_a_prefix_of_hourly_objects_restores_them_all(stack: Stack, unique: str) -> None:
    source = f"rpre-{unique}"
    hourly = f"{unique}/{{date}}/{{hour}}/{{partition}}.pb"
    stack = replace(stack, gcs=object_named(stack, hourly))
    # 10 s apart from 2023-11-14T22:13:20Z, batches of 100 per partition (300 per partition):
    # each partition's batches start in hours 22, 23 and 23, so its records span two objects.
    stack = record_topic(stack, source, 900, batch=100, spacing_ms=10_000)
    names = [b.name for b in stack.gcs.get_bucket().list_blobs(prefix=f"{unique}/")]
    assert sorted(names) == [
        f"{unique}/2023-11-14/{hour}/{partition}.pb" for hour in (22, 23) for partition in range(3)
    ]
    target = f"rpre-out-{unique}"
    prefix = f"gs://{stack.gcs.bucket}/{unique}/"
    done = run_restore(prefix, "--to-topic", target, "--create-topic")
    assert done.returncode == 0, done.stderr
    assert contents(committed(stack, target)) == contents(committed(stack, source))


def test_a_truncated_archive_stops_at_its_frame_keeping_what_came_before(
    stack: Stack, unique: str
) -> None:
    source = f"rbad-{unique}"
    stack = record_topic(stack, source, 200, partitions=1)
    blob = stack.gcs.get_bucket().get_blob(stack.gcs.object_template)
    assert blob is not None
    data = blob.download_as_bytes()
    cut = stack.gcs.get_bucket().blob(f"{unique}/cut.pb")
    cut.metadata = blob.metadata
    cut.upload_from_string(data[: len(data) - 7])
    target = f"rbad-out-{unique}"
    url = f"gs://{stack.gcs.bucket}/{unique}/cut.pb"
    bad = run_restore(url, "--to-topic", target, "--create-topic")
    assert bad.returncode == 2
    message = bad.stderr.strip().splitlines()[-1]
    assert message.startswith(f"protoagg: {url}: record 199 at byte "), message
    assert "truncated frame" in message and "restored up to there: 199 records" in message
    assert contents(committed(stack, target)) == contents(committed(stack, source)[:199])
    missing = run_restore(f"gs://{stack.gcs.bucket}/{unique}/nope.pb", "--to-topic", target)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    no_topic = run_restore(url_of(stack), "--to-topic", f"none-{unique}")
    assert no_topic.returncode == 2 and "--create-topic" in no_topic.stderr


def test_restore_archive_job_restores_once_with_per_partition_metadata(
    stack: Stack, unique: str
) -> None:
    source = f"rjob-{unique}"
    stack = record_topic(stack, source, 300)
    target = f"rjob-out-{unique}"
    config = {"sources": [url_of(stack)], "to_topic": target, "create_topic": True}
    run_config = {"ops": {"restore_records": {"config": config}}}
    with memory_instance() as instance:
        first = restore_archive.execute_in_process(
            run_config=run_config, resources={"kafka": stack.kafka}, instance=instance
        )
        assert first.success
        [materialized] = [e for e in first.all_node_events if e.event_type_value == "STEP_OUTPUT"]
        metadata = materialized.step_output_data.metadata
        assert metadata["records"].value == 300
        assert metadata["partition 2"].value["records"] == 100  # type: ignore[index]
        second = restore_archive.execute_in_process(
            run_config=run_config, resources={"kafka": stack.kafka}, instance=instance
        )
        assert second.success
        assert "nothing to restore" in second.output_for_node("restore_records")
    assert contents(committed(stack, target)) == contents(committed(stack, source))
