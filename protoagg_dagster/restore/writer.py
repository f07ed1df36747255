"""Restoring archives into a Kafka topic, exactly once (see docs/design.md, "Restore").

Each transaction carries a batch of records and, for every archive object it advanced, a
progress record in the compacted ``_protoagg-restore-progress`` topic of the target cluster: the
records and the position they reached become visible together or not at all. A rerun with the
same arguments fences the previous producer, reads the committed positions and skips those frames.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from protoagg_dagster.archive.store import sequence_blobs
from protoagg_dagster.core import settings
from protoagg_dagster.core.archive_object import TEMP_PREFIX, sequence_base
from protoagg_dagster.core.errors import ArchiveFormatError, BackendError, ConfigError
from protoagg_dagster.core.formats import RECORD
from protoagg_dagster.core.restore import (
    PROGRESS_TOPIC,
    OutRecord,
    RestoreSpec,
    Tallies,
    check_partitions,
    kafka_python_refuses,
    log_out,
    parse_progress,
    progress_key,
    progress_value,
    record_out,
)
from protoagg_dagster.kafka.admin import create_topic
from protoagg_dagster.kafka.producers import TransactionalProducer
from protoagg_dagster.reading.archive_reader import (
    open_archive_with_format,
    open_object_with_format,
)
from protoagg_dagster.resources.gcs import GCSResource
from protoagg_dagster.resources.kafka import KafkaResource

# Records per transaction: large enough that commits cost little, small enough that a crash
# re-sends seconds of work at most.
TRANSACTION_RECORDS = 20_000
# Called about once a second: (records done, including those an earlier run restored; bytes
# written this run; seconds; records the sources select).
Progress = Callable[[int, int, float, int], None]


@dataclass
class RestoreResult:
    """What a run restored, what earlier runs had, and where a bad frame stopped it."""

    restored: Tallies = field(default_factory=Tallies)
    skipped: int = 0
    already_done: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return self.restored.records + self.skipped


def list_sources(sources: tuple[str, ...]) -> list[str]:
    """Each SOURCE as the urls of single objects, in order.

    ``gs://B/PREFIX/`` is every archive object under it by name; an archive object that is the
    first of a numbered sequence (``log.pb``, ``log.0001.pb``, ...) stands for its members, in
    sequence order. Each object keeps its own progress (``open_object_with_format``).
    """
    urls: list[str] = []
    for source in sources:
        if not source.startswith("gs://"):
            if not Path(source).is_file():
                raise ConfigError(f"{source} is not a file")
            urls.append(source)
        elif source.endswith("/"):
            urls.extend(_objects_under(source))
        else:
            urls.extend(_members(source))
    return urls


def _members(url: str) -> list[str]:
    """The objects of the sequence ``url`` names first, or ``url`` itself if it is a member."""
    bucket_name, _, name = url[len("gs://") :].partition("/")
    if sequence_base(name) is not None:
        return [url]
    gcs = GCSResource(bucket=bucket_name, emulator_host=settings.STORAGE_EMULATOR_HOST.read())
    blobs = sequence_blobs(gcs.get_bucket(), name)
    if not blobs:
        raise BackendError(f"{url} does not exist")
    return [f"gs://{bucket_name}/{blob.name}" for blob in blobs]


def _objects_under(prefix_url: str) -> list[str]:
    bucket_name, _, prefix = prefix_url[len("gs://") :].partition("/")
    gcs = GCSResource(bucket=bucket_name, emulator_host=settings.STORAGE_EMULATOR_HOST.read())
    try:
        names = sorted(
            blob.name
            for blob in gcs.get_bucket().list_blobs(prefix=prefix)
            # Temporary pieces of an append in flight are not archives.
            if not blob.name.startswith(TEMP_PREFIX)
        )
    except Exception as exc:  # google-cloud raises many unrelated types; all mean "cannot list"
        raise BackendError(f"listing {prefix_url} failed: {exc}") from exc
    if not names:
        raise ConfigError(f"{prefix_url} holds no archive objects")
    # A numbered member (log.0001.pb) comes right after its sequence's first object (log.pb).
    listed = set(names)
    return [
        member
        for name in names
        if sequence_base(name) not in listed
        for member in _members(f"gs://{bucket_name}/{name}")
    ]


def iter_selected(
    url: str, spec: RestoreSpec, partitions: int
) -> Iterator[tuple[int, int, OutRecord | None]]:
    """(frame number, source partition, record to send or None if not selected) of one object."""
    local = not url.startswith("gs://")
    stream, archive = open_archive_with_format(url) if local else open_object_with_format(url)
    selection = spec.selection
    with stream:
        if archive.name == RECORD:
            for frame, record in enumerate(archive.decode(stream)):
                chosen = selection.selects(record.partition, record.offset, record.timestamp_ms)
                out = record_out(record, spec, partitions) if chosen else None
                yield frame, record.partition, out
            return
        if selection.needs_places:
            raise ConfigError(
                f"{url} is a log archive: its records carry no partition or offset "
                "(select by --from-time/--to-time only)"
            )
        for frame, log in enumerate(archive.decode(stream)):
            ms = log.seconds * 1000 + log.nanos // 1_000_000
            yield frame, -1, log_out(log, spec) if selection.selects(None, None, ms) else None


def _size(out: OutRecord) -> int:
    return len(out[1] or b"") + len(out[2] or b"")


def plan_restore(urls: list[str], spec: RestoreSpec) -> tuple[Tallies, ArchiveFormatError | None]:
    """What the sources select per source partition, and the bad frame that ends them, if any.

    The partition count is not known yet, so records are shaped for one target partition (the
    counts and sizes do not depend on it).
    """
    tallies = Tallies()
    try:
        for url in urls:
            for _, partition, out in iter_selected(url, spec, 1):
                if out is not None:
                    tallies.add(partition, _size(out))
                    tallies.kafka_python_refuses += kafka_python_refuses(out)
    except ArchiveFormatError as exc:
        return tallies, ArchiveFormatError(f"{url}: {exc}")
    return tallies, None


def restore(
    spec: RestoreSpec,
    kafka: KafkaResource,
    create_missing: bool,
    progress: Progress,
    transaction_records: int = TRANSACTION_RECORDS,
) -> RestoreResult:
    """Write the selected records to ``spec.to_topic`` once, however often this is restarted."""
    urls = list_sources(spec.sources)
    # A bad frame is met again, and reported, by the write pass once all before it is restored.
    plan, _ = plan_restore(urls, spec)
    partitions = _target_partitions(kafka, spec.to_topic, create_missing, plan.partitions_needed())
    check_partitions(spec.to_topic, partitions, plan, spec.partitioner)
    create_topic(kafka.get_admin(), PROGRESS_TOPIC, 1, {"cleanup.policy": "compact"})
    producer = _producer(kafka, spec, plan)
    result = RestoreResult()
    try:
        # First fence any earlier run of this restore: its open transaction is settled
        # (committed or aborted) before its progress is read.
        producer.init_transactions()
        result.already_done = read_progress(kafka, spec.restore_id)
        _write(
            urls,
            spec,
            partitions,
            producer,
            transaction_records,
            result,
            lambda done, written, seconds: progress(done, written, seconds, plan.records),
        )
    except KafkaError as exc:
        raise BackendError(f"restoring into {spec.to_topic!r} failed: {exc}") from exc
    except ArchiveFormatError as exc:
        raise ArchiveFormatError(
            f"{exc}; restored up to there: {result.restored.records} records this run, "
            f"{result.skipped} by earlier runs"
        ) from None
    finally:
        producer.close(timeout=5)
    return result


def _producer(kafka: KafkaResource, spec: RestoreSpec, plan: Tallies) -> TransactionalProducer:
    """The restore's producer: librdkafka's when kafka-python would refuse a selected record.

    One producer for the whole restore, so a rerun fences the same transactional id whichever
    client wrote before.
    """
    if plan.kafka_python_refuses and kafka.client != "confluent":
        kafka = KafkaResource(**{**kafka.model_dump(), "client": "confluent"})
    return kafka.get_transactional_producer(spec.transactional_id)


def _write(
    urls: list[str],
    spec: RestoreSpec,
    partitions: int,
    producer: TransactionalProducer,
    transaction_records: int,
    result: RestoreResult,
    progress: Callable[[int, int, float], None],
) -> None:
    started = now = last_report = time.monotonic()
    in_txn = 0
    advanced: dict[str, int] = {}
    send, topic, tally = producer.send, spec.to_topic, result.restored.add
    producer.begin_transaction()
    for url in urls:
        done = result.already_done.get(url, 0)
        try:
            for frame, partition, out in iter_selected(url, spec, partitions):
                if frame < done:
                    result.skipped += out is not None
                    continue
                advanced[url] = frame + 1
                if out is None:
                    continue
                target, key, value, headers, ms = out
                send(
                    topic, key=key, value=value, headers=headers, partition=target, timestamp_ms=ms
                )
                in_txn += 1
                # The clock every 1024 records: reading it per record cost 3% of a restore.
                if not in_txn & 1023:
                    now = time.monotonic()
                tally(partition, _size(out), now)
                if in_txn >= transaction_records:
                    _commit(producer, spec, advanced)
                    producer.begin_transaction()
                    in_txn = 0
                if now - last_report >= 1.0:
                    last_report = now
                    progress(result.done, result.restored.bytes, now - started)
        except ArchiveFormatError as exc:
            # Everything before the bad frame is good: keep it, then stop there.
            _commit(producer, spec, advanced)
            raise ArchiveFormatError(f"{url}: {exc}") from None
    _commit(producer, spec, advanced)
    result.seconds = time.monotonic() - started
    progress(result.done, result.restored.bytes, result.seconds)


def _commit(producer: TransactionalProducer, spec: RestoreSpec, advanced: dict[str, int]) -> None:
    """The progress of every object this transaction advanced, then commit: one atomic step."""
    for url, frames in advanced.items():
        producer.send(
            PROGRESS_TOPIC,
            key=progress_key(spec.restore_id, url),
            value=progress_value(frames, spec),
            partition=0,
        )
    advanced.clear()
    producer.commit_transaction()


def read_progress(kafka: KafkaResource, restore_id: str) -> dict[str, int]:
    """The committed frames per object of ``restore_id``.

    Read up to the high watermark, not just the last stable offset: another restore's open
    transaction holds the stable offset back, and our last progress record may lie beyond it.
    Waiting for that transaction to settle (commit, abort or time out) is the only safe answer.
    """
    consumer: KafkaConsumer = kafka.get_consumer()
    tp = TopicPartition(PROGRESS_TOPIC, 0)
    try:
        end = kafka.high_watermarks(PROGRESS_TOPIC, [0])[0]
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        pairs: list[tuple[bytes | None, bytes | None]] = []
        deadline = time.monotonic() + 120  # above kafka-python's 60 s transaction timeout
        while consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise BackendError(
                    f"{PROGRESS_TOPIC} has a transaction open for over 2 minutes; another "
                    "restore is writing, wait for it or stop it"
                )
            for records in consumer.poll(timeout_ms=500).values():
                pairs.extend((r.key, r.value) for r in records)
        return parse_progress(restore_id, pairs)
    finally:
        consumer.close()


def _target_partitions(kafka: KafkaResource, topic: str, create: bool, need: int) -> int:
    """The target's partition count; created with ``need`` partitions if asked."""
    consumer = kafka.get_consumer()
    try:
        partitions = consumer.partitions_for_topic(topic)
    finally:
        consumer.close()
    if partitions:
        return len(partitions)
    if not create:
        raise ConfigError(
            f"target topic {topic!r} does not exist on {kafka.bootstrap_servers} (pass "
            f"--create-topic to create it with {need} partitions)"
        )
    create_topic(kafka.get_admin(), topic, need)
    return need
