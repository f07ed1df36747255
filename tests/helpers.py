"""Shared test helpers: producing seed-shaped messages and building resources for a test."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

import dagster as dg
import psycopg
from google.cloud import storage
from kafka.admin import NewTopic

from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.ledger import (
    AppendLedger,
    archived_partitions,
    claim_batch,
    ledger_connection,
    read_progress,
)
from protoagg_dagster.archive.partition_lease import PartitionLease
from protoagg_dagster.archive.sensor import kafka_offsets_sensor
from protoagg_dagster.archive.store import AppendResult, append_batch, sequence_blobs
from protoagg_dagster.core.archive_object import Piece, archive_compression, archive_format
from protoagg_dagster.core.compression import decompressed
from protoagg_dagster.core.framing import ArchivedRecord, iter_records
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.reading.verification import KafkaCheck, check_against_kafka
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.resources.settings import ArchiverSettings
from tests.conftest import ROOT

# Debian's programs that decompress a whole archive object to stdout, by codec.
DECOMPRESSORS = {"gzip": ["gzip", "-dc"], "zstd": ["zstd", "-dcq"]}


@dataclass(frozen=True)
class Stack:
    kafka: KafkaResource
    postgres: PostgresResource
    gcs: GCSResource
    archiver: ArchiverSettings

    def resources(self) -> dict[str, object]:
        return {
            "kafka": self.kafka,
            "postgres": self.postgres,
            "gcs": self.gcs,
            "archiver": self.archiver,
            "lease": PartitionLease(postgres=self.postgres),
        }


def log_value(log_id: str | None = None, message: str = "hello", second: int = 0) -> bytes:
    return json.dumps(
        {
            "logId": log_id or str(uuid.uuid4()),
            "timestamp": f"2026-11-01T08:00:{second % 60:02d}.123456789Z",
            "message": message,
        }
    ).encode()


def create_topic(kafka: KafkaResource, topic: str, partitions: int = 1) -> None:
    admin = kafka.get_admin()
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def produce(kafka: KafkaResource, topic: str, values: Iterable[bytes], partition: int = 0) -> int:
    producer = kafka.get_producer()
    count = 0
    try:
        for value in values:
            producer.send(topic, value=value, partition=partition)
            count += 1
        producer.flush()
    finally:
        producer.close()
    return count


def topic_of(stack: Stack) -> str:
    return stack.kafka.topic_list()[0]


def memory_instance() -> dg.DagsterInstance:
    """A Dagster instance whose run and event storages live in memory, as ``execute_in_process``
    uses when given none. ``dg.instance_for_test()`` builds SQLite files instead: seconds of schema
    creation per instance and a connection per event (a run of four ops took four times as long
    on it), while nothing a test here reads differs (docs/design.md, "The tests")."""
    return dg.DagsterInstance.ephemeral()


def tick(stack: Stack, instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    """One evaluation of kafka_offsets_sensor on the stack's resources."""
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, resources=stack.resources()
    ) as context:
        result = kafka_offsets_sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def with_topics(stack: Stack, topics: str, **archiver: Any) -> Stack:
    """The stack archiving ``topics`` (a PROTOAGG_TOPICS value), with archiver settings changed."""
    return replace(
        stack,
        kafka=KafkaResource(
            bootstrap_servers=stack.kafka.bootstrap_servers,
            topics=topics,
            client=stack.kafka.client,
        ),
        # A fresh resource: Dagster rebuilds resources from their constructor arguments, which
        # pydantic's model_copy does not update.
        archiver=ArchiverSettings(**{**stack.archiver.model_dump(), **archiver}),
    )


def with_client(stack: Stack, client: str) -> Stack:
    """The stack reading Kafka with ``client`` (a PROTOAGG_KAFKA_CLIENT value)."""
    kafka = stack.kafka
    return replace(
        stack,
        kafka=KafkaResource(
            bootstrap_servers=kafka.bootstrap_servers, topics=kafka.topics, client=client
        ),
    )


def archived_records(stack: Stack) -> list[Any]:
    """The stack's archive object decoded in the format its metadata records."""
    blob = stack.gcs.get_bucket().get_blob(stack.gcs.object_template)
    assert blob is not None, f"no archive object {stack.gcs.object_template}"
    archive = stack.archiver.format_options().build(archive_format(blob.metadata))
    return list(archive.decode(uncompressed(blob)))


def uncompressed(blob: storage.Blob) -> BinaryIO:
    """The object's bytes, decompressed by the codec its metadata records."""
    return decompressed(io.BytesIO(blob.download_as_bytes()), archive_compression(blob.metadata))


def archived_to_end(dsn: str, topic: str, partitions: int, end: int) -> bool:
    """Whether partitions ``0..partitions-1`` of ``topic`` are archived up to ``end`` with no
    claim pending, by the ledger (False before any run created the schema)."""
    try:
        with psycopg.connect(dsn) as conn:
            progress = read_progress(conn, topic)
    except psycopg.errors.UndefinedTable:
        return False
    return all(
        (state := progress.get(p)) is not None
        and state.next_offset == end
        and state.pending is None
        for p in range(partitions)
    )


def run_sensor_until_idle(stack: Stack, instance: dg.DagsterInstance, max_ticks: int = 50) -> int:
    """Tick the sensor and execute what it asks for, until it asks for nothing; return runs."""
    cursor = None
    launched = 0
    for _ in range(max_ticks):
        result = tick(stack, instance, cursor)
        cursor = result.cursor
        if not result.run_requests:
            return launched
        for request in result.run_requests:
            outcome = archive_kafka_batch.execute_in_process(
                run_config=request.run_config,
                resources=stack.resources(),
                instance=instance,
                tags=request.tags,
            )
            assert outcome.success
            launched += 1
    raise AssertionError(f"sensor still launching runs after {max_ticks} ticks")


def run_in_subprocess(
    stack: Stack, topic: str, partition: int, start: int, end: int, crash_at: str | None = None
) -> subprocess.Popen[bytes]:
    """Start one archive run of one range in its own process (see tests/e2e/run_range.py)."""
    return run_ranges_in_subprocess(stack, [(topic, partition, start, end)], crash_at)


def run_ranges_in_subprocess(
    stack: Stack, ranges: Sequence[tuple[str, int, int, int]], crash_at: str | None = None
) -> subprocess.Popen[bytes]:
    """Start one archive run of ``ranges`` in its own process (see tests/e2e/run_range.py)."""
    spec = {
        "resources": {
            name: resource.model_dump(exclude_none=True)
            for name, resource in stack.resources().items()
        },
        "ranges": [list(r) for r in ranges],
        "crash_at": crash_at,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.run_range", json.dumps(spec)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def archive(stack: Stack) -> tuple[list[ArchivedRecord], str]:
    name = stack.gcs.object_template
    blob = stack.gcs.get_bucket().get_blob(name)
    assert blob is not None, f"no archive object {name}"
    return list(iter_records(uncompressed(blob))), f"gs://{stack.gcs.bucket}/{name}"


def check_archive(stack: Stack) -> KafkaCheck:
    """The invariant checker over the stack's archive object and its topic."""
    base = stack.gcs.object_template
    members = [blob.name for blob in sequence_blobs(stack.gcs.get_bucket(), base)]
    with ledger_connection(stack.postgres) as conn:
        partitions = archived_partitions(conn, members)
    consumer = stack.kafka.get_consumer()
    try:
        return check_against_kafka(
            stack.gcs.get_bucket(),
            stack.gcs.object_template,
            stack.gcs.dead_letter_template,
            consumer,
            stack.archiver.max_message_bytes,
            partitions,
            stack.archiver.format_options(),
        )
    finally:
        consumer.close()


def append_from_threads(
    gcs: GCSResource, postgres: PostgresResource, name: str, writers: int, pieces: int
) -> dict[tuple[int, int], tuple[bytes, AppendResult]]:
    """``writers`` partitions (threads, a connection each) append ``pieces`` batches to ``name``.

    Each batch is claimed and appended as the append op does (``AppendLedger``); its piece is
    ``<partition.n>``. Returns each batch's bytes and append result.
    """
    topic = f"t-{uuid.uuid4().hex}"

    def write(partition: int) -> dict[tuple[int, int], tuple[bytes, AppendResult]]:
        results = {}
        bucket = gcs.get_bucket()
        with ledger_connection(postgres) as conn:
            ledger = AppendLedger(conn, gcs.bucket)
            for n in range(pieces):
                batch = OffsetRange(topic, partition, n, n + 1)
                claim = claim_batch(conn, batch, [], name, run_id=None)
                assert claim.batch_id is not None
                data = f"<{partition}.{n}>".encode()
                piece = Piece(claim.batch_id, "records", len(data))
                results[(partition, n)] = (
                    data,
                    append_batch(bucket, name, batch, piece, data, ledger),
                )
        return results

    with ThreadPoolExecutor(writers) as pool:
        return {k: v for done in pool.map(write, range(writers)) for k, v in done.items()}


def restore_cmd(*args: str) -> list[str]:
    """``protoagg restore ARGS`` as a command line (the environment's settings apply)."""
    return [sys.executable, "-m", "protoagg_dagster.cli.main", "restore", *args]


def run_restore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(restore_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=300)


def archive_with_daemon(
    deployment: Any, dsn: str, topic: str, partitions: int, end: int, deadline_seconds: float
) -> float:
    """Start ``deployment`` (a ``DagsterDeployment``), wait until ``topic`` is archived to
    ``end`` and every run settled, stop it; return the seconds from start to archived.

    On failure the deployment's log tail is printed."""
    from tests.support.dagster_deployment import settled

    started = time.monotonic()
    deadline = started + deadline_seconds
    try:
        deployment.start()
        while not archived_to_end(dsn, topic, partitions, end):
            assert deployment.running(), "dagster-daemon exited"
            assert time.monotonic() < deadline, "not archived in time"
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        while not settled(deployment):
            assert time.monotonic() < deadline, "runs did not settle"
            time.sleep(0.5)
    except BaseException:
        print(deployment.log_tail())
        raise
    finally:
        deployment.stop()
    return elapsed
