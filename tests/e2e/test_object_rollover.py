"""PROTOAGG_MAX_OBJECT_BYTES through ``dagster-daemon``: the archive continues in a numbered
sequence of objects (``log.pb``, ``log.0001.pb``, ...), none past the limit, and every reader
that is given the first name follows the whole sequence.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from protoagg_dagster.archive.store import sequence_blobs
from protoagg_dagster.core.archive_object import sequence_number
from protoagg_dagster.reading.archive_reader import cat_archive, verify_archive
from tests.conftest import Services
from tests.helpers import (
    Stack,
    archive_with_daemon,
    check_archive,
    create_topic,
    log_value,
    produce,
    run_restore,
)
from tests.support.dagster_deployment import DagsterDeployment, run_summaries

PARTITIONS, PER_PARTITION = 2, 600
# Runs of 200 messages, one partition's range each (the range fills the run's bound), the two
# partitions' runs side by side: ~12 KB of frames a batch, so an object holds two batches and the
# third rolls over (a claim reserves its frames' exact size). Three runs a partition.
BATCH = 200
MAX_OBJECT_BYTES = 30_000
DEADLINE_SECONDS = 300.0


def test_the_archive_rolls_over_into_a_sequence_that_cat_verify_and_checks_follow(
    stack: Stack,
    services: Services,
    postgres_dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = stack.kafka.topic_list()[0]
    create_topic(stack.kafka, topic, partitions=PARTITIONS)
    for p in range(PARTITIONS):
        produce(stack.kafka, topic, [log_value() for _ in range(PER_PARTITION)], partition=p)
    base = stack.gcs.object_template
    env = {
        "PROTOAGG_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
        "PROTOAGG_TOPICS": topic,
        "PROTOAGG_POSTGRES_DSN": postgres_dsn,
        "PROTOAGG_GCS_BUCKET": services.bucket,
        "PROTOAGG_GCS_OBJECT": base,
        "PROTOAGG_MAX_OBJECT_BYTES": str(MAX_OBJECT_BYTES),
        "PROTOAGG_BATCH_SIZE": str(BATCH),
        "PROTOAGG_MAX_BATCH_MESSAGES": str(BATCH),
        "STORAGE_EMULATOR_HOST": services.gcs_url,
    }
    deployment = DagsterDeployment("rollover", tmp_path / "rollover", env)
    archive_with_daemon(
        deployment, postgres_dsn, topic, PARTITIONS, PER_PARTITION, DEADLINE_SECONDS
    )
    runs = [r for r in run_summaries(deployment) if r.job_name == "archive_kafka_batch"]
    assert runs and [r for r in runs if r.status != "SUCCESS"] == []
    members = sequence_blobs(stack.gcs.get_bucket(), base)
    numbers = [sequence_number(base, blob.name) for blob in members]
    assert numbers == list(range(len(members))) and len(members) >= 3, numbers
    assert all(0 < (blob.size or 0) <= MAX_OBJECT_BYTES for blob in members)
    # Each run's materialization names the objects its ranges went to; the sequence holds them
    # all.
    written = {
        name
        for r in runs
        for m in r.materializations
        if m.get("records_appended")
        for name in m["objects"]
    }
    assert written == {f"gs://{services.bucket}/{blob.name}" for blob in members}
    check = check_archive(stack)  # every member against Kafka, offsets accounted for once
    assert check.ok, check.summary()
    assert (check.offsets, check.archived) == (PARTITIONS * PER_PARTITION,) * 2
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", services.gcs_url)
    monkeypatch.setenv("PROTOAGG_KAFKA_BOOTSTRAP", services.kafka_bootstrap)
    url = f"gs://{services.bucket}/{base}"
    out = io.StringIO()
    assert cat_archive(url, out) == PARTITIONS * PER_PARTITION
    report = verify_archive(url)
    assert report.ok and report.records == PARTITIONS * PER_PARTITION, report.summary()
    # A member named explicitly is read alone.
    second = f"gs://{services.bucket}/{members[1].name}"
    assert 0 < cat_archive(second, io.StringIO()) < PARTITIONS * PER_PARTITION
    # A restore of the prefix reads the sequence once, through its first object.
    prefix = f"gs://{services.bucket}/{base.rsplit('/', 1)[0]}/"
    dry = run_restore(prefix, "--to-topic", f"{topic}-back", "--create-topic", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would restore {PARTITIONS * PER_PARTITION} records" in dry.stdout
