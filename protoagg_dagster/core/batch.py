"""A batch parsed straight to its archive frames, held in columns instead of one object per record.

Parsing encodes each record's frame at once into one buffer and keeps, per record, only what
dedupe and the checks read: the frame's end in the buffer, the Kafka offset and the dedupe key
(fixed-width uuid text). A record is then just its index (``Row``, a ``Claimable``), and encoding
the records dedupe kept is a join of their slices of the buffer. Messages can be added chunk by
chunk as the reader delivers them, so a batch's ``KafkaMessage`` objects never all exist at once.

Measured on 125-byte log values: ~130 bytes per record instead of ~700 for a ``KafkaMessage`` and
a ``LogRecord`` (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from protoagg_dagster.core.framing import FRAME_HEADER_BYTES, MAX_FRAME_BYTES
from protoagg_dagster.core.records import KafkaMessage, RecordRejected, Rejection

# Appends one message's frame to the buffer and returns its dedupe key (``key_width`` characters
# of uuid text, or None), or raises RecordRejected having appended nothing.
FrameWriter = Callable[[KafkaMessage, bytearray], str | None]


@dataclass(frozen=True, eq=False)
class FramedBatch:
    """Records of one partition in offset order, as their frames and a few columns.

    Record ``i``'s frame is ``frames[ends[i - 1]:ends[i]]`` (from 0 for the first). ``keys``
    holds each record's dedupe key in ``key_width`` characters; a record without a key
    holds spaces there, which no uuid text contains. ``key_width`` 0: the format keys no record.
    """

    topic: str
    partition: int
    # Buffers as they were built (copying them into bytes would hold each twice for a while);
    # nothing writes to them once the batch is made.
    frames: bytearray
    ends: array[int]
    offsets: array[int]
    keys: str
    key_width: int
    rejections: tuple[Rejection, ...]
    # Every message parsed (records and rejections), and the first one's Kafka timestamp.
    messages: int
    first_timestamp_ms: int
    parse_seconds: float = 0.0
    # Records without a dedupe key (all of them when ``key_width`` is 0).
    keyless: int = 0

    def __len__(self) -> int:
        return len(self.offsets)

    def rows(self) -> list[Row]:
        """Each record as a ``Claimable``, for the ledger."""
        return list(map(self.row_type, range(len(self.offsets))))

    @functools.cached_property
    def row_type(self) -> type[Row]:
        # The fields are closures over the columns, made for this batch's kind of keys: the
        # ledger reads each several times per record, and attribute lookups on the way cost
        # ~3x more (measured).
        offsets, keys, width = self.offsets, self.keys, self.key_width

        def offset(row: int) -> int:
            return offsets[row]

        def no_key(row: int) -> None:
            return None

        def key(row: int) -> str:
            start = row * width
            return keys[start : start + width]

        def key_or_none(row: int) -> str | None:
            start = row * width
            found = keys[start : start + width]
            return None if found[0] == " " else found

        dedupe_key = no_key if not width else key_or_none if self.keyless else key
        fields = {"offset": property(offset), "dedupe_key": property(dedupe_key)}
        return type("Row", (Row,), {"__slots__": (), "batch": self, **fields})

    def __getstate__(self) -> dict[str, object]:
        # The row type is made anew where the batch is unpickled.
        return {k: v for k, v in self.__dict__.items() if k != "row_type"}

    def frames_of(self, rows: Sequence[int]) -> bytes:
        """The frames of ``rows`` (distinct rows of this batch, in order), joined."""
        ends = self.ends
        view = memoryview(self.frames)
        pieces = []
        first = previous = -2
        # Runs of consecutive rows are one slice each: dedupe drops few records.
        for index in rows:
            if index != previous + 1:
                if previous >= 0:
                    pieces.append(view[ends[first - 1] if first else 0 : ends[previous]])
                first = index
            previous = index
        if previous >= 0:
            pieces.append(view[ends[first - 1] if first else 0 : ends[previous]])
        return b"".join(pieces)


class Row(int):
    """One record of a ``FramedBatch``: its index, with the fields the ledger and checks read.

    An int subclass without slots is the smallest object that can carry attributes (44 bytes);
    ``batch`` is a class attribute of a subclass made per batch (``FramedBatch.rows``).
    """

    __slots__ = ()
    batch: ClassVar[FramedBatch]
    # Properties of the subclass (FramedBatch.row_type).
    offset: int
    dedupe_key: str | None

    @property
    def topic(self) -> str:
        return self.batch.topic

    @property
    def partition(self) -> int:
        return self.batch.partition

    def __reduce__(self) -> tuple[Callable[[FramedBatch, int], Row], tuple[FramedBatch, int]]:
        # Pickled (an IO manager that stores outputs) as its batch, which pickle writes once.
        return _row_of, (self.batch, int(self))


def _row_of(batch: FramedBatch, index: int) -> Row:
    return batch.row_type(index)


def frame_too_large(message: KafkaMessage, size: int, limit: int) -> Rejection:
    """The rejection of a record whose frame would pass the frame-size limit."""
    return Rejection(
        message,
        "frame_too_large",
        f"its frame would be {size} bytes > PROTOAGG_MAX_FRAME_BYTES {limit}, which readers refuse",
    )


def might_pass_frame_limit(message: KafkaMessage, limit: int) -> bool:
    """Whether the record's frame could pass ``limit``: its bytes plus what framing adds."""
    raw = len(message.value or b"") + len(message.key or b"") + len(message.topic)
    raw += sum(len(name) + len(value or b"") for name, value in message.headers)
    # Field tags, lengths, offsets, timestamps and per-header overhead: far below this.
    return raw + 1024 + 16 * len(message.headers) > limit


class BatchBuilder:
    """Parses messages chunk by chunk into a ``FramedBatch`` with one format's ``FrameWriter``."""

    def __init__(
        self,
        topic: str,
        partition: int,
        write: FrameWriter,
        key_width: int,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        self._topic = topic
        self._max_frame_bytes = max_frame_bytes
        self._partition = partition
        self._write = write
        self._key_width = key_width
        self._frames = bytearray()
        self._ends = array("q")
        self._offsets = array("q")
        self._keys: list[str] = []
        self._rejections: list[Rejection] = []
        self._messages = 0
        self._first_timestamp_ms: int | None = None
        self._seconds = 0.0
        self._keyless = 0

    def add(self, messages: Sequence[KafkaMessage]) -> None:
        started = time.perf_counter()
        if messages and self._first_timestamp_ms is None:
            self._first_timestamp_ms = messages[0].timestamp_ms
        frames, ends, offsets, keys = self._frames, self._ends, self._offsets, []
        write, rejections = self._write, self._rejections
        blank = " " * self._key_width
        limit = self._max_frame_bytes
        for message in messages:
            before = len(frames)
            try:
                key = write(message, frames)
            except RecordRejected as exc:
                rejections.append(Rejection(message, exc.reason, exc.detail))
                continue
            size = len(frames) - before - FRAME_HEADER_BYTES
            if size > limit:
                # Readers refuse a longer frame as corrupt: it would be archived unreadable.
                rejections.append(frame_too_large(message, size, limit))
                del frames[before:]
                continue
            ends.append(len(frames))
            offsets.append(message.offset)
            if key is None:
                key = blank
                self._keyless += 1
            keys.append(key)
        if self._key_width:
            self._keys.append("".join(keys))
        self._messages += len(messages)
        self._seconds += time.perf_counter() - started

    def finish(self) -> FramedBatch:
        keys = "".join(self._keys)
        self._keys = []
        return FramedBatch(
            self._topic,
            self._partition,
            self._frames,
            self._ends,
            self._offsets,
            keys,
            self._key_width,
            tuple(self._rejections),
            self._messages,
            self._first_timestamp_ms or 0,
            self._seconds,
            self._keyless,
        )
