"""Does dedupe stay flat as processed_logs grows? claim_batch time vs ids already in the window.

    .venv/bin/python benchmarks/dedupe_scaling.py [--smoke] [--sizes 0,1000000,10000000] \
        [--partitions 7] [--batch 10000] [--batches 7] [--explain] \
        [--dsn ...] --admin-dsn postgresql://postgres:postgres@127.0.0.1:PORT/postgres

Needs a superuser DSN (``--admin-dsn``, default $PROTOAGG_BENCH_ADMIN_DSN): every scenario gets its
own fresh database, dropped at the end. Scenarios:

- ``<size>``: ``size`` ids already in the current day's partition (one partition);
- ``<size>/<P>``: the largest size spread over ``P`` day partitions, made the way the maintenance
  job makes them (``dedupe_window.advance_window`` with fake later days; the last one is the claim
  day), so each claim probes ``P - 1`` older partitions (``NOT EXISTS``) and inserts into the last;
- ``0/<P>``: ``P`` empty partitions (the probe's fixed cost per partition).

Preloading is bulk work, not what is measured: each filled partition is detached, loses its
index, gets random uuids by ``COPY`` (dummy batch_id 0), gets its primary key built in one sort,
and is attached again; then ``VACUUM (ANALYZE) processed_logs`` (so autovacuum does not start on
the fresh rows mid-measurement) and a ``CHECKPOINT``.

Measured: batches of ``--batch`` seed-shaped records (``run_once.make_values``, 5% repeated
logIds, all new to the window), each like a run: a fresh connection (``PostgresResource
.get_connection()``: connect + ensure_schema, timed apart), ``claim_batch`` (timed: temp table,
COPY of the candidates, the claiming INSERT), ``finish_batch``. The same batch goes to every
scenario, round-robin with a rotating order, after one unmeasured warm-up batch each, so load
from other work on the machine hits all scenarios alike. Reported: median claim time, ids/s,
WAL bytes per batch (from ``pg_current_wal_lsn``; the instance should be private to the
benchmark) and the ratio to the empty-window scenario. ``--explain`` loads auto_explain for one
extra batch per scenario and prints the claiming INSERT's plan (ANALYZE, BUFFERS, WAL).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run_once import (  # noqa: E402
    _rounded,
    add_service_args,
    code_version,
    database,
    make_values,
    require_service_args,
)
from protoagg_dagster.core.planning import OffsetRange  # noqa: E402
from protoagg_dagster.core.records import KafkaMessage, LogRecord, parse_messages  # noqa: E402
from protoagg_dagster.dedupe_window import advance_window, partition_name  # noqa: E402
from protoagg_dagster.ledger import claim_batch, finish_batch  # noqa: E402
from protoagg_dagster.ops import collector_paused  # noqa: E402
from protoagg_dagster.resources import PostgresResource  # noqa: E402

TOPIC = "dedupe-scaling"
COPY_CHUNK = 200_000


@dataclass
class Scenario:
    name: str
    ids: int
    partitions: int
    dsn: str = ""
    preload_s: float = 0.0
    claims: list[float] = field(default_factory=list)
    claim_cpu: list[float] = field(default_factory=list)
    connects: list[float] = field(default_factory=list)
    wal: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    next_offset: int = 0
    plan: str | None = None


# --------------------------------------------------------------------------------------------
# preload


def copy_random_ids(conn: psycopg.Connection, table: str, day: int, n: int) -> None:
    """COPY ``n`` random uuids (batch_id 0, offsets 0..n-1) into ``table``."""
    with conn.cursor().copy(
        sql.SQL("COPY {} (log_id, day, batch_id, kafka_offset) FROM STDIN").format(
            sql.Identifier(table)
        )
    ) as copy:
        for start in range(0, n, COPY_CHUNK):
            count = min(COPY_CHUNK, n - start)
            raw = os.urandom(16 * count).hex()
            lines = []
            for i in range(count):
                h = raw[32 * i : 32 * i + 32]
                lines.append(
                    f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}\t{day}\t0\t{start + i}\n"
                )
            copy.write("".join(lines))


def fill_partition(conn: psycopg.Connection, day: int, n: int) -> None:
    """Bulk-load ``n`` ids into the (existing, attached) partition of ``day``."""
    if n <= 0:
        return
    part = partition_name(day)
    ident = sql.Identifier(part)
    conn.execute(sql.SQL("ALTER TABLE processed_logs DETACH PARTITION {}").format(ident))
    conn.execute(
        sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(ident, sql.Identifier(f"{part}_pkey"))
    )
    copy_random_ids(conn, part, day, n)
    conn.execute("SET maintenance_work_mem = '1GB'")
    conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (log_id, day)").format(ident))
    # a CHECK that implies the partition bound lets ATTACH skip its validation scan
    check = sql.Identifier(f"{part}_bench_day")
    conn.execute(
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK (day = {})").format(
            ident, check, sql.Literal(day)
        )
    )
    conn.execute(
        sql.SQL("ALTER TABLE processed_logs ATTACH PARTITION {} FOR VALUES IN ({})").format(
            ident, sql.Literal(day)
        )
    )
    conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(ident, check))
    conn.execute("RESET maintenance_work_mem")


def prepare(scenario: Scenario) -> None:
    """Create the schema (and day partitions), preload the ids, vacuum, analyze, checkpoint."""
    started = time.perf_counter()
    with PostgresResource(dsn=scenario.dsn).get_connection() as conn:
        row = conn.execute("SELECT current_day FROM dedupe_window").fetchone()
        assert row is not None
        first = int(row[0])
        for k in range(1, scenario.partitions):
            advance_window(conn, first + k, keep_days=scenario.partitions)
        days = [first + k for k in range(scenario.partitions)]
        share, extra = divmod(scenario.ids, scenario.partitions)
        for i, day in enumerate(days):
            fill_partition(conn, day, share + (1 if i < extra else 0))
        count = conn.execute("SELECT count(*) FROM processed_logs").fetchone()
        parts = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'processed_logs'::regclass"
        ).fetchone()
        attached = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'processed_logs_pkey'::regclass"
        ).fetchone()
        assert count and parts and attached
        if (count[0], parts[0], attached[0]) != (scenario.ids, len(days), len(days)):
            raise RuntimeError(
                f"{scenario.name}: {count[0]} rows, {parts[0]} partitions, {attached[0]} attached "
                f"indexes; expected {scenario.ids}, {len(days)}, {len(days)}"
            )
        conn.execute("VACUUM (ANALYZE) processed_logs")
        conn.execute("CHECKPOINT")
    scenario.preload_s = time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# batches


def make_batch(size: int, seed: int, first_offset: int) -> list[LogRecord]:
    values, _ = make_values(size, 0.05, seed)
    messages = [
        KafkaMessage(TOPIC, 0, first_offset + i, 0, None, value, ())
        for i, value in enumerate(values)
    ]
    records, rejections = parse_messages(messages, 1 << 20)
    assert not rejections
    return records


def wal_lsn(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def claim_once(
    scenario: Scenario, records: list[LogRecord], size: int, explain: bool = False
) -> tuple[float, float, float, int, int]:
    """One run's dedupe: connect (+ schema), claim_batch, finish_batch. Returns the numbers."""
    start = scenario.next_offset
    batch = OffsetRange(TOPIC, 0, start, start + size)
    shifted = [r._replace(offset=start + i) for i, r in enumerate(records)]
    notices: list[str] = []
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        conn = stack.enter_context(PostgresResource(dsn=scenario.dsn).get_connection())
        connect = time.perf_counter() - t0
        if explain:
            conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
            for statement in (
                "LOAD 'auto_explain'",
                "SET auto_explain.log_min_duration = 0",
                "SET auto_explain.log_analyze = on",
                "SET auto_explain.log_buffers = on",
                "SET auto_explain.log_wal = on",
                "SET auto_explain.log_timing = on",
                "SET client_min_messages = log",
            ):
                conn.execute(statement)
        lsn = wal_lsn(conn)
        with collector_paused():
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            claim = claim_batch(conn, batch, shifted, "bench.pb", None)
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn,)).fetchone()
        assert row is not None and claim.batch_id is not None
        finish_batch(conn, claim.batch_id, None)
    scenario.next_offset = batch.end
    if explain:
        plans = [n for n in notices if "INSERT INTO processed_logs" in n]
        scenario.plan = plans[-1] if plans else "\n".join(notices)
    return connect, elapsed, cpu, int(row[0]), len(claim.kept)


# --------------------------------------------------------------------------------------------
# report


def scenarios_for(sizes: list[int], partitions: int) -> list[Scenario]:
    out = [Scenario(label(n), n, 1) for n in sizes]
    if partitions > 1:
        largest = max(sizes)
        out.append(Scenario(f"{label(largest)}/{partitions}", largest, partitions))
        out.append(Scenario(f"0/{partitions}", 0, partitions))
    return out


def label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def summarize(s: Scenario, size: int, base: float | None) -> dict[str, Any]:
    median = statistics.median(s.claims)
    return {
        "ids_preloaded": s.ids,
        "partitions": s.partitions,
        "preload_s": s.preload_s,
        "batches": len(s.claims),
        "claim_median_s": median,
        "claim_min_s": min(s.claims),
        "claim_max_s": max(s.claims),
        "records_per_s": size / median,
        "client_cpu_median_s": statistics.median(s.claim_cpu),
        "connect_and_schema_median_s": statistics.median(s.connects),
        "wal_bytes_median": statistics.median(s.wal),
        "kept_median": statistics.median(s.kept),
        "ratio_to_empty": median / base if base else None,
        "claims_s": s.claims,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="sizes 0/20k/100k")
    parser.add_argument("--sizes", default=None, help="ids preloaded, comma separated")
    parser.add_argument("--partitions", type=int, default=7, help="day partitions (0/1: skip)")
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=9, help="measured batches per scenario")
    parser.add_argument("--explain", action="store_true", help="print the INSERT's plans")
    parser.add_argument("--seed", type=int, default=7)
    add_service_args(parser)
    args = parser.parse_args()
    require_service_args(parser, args, ("admin_dsn",))
    if args.batches < 1:
        parser.error("--batches must be at least 1")
    default_sizes = "0,20000,100000" if args.smoke else "0,1000000,10000000"
    sizes = [int(x) for x in (args.sizes or default_sizes).split(",")]
    started = time.perf_counter()
    scenarios = scenarios_for(sizes, args.partitions)
    base_name = next((s.name for s in scenarios if s.ids == 0 and s.partitions == 1), None)

    with contextlib.ExitStack() as stack:
        for s in scenarios:
            s.dsn = stack.enter_context(database(args.dsn, args.admin_dsn))
            prepare(s)
            print(
                f"  prepared {s.name}: {s.ids:,} ids in {s.partitions} partition(s) in "
                f"{s.preload_s:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        preload_total = time.perf_counter() - started
        size = args.batch
        warm = make_batch(size, args.seed, 0)
        for s in scenarios:
            claim_once(s, warm, size)
        for r in range(args.batches):
            records = make_batch(size, args.seed + 1 + r, 0)
            order = scenarios[r % len(scenarios) :] + scenarios[: r % len(scenarios)]
            for s in order:
                connect, elapsed, cpu, wal, kept = claim_once(s, records, size)
                s.connects.append(connect)
                s.claims.append(elapsed)
                s.claim_cpu.append(cpu)
                s.wal.append(wal)
                s.kept.append(kept)
        if args.explain:
            records = make_batch(size, args.seed + 1000, 0)
            for s in scenarios:
                claim_once(s, records, size, explain=True)

    base = next((statistics.median(s.claims) for s in scenarios if s.name == base_name), None)
    results = {s.name: summarize(s, size, base) for s in scenarios}
    largest = next(s for s in scenarios if s.ids == max(sizes) and s.partitions == 1)
    report: dict[str, Any] = {
        "benchmark": "dedupe_scaling",
        "smoke": args.smoke,
        "code": code_version(),
        "batch": size,
        "batches": args.batches,
        "largest": largest.name,
        "records_per_s_at_largest": results[largest.name]["records_per_s"],
        "ratio_largest_to_empty": results[largest.name]["ratio_to_empty"],
        "target_records_per_s": 100_000,
        "target_ratio": 1.5,
        "scenarios": results,
        "preload_s": preload_total,
        "duration_s": time.perf_counter() - started,
    }
    print()
    print(
        f"dedupe scaling: claim_batch of fresh {size:,}-record batches (5% repeats inside), "
        f"median of {args.batches}, fresh connection each (as a run); code {report['code']}"
    )
    print(
        f"  {'scenario':<10}{'ids':>12}{'parts':>6}{'claim ms':>10}{'min-max ms':>14}"
        f"{'records/s':>11}{'x empty':>9}{'client CPU ms':>15}{'WAL MB':>8}{'connect ms':>12}"
    )
    for s in scenarios:
        x = results[s.name]
        ratio = f"{x['ratio_to_empty']:9.2f}" if x["ratio_to_empty"] else f"{'-':>9}"
        print(
            f"  {s.name:<10}{s.ids:>12,}{s.partitions:>6}{x['claim_median_s'] * 1000:10.1f}"
            f"{x['claim_min_s'] * 1000:7.0f}-{x['claim_max_s'] * 1000:<6.0f}"
            f"{x['records_per_s']:11,.0f}{ratio}{x['client_cpu_median_s'] * 1000:15.1f}"
            f"{x['wal_bytes_median'] / 1e6:8.1f}{x['connect_and_schema_median_s'] * 1000:12.1f}"
        )
    ok_rate = report["records_per_s_at_largest"] >= 100_000
    ratio = report["ratio_largest_to_empty"]
    ok_ratio = ratio is not None and ratio <= 1.5
    print(
        f"  at {largest.name}: {report['records_per_s_at_largest']:,.0f} records/s per batch "
        f"(target >= 100,000: {'met' if ok_rate else 'MISSED'}); {largest.name}/empty = "
        f"{ratio:.2f} (target <= 1.5: {'met' if ok_ratio else 'MISSED'})"
    )
    print(f"  preload {preload_total:.0f} s, total {report['duration_s']:.0f} s")
    if args.explain:
        for s in scenarios:
            print(f"\n--- plan of the claiming INSERT, {s.name} ---\n{s.plan}")
    print()
    print(json.dumps(_rounded(report), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
