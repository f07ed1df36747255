"""An archive run's one op and its four steps: consume, dedupe, encode, append, over all ranges.

Each step passes an immutable value to the next; the run's limits bound how large these values
get. One op for the whole run, not one op per step nor one mapped op per range: every Dagster
step costs about seven stored events whatever it does (a mapped step about 27), which Dagster
keeps for every run (docs/design.md).
"""

import contextlib
import functools
import gc
import inspect
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import dagster as dg
import psycopg
from dagster._core.storage.tags import RETRY_ON_ASSET_OR_OP_FAILURE_TAG
from google.cloud import storage

from protoagg_dagster.archive.assets import ARCHIVE_ASSET, topic_asset_key
from protoagg_dagster.archive.checks import evaluate_run
from protoagg_dagster.archive.leases import LeaseTaken
from protoagg_dagster.archive.ledger import (
    AppendedBatch,
    AppendLedger,
    Claim,
    archived_positions,
    claim_batch,
    dead_letter_member,
    finish_batches,
    gaps_before,
    ledger_connection,
)
from protoagg_dagster.archive.partition_lease import PartitionLease
from protoagg_dagster.archive.run_parts import (
    RANGE_ERRORS,
    Appended,
    ArchiveRunConfig,
    Claimed,
    ClaimedRun,
    Consumed,
    ConsumedRun,
    Encoded,
    EncodedRun,
    RangeFailures,
)
from protoagg_dagster.archive.run_report import run_events
from protoagg_dagster.archive.run_tags import is_follow_up
from protoagg_dagster.archive.store import PieceData, append_batch, append_pieces
from protoagg_dagster.core.archive_object import Piece, object_name
from protoagg_dagster.core.compression import NONE
from protoagg_dagster.core.dead_letters import encode_envelopes
from protoagg_dagster.core.errors import BackendError, ConfigError
from protoagg_dagster.core.formats import TopicFormats, rule_for
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.records import TOMBSTONE
from protoagg_dagster.kafka.reader import RangeRead, RangeReader
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.resources.settings import ArchiverSettings

# Measured (1,000 claims of 60 records, loaded machine): one commit per claim 5.9-11 s, one per
# 100 claims 4.3 s. A chunk holds its objects' sequence rows and its new ids until its commit:
# other runs claiming for those objects, or the same ids, wait for it (docs/design.md).
CLAIMS_PER_TRANSACTION = 100
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


def consume(
    context: dg.OpExecutionContext,
    config: ArchiveRunConfig,
    kafka: KafkaResource,
    postgres: PostgresResource,
    archiver: ArchiverSettings,
    lease: PartitionLease,
) -> ConsumedRun:
    """Read exactly the configured offset ranges (assign + seek; no consumer group), and parse.

    Each chunk the reader delivers is parsed straight to its frames and dropped, so each range's
    output is the compact ``FramedBatch``. A range the ledger already has archived is not read at
    all, nor one whose partition's lease another run holds; the run's ranges share its byte
    limit, and those past it are left to the next run.
    """
    started = time.perf_counter()
    formats = archiver.topic_formats(kafka.topics)
    failures = RangeFailures("consume", context)
    left_out: list[str] = []
    wanted: list[OffsetRange] = []
    offered = config.offset_ranges()
    with ledger_connection(postgres) as conn:
        positions = archived_positions(conn, offered)
    for one in offered:
        why = _left_out(context, lease, one, positions.get((one.topic, one.partition)))
        if why:
            left_out.append(f"{one} ({why})")
        else:
            wanted.append(one)
    parts: list[Consumed] = []
    if wanted:
        reader = kafka.get_reader()
        try:
            parts = _read_all(context, formats, archiver, reader, wanted, failures)
        finally:
            reader.close()
    read = {(p.read.batch.topic, p.read.batch.partition) for p in parts}
    left_out += [
        f"{w} (the run's byte limit is used up)"
        for w in wanted
        if (w.topic, w.partition) not in read and not failures.has(w)
    ]
    failures.raise_if_all_failed(len(offered))
    elapsed = time.perf_counter() - started
    messages = sum(p.records.messages for p in parts)
    asked = {(r.topic, r.partition): r.end for r in offered}
    short = [
        f"{p.read.batch} (asked up to {asked[p.read.batch.topic, p.read.batch.partition]})"
        for p in parts
        if p.read.batch.end < asked[p.read.batch.topic, p.read.batch.partition]
    ]
    context.log.info(
        f"consume: {messages} messages, {sum(p.read.value_bytes for p in parts)} bytes from "
        f"{len(parts)} ranges in {elapsed:.2f} s "
        f"({sum(p.records.parse_seconds for p in parts):.2f} s of it parsing) with {kafka.client}"
        + (f"; {len(left_out)} left out: {', '.join(left_out[:10])}" if left_out else "")
        + (f"; stopped at the byte limit: {', '.join(short[:10])}" if short else "")
    )
    return ConsumedRun(tuple(parts), tuple(failures.failed), {"consume": elapsed}, len(left_out))


def _left_out(
    context: dg.OpExecutionContext,
    lease: PartitionLease,
    wanted: OffsetRange,
    archived_to: int | None,
) -> str:
    """Why the run does not read ``wanted`` (archived up to ``archived_to``), or "" to read it."""
    if not lease.holds(wanted.topic, wanted.partition):
        return "its partition's lease is held by another live run"
    if archived_to is not None and archived_to >= wanted.end:
        return f"already archived up to {archived_to}"
    # The run before a follow-up stopped short (the byte limit) or failed: the sensor plans the
    # next range from the archived position, and this one would leave a gap.
    if is_follow_up(context.run) and (archived_to is None or archived_to < wanted.start):
        return f"follows a run that did not archive up to {wanted.start} (archived: {archived_to})"
    return ""


def _read_all(
    context: dg.OpExecutionContext,
    formats: TopicFormats,
    archiver: ArchiverSettings,
    reader: RangeReader,
    wanted: list[OffsetRange],
    failures: RangeFailures,
) -> list[Consumed]:
    """Read ``wanted`` together; the ranges read, in order, each parsed as its chunks arrive.

    The ranges share the run's byte limit: those it leaves unread are missing from the list.
    Should reading them together fail (a partition offline, a topic refused), they are
    read again one at a time, so that one partition's failure is its range's alone.
    """
    if len(wanted) > 1:
        try:
            return read_together(formats, archiver, reader, wanted)
        except RANGE_ERRORS as exc:
            context.log.warning(
                f"consume: reading {len(wanted)} ranges together failed ({exc}); reading them "
                "one at a time"
            )
    parts: list[Consumed] = []
    budget = archiver.max_batch_bytes
    for one in wanted:
        if budget <= 0:
            break
        with failures.each([one]):
            (consumed,) = read_together(formats, archiver, reader, [one], budget)
            budget -= consumed.read.value_bytes
            parts.append(consumed)
    return parts


def read_together(
    formats: TopicFormats,
    archiver: ArchiverSettings,
    reader: RangeReader,
    wanted: list[OffsetRange],
    max_bytes: int | None = None,
) -> list[Consumed]:
    builders = [
        formats.format_for(w.topic).batch_builder(w.topic, w.partition, archiver.max_message_bytes)
        for w in wanted
    ]
    chunks = reader.read_ranges(
        wanted, archiver.max_batch_bytes if max_bytes is None else max_bytes
    )
    with collector_paused():
        for i, chunk in chunks:
            builders[i].add(chunk)
        parts = []
        for asked, builder, end in zip(wanted, builders, chunks.ends, strict=True):
            if end.batch.end == asked.start:
                continue  # the byte limit came first: left to the next run
            parts.append(
                Consumed(
                    RangeRead(end.batch, [], end.value_bytes, end.skipped),
                    formats.format_for(asked.topic),
                    builder.finish(),
                    _assets(formats, asked.topic),
                )
            )
    return parts


def _assets(formats: TopicFormats, topic: str) -> tuple[dg.AssetKey, ...]:
    rule = rule_for(formats.rules, topic)
    return (ARCHIVE_ASSET,) + ((topic_asset_key(rule),) if rule is not None else ())


def dedupe(
    context: dg.OpExecutionContext,
    consumed: ConsumedRun,
    postgres: PostgresResource,
    gcs: GCSResource,
    archiver: ArchiverSettings,
    lease: PartitionLease,
) -> ClaimedRun:
    """Claim each range and each new dedupe key in PostgreSQL; drop keys seen before.

    The claims are committed CLAIMS_PER_TRANSACTION at a time, each in a savepoint of its own, so
    one range's failure is still its own. Their order is the objects' (then the partitions'):
    every run takes the objects' sequence rows, which a claim locks until its commit, in the same
    order. Two runs can still wait in a circle through new ids both insert; PostgreSQL then fails
    one claim, whose range a later run archives (docs/design.md, "Claiming").
    """
    lease.confirm()
    started = time.perf_counter()
    failures = RangeFailures("dedupe", context)
    claims: dict[int, Claim] = {}
    done = consumed.done
    destinations = [_destination(gcs, part) for part in consumed.parts]
    order = sorted(
        range(len(consumed.parts)),
        key=lambda i: (
            destinations[i],
            consumed.parts[i].read.batch.topic,
            consumed.parts[i].read.batch.partition,
        ),
    )
    with ledger_connection(postgres) as conn:
        for first in range(0, len(order), CLAIMS_PER_TRANSACTION):
            chunk = order[first : first + CLAIMS_PER_TRANSACTION]
            with conn.transaction() as transaction:
                for i in chunk:
                    batch = consumed.parts[i].read.batch
                    with failures.each([batch]):
                        if not lease.holds(batch.topic, batch.partition):
                            raise LeaseTaken(f"lost the lease of {batch.topic}[{batch.partition}]")
                        claims[i] = _claim(
                            context, conn, gcs, archiver, consumed.parts[i], destinations[i]
                        )
            if transaction.status != transaction.Status.COMMITTED:
                # The connection was lost inside the chunk (psycopg then neither commits nor
                # raises): the server rolled back every claim of it, those that looked made too.
                # Appending those would append records no claim holds; the op's retry claims
                # them again.
                raise BackendError(
                    f"the ledger's connection was lost while claiming {len(chunk)} ranges, none "
                    f"of them claimed ({transaction.status.value}; "
                    f"{failures.failed[-1].reason if failures.failed else 'no error seen'})"
                )
    parts: list[Claimed] = []
    for i, part in enumerate(consumed.parts):
        claim = claims.get(i)
        if claim is None:
            continue  # failed
        if claim.nothing_to_do:
            done += 1
            continue
        # Only what the claimed range covers (an adopted or trimmed claim may be narrower).
        inside = [
            r
            for r in part.records.rejections
            if claim.batch.start <= r.message.offset < claim.batch.end
        ]
        dead_letters = tuple(r for r in inside if r.reason != TOMBSTONE)
        parts.append(Claimed(part, claim, dead_letters, len(inside) - len(dead_letters)))
    failures.raise_if_all_failed(len(consumed.parts))
    elapsed = time.perf_counter() - started
    adopted = [str(p.claim.batch) for p in parts if p.claim.adopted]
    context.log.info(
        f"dedupe: {sum(len(p.claim.kept) for p in parts)} new, "
        f"{sum(p.claim.duplicates for p in parts)} duplicates, "
        f"{sum(len(p.dead_letters) for p in parts)} dead letters, "
        f"{sum(p.tombstones for p in parts)} tombstones in {len(parts)} ranges"
        + (f" ({done} already archived or left out)" if done else "")
        + (f"; finishing earlier claims of {', '.join(adopted[:10])}" if adopted else "")
        + f" in {elapsed:.2f} s"
    )
    reasons = Counter(r.reason for p in parts for r in p.dead_letters)
    if reasons:
        context.log.warning(f"dedupe: dead letters by reason: {dict(reasons)}")
    return ClaimedRun(
        tuple(parts),
        consumed.failed + tuple(failures.failed),
        {**consumed.seconds, "dedupe": elapsed},
        done,
    )


def _destination(gcs: GCSResource, part: Consumed) -> str:
    batch = part.read.batch
    return object_name(
        gcs.object_template, batch.topic, batch.partition, part.records.first_timestamp_ms
    )


def _claim(
    context: dg.OpExecutionContext,
    conn: psycopg.Connection,
    gcs: GCSResource,
    archiver: ArchiverSettings,
    part: Consumed,
    destination: str,
) -> Claim:
    batch = part.read.batch
    with collector_paused():
        return claim_batch(
            conn,
            batch,
            part.records.rows(),
            destination,
            context.run_id,
            # What the kept frames can add to the object: at most all the frames.
            len(part.records.frames),
            gcs.max_object_bytes,
            archiver.scope(),
        )


def encode(claimed: ClaimedRun, gcs: GCSResource) -> EncodedRun:
    """Join each range's kept records' frames (``uint32 LE length | message``, made when parsing).

    The frames of a range are then compressed (PROTOAGG_COMPRESSION) into one gzip member or
    zstd frame, which decompresses alone.
    """
    started = time.perf_counter()
    codec = gcs.codec()
    parts = []
    with collector_paused():
        for part in claimed.parts:
            framed = part.consumed.records.frames_of(part.claim.kept)
            parts.append(Encoded(part, codec.compress(framed), codec.name))
    elapsed = time.perf_counter() - started
    # No line of its own (append's says what was encoded): Dagster keeps every log line of
    # every run, and this step takes hundredths of a second.
    return EncodedRun(
        tuple(parts), claimed.failed, {**claimed.seconds, "encode": elapsed}, claimed.done
    )


RunEvent = dg.AssetMaterialization | dg.AssetCheckEvaluation


# No output: nothing reads it, and Dagster would store two more events for every run.
@dg.op(retry_policy=TRANSIENT_RETRY, out={})
@fail_fast
def archive(
    context: dg.OpExecutionContext,
    config: ArchiveRunConfig,
    kafka: KafkaResource,
    postgres: PostgresResource,
    gcs: GCSResource,
    archiver: ArchiverSettings,
    lease: PartitionLease,
) -> Iterator[RunEvent]:
    """Consume, dedupe, encode and append the run's ranges, logging a line after each but encode.

    A transient error that fails a whole step (every range of it) fails the op, and its
    RetryPolicy runs all four steps again: the ledger makes the second attempt finish the
    first's claims, and ranges already appended are not read again.
    """
    consumed = consume(context, config, kafka, postgres, archiver, lease)
    claimed = dedupe(context, consumed, postgres, gcs, archiver, lease)
    encoded = encode(claimed, gcs)
    yield from append(context, encoded, gcs, postgres, archiver, lease)


def append(
    context: dg.OpExecutionContext,
    encoded: EncodedRun,
    gcs: GCSResource,
    postgres: PostgresResource,
    archiver: ArchiverSettings,
    lease: PartitionLease,
) -> Iterator[RunEvent]:
    """Append dead letters, then records: the ranges bound for one object share its composes.

    Upload each piece, compose them onto the object (fenced), delete the uploads; the ledger
    records each range as appended inside the object's lock. One materialization per asset for
    the whole run, and one evaluation per check summarizing its ranges.
    """
    lease.confirm()
    started = time.perf_counter()
    failures = RangeFailures("append", context)
    appended: list[Appended] = []
    bucket = gcs.writable_bucket()
    with ledger_connection(postgres) as conn:
        ledger = AppendLedger(conn, gcs.bucket)
        by_object: dict[str, list[Encoded]] = {}
        for part in encoded.parts:
            batch = part.claimed.claim.batch
            with failures.each([batch]):
                if not lease.holds(batch.topic, batch.partition):
                    raise LeaseTaken(f"lost the lease of {batch.topic}[{batch.partition}]")
                # Dead letters first: once the batch is confirmed nothing of it may be missing.
                _append_dead_letters(gcs, bucket, ledger, part)
                by_object.setdefault(part.claimed.claim.object_name, []).append(part)
        for name, parts in by_object.items():
            with failures.each([p.claimed.claim.batch for p in parts]):
                appended += _append_records(conn, gcs, bucket, ledger, name, parts)
    failures.raise_if_all_failed(len(encoded.parts))
    failed = encoded.failed + tuple(failures.failed)
    seconds = {**encoded.seconds, "append": time.perf_counter() - started}
    records = sum(a.records for a in appended)
    codecs = sorted({p.compression for p in encoded.parts} - {NONE})
    context.log.info(
        f"append: {records} records, "
        f"{sum(len(a.part.data) for a in appended if a.records)} bytes"
        + (f" ({', '.join(codecs)})" if codecs else "")
        + f" encoded in {seconds['encode']:.3f} s, of {len(appended)} ranges to "
        f"{len(by_object)} objects in gs://{gcs.bucket} in {seconds['append']:.2f} s"
        + (f"; {len(failed)} ranges failed, a later run archives them" if failed else "")
    )
    yield from run_events(
        gcs.bucket,
        archiver.scope(),
        encoded,
        appended,
        failed,
        seconds,
        evaluate_run(bucket, appended),
    )
    permanent = [f for f in failed if f.permanent]
    if permanent:
        raise dg.Failure(
            description=f"{len(permanent)} ranges cannot be archived until a setting or object "
            f"is fixed (the run's other ranges are archived): {'; '.join(map(str, permanent[:5]))}",
            allow_retries=False,
        )
    _check_dead_letter_ratio(gcs, archiver, encoded.parts)


def _append_dead_letters(
    gcs: GCSResource, bucket: storage.Bucket, ledger: AppendLedger, part: Encoded
) -> None:
    claimed = part.claimed
    claim = claimed.claim
    if not claimed.dead_letters:
        return
    assert claim.batch_id is not None
    data = gcs.codec().compress(encode_envelopes(claimed.dead_letters))
    # Dead-letter objects roll over like archive objects; the batch keeps its member.
    member = dead_letter_member(
        ledger.conn, claim.batch_id, dead_letter_object(gcs, claim), len(data), gcs.max_object_bytes
    )
    append_batch(
        bucket,
        member,
        claim.batch,
        Piece(claim.batch_id, "dead_letters", len(data)),
        data,
        ledger,
        compression=part.compression,
    )


def _append_records(
    conn: psycopg.Connection,
    gcs: GCSResource,
    bucket: storage.Bucket,
    ledger: AppendLedger,
    name: str,
    parts: list[Encoded],
) -> list[Appended]:
    """Append the pieces of ``parts`` (one object's) and confirm their claims.

    A piece is appended even when empty (every record a duplicate), so the ledger records the
    batch against its object like any other.
    """
    pieces = []
    for part in parts:
        claim = part.claimed.claim
        assert claim.batch_id is not None
        pieces.append(
            PieceData(claim.batch, Piece(claim.batch_id, "records", len(part.data)), part.data)
        )
    results = append_pieces(
        bucket,
        name,
        pieces,
        ledger,
        format_name=parts[0].claimed.consumed.format.name,
        compression=parts[0].compression,
    )
    claims = [part.claimed.claim for part in parts]
    # append_pieces recorded each piece inside the object's lock; finishing again is a no-op
    # that keeps "the claim is confirmed" one visible step of the op. One round trip for all.
    finish_batches(
        conn,
        [
            (claim.batch_id, result.generation, len(part.data), result.object_size)
            if result.appended
            else (claim.batch_id, result.generation, 0, None)
            for claim, part, result in zip(claims, parts, results, strict=True)
            if claim.batch_id is not None
        ],
    )
    gaps = gaps_before(conn, [claim.batch for claim in claims])
    done = []
    for claim, part, result, gap in zip(claims, parts, results, gaps, strict=True):
        assert claim.batch_id is not None
        done.append(
            Appended(
                part,
                AppendedBatch(
                    claim.batch_id, claim.batch, name, len(part.data), result.object_size
                ),
                len(claim.kept) if result.appended else 0,
                gaps=gap,
            )
        )
    return done


def _check_dead_letter_ratio(
    gcs: GCSResource, archiver: ArchiverSettings, parts: Sequence[Encoded]
) -> None:
    for part in parts:
        claimed = part.claimed
        read_count = claimed.consumed.records.messages
        ratio = len(claimed.dead_letters) / read_count if read_count else 0.0
        if ratio > archiver.max_dead_letter_ratio:
            claim = claimed.claim
            # The batch is archived and its dead letters kept; failing makes a misconfigured
            # topic impossible to miss instead of quietly filling the dead-letter object.
            raise dg.Failure(
                description=f"{len(claimed.dead_letters)} of {read_count} messages in "
                f"{claim.batch} were dead letters ({ratio:.0%} > PROTOAGG_MAX_DEAD_LETTER_RATIO "
                f"{archiver.max_dead_letter_ratio:.0%}); they are kept in "
                f"gs://{gcs.bucket}/{dead_letter_object(gcs, claim)}. Is the topic carrying "
                "JSON log messages? Archive it whole with the record format (PROTOAGG_TOPICS "
                f"{claim.batch.topic}:record).",
                allow_retries=False,
            )


def dead_letter_object(gcs: GCSResource, claim: Claim) -> str:
    return object_name(
        gcs.dead_letter_template,
        claim.batch.topic,
        claim.batch.partition,
        0,
        setting="PROTOAGG_GCS_DEAD_LETTERS",
    )
