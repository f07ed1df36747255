"""Names and metadata of archive objects: pure functions, so retries always hit the same object.

The destination's custom metadata holds one marker: the pieces the last compose appended
(``batch id:role:bytes``, comma-separated, at most ``MARKER_BYTES`` long). What each batch
covers lives in the PostgreSQL ledger, so the metadata stays under 6 KiB however many partitions
write to the object (GCS allows 8 KiB). The marker closes the one gap the ledger cannot: a
compose that landed but whose ledger records were not committed (a crash, or a lost response);
whoever next holds the object's lock reads it and records those pieces before composing again.
It also records the archive format of the object's frames (absent on objects written before
formats existed: those are ``log``) and its compression (absent: none). Compose replaces the
metadata, so both are re-sent at every append, and a piece of another format or compression is
refused: it would make the object unreadable.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from protoagg_dagster.core.compression import NONE
from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.planning import OffsetRange

LAST_APPEND_KEY = "protoagg-last-append"
LEGACY_OFFSETS_KEY = "protoagg-offsets"
FORMAT_METADATA_KEY = "protoagg-format"
COMPRESSION_METADATA_KEY = "protoagg-compression"
LEGACY_FORMAT = "log"
TEMP_PREFIX = "_protoagg/tmp/"
# GCS composes at most 32 sources: the destination itself and this many uploads.
MAX_PIECES_PER_COMPOSE = 31
# The pieces one compose appends are all named in the marker (about 20 bytes each, 42 at most).
# GCS allows 8 KiB of custom metadata; fake-gcs-server keeps it in one extended attribute, which
# the file system caps at about 3.9 KB (measured), so the marker keeps to 3 KiB and is checked on
# the emulator. Bounded by its bytes rather than by a count of worst-case pieces, a compose takes
# about 150 of a run's ranges instead of 128, and a run's uploads all queue before its first
# compose. One upload's pieces take at most half of it, so a compose can always take another
# writer's upload along with its own.
MARKER_BYTES = 3 * 1024
UPLOAD_MARKER_BYTES = (MARKER_BYTES - 1) // 2
TEMPLATE_FIELDS = frozenset({"topic", "partition", "date", "year", "month", "day", "hour"})


def validate_template(template: str, setting: str = "PROTOAGG_GCS_OBJECT") -> None:
    """Raise ConfigError, naming ``setting``, if the template is empty or has an unknown field."""
    if not template.strip():
        raise ConfigError(f"{setting} (object template) must not be empty")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"{setting} {template!r} is not a valid template: {exc}") from None
    unknown = fields - TEMPLATE_FIELDS
    if unknown:
        raise ConfigError(
            f"{setting} {template!r} names unknown field(s) {sorted(unknown)}; "
            f"known fields: {sorted(TEMPLATE_FIELDS)}"
        )
    if template.startswith(TEMP_PREFIX):
        raise ConfigError(f"{setting} must not start with {TEMP_PREFIX!r} (reserved)")


def check_one_format_per_object(
    template: str, formats: Collection[str], setting: str = "PROTOAGG_GCS_OBJECT"
) -> None:
    """Refuse a template that would put topics of different formats into one object.

    An object holds one format (its metadata records it): without ``{topic}`` every topic
    shares the object, and the first append of the second format would fail in a run.
    """
    validate_template(template, setting)
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if len(set(formats)) > 1 and "topic" not in fields:
        raise ConfigError(
            f"{setting} {template!r} would put topics archived as {' and '.join(sorted(formats))} "
            "into one object, which holds one format: put {topic} in it "
            "(e.g. {topic}/{partition}.pb)"
        )


def object_name(
    template: str,
    topic: str,
    partition: int,
    timestamp_ms: int,
    setting: str = "PROTOAGG_GCS_OBJECT",
) -> str:
    """The object for a batch: ``timestamp_ms`` is its first message's Kafka timestamp."""
    validate_template(template, setting)
    moment = time.gmtime(max(timestamp_ms, 0) // 1000)
    return template.format(
        topic=topic,
        partition=partition,
        date=time.strftime("%Y-%m-%d", moment),
        year=f"{moment.tm_year:04d}",
        month=f"{moment.tm_mon:02d}",
        day=f"{moment.tm_mday:02d}",
        hour=f"{moment.tm_hour:02d}",
    )


# GCS's own limit is 5 TiB; far below it, an object stays quick to download and verify, and
# each replaced generation soft delete keeps costs less.
DEFAULT_MAX_OBJECT_BYTES = 256 * 2**30


def sequence_member(base: str, number: int) -> str:
    """The ``number``-th object of ``base``'s sequence: ``log.pb``, ``log.0001.pb``, ...

    The number goes before the first dot of the name's last path segment, so the extension
    (``.pb``, ``.pb.gz``) stays at the end.
    """
    if number == 0:
        return base
    head, tail = _numbered_parts(base)
    return f"{head}.{number:04d}{tail}"


def sequence_number(base: str, name: str) -> int | None:
    """Which member of ``base``'s sequence ``name`` is, or None if it is not one."""
    if name == base:
        return 0
    head, tail = _numbered_parts(base)
    if not (name.startswith(head + ".") and name.endswith(tail)):
        return None
    digits = name[len(head) + 1 : len(name) - len(tail)]
    return int(digits) if len(digits) >= 4 and digits.isdigit() and int(digits) > 0 else None


def sequence_base(name: str) -> str | None:
    """The first object of the sequence ``name`` is a numbered member of, or None."""
    folder, slash, leaf = name.rpartition("/")
    match = _MEMBER_LEAF.match(leaf)
    if match is None:
        return None
    base = f"{folder}{slash}{match['stem']}{match['tail']}"
    return base if sequence_number(base, name) else None


_MEMBER_LEAF = re.compile(r"(?P<stem>[^.]+)\.\d{4,}(?P<tail>(?:\..*)?)\Z", re.DOTALL)


def sequence_prefix(base: str) -> str:
    """A prefix every numbered member of ``base``'s sequence starts with (for listing)."""
    return _numbered_parts(base)[0] + "."


def _numbered_parts(base: str) -> tuple[str, str]:
    """``base`` split where a member's number goes: (``dir/log``, ``.pb``)."""
    folder, slash, leaf = base.rpartition("/")
    stem, dot, extension = leaf.partition(".")
    if not stem:  # a leaf like ".pb" has no stem to number: the number goes at the end
        return base, ""
    return f"{folder}{slash}{stem}", f"{dot}{extension}"


def rolls_over(object_bytes: int, batch_bytes: int, max_object_bytes: int) -> bool:
    """Whether a batch starts the next object: it would pass the limit on a non-empty one."""
    return object_bytes > 0 and object_bytes + batch_bytes > max_object_bytes


PieceRole = Literal["records", "dead_letters"]


@dataclass(frozen=True)
class Piece:
    """One append: the bytes of ``role`` (records or dead letters) of ledger batch ``batch_id``."""

    batch_id: int
    role: PieceRole
    size: int

    @property
    def key(self) -> tuple[int, PieceRole]:
        """What tells pieces apart: every upload of one batch's role holds the same bytes."""
        return (self.batch_id, self.role)

    def marker(self) -> str:
        return f"{self.batch_id}:{self.role}:{self.size}"


@dataclass(frozen=True)
class Queued:
    """Pieces uploaded together as ``temp_name``, in this order, waiting to be composed.

    An archive run uploads the pieces of all its ranges bound for one object as one upload: one
    upload and one compose for the run, whatever the number of partitions.
    """

    pieces: tuple[Piece, ...]
    temp_name: str
    format_name: str | None
    compression: str = NONE

    def __post_init__(self) -> None:
        if not self.pieces:
            raise ValueError("an upload holds at least one piece")

    @property
    def size(self) -> int:
        return sum(piece.size for piece in self.pieces)

    def row_names(self) -> list[str]:
        """The upload's rows in the ledger's queue, one per piece (unique names).

        A single piece's row is the upload's name, as before uploads held several.
        """
        if len(self.pieces) == 1:
            return [self.temp_name]
        n = len(self.pieces)
        return [f"{self.temp_name}{UPLOAD_ROW_SEPARATOR}{i}/{n}" for i in range(n)]


# Topic names never hold it (Kafka allows letters, digits, '.', '_' and '-').
UPLOAD_ROW_SEPARATOR = "#"


def upload_of_row(row_name: str) -> tuple[str, int, int]:
    """``(upload name, index, pieces)`` of a queue row named by ``Queued.row_names``."""
    upload, separator, place = row_name.partition(UPLOAD_ROW_SEPARATOR)
    if not separator:
        return upload, 0, 1
    index, _, count = place.partition("/")
    return upload, int(index), int(count)


@dataclass(frozen=True)
class Landed:
    """Where a composed piece ended: the object's generation and the piece's end offset in it."""

    generation: int | None
    end: int | None


def marker_bytes(pieces: Sequence[Piece]) -> int:
    """The length of the marker naming ``pieces``."""
    return sum(len(piece.marker()) + 1 for piece in pieces) - 1 if pieces else 0


def last_compose(metadata: Mapping[str, str] | None) -> list[Piece]:
    """The pieces the object's last compose appended, in object order, as its marker records."""
    raw = (metadata or {}).get(LAST_APPEND_KEY)
    return [_piece_of(marker) for marker in raw.split(",")] if raw else []


def legacy_offsets(metadata: Mapping[str, str] | None) -> dict[str, int]:
    """``topic/partition`` → offset after its last batch, as releases before the marker recorded.

    Those releases composed a batch and then confirmed its claim in the ledger; a claim left
    pending between the two is on the object exactly when this map covers its end. The map is
    dropped by the first compose of a release with the marker (which records such claims first).
    """
    raw = (metadata or {}).get(LEGACY_OFFSETS_KEY)
    if not raw:
        return {}
    try:
        decoded = json.loads(raw)
        return {str(key): int(value) for key, value in decoded.items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(
            f"archive object metadata {LEGACY_OFFSETS_KEY!r} is not a map of offsets: {raw!r}"
        ) from exc


def legacy_covers(offsets: Mapping[str, int], batch: OffsetRange) -> bool:
    """Whether a ``legacy_offsets`` map says ``batch`` was appended."""
    return offsets.get(f"{batch.topic}/{batch.partition}", -1) >= batch.end


def _piece_of(marker: str) -> Piece:
    batch_id, role, size = [*marker.split(":"), "", "", ""][:3]
    if role not in ("records", "dead_letters") or not batch_id.isdigit() or not size.isdigit():
        raise ConfigError(
            f"archive object metadata {LAST_APPEND_KEY!r} is not a marker: {marker!r}"
        )
    return Piece(int(batch_id), role_of(role), int(size))


def role_of(text: str) -> PieceRole:
    return "dead_letters" if text == "dead_letters" else "records"


def archive_format(metadata: Mapping[str, str] | None) -> str:
    """The archive format an object's metadata records (``log`` if it predates formats)."""
    return (metadata or {}).get(FORMAT_METADATA_KEY, LEGACY_FORMAT)


def archive_compression(metadata: Mapping[str, str] | None) -> str:
    """The compression an object's metadata records (``none`` if it predates compression)."""
    return (metadata or {}).get(COMPRESSION_METADATA_KEY, NONE)


def metadata_after_compose(
    metadata: Mapping[str, str] | None,
    pieces: Sequence[Piece],
    format_name: str | None = None,
    compression: str = NONE,
) -> dict[str, str]:
    """The destination's full custom metadata once ``pieces`` are appended (in this order).

    Compose replaces metadata, so the user's own keys are re-sent; the per-partition offsets map
    of earlier versions is dropped (the ledger holds offsets now). ``format_name`` None: the
    bytes are in no archive format (dead letters); none is recorded or checked.
    ``compression`` is the piece's codec; an object that holds pieces of another is refused.
    """
    known = metadata or {}
    holds_frames = any(
        k in known for k in (FORMAT_METADATA_KEY, LAST_APPEND_KEY, LEGACY_OFFSETS_KEY)
    )
    if holds_frames and archive_compression(metadata) != compression:
        raise ConfigError(
            f"the archive object is compressed with {archive_compression(metadata)!r}, and batch "
            f"{pieces[0].batch_id} with {compression!r} (PROTOAGG_COMPRESSION): one object cannot "
            "mix them; keep the setting, or point PROTOAGG_GCS_OBJECT (PROTOAGG_GCS_DEAD_LETTERS "
            "for dead letters) at a new object name"
        )
    if format_name is not None and holds_frames and archive_format(metadata) != format_name:
        raise ConfigError(
            f"the archive object holds {archive_format(metadata)!r} frames, and batch "
            f"{pieces[0].batch_id} is archived as {format_name!r}: one object cannot mix formats; "
            "put {topic} in PROTOAGG_GCS_OBJECT"
        )
    result = {k: v for k, v in known.items() if k != LEGACY_OFFSETS_KEY}
    result[LAST_APPEND_KEY] = ",".join(piece.marker() for piece in pieces)
    if format_name is not None:
        result[FORMAT_METADATA_KEY] = format_name
    # none is recorded as no key, so an uncompressed object's metadata is what it always was.
    if compression != NONE:
        result[COMPRESSION_METADATA_KEY] = compression
    return result


def piece_ends(object_size: int, pieces: Sequence[Piece]) -> list[int]:
    """Where each of the last-composed ``pieces`` ends in an object of ``object_size`` bytes."""
    ends, end = [], object_size
    for piece in reversed(pieces):
        ends.append(end)
        end -= piece.size
    return ends[::-1]


def temp_object_name(batch: OffsetRange, token: str) -> str:
    """A unique name for a batch's temporary upload; the token tells attempts apart."""
    return f"{TEMP_PREFIX}{batch.topic}/{batch.partition}/{batch.start}-{batch.end}-{token}"
