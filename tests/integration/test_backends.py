"""Each backend works through the project's own resources, on the real local services."""

from __future__ import annotations

import uuid

import pytest
from google.api_core import exceptions as gexc

from protoagg_dagster.archive.ledger import ledger_connection
from protoagg_dagster.core.errors import BackendError, ConfigError
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.settings import KAFKA_CLIENTS
from protoagg_dagster.kafka.reader import read_range
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from tests.conftest import Services
from tests.helpers import create_topic, log_value, produce


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_kafka_produce_then_read_exact_range_by_assign_and_seek(
    services: Services, unique: str, client: str
) -> None:
    topic = f"t-{unique}"
    kafka = KafkaResource(bootstrap_servers=services.kafka_bootstrap, topics=topic, client=client)
    create_topic(kafka, topic, partitions=2)
    values = [log_value(message=f"m{i}") for i in range(50)]
    produce(kafka, topic, values, partition=1)
    assert kafka.offset_bounds(topic) == {0: (0, 0), 1: (0, 50)}
    reader = kafka.get_reader()
    try:
        read = read_range(reader, OffsetRange(topic, 1, 10, 20), max_bytes=1 << 20)
    finally:
        reader.close()
    assert read.batch == OffsetRange(topic, 1, 10, 20)
    assert [m.offset for m in read.messages] == list(range(10, 20))
    assert [m.value for m in read.messages] == values[10:20]
    assert read.value_bytes == sum(map(len, values[10:20]))
    assert read.skipped == 0


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_kafka_read_stops_early_at_the_byte_limit(
    services: Services, unique: str, client: str
) -> None:
    topic = f"t-{unique}"
    kafka = KafkaResource(bootstrap_servers=services.kafka_bootstrap, topics=topic, client=client)
    create_topic(kafka, topic)
    values = [log_value() for _ in range(20)]
    produce(kafka, topic, values)
    reader = kafka.get_reader()
    try:
        read = read_range(reader, OffsetRange(topic, 0, 0, 20), max_bytes=len(values[0]) * 5)
    finally:
        reader.close()
    assert read.batch.end == 5
    assert [m.offset for m in read.messages] == list(range(5))
    assert read.value_bytes == sum(map(len, values[:5]))


def test_postgres_connection_creates_the_schema(postgres_dsn: str) -> None:
    with ledger_connection(PostgresResource(dsn=postgres_dsn)) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
        }
    assert {"processed_logs", "archive_batches", "archive_positions"} <= tables


def test_gcs_upload_compose_download(services: Services, unique: str) -> None:
    gcs = GCSResource(bucket=services.bucket, emulator_host=services.gcs_url)
    bucket = gcs.get_bucket()
    first, second, dest = (bucket.blob(f"{unique}/{name}") for name in ("a", "b", "dest"))
    first.upload_from_string(b"hello ", if_generation_match=0)
    second.upload_from_string(b"world", if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(f"{unique}/a").upload_from_string(b"again", if_generation_match=0)
    dest.metadata = {"k": "v"}
    dest.compose([first, second])
    fetched = bucket.get_blob(f"{unique}/dest")
    assert fetched is not None
    assert fetched.download_as_bytes() == b"hello world"
    assert fetched.metadata == {"k": "v"}


def test_postgres_wrong_password_is_one_clear_error(services: Services) -> None:
    bad = services.postgres_admin_dsn.replace(":postgres@", f":{uuid.uuid4().hex}@")
    with (
        pytest.raises(ConfigError, match="PROTOAGG_POSTGRES_DSN"),
        ledger_connection(PostgresResource(dsn=bad)),
    ):
        pass


def test_unreachable_kafka_is_one_clear_error() -> None:
    kafka = KafkaResource(bootstrap_servers="127.0.0.1:1", topics="logs", request_timeout_ms=3000)
    with pytest.raises(BackendError, match="PROTOAGG_KAFKA_BOOTSTRAP"):
        kafka.offset_bounds("logs")


def test_unknown_topic_names_the_setting(services: Services, unique: str) -> None:
    kafka = KafkaResource(bootstrap_servers=services.kafka_bootstrap, topics=f"missing-{unique}")
    with pytest.raises(ConfigError, match="PROTOAGG_TOPICS"):
        kafka.offset_bounds(f"missing-{unique}")
    # Looking must not create it.
    with pytest.raises(ConfigError):
        kafka.offset_bounds(f"missing-{unique}")


def test_missing_bucket_is_an_error_unless_creation_is_allowed(
    services: Services, unique: str
) -> None:
    name = f"bucket-{unique}"
    with pytest.raises(ConfigError, match="PROTOAGG_GCS_CREATE_BUCKET"):
        GCSResource(bucket=name, emulator_host=services.gcs_url).writable_bucket()
    created = GCSResource(
        bucket=name, emulator_host=services.gcs_url, create_bucket=True
    ).writable_bucket()
    assert created.exists()
