"""Offsets Kafka itself no longer holds: compacted away, or deleted from the log's start.

Both are Kafka's gaps, not the archive's: the run archives what is there, and the checker
accounts for every offset (``without_record`` for compaction holes, ``deleted`` for offsets
removed before they were read), never calling them missing. Runs read with either Kafka client.
"""

from __future__ import annotations

import time

import pytest
from kafka import KafkaProducer, TopicPartition

from protoagg_dagster.core.settings import KAFKA_CLIENTS
from tests.e2e.test_record_format import committed, create, rows_of
from tests.helpers import (
    Stack,
    archived_records,
    check_archive,
    log_value,
    memory_instance,
    produce,
    run_sensor_until_idle,
    with_client,
    with_topics,
)


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_a_compacted_topic_is_archived_as_compaction_left_it(
    stack: Stack, unique: str, client: str
) -> None:
    topic = f"compacted-{unique}"
    stack = with_topics(with_client(stack, client), f"{topic}:record")
    create(
        stack,
        topic,
        **{
            "cleanup.policy": "compact",
            "segment.ms": "100",
            "min.cleanable.dirty.ratio": "0.001",
            "min.compaction.lag.ms": "0",
            "delete.retention.ms": "0",
        },
    )
    sent = KafkaProducer(bootstrap_servers=stack.kafka.bootstrap_servers)
    for i in range(200):
        sent.send(topic, key=f"k{i % 10}".encode(), value=f"v{i}".encode(), partition=0)
    sent.flush()
    # Compaction only cleans closed segments: one later record rolls the segment (segment.ms).
    deadline = time.monotonic() + 120
    while len(committed(stack, topic)) >= 200 and time.monotonic() < deadline:
        time.sleep(1)
        sent.send(topic, key=b"roll", value=b"r", partition=0)
        sent.flush()
    sent.close()
    before = committed(stack, topic)
    assert len(before) < 200, "the broker did not compact within two minutes"
    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)
    archived = rows_of(archived_records(stack))
    # Compaction may go on meanwhile: the archive holds a superset of what is left now, in order.
    assert set(committed(stack, topic)) <= set(archived)
    assert [row[1] for row in archived] == sorted({row[1] for row in archived})
    check = check_archive(stack)
    print(check.summary())
    assert check.ok, check.summary()
    assert check.without_record > 0
    assert check.archived + check.without_record == check.offsets


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_offsets_deleted_before_they_were_read_are_accounted(
    stack: Stack, unique: str, client: str
) -> None:
    topic = f"trimmed-{unique}"
    stack = with_topics(with_client(stack, client), topic, max_batch_messages=30, batch_size=30)
    create(stack, topic)
    produce(stack.kafka, topic, [log_value() for _ in range(30)])
    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)
        # Offsets 30..49 are deleted from the log's start (DeleteRecords, as retention does to old
        # segments) before any run reads them.
        produce(stack.kafka, topic, [log_value() for _ in range(40)])
        admin = stack.kafka.get_admin()
        try:
            admin.delete_records({TopicPartition(topic, 0): 50})
        finally:
            admin.close()
        run_sensor_until_idle(stack, instance)
    assert len(archived_records(stack)) == 30 + 20
    check = check_archive(stack)
    print(check.summary())
    assert check.ok, check.summary()
    # 30..49 were never read; 0..29 are archived but Kafka no longer has them to compare.
    assert check.deleted >= 20
