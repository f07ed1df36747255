"""The table of each archive format: Iceberg schema, Arrow schema, and records decoded to columns.

Log: ``log_id``, ``timestamp``, ``message``, ``partition`` (the batch's), ``offset`` (null: a
``ProtoLog`` frame does not carry it). Record: ``partition``, ``offset``, ``timestamp``,
``timestamp_type``, ``key``, ``value`` (binary; null kept apart from empty), ``headers`` (a list
of key string, value binary or null). Timestamps are UTC microseconds; the data files carry no
field ids, the table's name mapping binds their columns.

Decoding goes straight from the frames to columns, one day at a time: a record of another day
is skipped, and the columns come out as Arrow tables of ``rows`` rows (the last one fewer).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import DayTransform
from pyiceberg.types import (
    BinaryType,
    IntegerType,
    ListType,
    LongType,
    NestedField,
    StringType,
    StructType,
    TimestamptzType,
)

from protoagg_dagster.core.errors import ArchiveFormatError
from protoagg_dagster.core.formats import LOG, RECORD
from protoagg_dagster.core.framing import MESSAGE_REUSE, iter_frame_runs
from protoagg_dagster.core.kafka_record import iter_kafka_records
from protoagg_dagster.core.table_days import SECONDS_PER_DAY
from protoagg_dagster.iceberg.log_frames import LogBlock, decode_log_frames
from protoagg_dagster.pb.log_pb2 import ProtoLog
from protoagg_dagster.pb.record_pb2 import KafkaRecord

TIMESTAMP = "timestamp"
_UTC_MICROS = pa.timestamp("us", tz="UTC")

LOG_SCHEMA = Schema(
    NestedField(1, "log_id", StringType(), required=True),
    NestedField(2, TIMESTAMP, TimestamptzType(), required=True),
    NestedField(3, "message", StringType(), required=True),
    NestedField(4, "partition", IntegerType(), required=False),
    NestedField(5, "offset", LongType(), required=False),
)
RECORD_SCHEMA = Schema(
    NestedField(1, "partition", IntegerType(), required=True),
    NestedField(2, "offset", LongType(), required=True),
    NestedField(3, TIMESTAMP, TimestamptzType(), required=True),
    NestedField(4, "timestamp_type", StringType(), required=True),
    NestedField(5, "key", BinaryType(), required=False),
    NestedField(6, "value", BinaryType(), required=False),
    NestedField(
        7,
        "headers",
        ListType(
            8,
            StructType(
                NestedField(9, "key", StringType(), required=True),
                NestedField(10, "value", BinaryType(), required=False),
            ),
            element_required=True,
        ),
        required=True,
    ),
)

_HEADER = pa.struct(
    [pa.field("key", pa.string(), nullable=False), pa.field("value", pa.binary(), nullable=True)]
)
LOG_ARROW = pa.schema(
    [
        pa.field("log_id", pa.string(), nullable=False),
        pa.field(TIMESTAMP, _UTC_MICROS, nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("partition", pa.int32()),
        pa.field("offset", pa.int64()),
    ]
)
RECORD_ARROW = pa.schema(
    [
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field(TIMESTAMP, _UTC_MICROS, nullable=False),
        pa.field("timestamp_type", pa.string(), nullable=False),
        pa.field("key", pa.binary()),
        pa.field("value", pa.binary()),
        pa.field("headers", pa.list_(pa.field("element", _HEADER, nullable=False)), nullable=False),
    ]
)
# kafka-python's timestamp type codes, as ``protoagg cat`` names them.
TIMESTAMP_TYPES = {0: "create_time", 1: "log_append_time", -1: "unspecified"}


@dataclass(frozen=True)
class TableLayout:
    """One format's table: its schemas and its decoder."""

    format: str
    schema: Schema
    arrow: pa.Schema
    # Columns people look single values up by (one logId, one key's history): a Parquet bloom
    # filter per row group lets a reader skip the row groups without the value.
    lookup_columns: tuple[str, ...] = ()
    # Columns of few distinct values, dictionary-encoded; on ids and texts pyarrow's attempt
    # at a dictionary costs CPU and memory before it falls back.
    dictionary_columns: tuple[str, ...] = ("partition",)

    @property
    def partition_spec(self) -> PartitionSpec:
        source = self.schema.find_field(TIMESTAMP).field_id
        return PartitionSpec(
            PartitionField(source, 1000, DayTransform(), f"{TIMESTAMP}_day"), spec_id=0
        )

    def columns(self, day: int) -> DayColumns:
        return LogColumns(day) if self.format == LOG else RecordColumns(day)


def layout_of(format_name: str) -> TableLayout:
    if format_name == LOG:
        return TableLayout(LOG, LOG_SCHEMA, LOG_ARROW, ("log_id",))
    assert format_name == RECORD, format_name
    return TableLayout(
        RECORD, RECORD_SCHEMA, RECORD_ARROW, ("key",), ("partition", "timestamp_type")
    )


class DayColumns(Protocol):
    """Buffers the records of one UTC day, decoded from archive streams, as columns."""

    @property
    def rows(self) -> int: ...

    def feed(self, stream: BinaryIO, partition: int, rows: int) -> Iterator[pa.Table]:
        """Decode ``stream``, keep the day's records, yield a table whenever ``rows`` wait."""

    def take(self) -> pa.Table:
        """The buffered rows as a table (possibly empty); the buffer starts again."""


def day_seconds(day: int) -> tuple[int, int]:
    return day * SECONDS_PER_DAY, (day + 1) * SECONDS_PER_DAY


@dataclass
class LogColumns:
    day: int
    blocks: list[pa.Table] = field(default_factory=list)
    buffered: int = 0

    @property
    def rows(self) -> int:
        return self.buffered

    def feed(self, stream: BinaryIO, partition: int, rows: int) -> Iterator[pa.Table]:
        low, high = day_seconds(self.day)
        for buffer, spans in iter_frame_runs(stream):
            block = decode_log_frames(buffer, spans) or _decode_with_upb(buffer, spans)
            keep = (block.seconds >= low) & (block.seconds < high)
            kept = int(keep.sum())
            if not kept:
                continue
            micros = block.seconds[keep] * 1_000_000 + block.nanos[keep] // 1000
            mask = pa.array(keep)
            self.blocks.append(
                pa.Table.from_arrays(
                    [
                        block.log_ids.filter(mask),
                        pa.array(micros, pa.int64()).cast(_UTC_MICROS),
                        block.messages.filter(mask),
                        pa.array(np.full(kept, partition, dtype=np.int32)),
                        pa.nulls(kept, pa.int64()),
                    ],
                    schema=LOG_ARROW,
                )
            )
            self.buffered += kept
            while self.buffered >= rows:
                yield self._take(rows)

    def take(self) -> pa.Table:
        return self._take(self.buffered)

    def _take(self, rows: int) -> pa.Table:
        buffered = pa.concat_tables(self.blocks) if self.blocks else LOG_ARROW.empty_table()
        rest = buffered.slice(rows)
        self.blocks = [rest] if rest.num_rows else []
        self.buffered = rest.num_rows
        return buffered.slice(0, rows)


def _decode_with_upb(buffer: bytes, spans: list[tuple[int, int]]) -> LogBlock:
    """A chunk decoded frame by frame (any valid ``ProtoLog`` layout), as ``decode_log_frames``."""
    ids, seconds, nanos, messages = [], [], [], []
    message, uses = ProtoLog(), 0
    view = memoryview(buffer)
    for start, stop in spans:
        if uses == MESSAGE_REUSE:
            message, uses = ProtoLog(), 0
        uses += 1
        try:
            message.ParseFromString(view[start:stop])  # type: ignore[arg-type] # upb reads any buffer
        except Exception as exc:  # upb raises a bare DecodeError subclass of Exception
            raise ArchiveFormatError(
                f"a {stop - start}-byte frame is not a ProtoLog ({exc})"
            ) from exc
        stamp = message.timestamp
        ids.append(message.logId)
        seconds.append(stamp.seconds)
        nanos.append(stamp.nanos)
        messages.append(message.message)
    return LogBlock(
        pa.array(ids, pa.string()),
        np.array(seconds, dtype=np.int64),
        np.array(nanos, dtype=np.int64),
        pa.array(messages, pa.string()),
    )


@dataclass
class RecordColumns:
    day: int
    records: list[Any] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.records)

    def feed(self, stream: BinaryIO, partition: int, rows: int) -> Iterator[pa.Table]:
        low, high = (edge * 1000 for edge in day_seconds(self.day))
        for record in iter_kafka_records(stream):
            if low <= record.timestamp_ms < high:
                self.records.append(record)
                if len(self.records) >= rows:
                    yield self.take()

    def take(self) -> pa.Table:
        records, self.records = self.records, []
        millis = pa.array([r.timestamp_ms for r in records], pa.int64())
        return pa.Table.from_arrays(
            [
                pa.array([r.partition for r in records], pa.int32()),
                pa.array([r.offset for r in records], pa.int64()),
                pc.multiply(millis, 1000).cast(_UTC_MICROS),
                pa.array([TIMESTAMP_TYPES.get(r.timestamp_type, "unspecified") for r in records]),
                pa.array([r.key for r in records], pa.binary()),
                pa.array([r.value for r in records], pa.binary()),
                pa.array(
                    [[{"key": k, "value": v} for k, v in r.headers] for r in records],
                    RECORD_ARROW.field("headers").type,
                ),
            ],
            schema=RECORD_ARROW,
        )


def record_times(format_name: str, stream: BinaryIO) -> Iterator[int]:
    """The timestamp (epoch seconds) of each record of an archive stream, in order."""
    kind: type[ProtoLog | KafkaRecord] = ProtoLog if format_name == LOG else KafkaRecord
    message, uses = kind(), 0
    for buffer, spans in iter_frame_runs(stream):
        view = memoryview(buffer)
        for start, stop in spans:
            if uses == MESSAGE_REUSE:
                message, uses = kind(), 0
            uses += 1
            try:
                message.ParseFromString(view[start:stop])  # type: ignore[arg-type]
            except Exception as exc:  # upb raises a bare DecodeError subclass of Exception
                raise ArchiveFormatError(
                    f"a {stop - start}-byte frame is not a {kind.DESCRIPTOR.name} ({exc})"
                ) from exc
            yield message.timestamp.seconds
