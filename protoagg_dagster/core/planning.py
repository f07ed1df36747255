"""Deciding which offset range of a partition to archive next: pure, so the sensor only plans."""

from __future__ import annotations

from dataclasses import dataclass

from protoagg_dagster.core.errors import ConfigError


@dataclass(frozen=True)
class OffsetRange:
    """Offsets ``[start, end)`` of one topic-partition."""

    topic: str
    partition: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.partition < 0 or self.start < 0 or self.end < self.start:
            raise ConfigError(f"invalid offset range {self}: need 0 <= start <= end")

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def run_key(self) -> str:
        return f"{self.topic}-{self.partition}-{self.start}-{self.end}"

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}] offsets {self.start}..{self.end}"


@dataclass(frozen=True)
class BatchLimits:
    """When a range is worth a run, and how large one may grow."""

    batch_size: int = 500
    linger_seconds: float = 15.0
    max_batch_messages: int = 200_000
    max_batch_bytes: int = 128 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_batch_messages < self.batch_size:
            raise ConfigError(
                f"max_batch_messages ({self.max_batch_messages}) must be >= batch_size "
                f"({self.batch_size})"
            )
        if self.linger_seconds < 0:
            raise ConfigError(f"linger_seconds must be >= 0, got {self.linger_seconds}")
        if self.max_batch_bytes < 1024:
            raise ConfigError(f"max_batch_bytes must be at least 1024, got {self.max_batch_bytes}")


@dataclass(frozen=True)
class PartitionView:
    """What the sensor knows of one partition at a tick.

    ``next_offset`` is the first offset not yet archived (from the ledger), or, for a partition
    never archived, where archiving starts (``start_from``). ``pending`` is a claimed range whose
    append was not confirmed: it must be finished, exactly as claimed, before anything else.
    """

    topic: str
    partition: int
    next_offset: int
    end_offset: int
    pending: OffsetRange | None = None
    in_flight: bool = False
    backlog_since: float | None = None


@dataclass(frozen=True)
class Plan:
    """The planner's answer: a range to launch (or None) and the backlog clock to remember."""

    launch: OffsetRange | None
    backlog_since: float | None
    reason: str


def plan_batch(view: PartitionView, limits: BatchLimits, now: float) -> Plan:
    """Next range to archive for one partition.

    Launch when ``batch_size`` messages wait or the backlog is ``linger_seconds`` old; never more
    than ``max_batch_messages`` at once; never while a run for the partition is in flight, so a
    partition's appends stay in offset order.
    """
    if view.in_flight:
        return Plan(None, view.backlog_since, "a run for this partition is in flight")
    if view.pending is not None:
        return Plan(view.pending, None, "finishing a claimed range whose append is unconfirmed")
    waiting = view.end_offset - view.next_offset
    if waiting <= 0:
        return Plan(None, None, "nothing new")
    since = view.backlog_since if view.backlog_since is not None else now
    full = waiting >= limits.batch_size
    lingered = now - since >= limits.linger_seconds
    if not (full or lingered):
        return Plan(None, since, f"{waiting} waiting, lingering")
    size = min(waiting, limits.max_batch_messages)
    launch = OffsetRange(view.topic, view.partition, view.next_offset, view.next_offset + size)
    return Plan(launch, None, "batch full" if full else f"lingered {now - since:.1f} s")


def split_range(whole: OffsetRange, max_messages: int) -> list[OffsetRange]:
    """Consecutive ranges of at most ``max_messages`` offsets covering ``whole``, in order."""
    if max_messages < 1:
        raise ConfigError(f"max_messages must be at least 1, got {max_messages}")
    return [
        OffsetRange(whole.topic, whole.partition, start, min(start + max_messages, whole.end))
        for start in range(whole.start, whole.end, max_messages)
    ]
