"""The Iceberg tables end to end: a log and a record topic archived, then their days written.

One pipeline per module (archiving is the slow part): zstd-compressed objects under a
``{date}/{hour}`` template, rolled over into numbered sequences every few kilobytes. The tests
then take the tables through their life: first write, a late record, a killed write, two
concurrent writes, maintenance.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import confluent_kafka
import dagster as dg
import psycopg
import pyarrow as pa
import pytest
from kafka import KafkaProducer
from psycopg import sql

from protoagg_dagster.cli.query import TopicTables, run_query
from protoagg_dagster.core.archive_object import archive_compression, archive_format
from protoagg_dagster.core.compression import decompressed
from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.formats import FormatOptions, parse_topics
from protoagg_dagster.core.table_days import day_key, parse_day
from protoagg_dagster.iceberg.assets import ROW_COUNT, build_table_assets, table_asset_key
from protoagg_dagster.iceberg.maintenance import clean_table, referenced_files
from protoagg_dagster.iceberg.sensor import build_days_sensor
from protoagg_dagster.iceberg.writer import day_filter
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.resources.iceberg import IcebergResource
from protoagg_dagster.resources.settings import ArchiverSettings
from tests.conftest import ROOT, Services
from tests.helpers import Stack, create_topic, run_sensor_until_idle

pytestmark = pytest.mark.integration

DAY1, DAY2, DAY3 = (parse_day(d) for d in ("2026-11-01", "2026-11-02", "2026-11-03"))
PARTITIONS = dg.DailyPartitionsDefinition(start_date="2026-10-01", timezone="UTC")


@dataclass(frozen=True)
class Pipeline:
    stack: Stack
    iceberg: IcebergResource
    prefix: str
    log_topic: str
    record_topic: str
    assets: list[dg.AssetsDefinition]
    sensor: dg.SensorDefinition
    instance: dg.DagsterInstance

    def resources(self) -> dict[str, Any]:
        return {"gcs": self.stack.gcs, "postgres": self.stack.postgres, "iceberg": self.iceberg}

    def table(self, topic: str) -> Any:
        return self.iceberg.get_catalog().load_table((self.iceberg.namespace, topic))

    def archive(self) -> None:
        assert run_sensor_until_idle(self.stack, self.instance) > 0

    def requested_days(self) -> list[tuple[str, str]]:
        with dg.build_sensor_context(instance=self.instance, resources=self.resources()) as ctx:
            requests = list(self.sensor(ctx) or [])
        return sorted(
            (r.tags["protoagg/iceberg-topic"], r.partition_key)
            for r in requests
            if isinstance(r, dg.RunRequest)
        )

    def materialize(self, topic: str, day: int) -> dg.ExecuteInProcessResult:
        result = dg.materialize(
            self.assets,
            partition_key=day_key(day),
            resources=self.resources(),
            instance=self.instance,
            selection=[table_asset_key(topic)],
        )
        assert result.success
        return result

    def write_in_subprocess(self, topic: str, fmt: str, day: int, crash: bool = False) -> Any:
        spec = {
            "gcs": self.stack.gcs.model_dump(exclude_none=True),
            "postgres": self.stack.postgres.model_dump(exclude_none=True),
            "iceberg": self.iceberg.model_dump(exclude_none=True),
            "topic": topic,
            "format": fmt,
            "day": day,
            "crash_before_commit": crash,
        }
        return subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.run_iceberg_day", json.dumps(spec)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )


def log_line(day: str, second: int, log_id: str | None = None) -> bytes:
    return json.dumps(
        {
            "logId": log_id or str(uuid.uuid4()),
            "timestamp": f"{day}T{second // 3600:02d}:{second // 60 % 60:02d}:"
            f"{second % 60:02d}.123456789Z",
            "message": f"line {second} of {day} " + "x" * (second % 40),
        }
    ).encode()


def _millis(day: str, second: int) -> int:
    start = datetime.datetime.fromisoformat(day).replace(tzinfo=datetime.UTC)
    return int(start.timestamp()) * 1000 + second * 1000 + 7


RECORDS: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = [
    (b"\xff\x00key", b"value", [("h", b"\x00\xff"), ("empty", b""), ("none", None)]),
    (None, b"null key", []),
    (b"", b"", [("h", b"1"), ("h", b"2")]),
    (b"deleted", None, []),  # a tombstone
    (b"k", "é".encode(), []),
]


@pytest.fixture(scope="module")
def pipeline(services: Services) -> Iterator[Pipeline]:
    unique = uuid.uuid4().hex[:10]
    database = f"t_{unique}"
    with psycopg.connect(services.postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    dsn = services.postgres_admin_dsn.rsplit("/", 1)[0] + f"/{database}"
    log_topic, record_topic = f"logs-{unique}", f"orders-{unique}"
    topics = f"{log_topic},{record_topic}:record"
    stack = Stack(
        kafka=KafkaResource(bootstrap_servers=services.kafka_bootstrap, topics=topics),
        postgres=PostgresResource(dsn=dsn),
        gcs=GCSResource(
            bucket=services.bucket,
            object_template=unique + "/{topic}/{date}/{hour}/{partition}.pb",
            emulator_host=services.gcs_url,
            compression="zstd",
            max_object_bytes=4000,
        ),
        archiver=ArchiverSettings(batch_size=40, linger_seconds=0, max_batch_messages=40),
    )
    iceberg = IcebergResource(
        postgres_dsn=dsn,
        bucket=services.bucket,
        warehouse_prefix=f"{unique}/iceberg",
        namespace=f"ns_{unique}",
        emulator_host=services.gcs_url,
    )
    rules = parse_topics(topics)
    assets = build_table_assets(rules, PARTITIONS)
    create_topic(stack.kafka, log_topic, partitions=2)
    create_topic(stack.kafka, record_topic)
    producer = KafkaProducer(bootstrap_servers=services.kafka_bootstrap)
    repeated = str(uuid.uuid4())
    for n in range(120):
        day = ("2026-11-01", "2026-11-02", "2026-11-03")[n // 50 if n < 100 else 2]
        value = log_line(day, n * 600, repeated if n in (3, 77) else None)
        producer.send(log_topic, value=value, partition=n % 2)
    producer.flush()
    producer.close()
    # librdkafka sends null header values, which kafka-python refuses.
    records = confluent_kafka.Producer({"bootstrap.servers": services.kafka_bootstrap})
    for n, (key, value, headers) in enumerate(RECORDS * 3):
        day = ("2026-11-01", "2026-11-02", "2026-11-03")[n // len(RECORDS)]
        records.produce(
            record_topic, key=key, value=value, headers=headers, timestamp=_millis(day, n)
        )
    assert records.flush(30) == 0
    with dg.instance_for_test() as instance:
        built = Pipeline(
            stack,
            iceberg,
            unique,
            log_topic,
            record_topic,
            assets,
            build_days_sensor(rules, grace_seconds=0),
            instance,
        )
        built.archive()
        yield built
    with psycopg.connect(services.postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
        )


def archived(pipeline: Pipeline, topic: str) -> list[Any]:
    """Every record in the topic's archive objects, each decoded in its object's format."""
    bucket = pipeline.stack.gcs.get_bucket()
    records = []
    for blob in bucket.list_blobs(prefix=f"{pipeline.prefix}/{topic}/"):
        archive = FormatOptions().build(archive_format(blob.metadata))
        stream = decompressed(
            io.BytesIO(blob.download_as_bytes()), archive_compression(blob.metadata)
        )
        records += list(archive.decode(stream))
    return records


def archived_day(pipeline: Pipeline, topic: str, day: int) -> list[tuple[Any, ...]]:
    low, high = day * 86_400, (day + 1) * 86_400
    rows = []
    for r in archived(pipeline, topic):
        if topic == pipeline.log_topic:
            if low <= r.seconds < high:
                rows.append((r.log_id, r.seconds * 1_000_000 + r.nanos // 1000, r.message))
        elif low * 1000 <= r.timestamp_ms < high * 1000:
            headers = [(k, v) for k, v in r.headers]
            rows.append((r.partition, r.offset, r.timestamp_ms * 1000, r.key, r.value, headers))
    return sorted(rows, key=repr)


def table_day(table: pa.Table, topic: str, pipeline: Pipeline) -> list[tuple[Any, ...]]:
    """A table's rows in the shape ``archived_day`` gives (timestamps as microseconds)."""
    table = table.set_column(
        table.schema.get_field_index("timestamp"),
        "timestamp",
        table.column("timestamp").cast(pa.int64()),
    )
    rows = []
    for r in table.to_pylist():
        if topic == pipeline.log_topic:
            rows.append((r["log_id"], r["timestamp"], r["message"]))
        else:
            headers = [(h["key"], h["value"]) for h in r["headers"]]
            rows.append(
                (r["partition"], r["offset"], r["timestamp"], r["key"], r["value"], headers)
            )
    return sorted(rows, key=repr)


def scanned(pipeline: Pipeline, topic: str, day: int) -> list[tuple[Any, ...]]:
    arrow = pipeline.table(topic).scan(row_filter=day_filter(day)).to_arrow()
    return table_day(arrow, topic, pipeline)


def queried(pipeline: Pipeline, topic: str, day: int) -> list[tuple[Any, ...]]:
    """The day through ``protoagg query --from DAY --to DAY --json`` (DuckDB's iceberg_scan)."""
    out = io.StringIO()
    start = datetime.datetime.combine(
        datetime.date.fromisoformat(day_key(day)), datetime.time(), datetime.UTC
    )
    run_query(
        f'SELECT * FROM "{topic}"',
        out,
        start,
        start + datetime.timedelta(days=1),
        as_json=True,
        tables=TopicTables(
            pipeline.iceberg.postgres_dsn,
            pipeline.iceberg.namespace,
            pipeline.iceberg.emulator_host,
        ),
    )
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    columns = {name: [r[name] for r in rows] for name in (rows[0] if rows else {})}
    for name, values in columns.items():
        if name == "timestamp":
            columns[name] = [datetime.datetime.fromisoformat(v) for v in values]
        elif name in ("key", "value"):
            columns[name] = [_unshown(v) for v in values]
        elif name == "headers":
            columns[name] = [
                [{"key": h["key"], "value": _unshown(h["value"])} for h in hs] for hs in values
            ]
    return table_day(pa.table(columns), topic, pipeline) if rows else []


def _unshown(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return base64.b64decode(value["base64"])
    return str(value).encode()


def test_days_the_archive_passed_are_written_with_exactly_the_archived_records(
    pipeline: Pipeline,
) -> None:
    topics = (pipeline.log_topic, pipeline.record_topic)
    # The sources are what the fixture meant: hourly objects rolled over into sequences.
    bucket = pipeline.stack.gcs.get_bucket()
    names = [b.name for t in topics for b in bucket.list_blobs(prefix=f"{pipeline.prefix}/{t}/")]
    assert all(re.search(r"/\d{4}-\d\d-\d\d/\d\d/\d+(\.\d{4})?\.pb$", n) for n in names), names
    assert any(".0001.pb" in n for n in names), names
    assert pipeline.requested_days() == sorted(
        (topic, day_key(day)) for topic in topics for day in (DAY1, DAY2)
    )
    for topic in topics:
        for day in (DAY1, DAY2):
            result = pipeline.materialize(topic, day)
            (check,) = result.get_asset_check_evaluations()
            assert check.check_name == ROW_COUNT and check.passed, check.metadata
    assert pipeline.requested_days() == []
    for topic in topics:
        for day in (DAY1, DAY2):
            expected = archived_day(pipeline, topic, day)
            assert expected, (topic, day)
            assert scanned(pipeline, topic, day) == expected
            assert queried(pipeline, topic, day) == expected
    # The logId repeated on day 2 was archived once, on day 1.
    assert len(scanned(pipeline, pipeline.log_topic, DAY1)) == 50
    assert len(scanned(pipeline, pipeline.log_topic, DAY2)) == 49


def test_a_late_record_makes_its_day_stale_and_rewriting_adds_it(pipeline: Pipeline) -> None:
    topic = pipeline.log_topic
    pipeline.materialize(topic, DAY1)
    before = scanned(pipeline, topic, DAY1)
    producer = KafkaProducer(bootstrap_servers=pipeline.stack.kafka.bootstrap_servers)
    producer.send(topic, value=log_line("2026-11-01", 86_399), partition=1)
    producer.flush()
    producer.close()
    pipeline.archive()
    assert pipeline.requested_days() == [(topic, day_key(DAY1))]
    pipeline.materialize(topic, DAY1)
    after = scanned(pipeline, topic, DAY1)
    assert len(after) == len(before) + 1
    assert after == archived_day(pipeline, topic, DAY1)


def test_a_write_killed_before_its_commit_leaves_the_previous_day(pipeline: Pipeline) -> None:
    topic = pipeline.record_topic
    pipeline.materialize(topic, DAY2)
    before = scanned(pipeline, topic, DAY2)
    files_before = _table_files(pipeline, topic)
    process = pipeline.write_in_subprocess(topic, "record", DAY2, crash=True)
    assert process.wait(timeout=120) == -9
    assert scanned(pipeline, topic, DAY2) == before
    # The killed write's data file exists, unreferenced.
    assert len(_table_files(pipeline, topic) - files_before) >= 1
    # A day never written before stays absent after a killed first write.
    process = pipeline.write_in_subprocess(topic, "record", DAY3, crash=True)
    assert process.wait(timeout=120) == -9
    assert scanned(pipeline, topic, DAY3) == []


def test_two_concurrent_writes_of_one_day_leave_it_once(pipeline: Pipeline) -> None:
    topic = pipeline.log_topic
    processes = [pipeline.write_in_subprocess(topic, "log", DAY2) for _ in range(2)]
    for process in processes:
        assert process.wait(timeout=180) == 0
    assert scanned(pipeline, topic, DAY2) == archived_day(pipeline, topic, DAY2)


def test_maintenance_leaves_only_the_files_of_retained_snapshots(pipeline: Pipeline) -> None:
    topic = pipeline.record_topic
    for _ in range(5):
        pipeline.materialize(topic, DAY1)
    table = pipeline.table(topic)
    assert len(table.metadata.snapshots) > 10
    cleaned = clean_table(
        table,
        pipeline.stack.gcs.get_client(),
        keep_snapshots=datetime.timedelta(0),
        orphan_age=datetime.timedelta(0),
    )
    assert cleaned.files_deleted > 0
    table = pipeline.table(topic)
    assert len(table.metadata.snapshots) == 1
    assert _table_files(pipeline, topic) == referenced_files(table)
    for day in (DAY1, DAY2):
        assert scanned(pipeline, topic, day) == archived_day(pipeline, topic, day)


def _table_files(pipeline: Pipeline, topic: str) -> set[str]:
    location = pipeline.table(topic).location()
    bucket, _, prefix = location.removeprefix("gs://").partition("/")
    blobs = pipeline.stack.gcs.get_client().bucket(bucket).list_blobs(prefix=prefix + "/")
    return {f"gs://{bucket}/{blob.name}" for blob in blobs}


def test_a_query_of_one_day_reads_only_that_days_files(pipeline: Pipeline) -> None:
    # Last in the module: it breaks day 2 of the log table on purpose.
    topic = pipeline.log_topic
    expected = archived_day(pipeline, topic, DAY1)
    table = pipeline.table(topic)
    (day2_file, *_) = [
        t.file.file_path for t in table.scan(row_filter=day_filter(DAY2)).plan_files()
    ]
    bucket, _, name = day2_file.removeprefix("gs://").partition("/")
    pipeline.stack.gcs.get_client().bucket(bucket).blob(name).delete()
    assert queried(pipeline, topic, DAY1) == expected
    with pytest.raises(ConfigError):
        queried(pipeline, topic, DAY2)
