"""Which offset ranges to archive next, and which of them share a run: pure, the sensor plans."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
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


def offsets_text(ranges: Sequence[OffsetRange]) -> dict[str, str]:
    """Ranges per topic as one line each, ``{"logs": "0:100-200,3:40-90"}``.

    What a run's config holds: the daemon, the run worker and the webserver each parse it, and
    a run of 1,000 ranges is about 18 KB this way against 102 KB as a list of objects. (Stored,
    PostgreSQL compresses either: 13 KB against 15 KB.)
    """
    lines: dict[str, list[str]] = {}
    for r in ranges:
        lines.setdefault(r.topic, []).append(f"{r.partition}:{r.start}-{r.end}")
    return {topic: ",".join(parts) for topic, parts in lines.items()}


def parse_offsets(topic: str, text: str) -> list[OffsetRange]:
    """The ranges of one ``offsets_text`` line (commas or spaces between ranges)."""
    found = []
    for part in text.replace(",", " ").split():
        partition, sep, span = part.partition(":")
        start, dash, end = span.partition("-")
        try:
            if not (sep and dash):
                raise ValueError
            found.append(OffsetRange(topic, int(partition), int(start), int(end)))
        except (ValueError, ConfigError):
            raise ConfigError(
                f"offsets of topic {topic}: {part!r} is not partition:start-end "
                "(e.g. 0:100-200, the offsets after the colon from first to one past the last)"
            ) from None
    return found


def parse_all_offsets(offsets: Mapping[str, str]) -> list[OffsetRange]:
    """The ranges of every topic's ``offsets_text`` line, topic by topic."""
    return [r for topic, text in offsets.items() for r in parse_offsets(topic, text)]


@dataclass(frozen=True)
class BatchLimits:
    """When ranges are worth a run, and how large one run may grow.

    ``max_batch_messages`` and ``max_batch_bytes`` bound a whole run (all its ranges);
    ``max_partitions_per_run`` bounds how many partitions' ranges one run archives.
    """

    batch_size: int = 500
    linger_seconds: float = 15.0
    max_batch_messages: int = 200_000
    max_batch_bytes: int = 128 * 1024 * 1024
    max_partitions_per_run: int = 1000
    # Runs one tick launches at most, whatever the number of partitions: what does not fit
    # stays due and goes at the next tick, the ranges most behind first.
    max_runs_per_tick: int = 16

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
        if self.max_runs_per_tick < 1:
            raise ConfigError(f"max_runs_per_tick must be at least 1, got {self.max_runs_per_tick}")
        if self.max_partitions_per_run < 1:
            raise ConfigError(
                f"max_partitions_per_run must be at least 1, got {self.max_partitions_per_run}"
            )


@dataclass(frozen=True)
class PartitionView:
    """What the sensor knows of one partition at a tick.

    ``next_offset`` is the first offset not yet archived (from the ledger), or, for a partition
    never archived, where archiving starts (``start_from``). ``pending`` is a claimed range whose
    append was not confirmed: it must be finished, exactly as claimed, before anything else.
    ``in_flight`` counts the runs holding a range of the partition that have not finished
    (queued, starting or working); ``in_flight_end`` is where the last of those ranges ends, when
    the sensor knows it (a run of another deployment is seen only by its lease). ``stalled``:
    the run in flight started and its lease has been free for a while: it may have died.
    """

    topic: str
    partition: int
    next_offset: int
    end_offset: int
    pending: OffsetRange | None = None
    in_flight: int = 0
    in_flight_end: int | None = None
    stalled: bool = False


@dataclass(frozen=True)
class Candidate:
    """A partition's next range, if its group launches now.

    ``due``: the range alone is reason to launch (a full batch, or a claim to finish).
    ``follows``: the range continues one still in flight (its run waits for the partition's
    lease, and does nothing if the range before it was not archived up to its start).
    """

    batch: OffsetRange
    due: bool
    follows: bool


def next_range(view: PartitionView, limits: BatchLimits) -> Candidate | None:
    """The range a run would archive for one partition now, or None.

    A pending claim is relaunched exactly as claimed. While one run of the partition is in
    flight, the range after it is a follow-up, so its run starts up while the other works and
    begins the moment the other ends; never more than one follow-up, none after a run whose
    range is unknown, and none after a stalled run. Appends stay in offset order because the
    ledger refuses a range that does not start at the archived position.
    """
    if view.in_flight > 1 or (view.in_flight == 1 and view.in_flight_end is None):
        return None
    if view.in_flight == 1 and view.stalled:
        # Dead, or maybe dead before its lease (the sensor fails that one only after
        # STARTUP_GRACE_SECONDS): a follow-up would find the range before it unarchived and
        # leave its own out, and one would be launched at every tick.
        return None
    if view.in_flight == 0 and view.pending is not None:
        return Candidate(view.pending, due=True, follows=False)
    start = view.next_offset
    if view.in_flight == 1:
        assert view.in_flight_end is not None
        if view.pending is not None and view.pending.end > view.in_flight_end:
            return None  # a claimed range the run in flight does not cover is unfinished
        start = max(start, view.in_flight_end)
    waiting = view.end_offset - start
    if waiting <= 0:
        return None
    size = min(waiting, limits.max_batch_messages)
    batch = OffsetRange(view.topic, view.partition, start, start + size)
    return Candidate(batch, due=waiting >= limits.batch_size, follows=view.in_flight == 1)


@dataclass(frozen=True)
class RunBatch:
    """The ranges one run archives: at most one per partition, all follow-ups or none."""

    ranges: tuple[OffsetRange, ...]
    follows: bool
    reason: str

    @property
    def messages(self) -> int:
        return sum(r.size for r in self.ranges)

    @property
    def run_key(self) -> str:
        """One range's own key; a group's first key, how many more, and a digest of them all."""
        first = self.ranges[0].run_key
        if len(self.ranges) == 1:
            return first
        digest = hashlib.sha256(",".join(r.run_key for r in self.ranges).encode()).hexdigest()
        return f"{first}+{len(self.ranges) - 1}-{digest[:12]}"

    def __str__(self) -> str:
        if len(self.ranges) == 1:
            return str(self.ranges[0])
        return f"{len(self.ranges)} ranges, {self.messages} offsets, from {self.ranges[0]}"


@dataclass(frozen=True)
class RunsPlan:
    """The runs to launch at a tick, and since when a backlog lingers (None: none waits)."""

    runs: tuple[RunBatch, ...]
    backlog_since: float | None


def plan_runs(
    views: Sequence[PartitionView],
    backlog_since: float | None,
    limits: BatchLimits,
    now: float,
) -> RunsPlan:
    """Group the partitions' next ranges into runs.

    Runs launch when one range is due (``batch_size`` messages wait, or a claim is unfinished)
    or when the backlog is ``linger_seconds`` old; then every range that waits goes along, of
    every topic, so a tick launches about ``partitions with a backlog / max_partitions_per_run``
    runs, not one per partition or per topic. The clock is the time the sensor first saw a
    backlog, so the cursor stays small whatever the number of partitions. Follow-ups go in runs
    of their own, which wait for their partitions' leases; a range larger than what is left of
    a run's message budget starts the next run. A tick launches at most ``max_runs_per_tick``
    runs, the largest first; the rest stay due.
    """
    waiting = [found for view in views if (found := next_range(view, limits)) is not None]
    if not waiting:
        return RunsPlan((), None)
    since = now if backlog_since is None else backlog_since
    full = any(c.due for c in waiting)
    if not full and now - since < limits.linger_seconds:
        return RunsPlan((), since)
    # Ties between equally far behind partitions go round over the ticks, so none waits for ever.
    turn = int(now / max(limits.linger_seconds, 1.0))
    reason = "batch full" if full else f"lingered {now - since:.1f} s"
    runs: list[RunBatch] = []
    for follows in (False, True):
        ranges = _in_turn(
            [c.batch for c in waiting if c.follows is follows],
            turn * limits.max_partitions_per_run,
        )
        runs += [
            RunBatch(chunk, follows, reason + ("; follows the runs in flight" if follows else ""))
            for chunk in _pack(ranges, limits)
        ]
    runs.sort(key=lambda run: -run.messages)
    # What does not fit is left for the next tick, still due.
    left = len(runs) > limits.max_runs_per_tick
    clock = (since if backlog_since is not None else now - limits.linger_seconds) if left else None
    return RunsPlan(tuple(runs[: limits.max_runs_per_tick]), clock)


def _in_turn(ranges: list[OffsetRange], shift: int) -> list[OffsetRange]:
    """The ranges most behind first; among equally long ones, starting ``shift`` further on."""
    ordered: list[OffsetRange] = []
    by_size = sorted(ranges, key=lambda r: (-r.size, r.topic, r.partition))
    for _, same in itertools.groupby(by_size, key=lambda r: r.size):
        tied = list(same)
        start = shift % len(tied)
        ordered += tied[start:] + tied[:start]
    return ordered


def _pack(ranges: Sequence[OffsetRange], limits: BatchLimits) -> list[tuple[OffsetRange, ...]]:
    """Consecutive chunks of ``ranges`` (in their order) within a run's bounds."""
    chunks: list[tuple[OffsetRange, ...]] = []
    chunk: list[OffsetRange] = []
    for batch in ranges:
        if chunk and (
            len(chunk) == limits.max_partitions_per_run
            or sum(r.size for r in chunk) + batch.size > limits.max_batch_messages
        ):
            chunks.append(tuple(chunk))
            chunk = []
        chunk.append(batch)
    if chunk:
        chunks.append(tuple(chunk))
    return chunks


def split_range(whole: OffsetRange, max_messages: int) -> list[OffsetRange]:
    """Consecutive ranges of at most ``max_messages`` offsets covering ``whole``, in order."""
    if max_messages < 1:
        raise ConfigError(f"max_messages must be at least 1, got {max_messages}")
    return [
        OffsetRange(whole.topic, whole.partition, start, min(start + max_messages, whole.end))
        for start in range(whole.start, whole.end, max_messages)
    ]
