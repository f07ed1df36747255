"""The ``record`` archive format's wire form: one ``KafkaRecord`` frame per Kafka record, whole.

Key, value and header values are kept as bytes with null and empty told apart (protobuf
``optional`` presence), headers in the record's order with repeated keys kept, so an archive says
exactly what Kafka held. Framing is the log format's: ``uint32 little-endian length | message``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, NamedTuple

from protoagg_dagster.core.framing import (
    LENGTH,
    MAX_FRAME_BYTES,
    MESSAGE_REUSE,
    iter_parsed_frames,
)
from protoagg_dagster.core.records import KafkaMessage
from protoagg_dagster.pb.record_pb2 import Header, KafkaRecord

# kafka-python's timestamp_type (0 create, 1 log append) to the proto enum; anything else is
# UNSPECIFIED (0).
_TO_PROTO_TYPE = {0: 1, 1: 2}
_FROM_PROTO_TYPE = {1: 0, 2: 1}


class ArchivedKafkaRecord(NamedTuple):
    """One Kafka record as archived; ``dedupe_key`` is derived (never stored), None when unused.

    ``timestamp_type`` uses kafka-python's codes (0 create time, 1 log-append time, -1 none), so a
    record read back compares equal to the same record read from Kafka.
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    dedupe_key: str | None = None


class KafkaRecordFrames:
    """Appends ``KafkaRecord`` frames to a buffer, reusing a upb message for up to MESSAGE_REUSE."""

    def __init__(self) -> None:
        self._message = KafkaRecord()
        self._uses = 0

    def append(self, out: bytearray, record: ArchivedKafkaRecord | KafkaMessage) -> None:
        if self._uses == MESSAGE_REUSE:
            self._message = KafkaRecord()
            self._uses = 0
        self._uses += 1
        message = self._message
        message.Clear()
        message.topic = record.topic
        message.partition = record.partition
        message.offset = record.offset
        seconds, millis = divmod(record.timestamp_ms, 1000)
        message.timestamp.seconds = seconds
        message.timestamp.nanos = millis * 1_000_000
        message.timestamp_type = _TO_PROTO_TYPE.get(record.timestamp_type, 0)  # type: ignore[assignment]
        if record.key is not None:
            message.key = record.key
        if record.value is not None:
            message.value = record.value
        for name, value in record.headers:
            message.headers.add(key=name, value=value)
        data = message.SerializeToString()
        out += LENGTH.pack(len(data))
        out += data


def encode_kafka_records(records: Iterable[ArchivedKafkaRecord]) -> bytes:
    """Frame each record as ``KafkaRecord``, in the order given."""
    out = bytearray()
    append = KafkaRecordFrames().append
    for record in records:
        append(out, record)
    return bytes(out)


def iter_kafka_records(
    stream: BinaryIO,
    dedupe_key: Callable[[ArchivedKafkaRecord], str | None] | None = None,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> Iterator[ArchivedKafkaRecord]:
    """Decode a record-format archive in archive order; name the frame that does not decode."""
    for _, _, message in iter_parsed_frames(stream, KafkaRecord, max_frame_bytes):
        stamp = message.timestamp
        record = ArchivedKafkaRecord(
            message.topic,
            message.partition,
            message.offset,
            stamp.seconds * 1000 + stamp.nanos // 1_000_000,
            _FROM_PROTO_TYPE.get(message.timestamp_type, -1),
            message.key if message.HasField("key") else None,
            message.value if message.HasField("value") else None,
            tuple(_header(h) for h in message.headers),
        )
        yield record if dedupe_key is None else record._replace(dedupe_key=dedupe_key(record))


def _header(header: Header) -> tuple[str, bytes | None]:
    return header.key, header.value if header.HasField("value") else None
