"""Reading archives back: open ``gs://`` or local files as streams, print them, verify them."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from protoagg_dagster.archive.ledger import archived_partitions, ledger_connection
from protoagg_dagster.archive.store import SequenceStream, open_sequence, sequence_blobs
from protoagg_dagster.core import settings
from protoagg_dagster.core.archive_object import LEGACY_FORMAT, archive_format
from protoagg_dagster.core.compression import sniffed
from protoagg_dagster.core.dead_letters import iter_dead_letters
from protoagg_dagster.core.errors import ArchiveFormatError, BackendError, ConfigError
from protoagg_dagster.core.formats import (
    ArchiveFormat,
    FormatOptions,
    ShowBytes,
    always_base64,
    text_or_base64,
)
from protoagg_dagster.reading.verification import KafkaCheck, check_against_kafka
from protoagg_dagster.resources.gcs import GCSResource
from protoagg_dagster.resources.kafka import KafkaResource
from protoagg_dagster.resources.postgres import PostgresResource


def open_archive(url: str) -> BinaryIO:
    """The uncompressed stream of ``gs://BUCKET/OBJECT`` (chunked, bounded memory) or a file."""
    stream, _ = open_archive_with_format(url)
    return stream


def open_archive_with_format(url: str, given: str | None = None) -> tuple[BinaryIO, ArchiveFormat]:
    """The uncompressed stream and its format: ``given``, else the object's metadata.

    ``gs://BUCKET/log.pb`` reads the object's whole numbered sequence (``log.pb``,
    ``log.0001.pb``, ...: see PROTOAGG_MAX_OBJECT_BYTES) as one stream, each object through the
    compression its metadata records; a member named explicitly is read alone. A local file's
    format is log, unless given; its compression is what its magic bytes say.
    """
    if not url.startswith("gs://"):
        local, _ = sniffed(Path(url).open("rb"))  # noqa: SIM115 (the caller closes it)
        return local, settings_options().build(given or LEGACY_FORMAT)
    bucket_name, _, object_name = url[len("gs://") :].partition("/")
    if not bucket_name or not object_name:
        raise ConfigError(f"{url!r} is not of the form gs://BUCKET/OBJECT")
    gcs = GCSResource(bucket=bucket_name, emulator_host=settings.STORAGE_EMULATOR_HOST.read())
    stream, blobs = open_sequence(gcs.get_client().bucket(bucket_name), object_name)
    return stream, settings_options().build(given or archive_format(blobs[0].metadata))


def open_object_with_format(url: str) -> tuple[BinaryIO, ArchiveFormat]:
    """One object of ``gs://BUCKET/OBJECT`` alone, never the rest of its sequence, and its format.

    Restore keeps its progress per object: counted over a whole sequence, frames an older member
    gains after a newer one exists (a rollover while partitions still append) would shift
    every later count.
    """
    bucket_name, _, object_name = url[len("gs://") :].partition("/")
    gcs = GCSResource(bucket=bucket_name, emulator_host=settings.STORAGE_EMULATOR_HOST.read())
    blob = gcs.get_client().bucket(bucket_name).get_blob(object_name)
    if blob is None:
        raise BackendError(f"{url} does not exist")
    stream = io.BufferedReader(SequenceStream([blob]), buffer_size=1024 * 1024)
    return stream, settings_options().build(archive_format(blob.metadata))


def settings_options() -> FormatOptions:
    """The format options of the environment's settings (PROTOAGG_DEDUPE_KEY, ...)."""
    return FormatOptions(
        settings.DEDUPE_KEY.read(),
        settings.LOG_ID_FIELD.read(),
        settings.LOG_TIMESTAMP_FIELD.read(),
        settings.LOG_MESSAGE_FIELD.read(),
        settings.MAX_FRAME_BYTES.read_int(),
    )


def cat_archive(
    url: str, out: TextIO, format_name: str | None = None, show_bytes: ShowBytes = text_or_base64
) -> int:
    """Write each record as a JSON line; return how many.

    Log: logId, timestamp, message. Record: topic, partition, offset, timestamp, timestamp_type,
    key, value, headers, bytes shown by ``show_bytes`` (text when UTF-8, else ``{"base64": ..}``).
    """
    count = 0
    stream, archive = open_archive_with_format(url, format_name)
    with stream:
        for record in archive.decode(stream):
            out.write(json.dumps(archive.as_json(record, show_bytes), ensure_ascii=False) + "\n")
            count += 1
    return count


BYTES_STYLES: dict[str, ShowBytes] = {"text": text_or_base64, "base64": always_base64}


def list_dead_letters(url: str, out: TextIO, with_values: bool) -> int:
    """Print one readable line per dead letter (and its value, if asked); return how many."""
    count = 0
    reasons: Counter[str] = Counter()
    with open_archive(url) as stream:
        for letter in iter_dead_letters(stream):
            message = letter.message
            out.write(
                f"{message.topic}[{message.partition}]@{message.offset}  "
                f"{letter.reason}: {letter.detail}\n"
            )
            if with_values:
                shown = "null" if message.value is None else repr(message.value)[2:-1]
                out.write(f"    value: {shown}\n")
            count += 1
            reasons[letter.reason] += 1
    summary = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
    out.write(f"{count} dead letters" + (f" ({summary})" if summary else "") + "\n")
    return count


@dataclass
class VerifyReport:
    url: str
    records: int = 0
    bytes_read: int = 0
    duplicates: Counter[str] = field(default_factory=Counter)
    out_of_order: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.duplicates and not self.out_of_order

    def summary(self) -> str:
        lines = [f"{self.url}: {self.records} records"]
        if self.duplicates:
            shown = ", ".join(f"{k} x{v + 1}" for k, v in self.duplicates.most_common(10))
            lines.append(f"DUPLICATE records: {len(self.duplicates)} ({shown})")
        if self.out_of_order:
            shown = ", ".join(self.out_of_order[:10])
            lines.append(f"OUT OF OFFSET ORDER: {len(self.out_of_order)} ({shown})")
        if self.error:
            lines.append(f"FORMAT ERROR: {self.error}")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def verify_archive(url: str, format_name: str | None = None) -> VerifyReport:
    """Check framing end to end; report records that appear more than once.

    Where records carry their offsets (record format), also offsets out of order per partition.
    """
    report = VerifyReport(url)
    seen: set[str] = set()
    last_offset: dict[tuple[str, int], int] = {}
    stream, archive = open_archive_with_format(url, format_name)
    with stream:
        try:
            for record in archive.decode(stream):
                report.records += 1
                key = archive.identity(record)
                if key in seen:
                    report.duplicates[key] += 1
                else:
                    seen.add(key)
                if archive.identity_names_place:
                    where = (record.topic, record.partition)
                    if record.offset <= last_offset.get(where, -1):
                        report.out_of_order.append(key)
                    last_offset[where] = max(record.offset, last_offset.get(where, -1))
        except ArchiveFormatError as exc:
            report.error = str(exc)
    return report


def _ledger_partitions(url: str, members: list[str]) -> dict[str, int]:
    """What the ledger says the object holds; a ConfigError saying what is needed otherwise.

    Only the ledger knows which partitions (and up to which offset) an object holds: checked
    against a database that did not archive it, the check would find nothing to account for
    and report success.
    """
    given = settings.POSTGRES_DSN.env in os.environ
    where = "PROTOAGG_POSTGRES_DSN" if given else "PROTOAGG_POSTGRES_DSN (unset: the local default)"
    need = (
        f"--against-kafka reads which partitions {url} holds from the archiver's ledger: set "
        "PROTOAGG_POSTGRES_DSN to the database of the deployment that archived it"
    )
    try:
        with ledger_connection(PostgresResource(dsn=settings.POSTGRES_DSN.read())) as conn:
            partitions = archived_partitions(conn, members)
    except BackendError as exc:
        raise ConfigError(f"{need} ({where} cannot be reached: {exc})") from exc
    if not partitions:
        raise ConfigError(f"{need} (the database of {where} records no batch of it)")
    return partitions


def check_url_against_kafka(url: str) -> KafkaCheck:
    """``check_against_kafka`` for ``gs://BUCKET/OBJECT`` with the environment's settings."""
    if not url.startswith("gs://"):
        raise ConfigError(
            "--against-kafka needs a gs:// URL (the ledger says which partitions it holds)"
        )
    bucket_name, _, name = url[len("gs://") :].partition("/")
    gcs = GCSResource(
        bucket=bucket_name,
        emulator_host=settings.STORAGE_EMULATOR_HOST.read(),
        dead_letter_template=settings.object_template(
            settings.GCS_DEAD_LETTERS, settings.read_codec().suffix
        ),
    )
    kafka = KafkaResource(bootstrap_servers=settings.KAFKA_BOOTSTRAP.read())
    members = [blob.name for blob in sequence_blobs(gcs.get_bucket(), name)]
    partitions = _ledger_partitions(url, members)
    options = settings_options()
    consumer = kafka.get_consumer()
    try:
        return check_against_kafka(
            gcs.get_bucket(),
            name,
            gcs.dead_letter_template,
            consumer,
            settings.MAX_MESSAGE_BYTES.read_int(),
            partitions,
            options,
        )
    finally:
        consumer.close()
