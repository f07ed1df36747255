"""Both Kafka clients read the same ranges the same way, on the real local broker.

Each case runs with kafka-python and librdkafka (``PROTOAGG_KAFKA_CLIENT``): same messages (every
``KafkaMessage`` field), same batch end, value bytes and skipped count.
"""

from __future__ import annotations

import time

import pytest
from kafka import KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from protoagg_dagster.core.errors import BackendError
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.records import KafkaMessage
from protoagg_dagster.core.settings import KAFKA_CLIENTS
from protoagg_dagster.kafka.reader import RangeEnd, RangeRead, read_range
from protoagg_dagster.resources import KafkaResource
from tests.conftest import Services

BASE_MS = 1_700_000_000_000


def resource(services: Services, topic: str, client: str) -> KafkaResource:
    return KafkaResource(bootstrap_servers=services.kafka_bootstrap, topics=topic, client=client)


def create(kafka: KafkaResource, topic: str, **configs: str) -> None:
    admin = kafka.get_admin()
    try:
        admin.create_topics([NewTopic(topic, 1, replication_factor=1, topic_configs=configs)])
    finally:
        admin.close()


def read(kafka: KafkaResource, wanted: OffsetRange, max_bytes: int = 1 << 30) -> RangeRead:
    reader = kafka.get_reader()
    try:
        return read_range(reader, wanted, max_bytes, timeout_seconds=30)
    finally:
        reader.close()


def test_headers_null_keys_and_values_and_timestamps_come_through_unchanged(
    services: Services, unique: str
) -> None:
    topic = f"shapes-{unique}"
    kafka = resource(services, topic, "kafka-python")
    create(kafka, topic)
    sent = [
        (None, b"v0", [], BASE_MS),
        (b"k1", None, [("h", b"1")], BASE_MS + 1),
        (b"", b"", [("h", b""), ("h", b"2"), ("trace", b"\x00\xff")], BASE_MS + 2),
        (b"k3", b"v3", [], BASE_MS - 5),
    ]
    producer = KafkaProducer(bootstrap_servers=services.kafka_bootstrap)
    for key, value, headers, ms in sent:
        producer.send(topic, key=key, value=value, headers=headers, partition=0, timestamp_ms=ms)
    producer.flush()
    producer.close()
    wanted = OffsetRange(topic, 0, 0, len(sent))
    expected = [
        KafkaMessage(topic, 0, offset, ms, key, value, tuple(headers), 0)
        for offset, (key, value, headers, ms) in enumerate(sent)
    ]
    for client in KAFKA_CLIENTS:
        got = read(resource(services, topic, client), wanted)
        assert got == RangeRead(wanted, expected, 4, 0), client


def test_log_append_time_is_reported_as_kafka_python_does(services: Services, unique: str) -> None:
    topic = f"append-{unique}"
    kafka = resource(services, topic, "kafka-python")
    create(kafka, topic, **{"message.timestamp.type": "LogAppendTime"})
    producer = KafkaProducer(bootstrap_servers=services.kafka_bootstrap)
    for i in range(3):
        producer.send(topic, value=b"v%d" % i, partition=0, timestamp_ms=BASE_MS)
    producer.flush()
    producer.close()
    wanted = OffsetRange(topic, 0, 0, 3)
    reads = {client: read(resource(services, topic, client), wanted) for client in KAFKA_CLIENTS}
    assert reads["kafka-python"] == reads["confluent"]
    assert {m.timestamp_type for m in reads["confluent"].messages} == {1}
    assert all(m.timestamp_ms > BASE_MS for m in reads["confluent"].messages)


def transactions(services: Services, topic: str, unique: str, tail: str) -> KafkaProducer | None:
    """Offsets 0-4 committed (marker 5), 6-10 aborted (marker 11), then 12-14 written without a
    transaction (``tail`` "records") or in a transaction left open (returns its producer)."""
    txn = KafkaProducer(
        bootstrap_servers=services.kafka_bootstrap, transactional_id=f"reader-{unique}"
    )
    txn.init_transactions()
    for commit in (True, False):
        txn.begin_transaction()
        for i in range(5):
            txn.send(topic, value=b"c%d" % i if commit else b"a%d" % i, partition=0)
        txn.flush()
        if commit:
            txn.commit_transaction()
        else:
            txn.abort_transaction()
    if tail == "records":
        txn.close()
        plain = KafkaProducer(bootstrap_servers=services.kafka_bootstrap)
        for i in range(3):
            plain.send(topic, value=b"t%d" % i, partition=0)
        plain.flush()
        plain.close()
    elif tail == "open-transaction":
        txn.begin_transaction()
        for i in range(3):
            txn.send(topic, value=b"o%d" % i, partition=0)
        txn.flush()
        return txn
    else:
        txn.close()
    return None


@pytest.mark.parametrize("tail", ["none", "records", "open-transaction"])
@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_ranges_ending_on_transaction_markers_and_aborted_records_complete(
    services: Services, unique: str, client: str, tail: str
) -> None:
    topic = f"txn-{unique}"
    kafka = resource(services, topic, client)
    create(kafka, topic)
    open_txn = transactions(services, topic, unique, tail)
    committed = [b"c%d" % i for i in range(5)]
    cases = {
        # range: values read
        (0, 12): committed,  # ends on the abort marker
        (0, 6): committed,  # ends on the commit marker
        (6, 12): [],  # aborted records and their marker only
        (3, 9): committed[3:],  # ends inside the aborted ones
        (5, 6): [],  # the commit marker alone
    }
    if tail == "records":
        cases[(4, 15)] = [*committed[4:], b"t0", b"t1", b"t2"]
    for (start, end), values in cases.items():
        # A read that waited for records that never come would hit its timeout and raise.
        wanted = OffsetRange(topic, 0, start, end)
        got = read(kafka, wanted)
        assert got.batch == wanted
        assert [m.value for m in got.messages] == values, (start, end)
        assert got.skipped == 0
    if open_txn is not None:
        open_txn.abort_transaction()
        open_txn.close()


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_offsets_deleted_from_the_log_start_are_skipped_and_counted(
    services: Services, unique: str, client: str
) -> None:
    topic = f"trimmed-{unique}"
    kafka = resource(services, topic, client)
    create(kafka, topic)
    producer = kafka.get_producer()
    for i in range(20):
        producer.send(topic, value=b"v%d" % i, partition=0)
    producer.flush()
    producer.close()
    admin = kafka.get_admin()
    try:
        admin.delete_records({TopicPartition(topic, 0): 10})
    finally:
        admin.close()
    got = read(kafka, OffsetRange(topic, 0, 0, 20))
    assert (got.batch.end, got.skipped) == (20, 10)
    assert [m.offset for m in got.messages] == list(range(10, 20))
    gone = read(kafka, OffsetRange(topic, 0, 2, 8))
    assert (gone.batch.end, gone.skipped, gone.messages) == (8, 6, [])


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_the_read_comes_in_chunks_that_add_up_to_the_range(
    services: Services, unique: str, client: str
) -> None:
    topic = f"chunks-{unique}"
    kafka = resource(services, topic, client)
    create(kafka, topic)
    producer = kafka.get_producer()
    for i in range(2_500):
        producer.send(topic, value=b"%04d" % i, partition=0)
    producer.flush()
    producer.close()
    reader = kafka.get_reader()
    try:
        chunks = reader.read_chunks(OffsetRange(topic, 0, 100, 2_400), 1 << 30, chunk_messages=700)
        with pytest.raises(RuntimeError):
            _ = chunks.end
        sizes = []
        offsets = []
        for chunk in chunks:
            sizes.append(len(chunk))
            offsets.extend(m.offset for m in chunk)
    finally:
        reader.close()
    assert offsets == list(range(100, 2_400))
    assert max(sizes) <= 700 and len(sizes) >= 4
    assert chunks.end.batch == OffsetRange(topic, 0, 100, 2_400)
    assert chunks.end.value_bytes == 4 * 2_300


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_ranges_read_together_are_each_read_alone_and_share_the_byte_limit(
    services: Services, unique: str, client: str
) -> None:
    topic = f"together-{unique}"
    kafka = resource(services, topic, client)
    admin = kafka.get_admin()
    try:
        admin.create_topics([NewTopic(topic, 6, replication_factor=1)])
    finally:
        admin.close()
    producer = kafka.get_producer()
    for partition in range(6):
        for i in range(50):
            producer.send(topic, value=b"p%d-%04d" % (partition, i), partition=partition)
    producer.flush()
    producer.close()
    wanted = [
        OffsetRange(topic, 0, 10, 50),
        OffsetRange(topic, 1, 0, 50),
        OffsetRange(topic, 2, 45, 50),
        OffsetRange(topic, 3, 0, 1),
        OffsetRange(topic, 5, 20, 30),
    ]
    alone = [read(kafka, w) for w in wanted]

    def together(max_bytes: int) -> tuple[list[list[KafkaMessage]], list[RangeEnd]]:
        got: list[list[KafkaMessage]] = [[] for _ in wanted]
        reader = kafka.get_reader()
        try:
            chunks = reader.read_ranges(wanted, max_bytes, timeout_seconds=30)
            for i, chunk in chunks:
                got[i].extend(chunk)
        finally:
            reader.close()
        return got, chunks.ends

    got, ends = together(1 << 30)
    assert got == [a.messages for a in alone]
    assert [(e.batch, e.value_bytes, e.skipped) for e in ends] == [
        (a.batch, a.value_bytes, a.skipped) for a in alone
    ]
    # 7-byte values: the read stops at the message that reaches 140 bytes, whichever range
    # holds it; each range ends right after what it handed over (nothing: an empty range).
    got, ends = together(140)
    assert sum(len(m) for m in got) == 20
    for w, messages, end in zip(wanted, got, ends, strict=True):
        assert [m.offset for m in messages] == list(range(w.start, end.batch.end))
        assert end.value_bytes == 7 * len(messages)


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_timestamps_at_and_offsets_at_time(services: Services, unique: str, client: str) -> None:
    topic = f"times-{unique}"
    kafka = resource(services, topic, client)
    admin = kafka.get_admin()
    try:
        admin.create_topics([NewTopic(topic, 2, replication_factor=1)])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=services.kafka_bootstrap)
    for i in range(10):
        producer.send(topic, value=b"v", partition=0, timestamp_ms=BASE_MS + 1000 * i)
    producer.flush()
    producer.close()
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    reader = kafka.get_reader()
    try:
        # Partition 1 is empty: no timestamp, no offset.
        assert reader.timestamps_at({tp0: 3, tp1: 0}) == {tp0: BASE_MS + 3000}
        assert reader.timestamps_at({}) == {}
        assert reader.timestamps_at({tp0: 7}) == {tp0: BASE_MS + 7000}
        assert reader.offsets_at_time([tp0, tp1], BASE_MS + 4500) == {tp0: 5, tp1: None}
        assert reader.offsets_at_time([tp0], BASE_MS - 1) == {tp0: 0}
        assert reader.offsets_at_time([tp0], BASE_MS + 10_000) == {tp0: None}
    finally:
        reader.close()


def test_an_unreachable_broker_is_one_clear_error_with_librdkafka() -> None:
    kafka = KafkaResource(
        bootstrap_servers="127.0.0.1:1", topics="logs", client="confluent", request_timeout_ms=2000
    )
    started = time.monotonic()
    # The reader waits for the brokers when it is made, not at its first read.
    with pytest.raises(BackendError, match=r"no Kafka broker answers at 127\.0\.0\.1:1 "):
        kafka.get_reader()
    assert time.monotonic() - started < 10
