"""The invariant checker: does the archive hold each record of the topic exactly once?

For every partition the ledger records as appended to an archive object, the offsets
``[0, archived position)`` are read back from Kafka (committed records only) and each offset must be
accounted for: archived once and equal to what Kafka holds (in the object's format), a duplicate
(a dedupe key archived before), a dead letter, a tombstone (log format), deleted by retention, or
holding no record (a transaction marker, an aborted or a compacted record). Records archived
twice, records missing from the archive, records that differ from Kafka's, partitions out of
offset order and dead letters that are missing are reported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from google.cloud import storage
from kafka import KafkaConsumer

from protoagg_dagster.archive.store import open_sequence, sequence_blobs
from protoagg_dagster.core.archive_object import archive_compression, archive_format, object_name
from protoagg_dagster.core.compression import decompressed
from protoagg_dagster.core.dead_letters import iter_dead_letters
from protoagg_dagster.core.errors import ArchiveFormatError
from protoagg_dagster.core.formats import ArchiveFormat, FormatOptions
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.records import TOMBSTONE
from protoagg_dagster.kafka.reader import read_range


@dataclass
class KafkaCheck:
    """What the checker found; ``ok`` when nothing is missing, doubled or out of order."""

    offsets: int = 0
    archived: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    tombstones: int = 0
    without_record: int = 0
    deleted: int = 0
    doubled: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    missing_dead_letters: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)
    format_error: str | None = None

    @property
    def ok(self) -> bool:
        return not (
            self.doubled
            or self.missing
            or self.different
            or self.missing_dead_letters
            or self.out_of_order
            or self.format_error
        )

    def summary(self) -> str:
        lines = [
            f"{self.offsets} offsets = {self.archived} archived + {self.duplicates} duplicates + "
            f"{self.dead_letters} dead letters + {self.tombstones} tombstones + "
            f"{self.without_record} holding no record (transaction markers, aborted or compacted "
            f"records) + {self.deleted} deleted by retention"
        ]
        for label, items in (
            ("archived more than once", self.doubled),
            ("missing from the archive", self.missing),
            ("different from Kafka's", self.different),
            ("missing from the dead letters", self.missing_dead_letters),
            ("out of offset order", self.out_of_order),
        ):
            if items:
                lines.append(f"{label}: {len(items)} (e.g. {', '.join(items[:5])})")
        if self.format_error:
            lines.append(f"format error: {self.format_error}")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def check_against_kafka(
    bucket: storage.Bucket,
    archive_object: str,
    dead_letter_template: str,
    consumer: KafkaConsumer,
    max_message_bytes: int,
    partitions: Mapping[str, int],
    options: FormatOptions | None = None,
) -> KafkaCheck:
    """Compare one archive object (its whole sequence) with the topic partitions appended to it.

    ``partitions`` maps ``topic/partition`` to the offset after its last appended batch
    (``ledger.archived_partitions`` of the sequence's objects). The object's metadata says its
    format; ``options`` (dedupe key, log fields) must be the ones it was archived with.
    """
    report = KafkaCheck()
    stream, blobs = open_sequence(bucket, archive_object)
    archive = (options or FormatOptions()).build(archive_format(blobs[0].metadata))
    archived = _Archived()
    with stream:
        try:
            for number, record in enumerate(archive.decode(stream)):
                archived.add(archive, number, record)
        except ArchiveFormatError as exc:
            report.format_error = str(exc)
    report.doubled = sorted(key for key, n in archived.counts.items() if n > 1)
    for key, end in sorted(partitions.items()):
        topic, _, partition = key.rpartition("/")
        _check_partition(
            report,
            bucket,
            consumer,
            OffsetRange(topic, int(partition), 0, end),
            archive,
            archived,
            dead_letter_template,
            max_message_bytes,
            strict_order=len(partitions) == 1,
        )
    return report


def _read_through(blob: storage.Blob) -> BinaryIO:
    """The object's uncompressed bytes, streamed (its metadata says its compression)."""
    stream: BinaryIO = blob.open("rb", chunk_size=8 * 1024 * 1024)
    return decompressed(stream, archive_compression(blob.metadata))


@dataclass
class _Archived:
    """What the archive holds, by record identity, and the dedupe keys it holds."""

    position: dict[str, int] = field(default_factory=dict)
    content: dict[str, tuple[object, ...]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    keys: set[str] = field(default_factory=set)

    def add(self, archive: ArchiveFormat, number: int, record: Any) -> None:
        identity = archive.identity(record)
        self.counts[identity] += 1
        if identity not in self.position:
            self.position[identity] = number
            self.content[identity] = archive.content(record)
        if record.dedupe_key is not None:
            self.keys.add(record.dedupe_key.lower())


def _check_partition(
    report: KafkaCheck,
    bucket: storage.Bucket,
    consumer: KafkaConsumer,
    wanted: OffsetRange,
    archive: ArchiveFormat,
    archived: _Archived,
    dead_letter_template: str,
    max_message_bytes: int,
    strict_order: bool,
) -> None:
    """Account for each offset of one partition.

    With ``strict_order`` (the object holds only this partition) a record archived before one of
    an earlier offset is out of order; in a shared object it may be an earlier record of another
    partition, so it counts as a duplicate.
    """
    read = read_range(consumer, wanted, max_bytes=2**62)
    report.offsets += wanted.size
    report.deleted += read.skipped
    report.without_record += wanted.size - read.skipped - len(read.messages)
    letters_name = object_name(
        dead_letter_template, wanted.topic, wanted.partition, 0, "PROTOAGG_GCS_DEAD_LETTERS"
    )
    lettered = set()
    # Dead letters roll over like the archive: the object and its numbered members.
    for letters_blob in sequence_blobs(bucket, letters_name):
        with _read_through(letters_blob) as lines:
            lettered |= {d.message.offset for d in iter_dead_letters(lines)}
    records, rejections = archive.parse(read.messages, max_message_bytes)
    for rejection in rejections:
        where = f"{wanted.topic}[{wanted.partition}]@{rejection.message.offset}"
        if rejection.reason == TOMBSTONE:
            report.tombstones += 1
        elif rejection.message.offset in lettered:
            report.dead_letters += 1
        else:
            report.missing_dead_letters.append(where)
    seen: set[str] = set()
    last_position = -1
    for record in records:
        identity = archive.identity(record)
        key = record.dedupe_key.lower() if record.dedupe_key is not None else None
        where = f"{identity} ({wanted.topic}[{wanted.partition}]@{record.offset})"
        position = archived.position.get(identity)
        if key is not None and key in seen:
            report.duplicates += 1
        elif position is None:
            if key is not None and key in archived.keys:
                # Its key was archived from another partition or an earlier offset range.
                report.duplicates += 1
            else:
                report.missing.append(where)
        elif position < last_position:
            if strict_order:
                report.out_of_order.append(where)
            else:
                report.duplicates += 1
        else:
            last_position = position
            report.archived += 1
            # A logId archived from another partition of a shared object may carry other
            # content; an identity that names a place can only be this record.
            comparable = strict_order or archive.identity_names_place
            if comparable and archived.content[identity] != archive.content(record):
                report.different.append(where)
        if key is not None:
            seen.add(key)
