"""Does dedupe stay flat as processed_logs grows? claim_batch time vs ids already in the window.

    .venv/bin/python benchmarks/dedupe_scaling.py [--smoke] \
        [--scenarios 0,10M,10M/7d,0/7d,10M/2s,100M/2s] [--batch 10000] [--batches 9] [--explain] \
        [--dsn ...] --admin-dsn postgresql://postgres:postgres@127.0.0.1:PORT/postgres

Needs a superuser DSN (``--admin-dsn``, default $PROTOAGG_BENCH_ADMIN_DSN): every scenario gets its
own fresh database, dropped at the end. Scenarios (sizes take k/M suffixes):

- ``<size>``: ``size`` ids in the current span (one partition, nothing older to probe);
- ``<size>/<P>d``: ``size`` ids spread evenly over ``P`` day partitions, the last one current:
  the layout of the day-partitioned versions (and of an upgraded window in its first span), so
  each claim probes ``P - 1`` older partitions;
- ``<size>/2s``: the layout of a 7-day window in spans (``dedupe_window``) the day after a new
  span started: 6/7 of the ids in the previous span (made by ``advance_window``, keep_days 7),
  1/7 in the current one; each claim probes the previous span and inserts into the current.

Preloading is bulk work, not what is measured: each filled partition is detached, loses its
index, gets random uuids from ``INSERT ... SELECT gen_random_uuid()`` (server side, dummy
batch_id 0), gets its primary key built in one sort, and is attached again; then ``VACUUM
(ANALYZE) processed_logs`` (so autovacuum does not start on the fresh rows mid-measurement), a
``CHECKPOINT``, and ``pg_prewarm`` of the indexes (a live window's index is in shared_buffers).
100M ids take ~12 GB of disk plus WAL while loading, and the cluster needs shared_buffers for
the indexes (~45 B an id, docs/operations.md).

Measured: batches of ``--batch`` seed-shaped records (``run_once.make_values``, 5% repeated
logIds, all new to the window), each like a run: a fresh connection (``PostgresResource
.get_connection()``: connect + ensure_schema, timed apart), ``claim_batch`` (timed: the control
row, the claiming INSERT, the ledger rows), ``finish_batch``. The same batch goes to every
scenario, round-robin with a rotating order, after ``--warmup`` unmeasured batches each, so load
from other work on the machine hits all scenarios alike. Random keys dirty index pages all over
the current span, and the first change of a page after a checkpoint writes it whole to the WAL:
right after the preload's checkpoint every insert does (WAL MB column); in a window claiming
continuously each page pays that once per checkpoint interval, which ``--warmup 30`` reaches.
Reported: median claim time, ids/s, WAL bytes per batch (from ``pg_current_wal_lsn``; the
instance should be private to the benchmark), the ratio to the empty-window scenario, and the
heap and index bytes per id stored (``pg_relation_size``, after the measured batches).
``--explain`` loads auto_explain for one extra batch per scenario and prints the claiming
INSERT's plan (ANALYZE, BUFFERS, WAL).
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from protoagg_dagster.archive.dedupe_window import advance_window, partition_name  # noqa: E402
from protoagg_dagster.archive.ledger import claim_batch, finish_batch, ledger_connection  # noqa: E402
from protoagg_dagster.archive.ops import collector_paused  # noqa: E402
from protoagg_dagster.core.planning import OffsetRange  # noqa: E402
from protoagg_dagster.core.records import KafkaMessage, LogRecord, parse_messages  # noqa: E402
from protoagg_dagster.resources import PostgresResource  # noqa: E402

TOPIC = "dedupe-scaling"
REPORTED_SETTINGS = (
    "shared_buffers",
    "wal_compression",
    "max_wal_size",
    "checkpoint_timeout",
    "jit",
)


@dataclass
class Scenario:
    name: str
    ids: int
    partitions: int
    spans: bool = False
    dsn: str = ""
    preload_s: float = 0.0
    claims: list[float] = field(default_factory=list)
    claim_cpu: list[float] = field(default_factory=list)
    connects: list[float] = field(default_factory=list)
    wal: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    next_offset: int = 0
    plan: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# preload


def fill_partition(conn: psycopg.Connection, day: int, n: int) -> None:
    """Bulk-load ``n`` random ids into the (existing, attached) partition of ``day``."""
    if n <= 0:
        return
    part = partition_name(day)
    ident = sql.Identifier(part)
    conn.execute(sql.SQL("ALTER TABLE processed_logs DETACH PARTITION {}").format(ident))
    conn.execute(
        sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(ident, sql.Identifier(f"{part}_pkey"))
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (log_id, day, batch_id, kafka_offset) "
            "SELECT gen_random_uuid(), {}, 0, g FROM generate_series(0, {}) AS g"
        ).format(ident, sql.Literal(day), sql.Literal(n - 1))
    )
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


def layout(conn: psycopg.Connection, scenario: Scenario) -> dict[int, int]:
    """Make the scenario's partitions; returns ids to load per partition (its first day)."""
    row = conn.execute("SELECT current_day FROM dedupe_window").fetchone()
    assert row is not None
    first = int(row[0])
    if scenario.spans:
        change = advance_window(conn, first + 7, keep_days=7)
        assert change.created and change.dropped == ()
        current = scenario.ids // 7
        return {first: scenario.ids - current, first + 7: current}
    days = [first + k for k in range(scenario.partitions)]
    for day in days[1:]:
        # the per-day versions' layout: one partition a day, claims go to the newest
        conn.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF processed_logs FOR VALUES IN ({})").format(
                sql.Identifier(partition_name(day)), sql.Literal(day)
            )
        )
    conn.execute("UPDATE dedupe_window SET current_day = %s", (days[-1],))
    share, extra = divmod(scenario.ids, len(days))
    return {day: share + (1 if i < extra else 0) for i, day in enumerate(days)}


def prepare(scenario: Scenario) -> None:
    """Create the schema and partitions, preload the ids, vacuum, analyze, checkpoint."""
    started = time.perf_counter()
    with ledger_connection(PostgresResource(dsn=scenario.dsn)) as conn:
        loads = layout(conn, scenario)
        for day, n in loads.items():
            fill_partition(conn, day, n)
        count = conn.execute("SELECT count(*) FROM processed_logs").fetchone()
        parts = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'processed_logs'::regclass"
        ).fetchone()
        attached = conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'processed_logs_pkey'::regclass"
        ).fetchone()
        assert count and parts and attached
        if (count[0], parts[0], attached[0]) != (scenario.ids, len(loads), len(loads)):
            raise RuntimeError(
                f"{scenario.name}: {count[0]} rows, {parts[0]} partitions, {attached[0]} attached "
                f"indexes; expected {scenario.ids}, {len(loads)}, {len(loads)}"
            )
        conn.execute("VACUUM (ANALYZE) processed_logs")
        conn.execute("CHECKPOINT")
        # An index built by sort is written past shared_buffers; a live window's index is in
        # them (every claim touches it), which is what the RAM per id buys.
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        conn.execute(
            "SELECT pg_prewarm(x.indexrelid) FROM pg_inherits i "
            "JOIN pg_index x ON x.indrelid = i.inhrelid "
            "WHERE i.inhparent = 'processed_logs'::regclass"
        )
    scenario.preload_s = time.perf_counter() - started


def relation_sizes(dsn: str) -> dict[str, int]:
    """Rows, heap and index bytes of processed_logs (all partitions)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM processed_logs), "
            "sum(pg_relation_size(c.oid)), sum(pg_indexes_size(c.oid)) "
            "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'processed_logs'::regclass"
        ).fetchone()
    assert row is not None
    return {"rows": int(row[0]), "heap_bytes": int(row[1]), "index_bytes": int(row[2])}


def huge_pages_in_use(conn: psycopg.Connection) -> str:
    """``on`` when the server's shared memory is mapped in huge pages, ``off``, or ``unknown``.

    PostgreSQL 15 cannot say (``huge_pages_status`` is 17's): the backend's largest shared mapping
    in /proc tells, when the server runs on this machine and we may read its processes.
    """
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    try:
        smaps = Path(f"/proc/{row[0]}/smaps").read_text()
    except OSError:
        return "unknown"
    largest, page_kb = 0, 0
    size = 0
    shared = False
    for line in smaps.splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 2 and len(fields[1]) == 4:
            shared = fields[1][3] == "s"
        elif fields[0] == "Size:":
            size = int(fields[1])
        elif fields[0] == "KernelPageSize:" and shared and size > largest:
            largest, page_kb = size, int(fields[1])
    return "unknown" if largest == 0 else ("on" if page_kb > 4 else "off")


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
        conn = stack.enter_context(ledger_connection(PostgresResource(dsn=scenario.dsn)))
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


def parse_scenario(spec: str) -> Scenario:
    """``<size>``, ``<size>/<P>d`` or ``<size>/2s`` (see the module docstring)."""
    size, _, shape = spec.partition("/")
    ids = parse_size(size)
    if not shape:
        return Scenario(spec, ids, 1)
    if shape == "2s":
        return Scenario(spec, ids, 2, spans=True)
    if shape.endswith("d") and shape[:-1].isdigit() and int(shape[:-1]) >= 1:
        return Scenario(spec, ids, int(shape[:-1]))
    raise ValueError(f"scenario {spec!r}: expected <size>, <size>/<P>d or <size>/2s")


def parse_size(text: str) -> int:
    scale = {"k": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def summarize(s: Scenario, size: int, base: float | None) -> dict[str, Any]:
    median = statistics.median(s.claims)
    return {
        "ids_preloaded": s.ids,
        "partitions": s.partitions,
        "layout": "spans" if s.spans else "days",
        **s.sizes,
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


SMOKE = "0,20k,100k/7d,100k/2s"
FULL = "0,10M,10M/7d,0/7d,10M/2s,100M/2s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help=f"scenarios {SMOKE}")
    parser.add_argument("--scenarios", default=None, help=f"comma separated (default {FULL})")
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=9, help="measured batches per scenario")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="unmeasured batches per scenario first (30 reach the steady state of a 100M window "
        "after a checkpoint: most index pages already written whole to the WAL)",
    )
    parser.add_argument("--explain", action="store_true", help="print the INSERT's plans")
    parser.add_argument("--seed", type=int, default=7)
    add_service_args(parser)
    args = parser.parse_args()
    require_service_args(parser, args, ("admin_dsn",))
    if args.batches < 1:
        parser.error("--batches must be at least 1")
    try:
        specs = (args.scenarios or (SMOKE if args.smoke else FULL)).split(",")
        scenarios = [parse_scenario(spec) for spec in specs]
    except ValueError as exc:
        parser.error(str(exc))
    base = next((s for s in scenarios if s.ids == 0 and s.partitions == 1), None)
    if base is None:
        parser.error("the scenarios need the empty window, 0, to compare against")
    started = time.perf_counter()

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
        for w in range(args.warmup):
            warm = make_batch(size, args.seed + 10_000 + w, 0)
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
        for s in scenarios:
            s.sizes = relation_sizes(s.dsn)
        with psycopg.connect(args.admin_dsn) as conn:
            settings: dict[str, str] = dict(
                conn.execute(
                    "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
                    (list(REPORTED_SETTINGS),),
                ).fetchall()
            )
            settings["huge_pages_in_use"] = huge_pages_in_use(conn)

    base_median = statistics.median(base.claims)
    results = {s.name: summarize(s, size, base_median) for s in scenarios}
    largest = max(scenarios, key=lambda s: (s.ids, s.spans, -s.partitions))
    report: dict[str, Any] = {
        "benchmark": "dedupe_scaling",
        "smoke": args.smoke,
        "code": code_version(),
        "batch": size,
        "batches": args.batches,
        "warmup": args.warmup,
        "settings": settings,
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
        f"median of {args.batches} after {args.warmup} unmeasured, fresh connection each (as a "
        f"run); code {report['code']}"
    )
    print("  " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    print(
        f"  {'scenario':<10}{'ids':>12}{'parts':>6}{'claim ms':>10}{'min-max ms':>14}"
        f"{'records/s':>11}{'x empty':>9}{'client CPU ms':>15}{'WAL MB':>8}{'connect ms':>12}"
        f"{'heap B/id':>11}{'index B/id':>12}"
    )
    for s in scenarios:
        x = results[s.name]
        rows = max(s.sizes["rows"], 1)
        print(
            f"  {s.name:<10}{s.ids:>12,}{s.partitions:>6}{x['claim_median_s'] * 1000:10.1f}"
            f"{x['claim_min_s'] * 1000:7.0f}-{x['claim_max_s'] * 1000:<6.0f}"
            f"{x['records_per_s']:11,.0f}{x['ratio_to_empty']:9.2f}"
            f"{x['client_cpu_median_s'] * 1000:15.1f}"
            f"{x['wal_bytes_median'] / 1e6:8.1f}{x['connect_and_schema_median_s'] * 1000:12.1f}"
            f"{s.sizes['heap_bytes'] / rows:11.0f}{s.sizes['index_bytes'] / rows:12.0f}"
        )
    ok_rate = report["records_per_s_at_largest"] >= 100_000
    ratio = report["ratio_largest_to_empty"]
    ok_ratio = ratio <= 1.5
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
