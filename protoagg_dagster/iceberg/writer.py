"""Write one UTC day of a topic's table from the archive, replacing the day in one commit.

The day's records are decoded from the batches the index names, in row groups of ROW_GROUP_ROWS
streamed by ``pyarrow.parquet.ParquetWriter`` into new files under the table's ``data/``; then
one Iceberg transaction deletes the day's files and adds the new ones. Readers see the whole
old day or the whole new one; a run that dies before the commit leaves only unreferenced files,
which maintenance removes.

Concurrent writers of one day (two deployments, a run and a backfill) take turns for the commit
on a PostgreSQL advisory lock, and a writer whose data is older than what the day holds drops
its files. A commit that loses a race anyway (another catalog client, maintenance) is retried on
a freshly loaded table: the retry deletes whatever the day holds then, so the day ends once.
"""

from __future__ import annotations

import datetime
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from google.cloud import storage
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError, ValidationException
from pyiceberg.io import FileIO
from pyiceberg.table import Table

from protoagg_dagster.core.errors import BackendError
from protoagg_dagster.core.table_days import day_key
from protoagg_dagster.iceberg.columns import TIMESTAMP, TableLayout, day_seconds, layout_of
from protoagg_dagster.iceberg.day_index import (
    LocatedBatch,
    batch_stream,
    batches_of_day,
    record_written,
)

# Rows per Parquet row group: bounds the memory of a conversion (~45 MB of 125-byte log lines
# as Python objects, ~25 MB as Arrow) while keeping row groups large enough for column
# statistics and DuckDB's parallel scan to pay.
ROW_GROUP_ROWS = 131_072
# A day of more rows continues in another file, so no single upload grows without bound.
FILE_ROWS = 32 * ROW_GROUP_ROWS
# 1% false positives: ~150 KB of filter per row group of ROW_GROUP_ROWS distinct values.
BLOOM_FPP = 0.01
COMMIT_ATTEMPTS = 5
TABLE_PROPERTIES = {
    "write.parquet.compression-codec": "zstd",
    "write.parquet.row-group-limit": str(ROW_GROUP_ROWS),
    # Our own loop retries a lost commit on a fresh table (see replace_day).
    "commit.retry.num-retries": "0",
    "format-version": "2",
}


@dataclass(frozen=True)
class DayWritten:
    """What one write of a day did."""

    topic: str
    day: int
    rows: int
    files: tuple[str, ...]
    batches: int
    seq: int
    committed: bool
    snapshot_id: int | None


def day_filter(day: int) -> str:
    """The day as an Iceberg row filter on ``timestamp`` (its partition, exactly)."""
    low, high = day_seconds(day)
    return f"{TIMESTAMP} >= '{_iso(low)}' and {TIMESTAMP} < '{_iso(high)}'"


def _iso(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()


def ensure_table(catalog: Catalog, namespace: str, topic: str, format_name: str) -> Table:
    """The topic's table, created (with its namespace) on first use.

    A column the format's layout gained since the table was made is added by an Iceberg schema
    update: old days keep their files and read the new column as null.
    """
    layout = layout_of(format_name)
    identifier = (namespace, topic)
    try:
        table = catalog.load_table(identifier)
    except NoSuchTableError:
        pass
    else:
        have = {field.name for field in table.schema().fields}
        if any(field.name not in have for field in layout.schema.fields):
            with table.update_schema() as update:
                update.union_by_name(layout.schema)
            table = catalog.load_table(identifier)
        return table
    catalog.create_namespace_if_not_exists(namespace)
    return catalog.create_table_if_not_exists(
        identifier,
        schema=layout.schema,
        partition_spec=layout.partition_spec,
        properties=TABLE_PROPERTIES,
    )


def write_files(
    io: FileIO,
    location: str,
    layout: TableLayout,
    day: int,
    tables: Iterable[pa.Table],
) -> tuple[list[str], int]:
    """Stream ``tables`` (row groups of the day) into new Parquet files; (paths, rows)."""
    paths: list[str] = []
    rows = 0
    writer: pq.ParquetWriter | None = None
    stream = None
    in_file = 0
    try:
        for table in tables:
            if not table.num_rows:
                continue
            if writer is None or in_file >= FILE_ROWS:
                if writer is not None:
                    writer.close()
                    assert stream is not None
                    stream.close()
                path = f"{location}/data/{TIMESTAMP}_day={day_key(day)}/{uuid.uuid4()}.parquet"
                stream = io.new_output(path).create(overwrite=False)
                writer = pq.ParquetWriter(
                    stream,
                    layout.arrow,
                    compression="zstd",
                    use_dictionary=list(layout.dictionary_columns),
                    bloom_filter_options={
                        column: {"ndv": ROW_GROUP_ROWS, "fpp": BLOOM_FPP}
                        for column in layout.lookup_columns
                    },
                )
                paths.append(path)
                in_file = 0
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            in_file += table.num_rows
            rows += table.num_rows
            del table
            # Arrow's allocator keeps freed row groups' memory otherwise (RSS only grows).
            pa.default_memory_pool().release_unused()
    finally:
        if writer is not None:
            writer.close()
        if stream is not None:
            stream.close()
    return paths, rows


def day_tables(
    bucket: storage.Bucket, layout: TableLayout, day: int, batches: Iterable[LocatedBatch]
) -> Iterator[pa.Table]:
    """The day's records of ``batches`` as Arrow tables of at most ROW_GROUP_ROWS rows."""
    columns = layout.columns(day)
    compressions: dict[str, str] = {}
    for batch in batches:
        if not batch.length:
            continue
        with batch_stream(bucket, batch, compressions) as stream:
            yield from columns.feed(stream, batch.partition, ROW_GROUP_ROWS)
    if columns.rows:
        yield columns.take()


def write_day(
    conn: psycopg.Connection,
    bucket: storage.Bucket,
    catalog: Catalog,
    namespace: str,
    topic: str,
    format_name: str,
    day: int,
) -> DayWritten:
    """Write ``day`` of ``topic``'s table from the batches the index names, in one commit."""
    seq, batches = batches_of_day(conn, topic, day)
    table = ensure_table(catalog, namespace, topic, format_name)
    layout = layout_of(format_name)
    paths, rows = write_files(
        table.io, table.location(), layout, day, day_tables(bucket, layout, day, batches)
    )
    committed, snapshot = replace_day(conn, catalog, namespace, topic, day, paths, seq, rows)
    return DayWritten(topic, day, rows, tuple(paths), len(batches), seq, committed, snapshot)


def replace_day(
    conn: psycopg.Connection,
    catalog: Catalog,
    namespace: str,
    topic: str,
    day: int,
    paths: list[str],
    seq: int,
    rows: int,
) -> tuple[bool, int | None]:
    """Make ``paths`` the day's only files, in one Iceberg transaction; (committed, snapshot).

    Under the day's advisory lock: if the day already holds data of a newer index state, our
    files are dropped and nothing is committed.
    """
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"iceberg day {namespace}.{topic} {day}",),
        )
        held = conn.execute(
            "SELECT seq FROM iceberg_days WHERE topic = %s AND day = %s",
            (topic, datetime.date(1970, 1, 1) + datetime.timedelta(days=day)),
        ).fetchone()
        if held is not None and int(held[0]) > seq:
            table = catalog.load_table((namespace, topic))
            for path in paths:
                table.io.delete(path)
            return False, None
        snapshot = _commit_replace(catalog, namespace, topic, day, paths)
        record_written(conn, topic, day, seq, rows)
    return True, snapshot


def _commit_replace(
    catalog: Catalog, namespace: str, topic: str, day: int, paths: list[str]
) -> int | None:
    last: Exception | None = None
    for _ in range(COMMIT_ATTEMPTS):
        table = catalog.load_table((namespace, topic))
        try:
            with table.transaction() as transaction, warnings.catch_warnings():
                # A first write of a day deletes nothing, which pyiceberg warns about.
                warnings.filterwarnings("ignore", "Delete operation did not match any records")
                transaction.delete(day_filter(day))
                if paths:
                    transaction.add_files(paths, check_duplicate_files=False)
        except (CommitFailedException, ValidationException) as exc:
            last = exc
            continue
        current = catalog.load_table((namespace, topic)).current_snapshot()
        return None if current is None else current.snapshot_id
    raise BackendError(
        f"the Iceberg commit of {namespace}.{topic} day {day_key(day)} lost "
        f"{COMMIT_ATTEMPTS} races in a row: {last}"
    )
