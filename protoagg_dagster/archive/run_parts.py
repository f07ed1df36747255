"""What an archive run carries from step to step: its ranges' values, and the ranges that failed.

A run archives ranges of many partitions. Each step works range by range (or object by object)
and a range that fails leaves the run's other ranges to go on: it is reported, left out of the
next steps, and archived by a later run (the ledger still says where its partition stands).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import dagster as dg
import psycopg
from google.api_core import exceptions as gexc
from kafka.errors import KafkaError
from pydantic import Field

from protoagg_dagster.archive.assets import ARCHIVE_ASSET
from protoagg_dagster.archive.ledger import AppendedBatch, Claim
from protoagg_dagster.core.batch import FramedBatch
from protoagg_dagster.core.compression import NONE
from protoagg_dagster.core.errors import ConfigError, ProtoaggError
from protoagg_dagster.core.formats import ArchiveFormat
from protoagg_dagster.core.planning import OffsetRange, parse_all_offsets
from protoagg_dagster.core.records import Rejection
from protoagg_dagster.kafka.reader import RangeRead

T = TypeVar("T")

# The errors one range can meet alone (its object, its partition's lease, a read or a claim):
# anything else is a bug, and fails the run.
RANGE_ERRORS = (ProtoaggError, psycopg.Error, gexc.GoogleAPIError, KafkaError)


class RangeConfig(dg.Config):
    """Offsets ``[start_offset, end_offset)`` of one partition."""

    topic: str = Field(description="Kafka topic.")
    partition: int = Field(description="Partition number.")
    start_offset: int = Field(description="First offset to archive.")
    end_offset: int = Field(description="Offset after the last one to archive.")


class ArchiveRunConfig(dg.Config):
    """The ranges one run archives, at most one per partition.

    Either form, or both: ``ranges`` one object per range (as written by hand on the
    Launchpad), ``offsets`` one line per topic (as the sensor and backfills write them: a
    fifth of the list's size for every process that parses the run's config).
    """

    ranges: list[RangeConfig] = Field(
        default=[], description="Offset ranges, at most one per partition."
    )
    offsets: dict[str, str] = Field(
        default={},
        description='Per topic, ranges as "partition:start-end" separated by commas, '
        'e.g. {"logs": "0:100-200,3:40-90"}.',
    )

    def offset_ranges(self) -> list[OffsetRange]:
        try:
            found = [
                OffsetRange(r.topic, r.partition, r.start_offset, r.end_offset) for r in self.ranges
            ] + parse_all_offsets(self.offsets)
        except ConfigError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from exc
        keys = [(r.topic, r.partition) for r in found]
        if len(set(keys)) != len(keys):
            raise dg.Failure(
                description="a run archives at most one range per partition: split the ranges "
                "of one partition over runs (one after the other)",
                allow_retries=False,
            )
        return found


@dataclass(frozen=True)
class Failed:
    """A range that failed at ``step``: archived by a later run."""

    batch: OffsetRange
    step: str
    reason: str
    # A setting or object a person must fix (a ConfigError): the run fails once the others
    # are archived, so it is seen.
    permanent: bool = False

    def __str__(self) -> str:
        return f"{self.batch}: {self.step} failed: {self.reason}"


@dataclass(frozen=True)
class Consumed:
    """One range read, parsed as it arrived (``read.messages`` is empty: ``records`` holds it)."""

    read: RangeRead
    format: ArchiveFormat
    records: FramedBatch
    # The whole archive's asset and the asset of the topic's PROTOAGG_TOPICS entry.
    assets: tuple[dg.AssetKey, ...] = (ARCHIVE_ASSET,)


@dataclass(frozen=True)
class Claimed:
    consumed: Consumed
    claim: Claim
    dead_letters: tuple[Rejection, ...]
    tombstones: int


@dataclass(frozen=True)
class Encoded:
    """A range's piece: its frames, compressed into one member/frame with ``compression``."""

    claimed: Claimed
    data: bytes
    compression: str = NONE


@dataclass(frozen=True)
class RunParts(Generic[T]):
    """A step's output: the ranges still going, the failed ones, seconds per step so far.

    ``done`` counts the ranges that needed nothing more (already archived, left out).
    """

    parts: tuple[T, ...]
    failed: tuple[Failed, ...]
    seconds: dict[str, float]
    done: int = 0


class RangeFailures:
    """Isolates each range's failure at one step; re-raises when every range failed.

    When nothing at all succeeded, the step fails as a whole (the op's RetryPolicy retries a
    transient error, a configuration error fails without retries): a database or broker outage
    is the run's problem, not a range's.
    """

    def __init__(self, step: str, context: dg.OpExecutionContext) -> None:
        self.step = step
        self.context = context
        self.failed: list[Failed] = []
        self._first: BaseException | None = None

    @contextlib.contextmanager
    def each(self, batches: Sequence[OffsetRange]) -> Iterator[None]:
        """Run the body for ``batches`` (one range, or the ranges of one object)."""
        try:
            yield
        except RANGE_ERRORS as exc:
            self._first = self._first or exc
            for batch in batches:
                self.failed.append(
                    Failed(batch, self.step, str(exc), permanent=isinstance(exc, ConfigError))
                )
            self.context.log.warning(
                f"{self.step}: {len(batches)} range(s) failed, the others go on: "
                f"{', '.join(map(str, batches))}: {exc}"
            )

    def has(self, batch: OffsetRange) -> bool:
        """Whether ``batch`` failed at this step."""
        return any(f.batch == batch for f in self.failed)

    def raise_if_all_failed(self, ranges: int) -> None:
        """Re-raise the first error if all ``ranges`` the step was given failed."""
        if self._first is not None and len(self.failed) >= ranges:
            raise self._first


@dataclass(frozen=True)
class Appended:
    """A range whose claim is confirmed: where its piece is, and what it added."""

    part: Encoded
    batch: AppendedBatch
    # Records this run appended (0: an earlier attempt's piece is the one on the object).
    records: int
    # Holes between the partition's previous appended range and this one.
    gaps: list[tuple[int, int]]


# Concrete classes: Dagster resolves an op's output type from a plain class, not a generic alias.
@dataclass(frozen=True)
class ConsumedRun(RunParts[Consumed]):
    pass


@dataclass(frozen=True)
class ClaimedRun(RunParts[Claimed]):
    pass


@dataclass(frozen=True)
class EncodedRun(RunParts[Encoded]):
    pass
