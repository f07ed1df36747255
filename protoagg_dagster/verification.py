"""The invariant checker: does the archive hold each logId of the topic exactly once?

For every partition the ledger records as appended to an archive object, the offsets
``[first retained, archived position)`` are read back from Kafka and each message must be
accounted for: archived once (its first occurrence), a duplicate of an id archived before, a dead
letter, or a tombstone. Ids archived twice, ids missing from the archive, partitions out of offset
order and dead letters that are missing are reported.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.cloud import storage
from kafka import KafkaConsumer

from protoagg_dagster.core.archive_object import object_name
from protoagg_dagster.core.dead_letters import iter_dead_letters
from protoagg_dagster.core.errors import ArchiveFormatError, BackendError
from protoagg_dagster.core.framing import iter_records
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.records import TOMBSTONE, RecordRejected, parse_log_value
from protoagg_dagster.kafka_reader import read_range


@dataclass
class KafkaCheck:
    """What the checker found; ``ok`` when nothing is missing, doubled or out of order."""

    offsets: int = 0
    archived: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    tombstones: int = 0
    doubled: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    missing_dead_letters: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)
    format_error: str | None = None

    @property
    def ok(self) -> bool:
        return not (
            self.doubled
            or self.missing
            or self.missing_dead_letters
            or self.out_of_order
            or self.format_error
        )

    def summary(self) -> str:
        lines = [
            f"{self.offsets} offsets = {self.archived} archived + {self.duplicates} duplicates + "
            f"{self.dead_letters} dead letters + {self.tombstones} tombstones"
        ]
        for label, items in (
            ("archived more than once", self.doubled),
            ("missing from the archive", self.missing),
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
) -> KafkaCheck:
    """Compare one archive object with the topic partitions appended to it.

    ``partitions`` maps ``topic/partition`` to the offset after its last appended batch
    (``ledger.archived_partitions``).
    """
    report = KafkaCheck()
    blob = bucket.get_blob(archive_object)
    if blob is None:
        raise BackendError(f"gs://{bucket.name}/{archive_object} does not exist")
    position_in_archive: dict[str, int] = {}
    counts: Counter[str] = Counter()
    try:
        for record in iter_records(io.BytesIO(blob.download_as_bytes())):
            key = record.log_id.lower()
            counts[key] += 1
            position_in_archive.setdefault(key, record.number)
    except ArchiveFormatError as exc:
        report.format_error = str(exc)
    report.doubled = sorted(key for key, n in counts.items() if n > 1)
    for key, end in sorted(partitions.items()):
        topic, _, partition = key.rpartition("/")
        _check_partition(
            report,
            bucket,
            consumer,
            OffsetRange(topic, int(partition), 0, end),
            position_in_archive,
            dead_letter_template,
            max_message_bytes,
            strict_order=len(partitions) == 1,
        )
    return report


def _check_partition(
    report: KafkaCheck,
    bucket: storage.Bucket,
    consumer: KafkaConsumer,
    wanted: OffsetRange,
    position_in_archive: dict[str, int],
    dead_letter_template: str,
    max_message_bytes: int,
    strict_order: bool,
) -> None:
    """Account for each message of one partition.

    With ``strict_order`` (the object holds only this partition) an id archived before an id of
    an earlier offset is out of order; in a shared object it may be an earlier message of another
    partition, so it counts as a duplicate.
    """
    read = read_range(consumer, wanted, max_bytes=2**62)
    letters_name = object_name(
        dead_letter_template, wanted.topic, wanted.partition, 0, "PROTOAGG_GCS_DEAD_LETTERS"
    )
    letters_blob = bucket.get_blob(letters_name)
    lettered = (
        {d.message.offset for d in iter_dead_letters(io.BytesIO(letters_blob.download_as_bytes()))}
        if letters_blob is not None
        else set()
    )
    seen: set[str] = set()
    last_position = -1
    for message in read.messages:
        report.offsets += 1
        try:
            record = parse_log_value(message.offset, message.value, max_message_bytes)
        except RecordRejected as exc:
            if exc.reason == TOMBSTONE:
                report.tombstones += 1
            elif message.offset in lettered:
                report.dead_letters += 1
            else:
                report.missing_dead_letters.append(
                    f"{wanted.topic}[{wanted.partition}]@{message.offset}"
                )
            continue
        key = record.log_id.lower()
        position = position_in_archive.get(key)
        if position is None:
            report.missing.append(f"{key} ({wanted.topic}[{wanted.partition}]@{message.offset})")
        elif key in seen:
            report.duplicates += 1
        elif position < last_position:
            if strict_order:
                report.out_of_order.append(
                    f"{key} ({wanted.topic}[{wanted.partition}]@{message.offset})"
                )
            else:
                report.duplicates += 1
        else:
            seen.add(key)
            last_position = position
            report.archived += 1
