"""The whole archive path on real services: sensor ticks launch runs that archive exactly once."""

from __future__ import annotations

import importlib
import io
import json
import uuid
from pathlib import Path

import dagster as dg
import pytest

from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.ledger import ledger_connection, object_lock
from protoagg_dagster.archive.run_tags import range_run_config
from protoagg_dagster.core import settings
from protoagg_dagster.core.framing import iter_records
from protoagg_dagster.core.records import parse_rfc3339
from protoagg_dagster.core.settings import KAFKA_CLIENTS
from protoagg_dagster.reading.archive_reader import verify_archive
from protoagg_dagster.resources import GCSResource
from tests.conftest import ROOT
from tests.helpers import (
    Stack,
    archive,
    check_archive,
    create_topic,
    log_value,
    memory_instance,
    produce,
    run_in_subprocess,
    run_sensor_until_idle,
    topic_of,
)

EXAMPLES = ROOT / "examples" / "messages.jsonl"


def expected_first_occurrences(values: list[bytes]) -> list[dict[str, str]]:
    seen: set[str] = set()
    result = []
    for value in values:
        obj = json.loads(value)
        if obj["logId"] not in seen:
            seen.add(obj["logId"])
            result.append(obj)
    return result


def test_examples_and_a_redelivery_are_archived_once_in_offset_order(stack: Stack) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    first = [line.rstrip(b"\n") for line in EXAMPLES.read_bytes().splitlines() if line.strip()]
    produce(stack.kafka, topic, first)
    with memory_instance() as instance:
        runs_first = run_sensor_until_idle(stack, instance)
        # A second delivery: some earlier logIds again (redelivered), then new messages.
        second = first[5:40] + [log_value(message=f"new {i}") for i in range(30)]
        produce(stack.kafka, topic, second)
        runs_second = run_sensor_until_idle(stack, instance)
    assert runs_first == 4  # 312 messages in runs of at most 100
    assert runs_second == 1
    records, url = archive(stack)
    expected = expected_first_occurrences(first + second)
    assert [r.log_id for r in records] == [e["logId"] for e in expected]
    for record, source in zip(records, expected, strict=True):
        assert (record.seconds, record.nanos) == parse_rfc3339(source["timestamp"])
        assert record.message == source["message"]
    assert verify_archive(url).ok


def test_re_executing_a_finished_run_appends_nothing(stack: Stack) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, [log_value() for _ in range(60)])
    config = range_run_config(topic, 0, 0, 60)
    with memory_instance() as instance:
        assert archive_kafka_batch.execute_in_process(
            run_config=config, resources=stack.resources(), instance=instance
        ).success
        before = stack.gcs.get_bucket().get_blob(stack.gcs.object_template)
        again = archive_kafka_batch.execute_in_process(
            run_config=config, resources=stack.resources(), instance=instance
        )
    assert again.success
    after = stack.gcs.get_bucket().get_blob(stack.gcs.object_template)
    assert before is not None and after is not None
    assert (after.size, after.generation) == (before.size, before.generation)
    records, _ = archive(stack)
    assert len(records) == 60


def test_overlapping_runs_in_parallel_archive_each_id_once(stack: Stack) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    values = [log_value() for _ in range(300)]
    produce(stack.kafka, topic, values)
    runs = [run_in_subprocess(stack, topic, 0, 0, end) for end in (300, 300, 150)]
    codes = [run.wait(timeout=180) for run in runs]
    # A run that meets another's unfinished, larger claim fails and is retried; at least one wins.
    assert 0 in codes
    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)
    records, url = archive(stack)
    assert [r.log_id for r in records] == [json.loads(v)["logId"] for v in values]
    assert verify_archive(url).ok


def test_a_busy_partition_does_not_hold_up_another(stack: Stack, unique: str) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic, partitions=2)
    per_partition = {p: [log_value(message=f"p{p}-{i}") for i in range(80)] for p in (0, 1)}
    for partition, values in per_partition.items():
        produce(stack.kafka, topic, values, partition=partition)
    gcs = GCSResource(
        bucket=stack.gcs.bucket,
        object_template=f"{unique}/{{partition}}.pb",
        emulator_host=stack.gcs.emulator_host,
    )
    resources = {**stack.resources(), "gcs": gcs}

    def run(partition: int, instance: dg.DagsterInstance) -> bool:
        return archive_kafka_batch.execute_in_process(
            run_config=range_run_config(topic, partition, 0, 80),
            resources=resources,
            instance=instance,
        ).success

    with memory_instance() as instance, ledger_connection(stack.postgres) as holder:
        # Hold everything a partition-0 run holds mid-flight: its position row and its object.
        with holder.transaction():
            holder.execute(
                "INSERT INTO archive_positions VALUES (%s, 0, 0) ON CONFLICT DO NOTHING", (topic,)
            )
            holder.execute(
                "SELECT * FROM archive_positions WHERE topic = %s AND partition = 0 FOR UPDATE",
                (topic,),
            )
            with object_lock(holder, gcs.bucket, f"{unique}/0.pb"):
                assert run(1, instance)
        assert run(0, instance)
    for partition, values in per_partition.items():
        blob = gcs.get_bucket().get_blob(f"{unique}/{partition}.pb")
        assert blob is not None
        records = list(iter_records(io.BytesIO(blob.download_as_bytes())))
        assert [r.message for r in records] == [json.loads(v)["message"] for v in values]


def test_examples_file_has_repeats(tmp_path: Path) -> None:
    ids = [json.loads(line)["logId"] for line in EXAMPLES.read_text().splitlines()]
    assert 200 <= len(ids) <= 1000
    assert len(set(ids)) < len(ids)
    for log_id in ids:
        uuid.UUID(log_id)


def test_an_all_duplicate_batch_still_moves_the_objects_offsets(stack: Stack) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    values = [log_value() for _ in range(20)]
    produce(stack.kafka, topic, values)
    produce(stack.kafka, topic, values)  # redelivered whole: the second batch appends nothing
    with memory_instance() as instance:
        for start, end in ((0, 20), (20, 40)):
            assert archive_kafka_batch.execute_in_process(
                run_config=range_run_config(topic, 0, start, end),
                resources=stack.resources(),
                instance=instance,
            ).success
    records, _ = archive(stack)
    assert len(records) == 20
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert (check.offsets, check.archived, check.duplicates) == (40, 20, 20)


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_the_kafka_client_setting_picks_the_client_that_reads_each_run(
    stack: Stack, client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    values = [log_value() for _ in range(150)]
    produce(stack.kafka, topic, values)
    assert stack.gcs.emulator_host is not None
    environment = {
        settings.KAFKA_BOOTSTRAP: stack.kafka.bootstrap_servers,
        settings.TOPICS: topic,
        settings.POSTGRES_DSN: stack.postgres.dsn,
        settings.GCS_BUCKET: stack.gcs.bucket,
        settings.GCS_OBJECT: stack.gcs.object_template,
        settings.STORAGE_EMULATOR_HOST: stack.gcs.emulator_host,
        settings.KAFKA_CLIENT: client,
    }
    for setting, value in environment.items():
        monkeypatch.setenv(setting.env, value)
    # The code location as deployed: its resources read the environment when a run starts.
    import protoagg_dagster.definitions as module

    defs = importlib.reload(module).defs
    with memory_instance() as instance:
        result = defs.get_job_def("archive_kafka_batch").execute_in_process(
            run_config=range_run_config(topic, 0, 0, 150), instance=instance
        )
        assert result.success
        logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any(m.startswith("consume: 150 messages") and m.endswith(client) for m in logged)
    records, _ = archive(stack)
    assert [r.log_id for r in records] == [json.loads(v)["logId"] for v in values]
    assert check_archive(stack).ok
