"""Restore's pure decisions: what is selected, what it becomes, where it goes, what is recorded.

Which archived records a restore selects, what each becomes in the target topic, which partition
it goes to, and the progress it records.

A restore is identified by what it writes (sources, target topic, selection and shaping), never by
where it runs, so a rerun with the same arguments finds its own progress.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

import orjson
from google.protobuf.timestamp_pb2 import Timestamp

# kafka-python's murmur2 is a pure function (no client is built by importing it); the key
# partitioner must agree with Kafka's own producers bit for bit, so it is reused, not copied.
from kafka.partitioner.default import murmur2

from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.framing import ArchivedRecord
from protoagg_dagster.core.kafka_record import ArchivedKafkaRecord

PROGRESS_TOPIC = "_protoagg-restore-progress"
SOURCE_HEADERS = ("protoagg-source-topic", "protoagg-source-partition", "protoagg-source-offset")
Partitioner = Literal["same", "key"]
LogKey = Literal["none", "logId"]
Headers = list[tuple[str, bytes | None]]
# What is sent: partition (None: Kafka's partitioner), key, value, headers, timestamp ms.
OutRecord = tuple[int | None, bytes | None, bytes | None, Headers, int]


@dataclass(frozen=True)
class Selection:
    """Which archived records to restore; ``to_*`` bounds are exclusive, None is unbounded."""

    partition: int | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    from_time_ms: int | None = None
    to_time_ms: int | None = None

    @property
    def needs_places(self) -> bool:
        """Whether it selects by partition or offset, which only record archives carry."""
        return (self.partition, self.from_offset, self.to_offset) != (None, None, None)

    def selects(self, partition: int | None, offset: int | None, timestamp_ms: int) -> bool:
        if self.partition is not None and partition != self.partition:
            return False
        if offset is not None:
            if self.from_offset is not None and offset < self.from_offset:
                return False
            if self.to_offset is not None and offset >= self.to_offset:
                return False
        if self.from_time_ms is not None and timestamp_ms < self.from_time_ms:
            return False
        return self.to_time_ms is None or timestamp_ms < self.to_time_ms


@dataclass(frozen=True)
class RestoreSpec:
    """Everything that decides what a restore writes; its hash is the restore id."""

    sources: tuple[str, ...]
    to_topic: str
    selection: Selection = Selection()
    partitioner: Partitioner = "same"
    key: LogKey = "none"
    source_headers: bool = False

    @property
    def restore_id(self) -> str:
        canonical = orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS)
        return hashlib.blake2b(canonical, digest_size=12).hexdigest()

    @property
    def transactional_id(self) -> str:
        # One id per restore: a rerun fences a stale run and settles its open transaction.
        return f"protoagg-restore-{self.restore_id}"


def record_out(record: ArchivedKafkaRecord, spec: RestoreSpec, partitions: int) -> OutRecord:
    """A record-format record as sent to the target: the original, in its chosen partition."""
    headers: Headers = list(record.headers)
    if spec.source_headers:
        headers += zip(
            SOURCE_HEADERS,
            (record.topic.encode(), str(record.partition).encode(), str(record.offset).encode()),
            strict=True,
        )
    partition = target_partition(record.partition, record.key, partitions, spec.partitioner)
    return partition, record.key, record.value, headers, record.timestamp_ms


def kafka_python_refuses(out: OutRecord) -> bool:
    """Whether kafka-python's producer refuses the record.

    It refuses a null key with a null value, and a header with a null value: both legal Kafka
    records, which librdkafka sends.
    """
    _, key, value, headers, _ = out
    return (key is None and value is None) or any(v is None for _, v in headers)


def log_out(record: ArchivedRecord, spec: RestoreSpec) -> OutRecord:
    """A log-format record as the JSON line it was produced as; Kafka's partitioner places it."""
    line = {
        "logId": record.log_id,
        # Protobuf's JSON form: 0, 3, 6 or 9 fraction digits, so a millisecond input reads back
        # as it was written (``.090Z``, not ``.09Z``).
        "timestamp": Timestamp(seconds=record.seconds, nanos=record.nanos).ToJsonString(),
        "message": record.message,
    }
    key = record.log_id.encode() if spec.key == "logId" else None
    return None, key, orjson.dumps(line), [], record.seconds * 1000 + record.nanos // 1_000_000


def target_partition(
    source_partition: int, key: bytes | None, partitions: int, partitioner: Partitioner
) -> int:
    """The target partition of a record.

    ``same``: the source's partition number. ``key``: Kafka's default murmur2 of the key; a null
    key keeps ``source % partitions`` so a rerun places it where the first run did.
    """
    if partitioner == "same":
        return source_partition
    if key is None:
        return source_partition % partitions
    hashed: int = murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions


@dataclass
class PartitionTally:
    """Records and bytes (key + value) of one source partition, and when they were sent."""

    records: int = 0
    bytes: int = 0
    first_at: float | None = None
    last_at: float | None = None

    def add(self, size: int, now: float | None = None) -> None:
        self.records += 1
        self.bytes += size
        if now is not None:
            self.first_at = now if self.first_at is None else self.first_at
            self.last_at = now

    @property
    def seconds(self) -> float:
        if self.first_at is None or self.last_at is None:
            return 0.0
        return self.last_at - self.first_at


@dataclass
class Tallies:
    """Per source partition (-1 for log archives, which carry none)."""

    by_partition: dict[int, PartitionTally] = field(default_factory=dict)
    # Records only librdkafka can send (``kafka_python_refuses``).
    kafka_python_refuses: int = 0

    def add(self, partition: int, size: int, now: float | None = None) -> None:
        self.by_partition.setdefault(partition, PartitionTally()).add(size, now)

    @property
    def records(self) -> int:
        return sum(t.records for t in self.by_partition.values())

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.by_partition.values())

    def partitions_needed(self) -> int:
        """How many target partitions keep every record's partition number (at least 1)."""
        return max([1, *(p + 1 for p in self.by_partition)])

    def lines(self) -> list[str]:
        return [
            f"  {'log' if p < 0 else f'partition {p}'}: {t.records} records, "
            f"{t.bytes / 1e6:.2f} MB" + (f", {t.seconds:.1f} s" if t.last_at is not None else "")
            for p, t in sorted(self.by_partition.items())
        ]


def check_partitions(topic: str, have: int, tallies: Tallies, partitioner: Partitioner) -> None:
    """Refuse a target whose partitions cannot keep the source's partition numbers."""
    need = tallies.partitions_needed()
    if partitioner == "same" and have < need:
        raise ConfigError(
            f"target topic {topic!r} has {have} partitions but the archive holds records of "
            f"partition {need - 1}; add partitions, or pass --partitioner key to spread records "
            "by key"
        )


def progress_key(restore_id: str, object_url: str) -> bytes:
    """The compacted progress topic keeps one record per restore and archive object."""
    return f"{restore_id} {object_url}".encode()


def progress_value(frames: int, spec: RestoreSpec) -> bytes:
    return orjson.dumps({"frames": frames, "to_topic": spec.to_topic})


def parse_progress(
    restore_id: str, records: Iterable[tuple[bytes | None, bytes | None]]
) -> dict[str, int]:
    """Frames already restored per object url.

    From the progress topic's (key, value) pairs in offset order: the last value of a key wins,
    as compaction keeps it.
    """
    prefix = f"{restore_id} ".encode()
    done: dict[str, int] = {}
    for key, value in records:
        if key is None or not key.startswith(prefix) or value is None:
            continue
        done[key[len(prefix) :].decode()] = int(orjson.loads(value)["frames"])
    return done


def summary(restored: Tallies, skipped: int, started: Mapping[str, int]) -> str:
    """The last words of a restore: what it wrote per partition, or that an earlier run did."""
    if restored.records == 0 and skipped and started:
        return f"nothing to restore: all {skipped} selected records were restored by an earlier run"
    head = f"restored {restored.records} records ({restored.bytes / 1e6:.2f} MB)"
    if skipped:
        head += f"; {skipped} restored by an earlier run were skipped"
    return "\n".join([head, *restored.lines()])
