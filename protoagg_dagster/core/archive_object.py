"""Names and metadata of archive objects: pure functions, so retries always hit the same object.

The destination's custom metadata holds one fixed-size marker, the last piece composed onto it
(``batch id:role:bytes``). What each batch covers lives in the PostgreSQL ledger, so the
metadata stays a few dozen bytes however many partitions write to the object (GCS allows 8 KiB).
The marker closes the one gap the ledger cannot: a compose that landed but whose ledger record
was not committed (a crash, or a lost response); whoever next holds the object's lock reads it
and records that piece before composing anything else.
It also records the archive format of the object's frames (absent on objects written before
formats existed: those are ``log``) and its compression (absent: none). Compose replaces the
metadata, so both are re-sent at every append, and a piece of another format or compression is
refused: it would make the object unreadable.
"""

from __future__ import annotations

import string
import time
from collections.abc import Mapping
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


PieceRole = Literal["records", "dead_letters"]


@dataclass(frozen=True)
class Piece:
    """One append: the bytes of ``role`` (records or dead letters) of ledger batch ``batch_id``."""

    batch_id: int
    role: PieceRole
    size: int

    def marker(self) -> str:
        return f"{self.batch_id}:{self.role}:{self.size}"


def last_append(metadata: Mapping[str, str] | None) -> Piece | None:
    """The piece the object's last compose appended, as its marker records (None if none)."""
    raw = (metadata or {}).get(LAST_APPEND_KEY)
    if not raw:
        return None
    batch_id, role, size = [*raw.split(":"), "", "", ""][:3]
    if role not in ("records", "dead_letters") or not batch_id.isdigit() or not size.isdigit():
        raise ConfigError(f"archive object metadata {LAST_APPEND_KEY!r} is not a marker: {raw!r}")
    return Piece(int(batch_id), "records" if role == "records" else "dead_letters", int(size))


def archive_format(metadata: Mapping[str, str] | None) -> str:
    """The archive format an object's metadata records (``log`` if it predates formats)."""
    return (metadata or {}).get(FORMAT_METADATA_KEY, LEGACY_FORMAT)


def archive_compression(metadata: Mapping[str, str] | None) -> str:
    """The compression an object's metadata records (``none`` if it predates compression)."""
    return (metadata or {}).get(COMPRESSION_METADATA_KEY, NONE)


def metadata_after_append(
    metadata: Mapping[str, str] | None,
    piece: Piece,
    format_name: str | None = None,
    compression: str = NONE,
) -> dict[str, str]:
    """The destination's full custom metadata once ``piece`` is appended.

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
            f"{piece.batch_id} with {compression!r} (PROTOAGG_COMPRESSION): one object cannot mix "
            "them; keep the setting, or point PROTOAGG_GCS_OBJECT (PROTOAGG_GCS_DEAD_LETTERS for "
            "dead letters) at a new object name"
        )
    if format_name is not None and holds_frames and archive_format(metadata) != format_name:
        raise ConfigError(
            f"the archive object holds {archive_format(metadata)!r} frames, and batch "
            f"{piece.batch_id} is archived as {format_name!r}: one object cannot mix formats; "
            "put {topic} in PROTOAGG_GCS_OBJECT"
        )
    result = {k: v for k, v in (metadata or {}).items() if k != LEGACY_OFFSETS_KEY}
    result[LAST_APPEND_KEY] = piece.marker()
    if format_name is not None:
        result[FORMAT_METADATA_KEY] = format_name
    # none is recorded as no key, so an uncompressed object's metadata is what it always was.
    if compression != NONE:
        result[COMPRESSION_METADATA_KEY] = compression
    return result


def temp_object_name(batch: OffsetRange, token: str) -> str:
    """A unique name for a batch's temporary upload; the token tells attempts apart."""
    return f"{TEMP_PREFIX}{batch.topic}/{batch.partition}/{batch.start}-{batch.end}-{token}"
