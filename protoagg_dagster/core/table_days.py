"""Which days of a topic's Iceberg table to write: pure decisions on UTC days (no I/O).

A record belongs to the UTC day of its timestamp. A day is written once every partition of the
topic has archived records past the day's end plus a grace, and written again when batches that
touch it were archived after it was written (it is stale). Days are numbered from 1970-01-01.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass

from protoagg_dagster.core.errors import ConfigError

SECONDS_PER_DAY = 86_400
_EPOCH = datetime.date(1970, 1, 1)


def day_of(seconds: int) -> int:
    """The UTC day of an epoch time in seconds (floor: before 1970 too)."""
    return seconds // SECONDS_PER_DAY


def day_key(day: int) -> str:
    """A day as Dagster's daily partition key, ``YYYY-MM-DD``."""
    return (_EPOCH + datetime.timedelta(days=day)).isoformat()


def parse_day(text: str) -> int:
    """``YYYY-MM-DD`` as a day number; ConfigError for anything else."""
    try:
        return (datetime.date.fromisoformat(text.strip()) - _EPOCH).days
    except ValueError:
        raise ConfigError(f"{text!r} is not a date of the form YYYY-MM-DD") from None


@dataclass(frozen=True)
class DayState:
    """What the index knows of one day: the newest index entry touching it, and the written one.

    ``indexed`` is the sequence number of the latest indexed batch with records of the day;
    ``written`` the one the table's day was made from (None: never written).
    """

    indexed: int
    written: int | None = None

    @property
    def needs_writing(self) -> bool:
        return self.written is None or self.written < self.indexed


def ready_through(watermarks: Mapping[int, int], grace_seconds: int) -> int | None:
    """The last day every partition has passed by ``grace_seconds``; None if no partition.

    ``watermarks`` maps each partition to the newest record time (epoch seconds) it archived.
    A day is done when that time, minus the grace, has reached the day's end in every
    partition: records of the day may still arrive until then.
    """
    if not watermarks:
        return None
    low = min(watermarks.values()) - grace_seconds
    # Day d ends at (d + 1) * SECONDS_PER_DAY; the last d with that <= low.
    return low // SECONDS_PER_DAY - 1


def days_to_write(
    days: Mapping[int, DayState],
    watermarks: Mapping[int, int],
    grace_seconds: int,
    limit: int,
) -> list[int]:
    """The days to (re)write now, oldest first, at most ``limit``."""
    last = ready_through(watermarks, grace_seconds)
    if last is None:
        return []
    due = sorted(day for day, state in days.items() if day <= last and state.needs_writing)
    return due[:limit]
