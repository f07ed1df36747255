"""Which archived batches hold records of which UTC day, and which days the tables hold.

The archive's ledger locates every appended batch's bytes (``archive_batches``: object, size and
end in the object). The index reads each newly appended batch once, through that byte range
alone, and records the days its records fall on; a day's table is then made from exactly the
batches the index names, never from a scan of the whole archive.

Tables (PostgreSQL, next to the ledger; created by ``ensure_index_schema``):

- ``iceberg_indexed``: one row per indexed batch, its sequence number (the order of indexing),
  topic, partition and newest record time (the partition's archived watermark).
- ``iceberg_batch_days``: per indexed batch and day, how many of its records fall on the day.
- ``iceberg_days``: per topic and day, the index sequence number the table's day was written
  from, and its row count. A batch indexed later that touches the day makes the day stale.
"""

from __future__ import annotations

import datetime
import io
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import psycopg
from google.cloud import storage

from protoagg_dagster.core.archive_object import archive_compression
from protoagg_dagster.core.compression import decompressed
from protoagg_dagster.core.table_days import DayState, day_of

# Kept in one place so it can become one numbered migration of protoagg_dagster/schema/.
INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS iceberg_indexed (
    batch_id    bigint PRIMARY KEY,
    seq         bigserial UNIQUE,
    topic       text NOT NULL,
    partition   integer NOT NULL,
    newest      timestamptz,
    indexed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS iceberg_indexed_partition ON iceberg_indexed (topic, partition);
CREATE TABLE IF NOT EXISTS iceberg_batch_days (
    batch_id    bigint NOT NULL,
    day         date NOT NULL,
    records     bigint NOT NULL,
    PRIMARY KEY (batch_id, day)
);
CREATE INDEX IF NOT EXISTS iceberg_batch_days_day ON iceberg_batch_days (day);
CREATE TABLE IF NOT EXISTS iceberg_days (
    topic       text NOT NULL,
    day         date NOT NULL,
    seq         bigint NOT NULL,
    rows        bigint NOT NULL,
    written_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, day)
);
"""
_INDEX_LOCK_ID = 0x70726F746F696478
_EPOCH = datetime.date(1970, 1, 1)
_READ_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class LocatedBatch:
    """An appended batch and where its bytes are: ``[size - length, size)`` of ``object_name``."""

    batch_id: int
    topic: str
    partition: int
    start_offset: int
    object_name: str
    length: int
    object_size: int


def ensure_index_schema(conn: psycopg.Connection) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_INDEX_LOCK_ID,))
        if conn.execute("SELECT to_regclass('iceberg_days')").fetchone() == (None,):
            conn.execute(INDEX_SCHEMA)


def _date(day: int) -> datetime.date:
    return _EPOCH + datetime.timedelta(days=day)


def _day(date: datetime.date) -> int:
    return (date - _EPOCH).days


_LOCATED = (
    "b.batch_id, b.topic, b.partition, b.start_offset, b.object_name, "
    "COALESCE(b.appended_bytes, 0), COALESCE(b.object_size, 0)"
)


def unindexed(conn: psycopg.Connection, topics: Sequence[str], limit: int) -> list[LocatedBatch]:
    """Appended batches of ``topics`` the index has not read yet, oldest first."""
    rows = conn.execute(
        f"SELECT {_LOCATED} FROM archive_batches b "
        "LEFT JOIN iceberg_indexed i ON i.batch_id = b.batch_id "
        "WHERE b.state = 'appended' AND b.topic = ANY(%s) AND i.batch_id IS NULL "
        "ORDER BY b.batch_id LIMIT %s",
        (list(topics), limit),
    ).fetchall()
    return [LocatedBatch(*row) for row in rows]


def batch_stream(
    bucket: storage.Bucket, batch: LocatedBatch, compressions: dict[str, str]
) -> BinaryIO:
    """The batch's frames, uncompressed, streamed from its byte range (bounded memory).

    ``compressions`` caches each object's compression (one metadata read per object).
    """
    if batch.object_name not in compressions:
        blob = bucket.get_blob(batch.object_name)
        compressions[batch.object_name] = archive_compression(blob.metadata if blob else None)
    raw = _RangeStream(
        bucket.blob(batch.object_name), batch.object_size - batch.length, batch.object_size
    )
    buffered = io.BufferedReader(raw, buffer_size=_READ_CHUNK)
    return decompressed(buffered, compressions[batch.object_name])


class _RangeStream(io.RawIOBase):
    """``[start, end)`` of an object, fetched in ranged reads of _READ_CHUNK bytes."""

    def __init__(self, blob: storage.Blob, start: int, end: int) -> None:
        super().__init__()
        self._blob, self._position, self._end = blob, start, end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._position >= self._end:
            return 0
        last = min(self._position + len(buffer), self._end) - 1
        data = self._blob.download_as_bytes(start=self._position, end=last, checksum=None)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def index_batches(
    conn: psycopg.Connection,
    bucket: storage.Bucket,
    formats: dict[str, str],
    limit: int,
    seconds: float | None = None,
) -> int:
    """Read up to ``limit`` unindexed batches of the topics in ``formats``; return how many.

    With ``seconds``, no batch is started after that long (a sensor tick has a time limit).

    One transaction per batch, under an advisory lock that indexers take in turn, so sequence
    numbers become visible in order: a day written from everything up to number S has seen
    every batch numbered S or below.
    """
    done = 0
    compressions: dict[str, str] = {}
    deadline = None if seconds is None else time.monotonic() + seconds
    for batch in unindexed(conn, sorted(formats), limit):
        if deadline is not None and time.monotonic() > deadline:
            break
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_INDEX_LOCK_ID,))
            seen = conn.execute(
                "SELECT 1 FROM iceberg_indexed WHERE batch_id = %s", (batch.batch_id,)
            ).fetchone()
            if seen is not None:
                continue  # another indexer read it meanwhile
            _index_batch(conn, bucket, batch, formats[batch.topic], compressions)
            done += 1
    return done


def _index_batch(
    conn: psycopg.Connection,
    bucket: storage.Bucket,
    batch: LocatedBatch,
    format_name: str,
    compressions: dict[str, str],
) -> None:
    # pyarrow loads with the first batch indexed, not when the definitions are imported.
    from protoagg_dagster.iceberg.columns import record_times

    days: Counter[int] = Counter()
    newest: int | None = None
    if batch.length:
        with batch_stream(bucket, batch, compressions) as stream:
            for seconds in record_times(format_name, stream):
                days[day_of(seconds)] += 1
                newest = seconds if newest is None or seconds > newest else newest
    conn.execute(
        "INSERT INTO iceberg_indexed (batch_id, topic, partition, newest) "
        "VALUES (%s, %s, %s, to_timestamp(%s))",
        (batch.batch_id, batch.topic, batch.partition, newest),
    )
    with conn.cursor().copy("COPY iceberg_batch_days (batch_id, day, records) FROM STDIN") as copy:
        for day, count in days.items():
            copy.write_row((batch.batch_id, _date(day), count))


def watermarks(conn: psycopg.Connection, topic: str) -> dict[int, int]:
    """Per partition, the newest record time (epoch seconds) of its indexed batches."""
    rows = conn.execute(
        "SELECT partition, extract(epoch FROM max(newest))::bigint FROM iceberg_indexed "
        "WHERE topic = %s AND newest IS NOT NULL GROUP BY partition",
        (topic,),
    ).fetchall()
    return {int(partition): int(newest) for partition, newest in rows}


def day_states(conn: psycopg.Connection, topic: str) -> dict[int, DayState]:
    """Every day the topic's indexed batches touch: its newest index entry and written one."""
    rows = conn.execute(
        "SELECT d.day, max(i.seq), w.seq FROM iceberg_batch_days d "
        "JOIN iceberg_indexed i ON i.batch_id = d.batch_id "
        "LEFT JOIN iceberg_days w ON w.topic = i.topic AND w.day = d.day "
        "WHERE i.topic = %s GROUP BY d.day, w.seq",
        (topic,),
    ).fetchall()
    return {_day(day): DayState(int(indexed), written) for day, indexed, written in rows}


def batches_of_day(
    conn: psycopg.Connection, topic: str, day: int
) -> tuple[int, list[LocatedBatch]]:
    """The index's newest sequence number, and the batches holding records of ``day``.

    In partition and offset order, so the table's rows follow the archive's order.
    """
    row = conn.execute("SELECT COALESCE(max(seq), 0) FROM iceberg_indexed").fetchone()
    seq = int(row[0]) if row else 0
    rows = conn.execute(
        f"SELECT {_LOCATED} FROM iceberg_batch_days d "
        "JOIN iceberg_indexed i ON i.batch_id = d.batch_id "
        "JOIN archive_batches b ON b.batch_id = d.batch_id "
        "WHERE i.topic = %s AND d.day = %s AND i.seq <= %s "
        "ORDER BY b.partition, b.start_offset",
        (topic, _date(day), seq),
    ).fetchall()
    return seq, [LocatedBatch(*r) for r in rows]


def archived_rows(conn: psycopg.Connection, topic: str, day: int) -> int:
    """How many archived records of ``topic`` fall on ``day``, by the index."""
    row = conn.execute(
        "SELECT COALESCE(sum(d.records), 0) FROM iceberg_batch_days d "
        "JOIN iceberg_indexed i ON i.batch_id = d.batch_id WHERE i.topic = %s AND d.day = %s",
        (topic, _date(day)),
    ).fetchone()
    return int(row[0]) if row else 0


def record_written(conn: psycopg.Connection, topic: str, day: int, seq: int, rows: int) -> None:
    """The table's day now holds the batches indexed up to ``seq``; never moves backwards."""
    conn.execute(
        "INSERT INTO iceberg_days (topic, day, seq, rows) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (topic, day) DO UPDATE SET seq = excluded.seq, rows = excluded.rows, "
        "written_at = now() WHERE iceberg_days.seq <= excluded.seq",
        (topic, _date(day), seq, rows),
    )


def iter_days(conn: psycopg.Connection, topic: str) -> Iterator[tuple[int, int]]:
    """(day, rows) of every day written to the topic's table."""
    for day, rows in conn.execute(
        "SELECT day, rows FROM iceberg_days WHERE topic = %s ORDER BY day", (topic,)
    ):
        yield _day(day), int(rows)
