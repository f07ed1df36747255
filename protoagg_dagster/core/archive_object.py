"""Names and metadata of archive objects: pure functions, so retries always hit the same object.

The destination's custom metadata records, per topic-partition, the offset after the last batch
appended to it, and the archive format of its frames (absent on objects written before formats
existed: those are ``log``). Compose replaces metadata rather than merging it, so every append
re-sends the whole map.
"""

from __future__ import annotations

import json
import string
import time
from collections.abc import Mapping

from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.planning import OffsetRange

OFFSETS_METADATA_KEY = "protoagg-offsets"
FORMAT_METADATA_KEY = "protoagg-format"
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


def partition_key(topic: str, partition: int) -> str:
    return f"{topic}/{partition}"


def archived_offsets(metadata: Mapping[str, str] | None) -> dict[str, int]:
    """The per-partition next offsets recorded on an archive object (empty if none)."""
    raw = (metadata or {}).get(OFFSETS_METADATA_KEY)
    if not raw:
        return {}
    try:
        decoded = json.loads(raw)
        return {str(key): int(value) for key, value in decoded.items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(
            f"archive object metadata {OFFSETS_METADATA_KEY!r} is not valid JSON offsets: {raw!r}"
        ) from exc


def archive_format(metadata: Mapping[str, str] | None) -> str:
    """The archive format an object's metadata records (``log`` if it predates formats)."""
    return (metadata or {}).get(FORMAT_METADATA_KEY, LEGACY_FORMAT)


def metadata_after_append(
    metadata: Mapping[str, str] | None, batch: OffsetRange, format_name: str | None = None
) -> dict[str, str]:
    """The destination's full custom metadata once ``batch`` is appended.

    ``format_name`` None: the bytes are in no archive format (dead letters); none is recorded.
    """
    offsets = archived_offsets(metadata)
    offsets[partition_key(batch.topic, batch.partition)] = batch.end
    result = dict(metadata or {})
    result[OFFSETS_METADATA_KEY] = json.dumps(offsets, sort_keys=True, separators=(",", ":"))
    if format_name is not None:
        if metadata and archived_offsets(metadata) and archive_format(metadata) != format_name:
            raise ConfigError(
                f"the archive object holds {archive_format(metadata)!r} frames, and {batch} is "
                f"archived as {format_name!r}: one object cannot mix formats; put {{topic}} in "
                "PROTOAGG_GCS_OBJECT"
            )
        result[FORMAT_METADATA_KEY] = format_name
    return result


def temp_object_name(batch: OffsetRange, token: str) -> str:
    """A unique name for a batch's temporary upload; the token tells attempts apart."""
    return f"{TEMP_PREFIX}{batch.topic}/{batch.partition}/{batch.start}-{batch.end}-{token}"
