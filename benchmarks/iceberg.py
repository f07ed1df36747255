"""The Iceberg copy: rows/s per core, peak memory, table size, query time, commit time.

    flock /tmp/protoagg-bench.lock .venv/bin/python benchmarks/iceberg.py [-n N] [--smoke] \
        [--batch-records R] --admin-dsn postgresql://... --gcs http://... [--bucket B] [--keep]

Prepares one UTC day (2026-11-01) of N log lines of 125 bytes (``compression.log_line``) as an
archive would hold them: batches of R records (the archive's default largest run), each one
zstd frame in its own object, recorded ``appended`` in the ledger of a fresh database. Then,
each stage in a child process of its own so its peak RSS (VmHWM) is its own:

1. **index**: ``index_batches`` reads every batch's bytes once and records its days.
2. **write**: ``write_day`` decodes the day's batches (ranged reads, zstd, ``ProtoLog``),
   streams Parquet row groups to the table's ``data/`` and commits the day; rows/s per core =
   rows / (user + system CPU seconds of the process); the commit (``replace_day``) is timed
   alone.
3. **query**: ``protoagg query "SELECT ... WHERE log_id = '...'" --from DAY --to DAY`` as a
   person runs it (a fresh process: imports, catalog, DuckDB), wall time, median of 3.

Table bytes (the day's Parquet files) are compared with the compressed archive's bytes.
A table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.compression import log_line  # noqa: E402
from protoagg_dagster.archive.ledger import ledger_connection  # noqa: E402
from protoagg_dagster.core.compression import Codec  # noqa: E402
from protoagg_dagster.core.framing import ProtoLogFrames  # noqa: E402
from protoagg_dagster.core.records import LogRecord  # noqa: E402
from protoagg_dagster.core.table_days import parse_day  # noqa: E402
from protoagg_dagster.resources import GCSResource, PostgresResource  # noqa: E402
from protoagg_dagster.resources.iceberg import IcebergResource  # noqa: E402

DAY = "2026-11-01"
TOPIC = "bench-logs"


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def prepare(spec: dict[str, Any], n: int, batch_records: int) -> dict[str, Any]:
    """Upload the day's batches and record them in the ledger; return a logId to look up.

    One batch of records spread over the whole day is encoded once; every batch is that batch
    with the first 8 hex digits of each logId replaced by the batch number (unique ids, no
    re-encoding of 10M records), compressed as one zstd frame like an archive's piece.
    """
    gcs = GCSResource(bucket=spec["bucket"], emulator_host=spec["gcs"])
    bucket = gcs.get_bucket()
    rng = random.Random(30)
    start = parse_day(DAY) * 86_400
    codec = Codec("zstd", 3)
    template = bytearray()
    id_offsets = []
    append = ProtoLogFrames().append
    for i in range(batch_records):
        log_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        second = start + i * 86_400 // batch_records
        # Frame: 4-byte length, tag 0x0a, 1-byte length 36, then the logId's text.
        id_offsets.append(len(template) + 6)
        append(template, LogRecord(i, log_id, second, (i * 7919) % 10**9, log_line(rng, i, 125)))
    archive_bytes, probe = 0, ""
    with ledger_connection(PostgresResource(dsn=spec["dsn"])) as conn:
        for number, first in enumerate(range(0, n, batch_records)):
            count = min(batch_records, n - first)
            frames = template[: id_offsets[count] - 6] if count < batch_records else template
            stamp = f"{number:08x}".encode()
            for offset in id_offsets[:count]:
                frames[offset : offset + 8] = stamp
            if first <= n // 2 < first + count:
                at = id_offsets[n // 2 - first]
                probe = frames[at : at + 36].decode()
            data = codec.compress(bytes(frames))
            name = f"{spec['prefix']}/log.{number:04d}.pb.zst"
            blob = bucket.blob(name)
            blob.metadata = {"protoagg-format": "log", "protoagg-compression": "zstd"}
            blob.upload_from_string(data)
            archive_bytes += len(data)
            conn.execute(
                "INSERT INTO archive_batches (topic, partition, start_offset, end_offset, "
                "object_name, state, records, claimed, appended_bytes, object_size) "
                "VALUES (%s, 0, %s, %s, %s, 'appended', %s, %s, %s, %s)",
                (TOPIC, first, first + count, name, count, count, len(data), len(data)),
            )
    return {"archive_bytes": archive_bytes, "probe": probe}


def _resources(spec: dict[str, Any]) -> tuple[GCSResource, PostgresResource, IcebergResource]:
    return (
        GCSResource(bucket=spec["bucket"], emulator_host=spec["gcs"]),
        PostgresResource(dsn=spec["dsn"]),
        IcebergResource(
            postgres_dsn=spec["dsn"],
            bucket=spec["bucket"],
            warehouse_prefix=f"{spec['prefix']}/iceberg",
            namespace="bench",
            emulator_host=spec["gcs"],
        ),
    )


def stage_index(spec: dict[str, Any]) -> dict[str, Any]:
    from protoagg_dagster.iceberg.day_index import ensure_index_schema, index_batches

    gcs, postgres, _ = _resources(spec)
    began, cpu = time.perf_counter(), _cpu_seconds()
    with ledger_connection(postgres) as conn:
        ensure_index_schema(conn)
        batches = index_batches(conn, gcs.get_bucket(), {TOPIC: "log"}, 10**6)
    return {
        "batches": batches,
        "seconds": time.perf_counter() - began,
        "cpu_seconds": _cpu_seconds() - cpu,
        "peak_rss_mb": _peak_rss_mb(),
    }


def stage_write(spec: dict[str, Any]) -> dict[str, Any]:
    from protoagg_dagster.iceberg import writer
    from protoagg_dagster.iceberg.columns import layout_of
    from protoagg_dagster.iceberg.day_index import batches_of_day

    gcs, postgres, iceberg = _resources(spec)
    day = parse_day(DAY)
    catalog = iceberg.get_catalog()
    # What the process holds before converting anything: Python, Dagster, pyiceberg, pyarrow.
    baseline = _peak_rss_mb()
    began, cpu = time.perf_counter(), _cpu_seconds()
    with ledger_connection(postgres) as conn:
        seq, batches = batches_of_day(conn, TOPIC, day)
        table = writer.ensure_table(catalog, iceberg.namespace, TOPIC, "log")
        layout = layout_of("log")
        tables = writer.day_tables(gcs.get_bucket(), layout, day, batches)
        paths, rows = writer.write_files(table.io, table.location(), layout, day, tables)
        committing = time.perf_counter()
        writer.replace_day(conn, catalog, iceberg.namespace, TOPIC, day, paths, seq, rows)
        commit = time.perf_counter() - committing
    seconds, cpu_seconds = time.perf_counter() - began, _cpu_seconds() - cpu
    table = catalog.load_table((iceberg.namespace, TOPIC))
    table_bytes = sum(t.file.file_size_in_bytes for t in table.scan().plan_files())
    return {
        "rows": rows,
        "files": len(paths),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "process_cpu_seconds": _cpu_seconds(),
        "commit_seconds": commit,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_mb": baseline,
        "table_bytes": table_bytes,
    }


def _child(stage: str, spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--stage", stage, "--spec", json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def query_seconds(spec: dict[str, Any], probe: str) -> tuple[float, str]:
    env = {
        **os.environ,
        "PROTOAGG_POSTGRES_DSN": spec["dsn"],
        "PROTOAGG_GCS_BUCKET": spec["bucket"],
        "PROTOAGG_ICEBERG_PREFIX": f"{spec['prefix']}/iceberg",
        "PROTOAGG_ICEBERG_NAMESPACE": "bench",
        "STORAGE_EMULATOR_HOST": spec["gcs"],
    }
    sql_text = f'SELECT log_id, "timestamp", message FROM "{TOPIC}" WHERE log_id = \'{probe}\''
    times, printed = [], ""
    for _ in range(3):
        began = time.perf_counter()
        printed = subprocess.run(
            [str(ROOT / ".venv/bin/protoagg"), "query", sql_text, "--from", DAY, "--to", DAY],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        times.append(time.perf_counter() - began)
    return statistics.median(times), printed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=10_000_000)
    parser.add_argument("--smoke", action="store_true", help="50k records: it runs and prints")
    parser.add_argument("--batch-records", type=int, default=200_000)
    parser.add_argument("--admin-dsn", default=os.environ.get("PROTOAGG_BENCH_ADMIN_DSN"))
    parser.add_argument("--gcs", default=os.environ.get("STORAGE_EMULATOR_HOST"))
    parser.add_argument("--bucket", default="logs")
    parser.add_argument("--keep", action="store_true", help="keep the database and objects")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        stage = {"index": stage_index, "write": stage_write}[args.stage]
        print(json.dumps(stage(json.loads(args.spec))))
        return 0
    if args.smoke:
        args.n, args.batch_records = 50_000, 20_000
    if not args.admin_dsn or not args.gcs:
        parser.error("--admin-dsn and --gcs (or PROTOAGG_BENCH_ADMIN_DSN, STORAGE_EMULATOR_HOST)")
    unique = uuid.uuid4().hex[:8]
    database = f"bench_iceberg_{unique}"
    with psycopg.connect(args.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    spec = {
        "dsn": args.admin_dsn.rsplit("/", 1)[0] + f"/{database}",
        "gcs": args.gcs,
        "bucket": args.bucket,
        "prefix": f"bench-iceberg-{unique}",
    }
    try:
        began = time.perf_counter()
        prepared = prepare(spec, args.n, args.batch_records)
        print(f"prepared {args.n:,} records in {time.perf_counter() - began:.0f} s", flush=True)
        index = _child("index", spec)
        write = _child("write", spec)
        query, printed = query_seconds(spec, prepared["probe"])
        assert prepared["probe"] in printed, printed
    finally:
        if args.keep:
            print(json.dumps(spec))
        else:
            with psycopg.connect(args.admin_dsn, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(database)
                    )
                )
    result = {
        "records": args.n,
        "index_rows_per_s": args.n / index["seconds"],
        "index_peak_rss_mb": index["peak_rss_mb"],
        "write_rows_per_s": write["rows"] / write["seconds"],
        "write_rows_per_cpu_s": write["rows"] / write["cpu_seconds"],
        "write_rows_per_process_cpu_s": write["rows"] / write["process_cpu_seconds"],
        "write_peak_rss_mb": write["peak_rss_mb"],
        "write_rss_before_mb": write["rss_before_mb"],
        "commit_seconds": write["commit_seconds"],
        "table_bytes": write["table_bytes"],
        "archive_bytes": prepared["archive_bytes"],
        "table_to_archive": write["table_bytes"] / prepared["archive_bytes"],
        "query_find_log_id_s": query,
        "files": write["files"],
    }
    for key, value in result.items():
        print(f"{key:24} {value:,.3f}" if isinstance(value, float) else f"{key:24} {value:,}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
