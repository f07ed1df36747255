"""Reading exactly one offset range of one partition (assign + seek), with either Kafka client.

No consumer group is involved: what is read is decided by the range alone, so a retry or a second
instance reads the same messages. ``RangeReader`` is what a read needs of a client;
``KafkaPythonReader`` (the default) and ``ConfluentReader`` (librdkafka, several times fewer CPU
microseconds per message) give the same messages and the same ``RangeRead`` for the same range.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import confluent_kafka
from kafka import KafkaConsumer, TopicPartition

from protoagg_dagster.core.errors import BackendError, ConfigError
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.records import KafkaMessage

# Messages per chunk: large enough that per-call costs vanish, small enough that a caller can
# parse one chunk while the client fetches the next.
CHUNK_MESSAGES = 10_000
# librdkafka's consume() waits out its whole timeout unless the chunk fills, which the last chunk
# of a range never does: a short wait keeps that to a fraction of a second per read.
_CONSUME_WAIT_SECONDS = 0.1
# kafka-python's codes (what KafkaMessage holds), by librdkafka's.
_TIMESTAMP_TYPES = {
    confluent_kafka.TIMESTAMP_NOT_AVAILABLE: -1,
    confluent_kafka.TIMESTAMP_CREATE_TIME: 0,
    confluent_kafka.TIMESTAMP_LOG_APPEND_TIME: 1,
}


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


def _timed_out(
    wanted: OffsetRange,
    timeout_seconds: float,
    position: int,
    last_error: confluent_kafka.KafkaError | None = None,
) -> BackendError:
    return BackendError(
        f"reading {wanted} timed out after {timeout_seconds:.0f} s at offset {position}: "
        "is the broker reachable and the range still retained?"
        + (f" (last client error: {last_error.str()})" if last_error is not None else "")
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
                raise _timed_out(wanted, timeout_seconds, consumer.position(tp))
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


class ConfluentReader:
    """``RangeReader`` over librdkafka's consumer (``confluent-kafka``).

    ``config`` is librdkafka's (``KafkaResource.confluent_consumer_config``): the consumer is
    group-less in effect (assigned, never subscribed or committed) and read_committed like
    kafka-python's. ``request_timeout_s`` bounds each metadata or offset request.
    """

    def __init__(self, config: dict[str, Any], request_timeout_s: float) -> None:
        self._failure: confluent_kafka.KafkaError | None = None
        self._last_error: confluent_kafka.KafkaError | None = None
        try:
            self._consumer = confluent_kafka.Consumer({**config, "error_cb": self._on_error})
        except (confluent_kafka.KafkaException, ValueError) as exc:
            raise ConfigError(f"the Kafka consumer cannot start: {exc}") from exc
        self._request_timeout_s = request_timeout_s

    def _on_error(self, error: confluent_kafka.KafkaError) -> None:
        """Note a client-wide error (a broker down, a failed login).

        librdkafka retries transient ones by itself; a fatal one or a refused login ends the read
        at its next step.
        """
        self._last_error = error
        if error.fatal() or error.code() == confluent_kafka.KafkaError._AUTHENTICATION:
            self._failure = error

    def _check(self) -> None:
        if self._failure is not None:
            raise BackendError(
                f"Kafka refused the consumer: {self._failure.str()} (check the "
                "PROTOAGG_KAFKA_SECURITY_PROTOCOL, _SASL_* and _SSL_CAFILE settings)"
            )

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
        topic, partition = wanted.topic, wanted.partition
        tp = confluent_kafka.TopicPartition(topic, partition)
        log_start, _ = self._call(
            consumer.get_watermark_offsets, tp, timeout=self._request_timeout_s, cached=False
        )
        start = max(wanted.start, log_start)
        end = wanted.end
        value_bytes = 0
        # Where the partition's read stands: past the last message returned and past any
        # transaction markers and aborted records librdkafka passed over since.
        position = start
        if start < end:
            self._call(consumer.assign, [confluent_kafka.TopicPartition(topic, partition, start)])
        deadline = time.monotonic() + timeout_seconds
        eof = confluent_kafka.KafkaError._PARTITION_EOF
        # KafkaMessage(...) runs a Python-level __new__; building the tuple directly takes about
        # half as long (timeit), and this loop is the reader's only Python work per message.
        build, message_type = tuple.__new__, KafkaMessage
        types = _TIMESTAMP_TYPES
        while position < end:
            self._check()
            if time.monotonic() > deadline:
                raise _timed_out(wanted, timeout_seconds, position, self._last_error)
            polled = self._call(
                consumer.consume,
                num_messages=min(chunk_messages, end - position),
                timeout=_CONSUME_WAIT_SECONDS,
            )
            chunk: list[KafkaMessage] = []
            for message in polled:
                error = message.error()
                if error is not None:
                    if error.code() != eof:
                        raise BackendError(f"reading {wanted} failed: {error.str()}")
                    # The partition's (stable) end: every offset below it has been handed over.
                    position = max(position, message.offset() or 0)
                    continue
                offset = message.offset()
                if offset >= end:
                    position = end
                    break
                kind, timestamp = message.timestamp()
                value = message.value()
                headers = message.headers()
                chunk.append(
                    build(
                        message_type,
                        (
                            topic,
                            partition,
                            offset,
                            timestamp,
                            message.key(),
                            value,
                            tuple(headers) if headers else (),
                            types[kind],
                        ),
                    )
                )
                if value is not None:
                    value_bytes += len(value)
                    if value_bytes >= max_bytes:
                        end = offset + 1
                        break
            if chunk:
                position = max(position, chunk[-1].offset + 1)
                yield chunk
            if position < end:
                position = max(position, self._position(tp))
        batch = OffsetRange(topic, partition, wanted.start, end)
        return RangeEnd(batch, value_bytes, skipped=min(start, end) - wanted.start)

    def _position(self, tp: confluent_kafka.TopicPartition) -> int:
        """The consumer's position (-1001 before any message).

        librdkafka moves it past transaction markers, and the aborted records before them, that
        it does not hand over.
        """
        return int(self._call(self._consumer.position, [tp])[0].offset)

    def timestamps_at(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        consumer = self._consumer
        found: dict[TopicPartition, int] = {}
        if not offsets:
            return found
        self._call(
            consumer.assign,
            [confluent_kafka.TopicPartition(t.topic, t.partition, o) for t, o in offsets.items()],
        )
        at_end: set[TopicPartition] = set()
        deadline = time.monotonic() + 5.0
        while len(found) + len(at_end) < len(offsets) and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                tp = TopicPartition(message.topic(), message.partition())
                if tp in found:
                    continue
                error = message.error()
                if error is None:
                    found[tp] = message.timestamp()[1]
                    at_end.discard(tp)
                    consumer.pause([confluent_kafka.TopicPartition(tp.topic, tp.partition)])
                elif error.code() == confluent_kafka.KafkaError._PARTITION_EOF:
                    # Nothing at or after the offset (yet): no need to wait the deadline out.
                    at_end.add(tp)
        # A pause outlives the assignment in librdkafka: the next look-up must not find it.
        consumer.resume([confluent_kafka.TopicPartition(tp.topic, tp.partition) for tp in found])
        return found

    def offsets_at_time(
        self, partitions: list[TopicPartition], time_ms: int
    ) -> dict[TopicPartition, int | None]:
        answer = self._call(
            self._consumer.offsets_for_times,
            [confluent_kafka.TopicPartition(tp.topic, tp.partition, time_ms) for tp in partitions],
            timeout=self._request_timeout_s,
        )
        # librdkafka answers -1 (the end) where no message is that recent, kafka-python None.
        return {
            TopicPartition(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
            for tp in answer
        }

    def close(self) -> None:
        self._consumer.close()

    def _call(self, step: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return step(*args, **kwargs)
        except confluent_kafka.KafkaException as exc:
            self._check()
            error = exc.args[0] if exc.args else exc
            text = error.str() if isinstance(error, confluent_kafka.KafkaError) else str(error)
            raise BackendError(
                f"Kafka request failed: {text} (is PROTOAGG_KAFKA_BOOTSTRAP right and the broker "
                "up?)"
            ) from exc
