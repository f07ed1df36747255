"""Asset checks on the archive: framing of the appended bytes, unique records, no offset gaps.

Three verdicts per appended range. A run's append step evaluates them over its own ranges and
records one check, ``appended_ranges_verified`` on the whole archive's asset, that fails when any
verdict fails and says which. Each topic entry's asset has the three as checks of their own,
executed from the UI over the latest appended batch of each of its partitions (so does the run
check, on the archive's asset, over every partition's).
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
from google.cloud import storage

from protoagg_dagster.archive.assets import ARCHIVE_ASSET, topic_asset_key
from protoagg_dagster.archive.ledger import (
    AppendedBatch,
    latest_appended,
    ledger_connection,
    offset_gaps,
)
from protoagg_dagster.archive.run_parts import Appended
from protoagg_dagster.core.archive_object import archive_compression, archive_format
from protoagg_dagster.core.compression import NONE, decompressed
from protoagg_dagster.core.errors import ArchiveFormatError
from protoagg_dagster.core.formats import ArchiveFormat, FormatOptions, TopicRule, rule_for
from protoagg_dagster.resources import GCSResource, PostgresResource

FRAMING = "framing_intact"
UNIQUE_IDS = "no_duplicate_ids_in_batch"
NO_GAPS = "no_offset_gaps"
VERDICTS = (FRAMING, UNIQUE_IDS, NO_GAPS)
# One evaluation a run, not one per verdict: each evaluation is an event and a row of
# asset_check_executions, about 4 KB kept for every run (docs/benchmarks.md).
RUN_CHECK = "appended_ranges_verified"
READ_BACK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Written:
    """What the append step wrote: the piece's bytes and the records whose frames they are.

    ``stored``: whether the bytes read back equal ``data``, and how many were read, when the
    read-back was already done (``stored_all``); None to read it back here.
    """

    data: bytes
    records: Sequence[Any]
    stored: tuple[bool, int] | None = None


def read_back(bucket: storage.Bucket, batch: AppendedBatch) -> bytes:
    """The batch's bytes as stored: ``[object_size - appended_bytes, object_size)``.

    With compression that range is the batch's one member or frame, which decompresses alone.
    """
    if not batch.appended_bytes or batch.object_size is None:
        return b""
    start = batch.object_size - batch.appended_bytes
    return bytes(
        bucket.blob(batch.object_name).download_as_bytes(start=start, end=batch.object_size - 1)
    )


def stored_equals(bucket: storage.Bucket, batch: AppendedBatch, data: bytes) -> tuple[bool, int]:
    """Whether the batch's stored bytes equal ``data``, and how many were read back.

    Read in ranges of READ_BACK_BYTES, so a large batch is never held twice.
    """
    if not batch.appended_bytes or batch.object_size is None:
        return data == b"", 0
    blob = bucket.blob(batch.object_name)
    start = batch.object_size - batch.appended_bytes
    expected = memoryview(data)
    read = 0
    while start + read < batch.object_size:
        end = min(start + read + READ_BACK_BYTES, batch.object_size)
        part = blob.download_as_bytes(start=start + read, end=end - 1)
        if len(part) != end - start - read or expected[read : read + len(part)] != part:
            return False, read + len(part)
        read += len(part)
    return read == len(data), read


def stored_all(
    bucket: storage.Bucket, written: Sequence[tuple[AppendedBatch, bytes]]
) -> dict[int, tuple[bool, int]]:
    """``stored_equals`` of many batches, by batch id, with one ranged read per window.

    A run's pieces bound for one object lie side by side in it (one upload, one compose), so
    pieces are read back together in windows of up to READ_BACK_BYTES: a run of a thousand
    small ranges costs a few reads, not a thousand. A larger piece is read back alone.
    """
    found: dict[int, tuple[bool, int]] = {}
    by_object: dict[str, list[tuple[int, AppendedBatch, bytes]]] = {}
    for batch, data in written:
        if not batch.appended_bytes or batch.object_size is None:
            found[batch.batch_id] = (data == b"", 0)
        elif batch.appended_bytes > READ_BACK_BYTES:
            found[batch.batch_id] = stored_equals(bucket, batch, data)
        else:
            start = batch.object_size - batch.appended_bytes
            by_object.setdefault(batch.object_name, []).append((start, batch, data))
    for name, pieces in by_object.items():
        pieces.sort(key=lambda piece: piece[0])
        window: list[tuple[int, AppendedBatch, bytes]] = []
        for piece in [*pieces, None]:
            if window and (piece is None or _end(piece) - window[0][0] > READ_BACK_BYTES):
                first = window[0][0]
                stored = bucket.blob(name).download_as_bytes(
                    start=first, end=max(_end(p) for p in window) - 1
                )
                for start, batch, data in window:
                    part = stored[start - first : start - first + batch.appended_bytes]
                    found[batch.batch_id] = (part == data and len(data) == len(part), len(part))
                window = []
            if piece is not None:
                window.append(piece)
    return found


def _end(piece: tuple[int, AppendedBatch, bytes]) -> int:
    return piece[0] + piece[1].appended_bytes


def evaluate_batch(
    bucket: storage.Bucket,
    batch: AppendedBatch,
    gaps: list[tuple[int, int]],
    archive: ArchiveFormat,
    written: Written | None = None,
    asset_keys: Sequence[dg.AssetKey] = (ARCHIVE_ASSET,),
    compression: str = NONE,
) -> list[dg.AssetCheckEvaluation]:
    """The three checks for one appended batch, per asset key.

    The batch's frames are in format ``archive``, its piece compressed with ``compression``.

    ``asset_keys``: the whole archive, and the asset of the batch's topic entry.

    With ``written`` (the op's own batch) the bytes read back are compared with the bytes
    written, which the framing tests pin, instead of decoding every frame again.
    """
    where = {"batch": str(batch.batch), "object": batch.object_name}
    if written is not None:
        records = written.records
        # Before the read-back, so the identities' hashes and the bytes are never held together.
        repeated = repeated_ids(lambda: map(archive.identity, records), len(records))
        framing_ok, read = (
            written.stored
            if written.stored is not None
            else stored_equals(bucket, batch, written.data)
        )
        framing_detail = f"{read} bytes read back " + (
            "equal the bytes written" if framing_ok else "DIFFER from the bytes written"
        )
    else:
        stored = read_back(bucket, batch)
        try:
            frames = decompressed(io.BytesIO(stored), compression)
            ids = [archive.identity(r) for r in archive.decode(frames)]
            framing_ok, framing_detail = True, f"{len(ids)} frames decode"
        except ArchiveFormatError as exc:
            ids, framing_ok, framing_detail = [], False, str(exc)
        repeated = repeated_ids(lambda: ids, len(ids))
    verdicts: tuple[tuple[str, bool, dict[str, Any]], ...] = (
        (FRAMING, framing_ok, {**where, "detail": framing_detail}),
        (
            UNIQUE_IDS,
            not repeated,
            {**where, "repeated_ids": len(repeated), "examples": ", ".join(repeated[:5])},
        ),
        (
            NO_GAPS,
            not gaps,
            {**where, "gaps": ", ".join(f"{a}..{b}" for a, b in gaps[:10]) or "none"},
        ),
    )
    return [
        dg.AssetCheckEvaluation(asset_key=key, check_name=name, passed=passed, metadata=metadata)
        for key in asset_keys
        for name, passed, metadata in verdicts
    ]


def evaluate_run(
    bucket: storage.Bucket, appended: Sequence[Appended]
) -> list[dg.AssetCheckEvaluation]:
    """The run check over a run's fresh ranges: one evaluation, on the archive's asset.

    Each range is checked as ``evaluate_batch`` checks it (its bytes read back and compared with
    the bytes written). The evaluation counts the ranges checked per topic and the failures per
    verdict, and names the first range that failed. None when the run appended nothing new.
    """
    # An earlier attempt's piece (no records this time) was checked when it was appended.
    fresh = [done for done in appended if done.records]
    if not fresh:
        return []
    stored = stored_all(bucket, [(done.batch, done.part.data) for done in fresh])
    evaluations = []
    for done in fresh:
        part = done.part
        evaluations += evaluate_batch(
            bucket,
            done.batch,
            gaps=done.gaps,
            archive=part.claimed.consumed.format,
            compression=part.compression,
            written=Written(part.data, part.claimed.claim.kept, stored[done.batch.batch_id]),
        )
    topics = Counter(done.batch.batch.topic for done in fresh)
    return [summarized(evaluations, {"ranges_by_topic": dg.JsonMetadataValue(dict(topics))})]


def summarized(
    evaluations: Sequence[dg.AssetCheckEvaluation], metadata: dict[str, Any]
) -> dg.AssetCheckEvaluation:
    """RUN_CHECK on the archive's asset from the verdicts of ``evaluations`` (three per range)."""
    failing = [e for e in evaluations if not e.passed]
    by_verdict = Counter(e.check_name for e in failing)
    metadata = {
        **metadata,
        "ranges_checked": len(evaluations) // len(VERDICTS),
        "failed": len({(e.metadata["batch"].value) for e in failing}),
        **{f"failed_{name}": by_verdict[name] for name in VERDICTS},
    }
    if failing:
        metadata["first_failure"] = failing[0].check_name
        metadata.update({k: v.value for k, v in failing[0].metadata.items()})
    return dg.AssetCheckEvaluation(
        asset_key=ARCHIVE_ASSET,
        check_name=RUN_CHECK,
        passed=not failing,
        metadata=metadata,
        description=None
        if not failing
        else "failed: " + ", ".join(f"{name} ({n} ranges)" for name, n in by_verdict.items()),
    )


def repeated_ids(identities: Callable[[], Iterable[str]], count: int) -> list[str]:
    """The identities that occur more than once, each once, from two passes over ``count`` ones.

    The first pass sets one bit per identity's hash in a bitmap of ~32 bits per identity (a
    batch's identities as strings would cost ~90 bytes each, their hashes in a set ~60) and
    notes the bits that were set already: every repeat's, and ~3% of the rest. The second pass
    counts exactly the identities on a noted bit.
    """
    mask = (1 << max(13, (32 * count).bit_length())) - 1
    bitmap = bytearray((mask >> 3) + 1)
    noted: set[int] = set()
    for identity in identities():
        spot = hash(identity) & mask
        bit = 1 << (spot & 7)
        if bitmap[spot >> 3] & bit:
            noted.add(spot)
        else:
            bitmap[spot >> 3] |= bit
    if not noted:
        return []
    counts = Counter(i for i in identities() if hash(i) & mask in noted)
    return [identity for identity, n in counts.items() if n > 1]


def build_archive_checks(rules: Sequence[TopicRule]) -> dg.AssetChecksDefinition:
    """RUN_CHECK on the whole archive, the three verdicts on each topic entry's asset.

    Run from the UI, they re-check the latest appended batch of every partition.
    """
    topic_keys = [topic_asset_key(rule) for rule in rules]
    specs = [_run_check_spec()] + [spec for key in topic_keys for spec in _check_specs(key)]

    @dg.multi_asset_check(specs=specs)
    def archive_checks(
        gcs: GCSResource, postgres: PostgresResource
    ) -> Iterator[dg.AssetCheckResult]:
        bucket = gcs.get_bucket()
        with ledger_connection(postgres) as conn:
            batches = latest_appended(conn)
            gaps = {
                b.batch_id: offset_gaps(conn, b.batch.topic, b.batch.partition) for b in batches
            }
        evaluations = []
        for b in batches:
            rule = rule_for(rules, b.batch.topic)
            own = [ARCHIVE_ASSET] + ([topic_asset_key(rule)] if rule is not None else [])
            archive, compression = _format_of(bucket, b.object_name)
            evaluations += evaluate_batch(
                bucket, b, gaps[b.batch_id], archive, asset_keys=own, compression=compression
            )
        whole = summarized([e for e in evaluations if e.asset_key == ARCHIVE_ASSET], {})
        yield dg.AssetCheckResult(
            check_name=RUN_CHECK,
            asset_key=ARCHIVE_ASSET,
            passed=whole.passed,
            metadata=whole.metadata,
            description=whole.description,
        )
        for key in topic_keys:
            for name in VERDICTS:
                mine = [e for e in evaluations if e.check_name == name and e.asset_key == key]
                yield dg.AssetCheckResult(
                    check_name=name,
                    asset_key=key,
                    passed=all(e.passed for e in mine),
                    metadata={
                        "batches_checked": len(mine),
                        "failed": sum(not e.passed for e in mine),
                    },
                )

    return archive_checks


def _run_check_spec() -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        RUN_CHECK,
        asset=ARCHIVE_ASSET,
        description="Every range a run appended: its bytes read back equal the bytes written "
        f"({FRAMING}; run from the UI, the latest batch of each partition decodes as frames), "
        f"no record repeats in it ({UNIQUE_IDS}), it starts where its partition's archive "
        f"ended ({NO_GAPS}). Fails naming the verdicts that failed.",
    )


def _check_specs(key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            FRAMING,
            asset=key,
            description="The latest batch's bytes decode as uint32 LE length | message frames "
            "of the object's format (ProtoLog or KafkaRecord).",
        ),
        dg.AssetCheckSpec(
            UNIQUE_IDS,
            asset=key,
            description="No record repeats inside the latest batch (log: its logId; record: its "
            "topic, partition and offset).",
        ),
        dg.AssetCheckSpec(
            NO_GAPS,
            asset=key,
            description="Each partition's batches are contiguous: no offsets skipped between them.",
        ),
    ]


def _format_of(bucket: storage.Bucket, object_name: str) -> tuple[ArchiveFormat, str]:
    """The object's format and compression, by its metadata (a check needs no dedupe options)."""
    blob = bucket.get_blob(object_name)
    metadata = blob.metadata if blob is not None else None
    return FormatOptions().build(archive_format(metadata)), archive_compression(metadata)
