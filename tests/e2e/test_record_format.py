"""The record format end to end: any topic archived byte for byte, transactions, dedupe keys,
patterns, and the log format with the user's own JSON fields.

Topics are written by a plain kafka-python producer, not the project's code, and the archive is
compared with what a read_committed consumer reads.
"""

from __future__ import annotations

import io
import json
import random
import uuid

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.structs import OffsetAndMetadata

from protoagg_dagster.archive.assets import ARCHIVE_ASSET, topic_asset_key
from protoagg_dagster.archive.ledger import ledger_connection, read_progress
from protoagg_dagster.core.formats import parse_topics
from protoagg_dagster.core.kafka_record import ArchivedKafkaRecord
from protoagg_dagster.core.settings import KAFKA_CLIENTS
from protoagg_dagster.reading.archive_reader import cat_archive, verify_archive
from tests.helpers import (
    Stack,
    archived_records,
    check_archive,
    log_value,
    memory_instance,
    run_sensor_until_idle,
    tick,
    with_client,
    with_topics,
)

Row = tuple[int, int, int, int, bytes | None, bytes | None, tuple[tuple[str, bytes | None], ...]]


def create(stack: Stack, topic: str, partitions: int = 1, **configs: str) -> None:
    admin = stack.kafka.get_admin()
    try:
        new = NewTopic(topic, partitions, replication_factor=1, topic_configs=configs)
        admin.create_topics([new])
    finally:
        admin.close()


def producer(stack: Stack, **extra: object) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=stack.kafka.bootstrap_servers, **extra)


def committed(stack: Stack, topic: str) -> list[Row]:
    """Every committed record of the topic, as a read_committed consumer of its own reads it."""
    consumer = KafkaConsumer(
        bootstrap_servers=stack.kafka.bootstrap_servers,
        isolation_level="read_committed",
        enable_auto_commit=False,
    )
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(tps)
        rows: list[Row] = []
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            for records in consumer.poll(timeout_ms=1000).values():
                rows.extend(
                    (
                        r.partition,
                        r.offset,
                        r.timestamp,
                        r.timestamp_type,
                        r.key,
                        r.value,
                        tuple(r.headers),
                    )
                    for r in records
                )
        return sorted(rows, key=lambda row: (row[0], row[1]))
    finally:
        consumer.close()


def rows_of(records: list[ArchivedKafkaRecord]) -> list[Row]:
    return sorted(
        ((r.partition, r.offset, r.timestamp_ms, r.timestamp_type, r.key, r.value, r.headers))
        for r in records
    )


def binary(rng: random.Random, size: int) -> bytes:
    # 0xff never occurs in UTF-8: these keys and values are not text.
    return b"\xff" + rng.randbytes(size)


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_any_topic_is_archived_byte_for_byte(stack: Stack, unique: str, client: str) -> None:
    topic = f"any-{unique}"
    stack = with_topics(with_client(stack, client), f"{topic}:record")
    create(stack, topic, partitions=3)
    rng = random.Random(11)
    sent = producer(stack)
    for i in range(240):
        key = rng.choice([None, b"", binary(rng, rng.randrange(1, 20))])
        value = rng.choice([None, b"", binary(rng, rng.randrange(1, 300))])
        if key is None and value is None:
            key = b""  # kafka-python refuses a record with neither
        headers = [
            (rng.choice(["h", "h", "trace"]), rng.choice([b"", binary(rng, 5)]))
            for _ in range(rng.randrange(4))
        ]
        sent.send(
            topic,
            key=key,
            value=value,
            headers=headers,
            partition=i % 3,
            timestamp_ms=1_700_000_000_000 + rng.randrange(10**9),
        )
    sent.flush()
    sent.close()

    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)

    records = archived_records(stack)
    assert rows_of(records) == committed(stack, topic)
    assert len(records) == 240
    kinds = {(r.key is None, r.key == b"", r.value is None, r.value == b"") for r in records}
    assert (False, False, True, False) in kinds  # tombstones archived
    assert any(r.key is None for r in records) and any(r.value == b"" for r in records)
    assert any(len({k for k, _ in r.headers}) < len(r.headers) for r in records)
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert (check.offsets, check.archived, check.without_record) == (240, 240, 0)
    url = f"gs://{stack.gcs.bucket}/{stack.gcs.object_template}"
    assert verify_archive(url).ok
    out = io.StringIO()
    assert cat_archive(url, out) == 240
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    first = next(line for line in lines if isinstance(line["value"], dict))
    assert set(first) == {
        "topic",
        "partition",
        "offset",
        "timestamp",
        "timestamp_type",
        "key",
        "value",
        "headers",
    }
    assert first["timestamp_type"] == "create_time"
    assert set(first["value"]) == {"base64"}


def test_log_append_time_topic_keeps_the_broker_timestamp(stack: Stack, unique: str) -> None:
    topic = f"append-{unique}"
    stack = with_topics(stack, f"{topic}:record")
    create(stack, topic, **{"message.timestamp.type": "LogAppendTime"})
    sent = producer(stack)
    for i in range(5):
        sent.send(topic, value=b"v%d" % i, timestamp_ms=1_000_000_000_000)
    sent.flush()
    sent.close()
    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)
    records = archived_records(stack)
    assert rows_of(records) == committed(stack, topic)
    assert {r.timestamp_type for r in records} == {1}
    assert all(r.timestamp_ms > 1_000_000_000_000 for r in records)
    assert check_archive(stack).ok


@pytest.mark.parametrize(
    ("archive_format", "client"),
    [("record", "kafka-python"), ("log", "kafka-python"), ("record", "confluent")],
)
def test_transactions_only_committed_records_and_open_ones_once_committed(
    stack: Stack, unique: str, archive_format: str, client: str
) -> None:
    topic = f"txn-{unique}"
    stack = with_topics(with_client(stack, client), f"{topic}:{archive_format}")
    create(stack, topic, partitions=2)
    values = [log_value() for _ in range(25)]
    txn = producer(stack, transactional_id=f"protoagg-test-{unique}")
    txn.init_transactions()
    for batch, commit in ((values[0:5], True), (values[5:10], False), (values[10:15], True)):
        txn.begin_transaction()
        for value in batch:
            txn.send(topic, value=value, partition=0)
        txn.flush()
        if commit:
            txn.commit_transaction()
        else:
            txn.abort_transaction()
    txn.begin_transaction()
    for value in values[15:20]:
        txn.send(topic, value=value, partition=0)
    txn.flush()
    plain = producer(stack)
    for value in values[20:25]:
        plain.send(topic, value=value, partition=1)
    plain.flush()
    plain.close()

    def archived_values() -> list[bytes | None]:
        records = archived_records(stack)
        if archive_format == "log":
            by_id = {json.loads(v)["logId"]: v for v in values}
            return [by_id[r.log_id] for r in records]
        return [r.value for r in sorted(records, key=lambda r: (r.partition, r.offset))]

    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)
        # The open transaction holds partition 0 back, tick after tick; partition 1 is done.
        cursor = None
        for _ in range(3):
            result = tick(stack, instance, cursor)
            assert not result.run_requests
            cursor = result.cursor
        # ...and the lag says so, for the whole archive and for the topic's own asset.
        observations = {o.asset_key: o.metadata for o in result.asset_events}
        assert set(observations) == {
            ARCHIVE_ASSET,
            topic_asset_key(parse_topics(stack.kafka.topics)[0]),
        }
        for metadata in observations.values():
            assert metadata["most_behind"].value[f"{topic}/0"][2] == 5
            assert metadata["lag_messages"].value == 0
        assert sorted(archived_values(), key=values.index) == (
            values[0:5] + values[10:15] + values[20:25]
        )
        with ledger_connection(stack.postgres) as conn:
            progress = read_progress(conn, topic)
        assert progress[1].next_offset == 5
        txn.commit_transaction()
        txn.close()
        run_sensor_until_idle(stack, instance)

    assert sorted(archived_values(), key=values.index) == values[0:5] + values[10:25]
    check = check_archive(stack)
    assert check.ok, check.summary()
    # 4 transaction markers and at least the aborted records hold no record.
    assert check.archived == 20
    assert check.offsets == check.archived + check.without_record
    assert check.without_record >= 4


@pytest.mark.parametrize(
    ("dedupe_key", "make"),
    [
        ("key", lambda k: {"key": k, "value": b"v"}),
        ("header:id", lambda k: {"value": b"v", "headers": [("id", k)]}),
        ("json:id", lambda k: {"value": orjson.dumps({"id": k.decode(), "n": 1})}),
    ],
)
def test_dedupe_keys_drop_repeats_and_keep_records_without_a_key(
    stack: Stack, unique: str, dedupe_key: str, make: object
) -> None:
    topic = f"dd-{unique}"
    stack = with_topics(stack, f"{topic}:record", dedupe_key=dedupe_key)
    create(stack, topic)
    keys = [b"a", b"b", b"a", b"c", b"b", b"a"]
    sent = producer(stack)
    for key in keys:
        sent.send(topic, partition=0, **make(key))  # type: ignore[operator]
    # No such key: a null key / no header / a value that is not JSON; archived, never deduped.
    for _ in range(2):
        sent.send(topic, partition=0, value=b"\xffnot json", headers=[("other", b"x")])
    sent.flush()
    sent.close()
    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)
    offsets = [r.offset for r in archived_records(stack)]
    assert offsets == [0, 1, 3, 6, 7]
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert (check.archived, check.duplicates) == (5, 3)


@pytest.mark.parametrize("timestamp_field", ["kafka", "at"])
def test_log_format_with_the_users_own_fields(
    stack: Stack, unique: str, timestamp_field: str
) -> None:
    topic = f"own-{unique}"
    stack = with_topics(
        stack,
        topic,
        log_id_field="id",
        log_timestamp_field=timestamp_field,
        log_message_field="*",
    )
    create(stack, topic)
    ids = [str(uuid.uuid4()) for _ in range(4)]
    values = [orjson.dumps({"id": i, "at": "2026-01-02T03:04:05.5Z", "lvl": 1}) for i in ids]
    values.append(values[0])  # a repeated id
    sent = producer(stack)
    for value in values:
        sent.send(topic, value=value, partition=0, timestamp_ms=1_767_225_600_123)
    sent.flush()
    sent.close()
    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)
    records = archived_records(stack)
    assert [r.log_id for r in records] == ids
    assert [r.message.encode() for r in records] == values[:4]
    if timestamp_field == "kafka":
        assert {(r.seconds, r.nanos) for r in records} == {(1_767_225_600, 123_000_000)}
    else:
        assert {(r.seconds, r.nanos) for r in records} == {(1_767_323_045, 500_000_000)}
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert (check.archived, check.duplicates) == (4, 1)


def test_a_pattern_archives_topics_created_after_start(stack: Stack, unique: str) -> None:
    stack = with_topics(stack, f"/pat-{unique}-.*/:record")
    create(stack, f"pat-{unique}-a")
    sent = producer(stack)
    sent.send(f"pat-{unique}-a", value=b"first")
    sent.flush()
    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)
        assert [r.value for r in archived_records(stack)] == [b"first"]
        create(stack, f"pat-{unique}-b")
        sent.send(f"pat-{unique}-b", value=b"later")
        sent.flush()
        run_sensor_until_idle(stack, instance)
    sent.close()
    assert sorted((r.topic, r.value) for r in archived_records(stack)) == [
        (f"pat-{unique}-a", b"first"),
        (f"pat-{unique}-b", b"later"),
    ]
    assert check_archive(stack).ok


def test_a_catch_all_pattern_leaves_internal_topics_alone(stack: Stack, unique: str) -> None:
    topic = f"visible-{unique}"
    create(stack, topic)
    # A committed group offset makes sure the broker has its internal __consumer_offsets topic.
    group = KafkaConsumer(
        bootstrap_servers=stack.kafka.bootstrap_servers,
        group_id=f"g-{unique}",
        enable_auto_commit=False,
    )
    try:
        group.assign([TopicPartition(topic, 0)])
        group.commit({TopicPartition(topic, 0): OffsetAndMetadata(0, "", -1)})
    finally:
        group.close()
    admin = stack.kafka.get_admin()
    try:
        assert "__consumer_offsets" in admin.list_topics()
    finally:
        admin.close()
    listed = with_topics(stack, "/.*/:record").kafka.topic_list()
    assert topic in listed
    assert [t for t in listed if t.startswith("_")] == []
    named = with_topics(stack, "__consumer_offsets:record").kafka.topic_list()
    assert named == ["__consumer_offsets"]
