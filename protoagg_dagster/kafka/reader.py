"""Reading exactly one offset range of one partition (assign + seek), with either Kafka client.

No consumer group is involved: what is read is decided by the range alone, so a retry or a second
instance reads the same messages. ``RangeReader`` is what a read needs of a client;
``KafkaPythonReader`` here (the default) and ``confluent_reader.ConfluentReader`` (librdkafka,
several times fewer CPU microseconds per message) give the same messages and the same
``RangeRead`` for the same range.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from kafka import KafkaConsumer, TopicPartition

from protoagg_dagster.core.errors import BackendError, ConfigError
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.records import KafkaMessage

# Messages per chunk: large enough that per-call costs vanish, small enough that a caller can
# parse one chunk while the client fetches the next.
CHUNK_MESSAGES = 10_000
# Partitions kafka-python reads at once: each poll costs it a look at every assigned partition,
# and returns the records of a few, so a poll per partition makes larger sets cost quadratically.
READ_TOGETHER = 100
# The fewest records a poll of several ranges asks for (see KafkaPythonReader._together).
MIN_POLL = 50


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
# Chunks of several ranges read together, each with its range's place in the request.
ManyChunkSource = Generator[tuple[int, list[KafkaMessage]], None, list[RangeEnd]]


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


class RangesChunks:
    """Several ranges read together: ``(i, chunk)`` pairs, chunk of the ``i``-th range asked.

    Each range's chunks come in offset order; chunks of different ranges interleave. ``ends``
    (in the order asked) once every chunk has been taken.
    """

    def __init__(self, source: ManyChunkSource) -> None:
        self._source = source
        self._ends: list[RangeEnd] | None = None

    def __iter__(self) -> Iterator[tuple[int, list[KafkaMessage]]]:
        self._ends = yield from self._source

    @property
    def ends(self) -> list[RangeEnd]:
        if self._ends is None:
            raise RuntimeError("RangesChunks.ends is known only once every chunk has been taken")
        return self._ends


def one_of(source: ManyChunkSource) -> ChunkSource:
    """The chunks of a read of one range, as a one-range source."""
    try:
        while True:
            try:
                _, chunk = next(source)
            except StopIteration as stop:
                ends: list[RangeEnd] = stop.value
                return ends[0]
            yield chunk
    finally:
        source.close()  # a read given up early resumes its partitions now, not when collected


def as_many(source: ChunkSource) -> ManyChunkSource:
    """A read of one range as a read of several: its chunks are the first range's."""
    while True:
        try:
            chunk = next(source)
        except StopIteration as stop:
            end: RangeEnd = stop.value
            return [end]
        yield 0, chunk


def in_turn(
    read_some: Callable[[Sequence[OffsetRange], int], ManyChunkSource],
    wanted: Sequence[OffsetRange],
    max_bytes: int,
    together: int,
) -> ManyChunkSource:
    """``wanted`` read ``together`` ranges at a time with ``read_some``, sharing ``max_bytes``."""
    ends: list[RangeEnd] = []
    left = max_bytes
    for first in range(0, len(wanted), together):
        some = wanted[first : first + together]
        if left <= 0:
            ends += [
                RangeEnd(OffsetRange(r.topic, r.partition, r.start, r.start), 0, 0) for r in some
            ]
            continue
        source = read_some(some, left)
        while True:
            try:
                i, chunk = next(source)
            except StopIteration as stop:
                done: list[RangeEnd] = stop.value
                break
            yield first + i, chunk
        ends += done
        left -= sum(end.value_bytes for end in done)
    return ends


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

    def read_ranges(
        self,
        wanted: Sequence[OffsetRange],
        max_bytes: int,
        timeout_seconds: float = 120.0,
        chunk_messages: int = CHUNK_MESSAGES,
    ) -> RangesChunks:
        """``read_chunks`` of several ranges (one per partition) at once, sharing ``max_bytes``.

        One assignment fetches them all, so a run of hundreds of small ranges costs a few
        fetches rather than a round of requests per range. At the byte limit every range not yet
        read to its end stops where it stands, as ``read_chunks`` does.
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
        return RangeChunks(
            one_of(self._together([wanted], max_bytes, timeout_seconds, chunk_messages))
        )

    def read_ranges(
        self,
        wanted: Sequence[OffsetRange],
        max_bytes: int,
        timeout_seconds: float = 120.0,
        chunk_messages: int = CHUNK_MESSAGES,
    ) -> RangesChunks:
        if len({(r.topic, r.partition) for r in wanted}) < len(wanted):
            raise ValueError(f"one range per partition, got {', '.join(map(str, wanted))}")
        return RangesChunks(
            in_turn(
                lambda some, left: self._together(some, left, timeout_seconds, chunk_messages),
                wanted,
                max_bytes,
                READ_TOGETHER,
            )
        )

    def _together(
        self,
        wanted: Sequence[OffsetRange],
        max_bytes: int,
        timeout_seconds: float,
        chunk_messages: int,
    ) -> ManyChunkSource:
        consumer = self._consumer
        tps = [TopicPartition(r.topic, r.partition) for r in wanted]
        index = {tp: i for i, tp in enumerate(tps)}
        consumer.assign(tps)
        try:
            # kafka-python leaves out of its answer the partitions of a topic whose metadata it
            # does not hold yet (3.0.12: a KeyError); asking for the topic first fetches it.
            known = {
                topic: consumer.partitions_for_topic(topic) for topic in {r.topic for r in wanted}
            }
            for r in wanted:
                partitions = known[r.topic] or set()
                if r.partition not in partitions:
                    # Never readable (a range launched by hand, a topic created again smaller):
                    # the run fails once its other ranges are archived, so a person sees it.
                    raise ConfigError(
                        f"{r}: the topic has no partition {r.partition} "
                        f"(it has {len(partitions)} partitions)"
                    )
            log_starts = consumer.beginning_offsets(tps)
            starts = [max(r.start, log_starts[tp]) for r, tp in zip(wanted, tps, strict=True)]
            ends = [r.end for r in wanted]
            # Where each read stands: past the last message handed over.
            reached = list(starts)
            value_bytes = [0] * len(tps)
            reading: set[TopicPartition] = set()
            for i, tp in enumerate(tps):
                if starts[i] < ends[i]:
                    consumer.seek(tp, starts[i])
                    reading.add(tp)
                else:
                    consumer.pause(tp)
            total = 0
            deadline = time.monotonic() + timeout_seconds
            while reading:
                if time.monotonic() > deadline:
                    late = min(reading, key=index.__getitem__)
                    raise timed_out(wanted[index[late]], timeout_seconds, consumer.position(late))
                full = False
                # kafka-python decodes a partition's fetched records as a poll takes them, and
                # drops the rest undecoded once the partition is paused: asking no more than the
                # shortest range still wants keeps a small range from decoding a big backlog.
                wants = min(ends[index[tp]] - reached[index[tp]] for tp in reading)
                polled = consumer.poll(
                    timeout_ms=1000, max_records=min(chunk_messages, max(wants, MIN_POLL))
                )
                for tp, records in polled.items():
                    i = index[tp]
                    end = ends[i]
                    chunk: list[KafkaMessage] = []
                    for record in records:
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
                        size = len(value) if value is not None else 0
                        value_bytes[i] += size
                        total += size
                        if total >= max_bytes:
                            full = True
                            break
                    if chunk:
                        reached[i] = chunk[-1].offset + 1
                        yield i, chunk
                    if full:
                        break
                if full:
                    # The byte limit: each unfinished range ends where its read stands (a later
                    # run reads on from there); one with nothing read yet is empty.
                    for tp in reading:
                        ends[index[tp]] = reached[index[tp]]
                    break
                # The position moves past offsets holding no message (see read_chunks); a poll
                # returns few partitions' records, so only those are looked at, all when it
                # returned nothing.
                for tp in [tp for tp in polled if tp in reading] if polled else list(reading):
                    if consumer.position(tp) >= ends[index[tp]]:
                        reading.discard(tp)
                        consumer.pause(tp)
        finally:
            # kafka-python keeps a pause across assign() of the same partition.
            consumer.resume(*tps)
        return [
            RangeEnd(
                OffsetRange(r.topic, r.partition, r.start, end),
                value_bytes[i],
                skipped=min(start, end) - r.start,
            )
            for i, (r, start, end) in enumerate(zip(wanted, starts, ends, strict=True))
        ]

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
