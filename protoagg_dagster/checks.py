"""Asset checks on the archive: framing of the appended bytes, unique records, no offset gaps.

The append op evaluates them for its own batch; the same checks can be executed from the UI,
where they re-check the latest appended batch of every partition.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import dagster as dg
from google.cloud import storage

from protoagg_dagster.assets import ARCHIVE_ASSET
from protoagg_dagster.core.archive_object import archive_format
from protoagg_dagster.core.errors import ArchiveFormatError
from protoagg_dagster.core.formats import ArchiveFormat, FormatOptions
from protoagg_dagster.ledger import AppendedBatch, latest_appended, offset_gaps
from protoagg_dagster.resources import GCSResource, PostgresResource

FRAMING = "framing_intact"
UNIQUE_IDS = "no_duplicate_ids_in_batch"
NO_GAPS = "no_offset_gaps"


@dataclass(frozen=True)
class Written:
    """What the append op wrote: the framed bytes and the identities of their records."""

    data: bytes
    identities: Sequence[str]


def read_back(bucket: storage.Bucket, batch: AppendedBatch) -> bytes:
    """The batch's bytes as stored: ``[object_size - appended_bytes, object_size)``."""
    if not batch.appended_bytes or batch.object_size is None:
        return b""
    start = batch.object_size - batch.appended_bytes
    return bytes(
        bucket.blob(batch.object_name).download_as_bytes(start=start, end=batch.object_size - 1)
    )


def evaluate_batch(
    bucket: storage.Bucket,
    batch: AppendedBatch,
    gaps: list[tuple[int, int]],
    archive: ArchiveFormat,
    written: Written | None = None,
) -> list[dg.AssetCheckEvaluation]:
    """The three checks for one appended batch, whose frames are in format ``archive``.

    With ``written`` (the op's own batch) the bytes read back are compared with the bytes
    written, which the framing tests pin, instead of decoding every frame again.
    """
    where = {"batch": str(batch.batch), "object": batch.object_name}
    stored = read_back(bucket, batch)
    if written is not None:
        ids = list(written.identities)
        framing_ok = stored == written.data
        framing_detail = f"{len(stored)} bytes read back " + (
            "equal the bytes written" if framing_ok else "DIFFER from the bytes written"
        )
    else:
        try:
            ids = [archive.identity(r) for r in archive.decode(io.BytesIO(stored))]
            framing_ok, framing_detail = True, f"{len(ids)} frames decode"
        except ArchiveFormatError as exc:
            ids, framing_ok, framing_detail = [], False, str(exc)
    repeated = [key for key, n in Counter(ids).items() if n > 1]
    return [
        dg.AssetCheckEvaluation(
            asset_key=ARCHIVE_ASSET,
            check_name=FRAMING,
            passed=framing_ok,
            metadata={**where, "detail": framing_detail},
        ),
        dg.AssetCheckEvaluation(
            asset_key=ARCHIVE_ASSET,
            check_name=UNIQUE_IDS,
            passed=not repeated,
            metadata={**where, "repeated_ids": len(repeated), "examples": ", ".join(repeated[:5])},
        ),
        dg.AssetCheckEvaluation(
            asset_key=ARCHIVE_ASSET,
            check_name=NO_GAPS,
            passed=not gaps,
            metadata={**where, "gaps": ", ".join(f"{a}..{b}" for a, b in gaps[:10]) or "none"},
        ),
    ]


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            FRAMING,
            asset=ARCHIVE_ASSET,
            description="The latest batch's bytes decode as uint32 LE length | message frames "
            "of the object's format (ProtoLog or KafkaRecord).",
        ),
        dg.AssetCheckSpec(
            UNIQUE_IDS,
            asset=ARCHIVE_ASSET,
            description="No record repeats inside the latest batch (log: its logId; record: its "
            "topic, partition and offset).",
        ),
        dg.AssetCheckSpec(
            NO_GAPS,
            asset=ARCHIVE_ASSET,
            description="Each partition's batches are contiguous: no offsets skipped between them.",
        ),
    ],
)
def archive_checks(gcs: GCSResource, postgres: PostgresResource) -> Iterator[dg.AssetCheckResult]:
    """Re-check the latest appended batch of every partition."""
    bucket = gcs.get_bucket()
    with postgres.get_connection() as conn:
        batches = latest_appended(conn)
        gaps = {b.batch_id: offset_gaps(conn, b.batch.topic, b.batch.partition) for b in batches}
    evaluations = [
        e
        for b in batches
        for e in evaluate_batch(bucket, b, gaps[b.batch_id], _format_of(bucket, b.object_name))
    ]
    for name in (FRAMING, UNIQUE_IDS, NO_GAPS):
        mine = [e for e in evaluations if e.check_name == name]
        yield dg.AssetCheckResult(
            check_name=name,
            asset_key=ARCHIVE_ASSET,
            passed=all(e.passed for e in mine),
            metadata={"batches_checked": len(mine), "failed": sum(not e.passed for e in mine)},
        )


def _format_of(bucket: storage.Bucket, object_name: str) -> ArchiveFormat:
    """The format the object's metadata records; decoding for a check needs no dedupe options."""
    blob = bucket.get_blob(object_name)
    return FormatOptions().build(archive_format(blob.metadata if blob is not None else None))
