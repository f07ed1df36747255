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
    ``in_flight`` counts the partition's unfinished runs (queued, starting or working);
    ``in_flight_end`` is where the last of them ends, when the sensor knows its range (a run of
    another deployment is seen only by its lease).
    """

    topic: str
    partition: int
    next_offset: int
    end_offset: int
    pending: OffsetRange | None = None
    in_flight: int = 0
    in_flight_end: int | None = None
    backlog_since: float | None = None


@dataclass(frozen=True)
class Plan:
    """The planner's answer: a range to launch (or None) and the backlog clock to remember."""

    launch: OffsetRange | None
    backlog_since: float | None
    reason: str
    # The range continues one still in flight: its run waits for the partition's lease, and does
    # nothing if the range before it was not archived to the offset it starts at.
    follows: bool = False


def plan_batch(view: PartitionView, limits: BatchLimits, now: float) -> Plan:
    """Next range to archive for one partition.

    Launch when ``batch_size`` messages wait or the backlog is ``linger_seconds`` old; never more
    than ``max_batch_messages`` at once. While one run of the partition is in flight, the range
    after it is launched as a follow-up, so its run starts up while the other works and begins
    the moment the other ends; never more than one follow-up, and none after a run whose range
    is unknown. Appends stay in offset order because the ledger refuses a range that does not
    start at the archived position.
    """
    if view.in_flight > 1 or (view.in_flight == 1 and view.in_flight_end is None):
        return Plan(None, view.backlog_since, "runs for this partition are in flight")
    if view.in_flight == 0 and view.pending is not None:
        return Plan(view.pending, None, "finishing a claimed range whose append is unconfirmed")
    follows = view.in_flight == 1
    start = view.next_offset
    if follows:
        assert view.in_flight_end is not None
        if view.pending is not None and view.pending.end > view.in_flight_end:
            return Plan(None, view.backlog_since, "a claimed range is unfinished")
        start = max(start, view.in_flight_end)
    waiting = view.end_offset - start
    if waiting <= 0:
        return Plan(None, None, "nothing new")
    since = view.backlog_since if view.backlog_since is not None else now
    full = waiting >= limits.batch_size
    lingered = now - since >= limits.linger_seconds
    if not (full or lingered):
        return Plan(None, since, f"{waiting} waiting, lingering")
    size = min(waiting, limits.max_batch_messages)
    launch = OffsetRange(view.topic, view.partition, start, start + size)
    reason = "batch full" if full else f"lingered {now - since:.1f} s"
    if follows:
        reason += f"; follows the run in flight up to offset {start}"
    return Plan(launch, None, reason, follows)


def split_range(whole: OffsetRange, max_messages: int) -> list[OffsetRange]:
    """Consecutive ranges of at most ``max_messages`` offsets covering ``whole``, in order."""
    if max_messages < 1:
        raise ConfigError(f"max_messages must be at least 1, got {max_messages}")
    return [
        OffsetRange(whole.topic, whole.partition, start, min(start + max_messages, whole.end))
        for start in range(whole.start, whole.end, max_messages)
    ]
