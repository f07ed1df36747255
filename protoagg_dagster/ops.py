"""The four steps of an archive run: consume, dedupe, encode, append.

Each op passes an immutable value to the next in memory (the job uses the in-process executor);
the batch limits bound how large these values get.
"""

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import dagster as dg
from pydantic import Field

from protoagg_dagster.archive_store import append_batch
from protoagg_dagster.core.archive_object import object_name
from protoagg_dagster.core.framing import encode_records
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.records import Rejection, parse_messages
from protoagg_dagster.kafka_reader import RangeRead, read_range
from protoagg_dagster.ledger import Claim, claim_batch, finish_batch, object_lock
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.settings_resource import ArchiverSettings

ARCHIVE_ASSET = dg.AssetKey("kafka_archive")
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL)


class ArchiveRangeConfig(dg.Config):
    """The offsets one run archives: ``[start_offset, end_offset)`` of one partition."""

    topic: str = Field(description="Kafka topic.")
    partition: int = Field(description="Partition number.")
    start_offset: int = Field(description="First offset to archive.")
    end_offset: int = Field(description="Offset after the last one to archive.")


@dataclass(frozen=True)
class Consumed:
    read: RangeRead
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Claimed:
    read: RangeRead
    claim: Claim
    rejections: tuple[Rejection, ...]
    seconds: dict[str, float]


@dataclass(frozen=True)
class Encoded:
    claimed: Claimed
    data: bytes
    seconds: dict[str, float]


@dg.op(retry_policy=TRANSIENT_RETRY)
def consume(
    context: dg.OpExecutionContext,
    config: ArchiveRangeConfig,
    kafka: KafkaResource,
    archiver: ArchiverSettings,
) -> Consumed:
    """Read exactly the configured offset range (assign + seek; no consumer group)."""
    wanted = OffsetRange(config.topic, config.partition, config.start_offset, config.end_offset)
    started = time.perf_counter()
    consumer = kafka.get_consumer()
    try:
        read = read_range(consumer, wanted, archiver.max_batch_bytes)
    finally:
        consumer.close()
    elapsed = time.perf_counter() - started
    context.log.info(
        f"consume: {len(read.messages)} messages, {read.value_bytes} bytes from {read.batch} "
        f"in {elapsed:.2f} s"
        + (f"; {read.skipped} offsets already deleted by retention" if read.skipped else "")
        + (
            f"; stopped at the byte limit (asked up to {wanted.end})"
            if read.batch != wanted
            else ""
        )
    )
    return Consumed(read, {"consume": elapsed})


@dg.op(retry_policy=TRANSIENT_RETRY)
def dedupe(
    context: dg.OpExecutionContext,
    consumed: Consumed,
    postgres: PostgresResource,
    gcs: GCSResource,
    archiver: ArchiverSettings,
) -> Claimed:
    """Parse, then claim each new logId in PostgreSQL; drop ids archived before or repeated."""
    started = time.perf_counter()
    read = consumed.read
    records, rejections = parse_messages(read.messages, archiver.max_message_bytes)
    first_timestamp = read.messages[0].timestamp_ms if read.messages else 0
    destination = object_name(
        gcs.object_template, read.batch.topic, read.batch.partition, first_timestamp
    )
    with postgres.get_connection() as conn:
        claim = claim_batch(conn, read.batch, records, destination, context.run_id)
    elapsed = time.perf_counter() - started
    if claim.nothing_to_do:
        context.log.info(f"dedupe: {read.batch} is already archived; nothing to do")
    else:
        context.log.info(
            f"dedupe: {len(claim.kept)} new, {claim.duplicates} duplicates, "
            f"{len(rejections)} rejected of {len(read.messages)} in {claim.batch}"
            + (" (finishing an earlier claim of this range)" if claim.adopted else "")
            + f" in {elapsed:.2f} s"
        )
    if rejections:
        reasons = Counter(r.reason for r in rejections)
        context.log.warning(f"dedupe: rejected messages by reason: {dict(reasons)}")
    return Claimed(read, claim, tuple(rejections), {**consumed.seconds, "dedupe": elapsed})


@dg.op
def encode(context: dg.OpExecutionContext, claimed: Claimed) -> Encoded:
    """Frame the kept records as ``uint32 LE length | ProtoLog``, in offset order."""
    started = time.perf_counter()
    data = encode_records(claimed.claim.kept)
    elapsed = time.perf_counter() - started
    context.log.info(
        f"encode: {len(claimed.claim.kept)} records, {len(data)} bytes in {elapsed:.3f} s"
    )
    return Encoded(claimed, data, {**claimed.seconds, "encode": elapsed})


@dg.op(retry_policy=TRANSIENT_RETRY)
def append(
    context: dg.OpExecutionContext,
    encoded: Encoded,
    gcs: GCSResource,
    postgres: PostgresResource,
) -> Iterator[dg.AssetMaterialization | dg.Output[int]]:
    """Append to the archive object (upload, fenced compose, delete) and confirm the claim."""
    claim = encoded.claimed.claim
    started = time.perf_counter()
    generation: int | None = None
    appended_bytes = 0
    size: int | None = None
    if claim.batch_id is not None:
        with postgres.get_connection() as conn:
            if encoded.data:
                result = append_batch(
                    gcs.get_bucket(),
                    claim.object_name,
                    claim.batch,
                    encoded.data,
                    serialize=lambda: object_lock(conn, gcs.bucket, claim.object_name),
                )
                generation, size = result.generation, result.object_size
                appended_bytes = len(encoded.data) if result.appended else 0
                if not result.appended:
                    context.log.info(
                        f"append: gs://{gcs.bucket}/{claim.object_name} already holds {claim.batch}"
                    )
            finish_batch(conn, claim.batch_id, generation)
    elapsed = time.perf_counter() - started
    seconds = {**encoded.seconds, "append": elapsed}
    appended_records = len(claim.kept) if appended_bytes else 0
    context.log.info(
        f"append: {appended_records} records, {appended_bytes} bytes to "
        f"gs://{gcs.bucket}/{claim.object_name} (generation {generation}) in {elapsed:.2f} s"
    )
    read = encoded.claimed.read
    total = sum(seconds.values())
    yield dg.AssetMaterialization(
        asset_key=ARCHIVE_ASSET,
        description=f"{claim.batch}",
        metadata={
            "topic": claim.batch.topic,
            "partition": claim.batch.partition,
            "start_offset": claim.batch.start,
            "end_offset": claim.batch.end,
            "object": f"gs://{gcs.bucket}/{claim.object_name}",
            "records_read": len(read.messages),
            "duplicates_dropped": claim.duplicates,
            "rejected": len(encoded.claimed.rejections),
            "records_appended": appended_records,
            "bytes_appended": appended_bytes,
            "object_generation": generation if generation is not None else -1,
            "object_size": size if size is not None else -1,
            "already_archived": claim.nothing_to_do or (bool(encoded.data) and not appended_bytes),
            **{
                f"seconds_{step}": dg.FloatMetadataValue(round(s, 4)) for step, s in seconds.items()
            },
            "messages_per_second": dg.FloatMetadataValue(
                round(len(read.messages) / total, 1) if total > 0 else 0.0
            ),
        },
    )
    yield dg.Output(appended_records)
