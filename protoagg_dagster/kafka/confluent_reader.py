"""Reading one offset range with librdkafka (``confluent-kafka``, PROTOAGG_KAFKA_CLIENT=confluent).

Same ``RangeReader`` contract as ``kafka_reader.KafkaPythonReader``, same messages; librdkafka
decodes record batches in C, so the only Python work per message is building its tuple.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import confluent_kafka
from kafka import TopicPartition

from protoagg_dagster.core.errors import BackendError, ConfigError
from protoagg_dagster.core.kafka_client import KafkaClientSettings
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.records import KafkaMessage
from protoagg_dagster.kafka.clients import LibrdkafkaErrors, librdkafka_refusal
from protoagg_dagster.kafka.reader import (
    CHUNK_MESSAGES,
    ChunkSource,
    RangeChunks,
    RangeEnd,
    RangesChunks,
    as_many,
    in_turn,
    timed_out,
)

# librdkafka's consume() waits out its whole timeout unless the chunk fills, which the last chunk
# of a range never does: a short wait keeps that to a fraction of a second per read.
_CONSUME_WAIT_SECONDS = 0.1
# kafka-python's codes (what KafkaMessage holds), by librdkafka's.
_TIMESTAMP_TYPES = {
    confluent_kafka.TIMESTAMP_NOT_AVAILABLE: -1,
    confluent_kafka.TIMESTAMP_CREATE_TIME: 0,
    confluent_kafka.TIMESTAMP_LOG_APPEND_TIME: 1,
}


class ConfluentReader:
    """``RangeReader`` over librdkafka's consumer (``confluent-kafka``).

    ``config`` is librdkafka's (``KafkaResource.confluent_consumer_config``): the consumer is
    group-less in effect (assigned, never subscribed or committed) and read_committed like
    kafka-python's. ``request_timeout_s`` bounds each metadata or offset request. ``client``
    says what a refusal means (``kafka.clients``): the reader is ready, or refused, within
    ``BOOTSTRAP_TIMEOUT_MS``.
    """

    def __init__(
        self, config: dict[str, Any], request_timeout_s: float, client: KafkaClientSettings
    ) -> None:
        self._client = client
        self._errors = LibrdkafkaErrors(client)
        try:
            self._consumer = confluent_kafka.Consumer({**config, "error_cb": self._errors})
        except (confluent_kafka.KafkaException, ValueError) as exc:
            raise ConfigError(f"the Kafka consumer cannot start: {exc}") from exc
        self._request_timeout_s = request_timeout_s
        try:
            self._errors.await_brokers(self._consumer)
        except BaseException:
            self._consumer.close()
            raise

    def _check(self) -> None:
        """Raise a refusal librdkafka reported (a fatal error too: it ends the client)."""
        self._errors.check()
        failure = self._errors.last
        if failure is not None and failure.fatal():
            raise BackendError(f"the Kafka consumer failed: {failure.str()}")

    def read_chunks(
        self,
        wanted: OffsetRange,
        max_bytes: int,
        timeout_seconds: float = 120.0,
        chunk_messages: int = CHUNK_MESSAGES,
    ) -> RangeChunks:
        return RangeChunks(self._chunks(wanted, max_bytes, timeout_seconds, chunk_messages))

    def read_ranges(
        self,
        wanted: Sequence[OffsetRange],
        max_bytes: int,
        timeout_seconds: float = 120.0,
        chunk_messages: int = CHUNK_MESSAGES,
    ) -> RangesChunks:
        # One range after another: librdkafka's per-range cost was not measured at many
        # partitions (kafka-python's, the default, was: it reads them together).
        return RangesChunks(
            in_turn(
                lambda one, left: as_many(
                    self._chunks(one[0], left, timeout_seconds, chunk_messages)
                ),
                wanted,
                max_bytes,
                1,
            )
        )

    def _chunks(
        self, wanted: OffsetRange, max_bytes: int, timeout_seconds: float, chunk_messages: int
    ) -> ChunkSource:
        consumer = self._consumer
        topic, partition = wanted.topic, wanted.partition
        tp = confluent_kafka.TopicPartition(topic, partition)
        log_start, _ = self._call(
            consumer.get_watermark_offsets,
            tp,
            timeout=self._request_timeout_s,
            cached=False,
            topic=topic,
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
        # librdkafka looks up the coordinator of the group it must be given, which it never
        # joins or commits to; without an ACL on that group it says so once and reads on.
        unused_group = confluent_kafka.KafkaError.GROUP_AUTHORIZATION_FAILED
        # KafkaMessage(...) runs a Python-level __new__; building the tuple directly takes about
        # half as long (timeit), and this loop is the reader's only Python work per message.
        build, message_type = tuple.__new__, KafkaMessage
        types = _TIMESTAMP_TYPES
        while position < end:
            self._check()
            if time.monotonic() > deadline:
                raise timed_out(
                    wanted,
                    timeout_seconds,
                    position,
                    self._errors.last.str() if self._errors.last is not None else "",
                )
            polled = self._call(
                consumer.consume,
                num_messages=min(chunk_messages, end - position),
                timeout=_CONSUME_WAIT_SECONDS,
            )
            chunk: list[KafkaMessage] = []
            for message in polled:
                error = message.error()
                if error is not None:
                    if error.code() == unused_group:
                        continue
                    if error.code() != eof:
                        refusal = librdkafka_refusal(
                            self._client, error, f"READ on Topic {topic!r}"
                        )
                        if refusal is not None:
                            raise refusal
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

    def _check_topic_access(self, topic: str) -> None:
        """Raise a refusal when the principal may not describe ``topic``.

        librdkafka answers an offset request on such a topic with "unknown partition".
        """
        try:
            metadata = self._consumer.list_topics(topic, timeout=self._request_timeout_s)
        except confluent_kafka.KafkaException:
            return
        found = metadata.topics.get(topic)
        if found is not None and found.error is not None:
            refusal = librdkafka_refusal(
                self._client, found.error, f"READ and DESCRIBE on Topic {topic!r}"
            )
            if refusal is not None:
                raise refusal

    def _call(self, step: Any, *args: Any, topic: str | None = None, **kwargs: Any) -> Any:
        """``step``; its failure as a refusal when it is one (``topic``: the one it asked of)."""
        try:
            return step(*args, **kwargs)
        except confluent_kafka.KafkaException as exc:
            self._check()
            error = exc.args[0] if exc.args else exc
            if topic is not None:
                self._check_topic_access(topic)
            text = error.str() if isinstance(error, confluent_kafka.KafkaError) else str(error)
            raise BackendError(
                f"Kafka request failed: {text} (is PROTOAGG_KAFKA_BOOTSTRAP right and the broker "
                "up?)"
            ) from exc
