"""Reading archives back: open ``gs://`` or local files as streams, print them, verify them."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from google.api_core import exceptions as gexc

from protoagg_dagster.core import settings
from protoagg_dagster.core.dead_letters import iter_dead_letters
from protoagg_dagster.core.errors import ArchiveFormatError, BackendError, ConfigError
from protoagg_dagster.core.framing import iter_records
from protoagg_dagster.core.records import format_rfc3339
from protoagg_dagster.ledger import archived_partitions
from protoagg_dagster.resources.gcs import GCSResource
from protoagg_dagster.resources.kafka import KafkaResource
from protoagg_dagster.resources.postgres import PostgresResource
from protoagg_dagster.verification import KafkaCheck, check_against_kafka


def open_archive(url: str) -> BinaryIO:
    """A binary stream of ``gs://BUCKET/OBJECT`` (chunked, bounded memory) or of a local file."""
    if not url.startswith("gs://"):
        return Path(url).open("rb")
    bucket_name, _, object_name = url[len("gs://") :].partition("/")
    if not bucket_name or not object_name:
        raise ConfigError(f"{url!r} is not of the form gs://BUCKET/OBJECT")
    gcs = GCSResource(bucket=bucket_name, emulator_host=settings.STORAGE_EMULATOR_HOST.read())
    blob = gcs.get_client().bucket(bucket_name).blob(object_name)
    try:
        blob.reload()
    except gexc.NotFound:
        raise BackendError(f"{url} does not exist") from None
    stream: BinaryIO = blob.open("rb", chunk_size=8 * 1024 * 1024)
    return stream


def cat_archive(url: str, out: TextIO) -> int:
    """Write each record as a JSON line (logId, timestamp, message); return how many."""
    count = 0
    with open_archive(url) as stream:
        for record in iter_records(stream):
            out.write(
                json.dumps(
                    {
                        "logId": record.log_id,
                        "timestamp": format_rfc3339(record.seconds, record.nanos),
                        "message": record.message,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
            count += 1
    return count


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
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.duplicates

    def summary(self) -> str:
        lines = [f"{self.url}: {self.records} records"]
        if self.duplicates:
            shown = ", ".join(f"{k} x{v + 1}" for k, v in self.duplicates.most_common(10))
            lines.append(f"DUPLICATE logIds: {len(self.duplicates)} ({shown})")
        if self.error:
            lines.append(f"FORMAT ERROR: {self.error}")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def verify_archive(url: str) -> VerifyReport:
    """Check framing end to end and report logIds that appear more than once."""
    report = VerifyReport(url)
    seen: set[str] = set()
    with open_archive(url) as stream:
        try:
            for record in iter_records(stream):
                report.records += 1
                key = record.log_id.lower()
                if key in seen:
                    report.duplicates[key] += 1
                else:
                    seen.add(key)
        except ArchiveFormatError as exc:
            report.error = str(exc)
    return report


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
        dead_letter_template=settings.GCS_DEAD_LETTERS.read(),
    )
    kafka = KafkaResource(bootstrap_servers=settings.KAFKA_BOOTSTRAP.read())
    with PostgresResource(dsn=settings.POSTGRES_DSN.read()).get_connection() as conn:
        partitions = archived_partitions(conn, [name])
    consumer = kafka.get_consumer()
    try:
        return check_against_kafka(
            gcs.get_bucket(),
            name,
            gcs.dead_letter_template,
            consumer,
            settings.MAX_MESSAGE_BYTES.read_int(),
            partitions,
        )
    finally:
        consumer.close()
