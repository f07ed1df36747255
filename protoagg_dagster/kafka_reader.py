"""Reading exactly one offset range of one partition with kafka-python (assign + seek).

No consumer group is involved: what is read is decided by the range alone, so a retry or a second
instance reads the same messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition

from protoagg_dagster.core.errors import BackendError
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.records import KafkaMessage


@dataclass(frozen=True)
class RangeRead:
    """Messages of ``batch`` in offset order.

    ``batch.end`` is below the requested end when the byte limit stopped the read; ``skipped``
    counts offsets already deleted by retention.
    """

    batch: OffsetRange
    messages: list[KafkaMessage]
    value_bytes: int
    skipped: int


def read_range(
    consumer: KafkaConsumer,
    wanted: OffsetRange,
    max_bytes: int,
    timeout_seconds: float = 120.0,
    on_chunk: Callable[[list[KafkaMessage]], None] | None = None,
) -> RangeRead:
    """Read offsets ``[wanted.start, wanted.end)``, stopping early once ``max_bytes`` is reached.

    Offsets with no message (compaction, transaction markers, aborted records of a
    read_committed consumer, retention) are passed over: the loop ends on the consumer's
    position, which moves past them, not on a message count; the range is complete even when its
    last offsets hold nothing.

    With ``on_chunk`` each poll's messages are handed to it instead of being kept (``messages``
    stays empty), so a caller can parse them as they arrive.
    """
    tp = TopicPartition(wanted.topic, wanted.partition)
    consumer.assign([tp])
    log_start = consumer.beginning_offsets([tp])[tp]
    start = max(wanted.start, log_start)
    consumer.seek(tp, start)
    messages: list[KafkaMessage] = []
    value_bytes = 0
    end = wanted.end
    deadline = time.monotonic() + timeout_seconds
    while start < end and consumer.position(tp) < end:
        if time.monotonic() > deadline:
            raise BackendError(
                f"reading {wanted} timed out after {timeout_seconds:.0f} s at offset "
                f"{consumer.position(tp)}: is the broker reachable and the range still retained?"
            )
        polled = consumer.poll(timeout_ms=1000, max_records=10_000).get(tp, [])
        chunk: list[KafkaMessage] = []
        for record in polled:
            if record.offset >= end:
                break
            value = record.value
            chunk.append(
                KafkaMessage(
                    record.topic,
                    record.partition,
                    record.offset,
                    record.timestamp,
                    record.key,
                    value,
                    tuple(record.headers) if record.headers else (),
                    record.timestamp_type,
                )
            )
            value_bytes += len(value) if value is not None else 0
            if value_bytes >= max_bytes:
                end = record.offset + 1
                break
        if on_chunk is None:
            messages += chunk
        else:
            on_chunk(chunk)
    batch = OffsetRange(wanted.topic, wanted.partition, wanted.start, end)
    return RangeRead(batch, messages, value_bytes, skipped=min(start, end) - wanted.start)


def timestamps_at(
    consumer: KafkaConsumer, offsets: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """Kafka timestamp (ms) of the message at (or first after) each offset, where there is one."""
    found: dict[TopicPartition, int] = {}
    if not offsets:
        return found
    consumer.assign(list(offsets))
    for tp, offset in offsets.items():
        consumer.seek(tp, offset)
    deadline = time.monotonic() + 5.0
    while len(found) < len(offsets) and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=500, max_records=500).items():
            if tp not in found and records:
                found[tp] = records[0].timestamp
                consumer.pause(tp)
    return found


def offsets_at_time(
    consumer: KafkaConsumer, partitions: list[TopicPartition], time_ms: int
) -> dict[TopicPartition, int | None]:
    """First offset at or after ``time_ms`` per partition (None: no such message yet)."""
    answer = consumer.offsets_for_times({tp: time_ms for tp in partitions})
    return {tp: (value.offset if value is not None else None) for tp, value in answer.items()}
