"""Reading exactly one offset range of one partition (assign + seek), with either Kafka client.

No consumer group is involved: what is read is decided by the range alone, so a retry or a second
instance reads the same messages. ``RangeReader`` is what a read needs of a client;
``KafkaPythonReader`` here (the default) and ``confluent_reader.ConfluentReader`` (librdkafka,
several times fewer CPU microseconds per message) give the same messages and the same
``RangeRead`` for the same range.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Protocol

from kafka import KafkaConsumer, TopicPartition

from protoagg_dagster.core.errors import BackendError
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.records import KafkaMessage

# Messages per chunk: large enough that per-call costs vanish, small enough that a caller can
# parse one chunk while the client fetches the next.
CHUNK_MESSAGES = 10_000


@dataclass(frozen=True)
class RangeEnd:
    """How a range read ended.

    ``batch.end`` is below the requested end when the byte limit stopped the read; ``skipped``
    counts offsets already deleted by retention.
    """

    batch: OffsetRange
    value_bytes: int
    skipped: int


@dataclass(frozen=True)
class RangeRead:
    """Messages of ``batch`` in offset order (see ``RangeEnd`` for the other fields)."""

    batch: OffsetRange
    messages: list[KafkaMessage]
    value_bytes: int
    skipped: int


ChunkSource = Generator[list[KafkaMessage], None, RangeEnd]


class RangeChunks:
    """The messages of one range read as chunks in offset order; ``end`` once all are taken.

    ``chunks = reader.read_chunks(wanted, max_bytes)``, ``for chunk in chunks: ...`` (each a
    list of at most ``chunk_messages``), then ``chunks.end.batch`` is what was read.
    """

    def __init__(self, source: ChunkSource) -> None:
        self._source = source
        self._end: RangeEnd | None = None

    def __iter__(self) -> Iterator[list[KafkaMessage]]:
        self._end = yield from self._source

    @property
    def end(self) -> RangeEnd:
        if self._end is None:
            raise RuntimeError("RangeChunks.end is known only once every chunk has been taken")
        return self._end


class RangeReader(Protocol):
    """What archiving needs of a Kafka client: exact ranges, and offsets by time."""

    def read_chunks(
        self,
        wanted: OffsetRange,
        max_bytes: int,
        timeout_seconds: float = 120.0,
        chunk_messages: int = CHUNK_MESSAGES,
    ) -> RangeChunks:
        """Offsets ``[wanted.start, wanted.end)``, stopping early once ``max_bytes`` is reached.

        Offsets with no message (compaction, transaction markers, aborted records of a
        read_committed consumer, retention) are passed over: a read ends on the consumer's
        position, which moves past them, not on a message count; the range is complete even
        when its last offsets hold nothing.
        """
        ...

    def timestamps_at(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Kafka timestamp (ms) of the message at (or first after) each offset, if any."""
        ...

    def offsets_at_time(
        self, partitions: list[TopicPartition], time_ms: int
    ) -> dict[TopicPartition, int | None]:
        """First offset at or after ``time_ms`` per partition (None: no such message yet)."""
        ...

    def close(self) -> None: ...


def read_range(
    consumer: RangeReader | KafkaConsumer,
    wanted: OffsetRange,
    max_bytes: int,
    timeout_seconds: float = 120.0,
) -> RangeRead:
    """``read_chunks`` collected into one list (a kafka-python consumer is read as it is)."""
    chunks = _reader(consumer).read_chunks(wanted, max_bytes, timeout_seconds)
    messages: list[KafkaMessage] = []
    for chunk in chunks:
        messages.extend(chunk)
    end = chunks.end
    return RangeRead(end.batch, messages, end.value_bytes, end.skipped)


def timestamps_at(
    consumer: RangeReader | KafkaConsumer, offsets: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """``RangeReader.timestamps_at`` of the reader or kafka-python consumer."""
    return _reader(consumer).timestamps_at(offsets)


def offsets_at_time(
    consumer: RangeReader | KafkaConsumer, partitions: list[TopicPartition], time_ms: int
) -> dict[TopicPartition, int | None]:
    """``RangeReader.offsets_at_time`` of the reader or kafka-python consumer."""
    return _reader(consumer).offsets_at_time(partitions, time_ms)


def _reader(consumer: RangeReader | KafkaConsumer) -> RangeReader:
    return KafkaPythonReader(consumer) if isinstance(consumer, KafkaConsumer) else consumer


def timed_out(
    wanted: OffsetRange, timeout_seconds: float, position: int, last_error: str = ""
) -> BackendError:
    """The error of a read that did not reach its end in time."""
    return BackendError(
        f"reading {wanted} timed out after {timeout_seconds:.0f} s at offset {position}: "
        "is the broker reachable and the range still retained?"
        + (f" (last client error: {last_error})" if last_error else "")
    )


class KafkaPythonReader:
    """``RangeReader`` over a kafka-python consumer (read_committed, see ``KafkaResource``)."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self._consumer = consumer

    def read_chunks(
        self,
        wanted: OffsetRange,
        max_bytes: int,
        timeout_seconds: float = 120.0,
        chunk_messages: int = CHUNK_MESSAGES,
    ) -> RangeChunks:
        return RangeChunks(self._chunks(wanted, max_bytes, timeout_seconds, chunk_messages))

    def _chunks(
        self, wanted: OffsetRange, max_bytes: int, timeout_seconds: float, chunk_messages: int
    ) -> ChunkSource:
        consumer = self._consumer
        tp = TopicPartition(wanted.topic, wanted.partition)
        consumer.assign([tp])
        log_start = consumer.beginning_offsets([tp])[tp]
        start = max(wanted.start, log_start)
        consumer.seek(tp, start)
        value_bytes = 0
        end = wanted.end
        deadline = time.monotonic() + timeout_seconds
        while start < end and consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise timed_out(wanted, timeout_seconds, consumer.position(tp))
            polled = consumer.poll(timeout_ms=1000, max_records=chunk_messages).get(tp, [])
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
            if chunk:
                yield chunk
        batch = OffsetRange(wanted.topic, wanted.partition, wanted.start, end)
        return RangeEnd(batch, value_bytes, skipped=min(start, end) - wanted.start)

    def timestamps_at(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        consumer = self._consumer
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
        # kafka-python keeps a pause across assign() of the same partition.
        consumer.resume(*found)
        return found

    def offsets_at_time(
        self, partitions: list[TopicPartition], time_ms: int
    ) -> dict[TopicPartition, int | None]:
        answer = self._consumer.offsets_for_times({tp: time_ms for tp in partitions})
        return {tp: (value.offset if value is not None else None) for tp, value in answer.items()}

    def close(self) -> None:
        self._consumer.close()
