"""Compression of archive pieces (gzip members, zstd frames) and the streaming decoder.

Each appended piece is compressed on its own into one complete gzip member or zstd frame, so the
object that compose concatenates is itself one valid ``.gz`` / ``.zst`` stream (both formats
define a concatenation of members/frames as the concatenation of their contents) and
``gunzip -c`` / ``zstd -dc`` read it whole. The decoder walks the members itself, which is how a
corrupt one is located by its byte offset in the object.
"""

from __future__ import annotations

import io
import zlib
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import zstandard

from protoagg_dagster.core.errors import ArchiveFormatError, ConfigError

NONE = "none"
GZIP = "gzip"
ZSTD = "zstd"
CODECS = (NONE, GZIP, ZSTD)
SUFFIXES = {NONE: "", GZIP: ".gz", ZSTD: ".zst"}
DEFAULT_LEVELS = {GZIP: 6, ZSTD: 3}
LEVEL_RANGES = {GZIP: range(1, 10), ZSTD: range(1, 23)}
MAGIC = {GZIP: b"\x1f\x8b", ZSTD: b"\x28\xb5\x2f\xfd"}
# Compressed bytes fed to a decompressor at a time: memory stays bounded by this times the
# compression ratio, plus the reader's buffer.
_INPUT_CHUNK = 64 * 1024
_GZIP_WINDOW = 31  # zlib's wbits for a gzip header and trailer around deflate
# How far behind the decoder a reader may be (its buffers plus the largest frame) and still be
# told which member an offset sits in; older member starts are forgotten, so memory stays bounded.
_LOOKBACK = 256 * 1024 * 1024


@dataclass(frozen=True)
class Codec:
    """A compression setting: ``name`` (none, gzip or zstd) at ``level``."""

    name: str = NONE
    level: int | None = None

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ConfigError(
                f"PROTOAGG_COMPRESSION must be one of {', '.join(CODECS)}, got {self.name!r}"
            )
        if self.level is not None and self.name == NONE:
            raise ConfigError("PROTOAGG_COMPRESSION_LEVEL is set, but PROTOAGG_COMPRESSION is none")
        if self.level is not None and self.level not in LEVEL_RANGES[self.name]:
            allowed = LEVEL_RANGES[self.name]
            raise ConfigError(
                f"PROTOAGG_COMPRESSION_LEVEL for {self.name} must be {allowed.start}.."
                f"{allowed.stop - 1}, got {self.level}"
            )

    @property
    def suffix(self) -> str:
        """What the default object name gets: ``.gz``, ``.zst`` or nothing."""
        return SUFFIXES[self.name]

    def compress(self, data: bytes) -> bytes:
        """``data`` as one complete gzip member or zstd frame (none: ``data`` itself)."""
        if self.name == NONE:
            return data
        level = DEFAULT_LEVELS[self.name] if self.level is None else self.level
        if self.name == GZIP:
            member = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WINDOW)
            return member.compress(data) + member.flush()
        # The checksum lets a corrupt frame be told from a valid one, as gzip's CRC does.
        return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)


def parse_codec(name: str, level: str = "") -> Codec:
    """The codec of the PROTOAGG_COMPRESSION and PROTOAGG_COMPRESSION_LEVEL values."""
    text = level.strip()
    if text and not text.lstrip("-").isdigit():
        raise ConfigError(f"PROTOAGG_COMPRESSION_LEVEL must be an integer, got {level!r}")
    return Codec(name.strip().lower() or NONE, int(text) if text else None)


def detect(head: bytes) -> str:
    """The codec whose magic bytes start ``head`` (none: not compressed)."""
    for name, magic in MAGIC.items():
        if head.startswith(magic):
            return name
    return NONE


class _Member(Protocol):
    """zlib's and zstandard's decompression objects, as far as the decoder uses them."""

    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes) -> bytes: ...


def _new_member(name: str) -> _Member:
    if name == GZIP:
        return zlib.decompressobj(_GZIP_WINDOW)
    # read_across_frames stays off: each frame is a piece, and its end is where the next starts.
    return zstandard.ZstdDecompressor().decompressobj()


class _Decompressed(io.RawIOBase):
    """The uncompressed bytes of a stream of gzip members or zstd frames, read lazily."""

    def __init__(self, raw: BinaryIO, name: str) -> None:
        self._raw = raw
        self._name = name
        self._member = _new_member(name)
        self._index = 0  # which member is being decoded
        self._member_start = 0  # its byte offset in the compressed stream
        self._fed = 0  # compressed bytes given to the current member
        self._uncompressed = 0  # uncompressed bytes produced before the current member
        self._produced = 0  # ...and by it
        self._pending = b""  # compressed bytes read but not yet fed
        self._out = b""
        # (uncompressed start, member index, compressed start) of the recent members.
        self._starts: deque[tuple[int, int, int]] = deque([(0, 0, 0)])

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()
        super().close()

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._out:
            if not self._step():
                return 0
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _step(self) -> bool:
        """Decompress one more input chunk into ``_out``; False at the end of the stream."""
        data = self._pending or self._raw.read(_INPUT_CHUNK)
        self._pending = b""
        if not data:
            if self._fed:
                raise self._corrupt("truncated: the stream ends inside it")
            return False
        try:
            out = self._member.decompress(data)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise self._corrupt(str(exc)) from exc
        self._out, self._produced = out, self._produced + len(out)
        if self._member.eof:
            rest = self._member.unused_data
            self._member_start += self._fed + len(data) - len(rest)
            self._uncompressed += self._produced
            self._index += 1
            self._member, self._fed, self._produced, self._pending = (
                _new_member(self._name),
                0,
                0,
                rest,
            )
            self._remember_start()
        else:
            self._fed += len(data)
        return True

    def _remember_start(self) -> None:
        start = (self._uncompressed, self._index, self._member_start)
        if self._starts[-1][0] == self._uncompressed:
            self._starts.pop()  # the previous member was empty: no offset sits in it
        self._starts.append(start)
        while len(self._starts) > 1 and self._starts[1][0] < self._uncompressed - _LOOKBACK:
            self._starts.popleft()

    @property
    def _kind(self) -> str:
        return "gzip member" if self._name == GZIP else "zstd frame"

    def locate(self, offset: int) -> str:
        """Where uncompressed byte ``offset`` sits: `` (in zstd frame 3 at byte 1234 ...)``."""
        for uncompressed, index, compressed in reversed(self._starts):
            if uncompressed <= offset:
                return f" (in {self._kind} {index} at byte {compressed} of the object)"
        return ""

    def _corrupt(self, why: str) -> ArchiveFormatError:
        return ArchiveFormatError(
            f"{self._kind} {self._index} at byte {self._member_start} of the object (uncompressed "
            f"byte {self._uncompressed}, {self._produced} bytes of it decoded) is corrupt: {why}"
        )


class _Reader(io.BufferedReader):
    """The buffered decompressed stream, which can say which member an offset sits in."""

    raw: _Decompressed

    def locate(self, offset: int) -> str:
        return self.raw.locate(offset)


def decompressed(stream: BinaryIO, name: str) -> BinaryIO:
    """``stream`` read through codec ``name``; an ArchiveFormatError names a corrupt member."""
    if name == NONE:
        return stream
    if name not in CODECS:
        raise ConfigError(
            f"the object records compression {name!r}, which this protoagg cannot read "
            f"(it knows {', '.join(CODECS)}): upgrade protoagg"
        )
    return _Reader(_Decompressed(stream, name), buffer_size=1024 * 1024)


def sniffed(stream: io.BufferedReader) -> tuple[BinaryIO, str]:
    """A local file's stream, decompressed if its magic bytes say so, and the codec found."""
    name = detect(stream.peek(4)[:4])
    return decompressed(stream, name), name
