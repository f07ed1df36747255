"""The archive's framing, ``uint32 little-endian length | message bytes``, and the ``log`` format.

The ``log`` format's message is ``ProtoLog``, the reference tool's format, so its archives and ours
are interchangeable. Encoding uses the protobuf runtime's C (upb) backend; reading never trusts a
length prefix further than the bytes actually present.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO, NamedTuple, Protocol, TypeVar, runtime_checkable

from google.protobuf.message import Message

from protoagg_dagster.core.errors import ArchiveFormatError
from protoagg_dagster.core.records import LogRecord
from protoagg_dagster.pb.log_pb2 import ProtoLog

LENGTH = struct.Struct("<I")
FRAME_HEADER_BYTES = LENGTH.size
# A frame larger than this is treated as corruption rather than allocated: messages over the
# configured size limit never reach the archive, and this bound is far above any sane limit.
MAX_FRAME_BYTES = 64 * 1024 * 1024
_READ_CHUNK = 1024 * 1024
M = TypeVar("M", bound=Message)


# upb keeps every string assigned to a message in the message's arena until the message is
# freed (~80 bytes per record measured), so a reused message is replaced after this many frames.
MESSAGE_REUSE = 1024


class ProtoLogFrames:
    """Appends ``ProtoLog`` frames to a buffer, reusing a upb message for up to MESSAGE_REUSE."""

    def __init__(self) -> None:
        self._renew()

    def _renew(self) -> None:
        self._message = ProtoLog()
        self._timestamp = self._message.timestamp
        self._uses = 0

    def append(self, out: bytearray, record: LogRecord) -> None:
        if self._uses == MESSAGE_REUSE:
            self._renew()
        self._uses += 1
        message = self._message
        message.logId = record.log_id
        self._timestamp.seconds = record.seconds
        self._timestamp.nanos = record.nanos
        message.message = record.message
        data = message.SerializeToString()
        out += LENGTH.pack(len(data))
        out += data


def encode_records(records: Iterable[LogRecord]) -> bytes:
    """Frame each record as ``ProtoLog``, in the order given."""
    out = bytearray()
    append = ProtoLogFrames().append
    for record in records:
        append(out, record)
    return bytes(out)


class ArchivedRecord(NamedTuple):
    """One record read back from an archive, with where it sits."""

    number: int
    byte_offset: int
    log_id: str
    seconds: int
    nanos: int
    message: str

    @property
    def dedupe_key(self) -> str:
        return self.log_id


def iter_frames(stream: BinaryIO, max_frame_bytes: int = MAX_FRAME_BYTES) -> Iterator[bytes]:
    """Yield each frame's payload; raise ArchiveFormatError on a truncated or absurd frame."""
    for _, _, payload in iter_located_frames(stream, max_frame_bytes):
        yield payload


def iter_records(
    stream: BinaryIO, max_frame_bytes: int = MAX_FRAME_BYTES
) -> Iterator[ArchivedRecord]:
    """Decode an archive stream record by record, in archive order.

    Memory stays bounded by one read chunk plus one frame, whatever the archive's size.
    """
    for index, offset, message in iter_parsed_frames(stream, ProtoLog, max_frame_bytes):
        yield ArchivedRecord(
            index,
            offset,
            message.logId,
            message.timestamp.seconds,
            message.timestamp.nanos,
            message.message,
        )


def iter_parsed_frames(
    stream: BinaryIO, kind: type[M], max_frame_bytes: int = MAX_FRAME_BYTES
) -> Iterator[tuple[int, int, M]]:
    """Parse each frame into a ``kind`` message and yield (record index, byte offset, message).

    The message is reused and valid until the next frame. A frame that does not parse as
    ``kind`` is an ArchiveFormatError naming it.
    """
    message = kind()
    for index, offset, payload in iter_located_frames(stream, max_frame_bytes):
        if index % MESSAGE_REUSE == 0:
            # One message for a whole archive would grow by about the archive's size (measured).
            message = kind()
        try:
            message.ParseFromString(payload)
        except Exception as exc:  # upb raises a bare DecodeError subclass of Exception
            raise _frame_error(
                stream,
                index,
                offset,
                f"{len(payload)}-byte frame is not a {kind.DESCRIPTOR.name} ({exc})",
            ) from exc
        yield index, offset, message


def iter_located_frames(
    stream: BinaryIO, max_frame_bytes: int = MAX_FRAME_BYTES
) -> Iterator[tuple[int, int, bytes]]:
    """Yield (record index, byte offset, payload) of each frame, whatever message it holds."""
    buffer, pos, base, index = b"", 0, 0, 0
    while True:
        if len(buffer) - pos < LENGTH.size:
            buffer, pos, base = _refill(stream, buffer, pos, base, LENGTH.size, index)
            if len(buffer) == 0:
                return
            if len(buffer) < LENGTH.size:
                raise _frame_error(
                    stream,
                    index,
                    base,
                    f"truncated length prefix, {len(buffer)} of {LENGTH.size} bytes present",
                )
        (length,) = LENGTH.unpack_from(buffer, pos)
        if length > max_frame_bytes:
            raise _frame_error(
                stream,
                index,
                base + pos,
                f"length prefix {length} exceeds the {max_frame_bytes}-byte frame limit (corrupt, "
                f"or not a protoagg archive; prefix bytes {buffer[pos : pos + LENGTH.size].hex()})",
            )
        end = pos + LENGTH.size + length
        if end > len(buffer):
            buffer, pos, base = _refill(stream, buffer, pos, base, LENGTH.size + length, index)
            end = LENGTH.size + length
            if end > len(buffer):
                raise _frame_error(
                    stream, index, base, f"truncated frame, {len(buffer)} of {end} bytes present"
                )
        yield index, base + pos, buffer[pos + LENGTH.size : end]
        pos = end
        index += 1


def _refill(
    stream: BinaryIO, buffer: bytes, pos: int, base: int, need: int, index: int
) -> tuple[bytes, int, int]:
    """Keep the unread tail of ``buffer`` and read until it holds ``need`` bytes or EOF.

    A decompressing stream's error (a corrupt member) is told with the frame being read.
    """
    chunks = [buffer[pos:]]
    have = len(chunks[0])
    while have < need:
        try:
            chunk = stream.read(max(_READ_CHUNK, need - have))
        except ArchiveFormatError as exc:
            raise _frame_error(stream, index, base + pos, str(exc)) from exc
        if not chunk:
            break
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks), 0, base + pos


@runtime_checkable
class LocatedStream(Protocol):
    """A stream that can say where an uncompressed byte offset sits (``core.compression``)."""

    def locate(self, offset: int) -> str: ...


def _frame_error(stream: BinaryIO, index: int, offset: int, detail: str) -> ArchiveFormatError:
    """An error naming the frame, and in a compressed archive the member it is in."""
    place = stream.locate(offset) if isinstance(stream, LocatedStream) else ""
    return ArchiveFormatError(f"record {index} at byte {offset}{place}: {detail}")
