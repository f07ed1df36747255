"""Asset checks on the archive: framing of the appended bytes, unique ids, no offset gaps.

The append op evaluates them for its own batch; the same checks can be executed from the UI,
where they re-check the latest appended batch of every partition.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator

import dagster as dg
from google.cloud import storage

from protoagg_dagster.assets import ARCHIVE_ASSET
from protoagg_dagster.core.errors import ArchiveFormatError
from protoagg_dagster.core.framing import iter_records
from protoagg_dagster.ledger import AppendedBatch, latest_appended, offset_gaps
from protoagg_dagster.resources import GCSResource, PostgresResource

FRAMING = "framing_intact"
UNIQUE_IDS = "no_duplicate_ids_in_batch"
NO_GAPS = "no_offset_gaps"


def read_batch_ids(bucket: storage.Bucket, batch: AppendedBatch) -> list[str]:
    """Download the batch's bytes from the object and decode them (raises on bad framing)."""
    if not batch.appended_bytes or batch.object_size is None:
        return []
    start = batch.object_size - batch.appended_bytes
    data = bucket.blob(batch.object_name).download_as_bytes(start=start, end=batch.object_size - 1)
    return [record.log_id.lower() for record in iter_records(io.BytesIO(data))]


def evaluate_batch(
    bucket: storage.Bucket,
    batch: AppendedBatch,
    expected_records: int | None,
    gaps: list[tuple[int, int]],
) -> list[dg.AssetCheckEvaluation]:
    """The three checks for one appended batch."""
    where = {"batch": str(batch.batch), "object": batch.object_name}
    try:
        ids = read_batch_ids(bucket, batch)
        framing_ok = expected_records is None or len(ids) == expected_records
        framing_detail = f"{len(ids)} frames decode" + (
            "" if framing_ok else f", expected {expected_records}"
        )
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
            description="The latest batch's bytes decode as uint32 LE length | ProtoLog frames.",
        ),
        dg.AssetCheckSpec(
            UNIQUE_IDS, asset=ARCHIVE_ASSET, description="No logId repeats inside the latest batch."
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
    evaluations = [e for b in batches for e in evaluate_batch(bucket, b, None, gaps[b.batch_id])]
    for name in (FRAMING, UNIQUE_IDS, NO_GAPS):
        mine = [e for e in evaluations if e.check_name == name]
        yield dg.AssetCheckResult(
            check_name=name,
            asset_key=ARCHIVE_ASSET,
            passed=all(e.passed for e in mine),
            metadata={"batches_checked": len(mine), "failed": sum(not e.passed for e in mine)},
        )
