"""The four steps of an archive run: consume, dedupe, encode, append.

Each op passes an immutable value to the next in memory (the job uses the in-process executor);
the batch limits bound how large these values get.
"""

import contextlib
import functools
import gc
import inspect
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

import dagster as dg
from dagster._core.storage.tags import RETRY_ON_ASSET_OR_OP_FAILURE_TAG
from pydantic import Field

from protoagg_dagster.archive.assets import ARCHIVE_ASSET, topic_asset_key
from protoagg_dagster.archive.checks import Written, evaluate_batch
from protoagg_dagster.archive.ledger import (
    AppendedBatch,
    AppendLedger,
    Claim,
    archived_position,
    claim_batch,
    dead_letter_member,
    finish_batch,
    gap_before,
    ledger_connection,
)
from protoagg_dagster.archive.partition_lease import PartitionLease
from protoagg_dagster.archive.run_tags import is_follow_up
from protoagg_dagster.archive.store import AppendResult, append_batch
from protoagg_dagster.core.archive_object import Piece, PieceRole, object_name
from protoagg_dagster.core.batch import BatchBuilder, FramedBatch
from protoagg_dagster.core.compression import NONE
from protoagg_dagster.core.dead_letters import encode_envelopes
from protoagg_dagster.core.dedupe_scope import Scope, described
from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.formats import ArchiveFormat, rule_for
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.records import TOMBSTONE, Rejection
from protoagg_dagster.kafka.reader import RangeRead, RangeReader
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.resources.settings import ArchiverSettings

P = ParamSpec("P")
R = TypeVar("R")
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL)


def fail_fast(step: Callable[P, R]) -> Callable[P, R]:
    """Turn configuration errors into failures Dagster does not retry.

    Transient errors (a broker or database restarting, GCS 503) are retried by the op's
    RetryPolicy with backoff; retrying a wrong password, a missing ACL or a bucket name only
    delays the message, so neither the op's retry policy nor run retries repeat those.
    """
    if inspect.isgeneratorfunction(step):

        @functools.wraps(step)
        def generator(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                yield from cast(Iterator[Any], step(*args, **kwargs))
            except ConfigError as exc:
                raise _final_failure(exc) from exc

        return cast(Callable[P, R], generator)

    @functools.wraps(step)
    def plain(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return step(*args, **kwargs)
        except ConfigError as exc:
            raise _final_failure(exc) from exc

    return plain


def _final_failure(exc: ConfigError) -> dg.Failure:
    """A failure retried neither by the op's retry policy nor by run retries."""
    # allow_retries=False covers the retry policy. Run retries re-run a run that failed in an op
    # unless the run's tag says not to; the daemon reads the tags when the run fails.
    try:
        context = dg.OpExecutionContext.get()
    except dg.DagsterInvariantViolationError:  # the op called directly, outside any run
        pass
    else:
        context.instance.add_run_tags(context.run_id, {RETRY_ON_ASSET_OR_OP_FAILURE_TAG: "false"})
    return dg.Failure(description=str(exc), allow_retries=False)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector around a hot loop.

    The loops build hundreds of thousands of small objects with no reference cycles; the
    collections their allocations trigger would scan them all again and again (measured: about
    1 s of a 100k-message run), and would find nothing to free.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            # Moving what the loop built out of the collector's reach keeps re-enabling from
            # triggering one big scan of it; objects are still freed by reference counting.
            gc.freeze()
            gc.enable()


class ArchiveRangeConfig(dg.Config):
    """The offsets one run archives: ``[start_offset, end_offset)`` of one partition."""

    topic: str = Field(description="Kafka topic.")
    partition: int = Field(description="Partition number.")
    start_offset: int = Field(description="First offset to archive.")
    end_offset: int = Field(description="Offset after the last one to archive.")


@dataclass(frozen=True)
class Consumed:
    """The range read, parsed as it arrived (``read.messages`` is empty: ``records`` holds it)."""

    read: RangeRead
    format: ArchiveFormat
    records: FramedBatch
    seconds: dict[str, float] = field(default_factory=dict)
    # The whole archive's asset and the asset of the topic's PROTOAGG_TOPICS entry.
    assets: tuple[dg.AssetKey, ...] = (ARCHIVE_ASSET,)
    # A follow-up run whose range does not start at the archived position: it does nothing.
    superseded: bool = False


@dataclass(frozen=True)
class Claimed:
    read: RangeRead
    format: ArchiveFormat
    records: FramedBatch
    claim: Claim
    dead_letters: tuple[Rejection, ...]
    tombstones: int
    seconds: dict[str, float]
    assets: tuple[dg.AssetKey, ...] = (ARCHIVE_ASSET,)
    superseded: bool = False


@dataclass(frozen=True)
class Encoded:
    """The batch's piece: its frames, compressed into one member/frame with ``compression``."""

    claimed: Claimed
    data: bytes
    seconds: dict[str, float]
    compression: str = NONE


@dg.op(retry_policy=TRANSIENT_RETRY)
@fail_fast
def consume(
    context: dg.OpExecutionContext,
    config: ArchiveRangeConfig,
    kafka: KafkaResource,
    postgres: PostgresResource,
    archiver: ArchiverSettings,
) -> Consumed:
    """Read exactly the configured offset range (assign + seek; no consumer group), and parse it.

    Each chunk the reader delivers is parsed straight to its frames and dropped, so the output
    is the compact ``FramedBatch``. A range the ledger already has archived is not read at all:
    dedupe will find it done.
    """
    wanted = OffsetRange(config.topic, config.partition, config.start_offset, config.end_offset)
    formats = archiver.topic_formats(kafka.topics)
    archive_format = formats.format_for(wanted.topic)
    rule = rule_for(formats.rules, wanted.topic)
    assets = (ARCHIVE_ASSET,) + ((topic_asset_key(rule),) if rule is not None else ())
    builder = archive_format.batch_builder(
        wanted.topic, wanted.partition, archiver.max_message_bytes
    )
    started = time.perf_counter()
    with ledger_connection(postgres) as conn:
        archived_to = archived_position(conn, wanted.topic, wanted.partition)
    # The run before a follow-up stopped short (the byte limit) or failed: the sensor plans the
    # next range from the archived position, and this one would leave a gap.
    superseded = is_follow_up(context.run) and (archived_to is None or archived_to < wanted.start)
    if superseded or (archived_to is not None and archived_to >= wanted.end):
        context.log.info(
            f"consume: {wanted} follows a run that did not archive up to {wanted.start} "
            f"(archived up to {archived_to}); nothing to do, the sensor launches the range "
            "after the archived position"
            if superseded
            else f"consume: {wanted} is already archived (up to {archived_to}); not read"
        )
        return Consumed(
            RangeRead(wanted, [], 0, 0),
            archive_format,
            builder.finish(),
            {"consume": time.perf_counter() - started},
            assets,
            superseded=superseded,
        )
    reader = kafka.get_reader()
    try:
        with collector_paused():
            read = read_into(builder, reader, wanted, archiver.max_batch_bytes)
            records = builder.finish()
    finally:
        reader.close()
    elapsed = time.perf_counter() - started
    parsed = records.parse_seconds
    context.log.info(
        f"consume: {records.messages} messages, {read.value_bytes} bytes from {read.batch} "
        f"in {elapsed:.2f} s ({parsed:.2f} s of it parsing) with {kafka.client}"
        + (f"; {read.skipped} offsets already deleted by retention" if read.skipped else "")
        + (
            f"; {read.batch.size - read.skipped - records.messages} offsets hold no record "
            "(transaction markers, aborted or compacted records)"
            if read.batch.size - read.skipped > records.messages
            else ""
        )
        + (
            f"; stopped at the byte limit (asked up to {wanted.end})"
            if read.batch != wanted
            else ""
        )
    )
    return Consumed(read, archive_format, records, {"consume": elapsed}, assets)


def read_into(
    builder: BatchBuilder, reader: RangeReader, wanted: OffsetRange, max_bytes: int
) -> RangeRead:
    """Read ``wanted`` chunk by chunk into ``builder``: no chunk outlives its parse."""
    chunks = reader.read_chunks(wanted, max_bytes)
    for chunk in chunks:
        builder.add(chunk)
    end = chunks.end
    return RangeRead(end.batch, [], end.value_bytes, end.skipped)


@dg.op(retry_policy=TRANSIENT_RETRY)
@fail_fast
def dedupe(
    context: dg.OpExecutionContext,
    consumed: Consumed,
    postgres: PostgresResource,
    gcs: GCSResource,
    archiver: ArchiverSettings,
    lease: PartitionLease,
) -> Claimed:
    """Claim the range and each new dedupe key in PostgreSQL; drop keys seen before."""
    lease.confirm()
    started = time.perf_counter()
    read = consumed.read
    records = consumed.records
    if consumed.superseded:
        nothing = Claim(None, read.batch, "", (), 0, adopted=False)
        return Claimed(
            read, consumed.format, records, nothing, (), 0, consumed.seconds, superseded=True
        )
    destination = object_name(
        gcs.object_template, read.batch.topic, read.batch.partition, records.first_timestamp_ms
    )
    with ledger_connection(postgres) as conn, collector_paused():
        claim = claim_batch(
            conn,
            read.batch,
            records.rows(),
            destination,
            context.run_id,
            # What the kept frames can add to the object: at most all the frames.
            len(records.frames),
            gcs.max_object_bytes,
            archiver.scope(),
        )
    # Only what the claimed range covers (an adopted or trimmed claim may be narrower).
    inside = [
        r for r in records.rejections if claim.batch.start <= r.message.offset < claim.batch.end
    ]
    dead_letters = tuple(r for r in inside if r.reason != TOMBSTONE)
    tombstones = len(inside) - len(dead_letters)
    elapsed = time.perf_counter() - started
    if claim.nothing_to_do:
        context.log.info(f"dedupe: {read.batch} is already archived; nothing to do")
    else:
        context.log.info(
            f"dedupe: {len(claim.kept)} new, {claim.duplicates} duplicates, "
            f"{len(dead_letters)} dead letters, {tombstones} tombstones of "
            f"{records.messages} in {claim.batch}"
            + (" (finishing an earlier claim of this range)" if claim.adopted else "")
            + f" in {elapsed:.2f} s"
        )
    if dead_letters:
        reasons = Counter(r.reason for r in dead_letters)
        context.log.warning(f"dedupe: dead letters by reason: {dict(reasons)}")
    return Claimed(
        read,
        consumed.format,
        records,
        claim,
        dead_letters,
        tombstones,
        {**consumed.seconds, "dedupe": elapsed},
        consumed.assets,
    )


@dg.op
@fail_fast
def encode(context: dg.OpExecutionContext, claimed: Claimed, gcs: GCSResource) -> Encoded:
    """Join the kept records' frames (``uint32 LE length | message``, made when parsing).

    The frames are then compressed (PROTOAGG_COMPRESSION) into one gzip member or zstd frame.
    """
    started = time.perf_counter()
    codec = gcs.codec()
    with collector_paused():
        framed = claimed.records.frames_of(claimed.claim.kept)
    data = codec.compress(framed)
    elapsed = time.perf_counter() - started
    context.log.info(
        f"encode: {len(claimed.claim.kept)} records, {len(framed)} bytes"
        + (f", {len(data)} with {codec.name}" if codec.name != NONE else "")
        + f" in {elapsed:.3f} s"
    )
    return Encoded(claimed, data, {**claimed.seconds, "encode": elapsed}, codec.name)


@dg.op(retry_policy=TRANSIENT_RETRY)
@fail_fast
def append(
    context: dg.OpExecutionContext,
    encoded: Encoded,
    gcs: GCSResource,
    postgres: PostgresResource,
    archiver: ArchiverSettings,
    lease: PartitionLease,
) -> Iterator[dg.AssetMaterialization | dg.AssetCheckEvaluation | dg.Output[int]]:
    """Append dead letters, then records (upload, fenced compose, delete); confirm the claim."""
    lease.confirm()
    claimed = encoded.claimed
    claim = claimed.claim
    if claimed.superseded:
        yield dg.Output(0)
        return
    started = time.perf_counter()
    archived: AppendResult | None = None
    checks: list[dg.AssetCheckEvaluation] = []
    if claim.batch_id is not None:
        bucket = gcs.writable_bucket()
        with ledger_connection(postgres) as conn:
            ledger = AppendLedger(conn, gcs.bucket)

            def append_once(
                name: str, role: PieceRole, data: bytes, format_name: str | None
            ) -> AppendResult:
                assert claim.batch_id is not None
                piece = Piece(claim.batch_id, role, len(data))
                result = append_batch(
                    bucket,
                    name,
                    claim.batch,
                    piece,
                    data,
                    ledger,
                    format_name=format_name,
                    compression=encoded.compression,
                )
                if not result.appended:
                    context.log.info(
                        f"append: gs://{gcs.bucket}/{name} already holds {claim.batch}"
                    )
                return result

            # Dead letters first: once the batch is confirmed nothing of it may be missing.
            if claimed.dead_letters:
                letters = gcs.codec().compress(encode_envelopes(claimed.dead_letters))
                base = dead_letter_object(gcs, claim)
                member = dead_letter_member(
                    conn, claim.batch_id, base, len(letters), gcs.max_object_bytes
                )
                append_once(member, "dead_letters", letters, None)
            # Appended even when empty (every record a duplicate), so the ledger records the
            # batch against its object like any other.
            archived = append_once(claim.object_name, "records", encoded.data, claimed.format.name)
            # append_batch recorded the piece inside the object's lock; finishing again is a
            # no-op that keeps "the claim is confirmed" one visible step of the op.
            if archived.appended:
                finish_batch(
                    conn,
                    claim.batch_id,
                    archived.generation,
                    len(encoded.data),
                    archived.object_size,
                )
                checks = evaluate_batch(
                    bucket,
                    AppendedBatch(
                        claim.batch_id,
                        claim.batch,
                        claim.object_name,
                        len(encoded.data),
                        archived.object_size,
                    ),
                    gaps=gap_before(conn, claim.batch),
                    archive=claimed.format,
                    compression=encoded.compression,
                    written=Written(encoded.data, claim.kept),
                    asset_keys=claimed.assets,
                )
            else:
                finish_batch(conn, claim.batch_id, archived.generation)
    seconds = {**encoded.seconds, "append": time.perf_counter() - started}
    appended = len(claim.kept) if archived is not None and archived.appended else 0
    context.log.info(
        f"append: {appended} records, {len(claimed.dead_letters)} dead letters to "
        f"gs://{gcs.bucket}/{claim.object_name} in {seconds['append']:.2f} s"
    )
    metadata = _batch_metadata(gcs.bucket, archiver.scope(), encoded, archived, appended, seconds)
    for asset_key in claimed.assets:
        yield dg.AssetMaterialization(
            asset_key=asset_key, description=str(claim.batch), metadata=metadata
        )
    yield from checks
    read_count = claimed.records.messages
    ratio = len(claimed.dead_letters) / read_count if read_count else 0.0
    if ratio > archiver.max_dead_letter_ratio:
        # The batch is archived and its dead letters kept; failing makes a misconfigured topic
        # impossible to miss instead of quietly filling the dead-letter object.
        raise dg.Failure(
            description=f"{len(claimed.dead_letters)} of {read_count} messages in {claim.batch} "
            f"were dead letters ({ratio:.0%} > PROTOAGG_MAX_DEAD_LETTER_RATIO "
            f"{archiver.max_dead_letter_ratio:.0%}); they are kept in "
            f"gs://{gcs.bucket}/{dead_letter_object(gcs, claim)}. Is the topic carrying "
            "JSON log messages? Archive it whole with the record format (PROTOAGG_TOPICS "
            f"{claim.batch.topic}:record).",
            allow_retries=False,
        )
    yield dg.Output(appended)


def dead_letter_object(gcs: GCSResource, claim: Claim) -> str:
    return object_name(
        gcs.dead_letter_template,
        claim.batch.topic,
        claim.batch.partition,
        0,
        setting="PROTOAGG_GCS_DEAD_LETTERS",
    )


def _batch_metadata(
    bucket: str,
    scope: Scope,
    encoded: Encoded,
    archived: AppendResult | None,
    appended: int,
    seconds: dict[str, float],
) -> dict[str, Any]:
    claimed = encoded.claimed
    claim = claimed.claim
    read_count = claimed.records.messages
    total = sum(seconds.values())
    reasons = Counter(r.reason for r in claimed.dead_letters)
    return {
        "topic": claim.batch.topic,
        "partition": claim.batch.partition,
        "format": claimed.format.name,
        "compression": encoded.compression,
        "start_offset": claim.batch.start,
        "end_offset": claim.batch.end,
        "object": f"gs://{bucket}/{claim.object_name}",
        "records_read": read_count,
        "duplicates_dropped": claim.duplicates,
        "duplicate_means": described(scope, claim.batch.topic),
        "dead_letters": len(claimed.dead_letters),
        "dead_letters_by_reason": dg.JsonMetadataValue(dict(reasons)),
        "tombstones": claimed.tombstones,
        "records_appended": appended,
        "bytes_appended": len(encoded.data) if appended else 0,
        "object_generation": archived.generation or -1 if archived else -1,
        "object_size": archived.object_size or -1 if archived else -1,
        "already_archived": claim.nothing_to_do or (archived is not None and not archived.appended),
        **{f"seconds_{step}": dg.FloatMetadataValue(round(s, 4)) for step, s in seconds.items()},
        # Consume parses each chunk as it arrives: this much of seconds_consume.
        "seconds_consume_parsing": dg.FloatMetadataValue(round(claimed.records.parse_seconds, 4)),
        "messages_per_second": dg.FloatMetadataValue(
            round(read_count / total, 1) if total > 0 else 0.0
        ),
    }
