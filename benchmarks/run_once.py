"""One benchmark pass of the archive path on real services.

    .venv/bin/python benchmarks/run_once.py --messages 100000 \
        [--bootstrap HOST:PORT] [--dsn postgresql://...] [--gcs http://HOST:PORT] [--admin-dsn ...]

Defaults come from PROTOAGG_KAFKA_BOOTSTRAP, PROTOAGG_POSTGRES_DSN and STORAGE_EMULATOR_HOST
(`eval "$(protoagg services up | grep ^export)"`).

What it does, each on a fresh topic (1 partition) and a fresh archive object:

1. produces N seed-shaped JSON messages (~120 bytes, 5% repeated logIds); timed, not measured;
2. raw consume ceiling: a group-less KafkaConsumer (assign + seek) reads and discards N messages;
3. one ``archive_kafka_batch`` run over [0, N) via ``execute_in_process`` (fresh
   ``dg.instance_for_test()``, ``max_batch_messages=N``): wall time, per-step seconds from the
   ``kafka_archive`` materialization, msgs/s, fixed cost = wall - sum(step seconds);
4. the same range again (already archived): the fixed cost of an "empty" run;
5. a table, then one JSON line with every number (the last line of stdout).

``--admin-dsn`` (a superuser DSN, default $PROTOAGG_BENCH_ADMIN_DSN; for the local stack
postgresql://postgres:postgres@127.0.0.1:PORT/postgres) runs against a fresh database, dropped
afterwards, so ``processed_logs`` does not grow between invocations and no older schema is met.
``--gc-freeze`` and ``--warmup`` are experiments (see --help); ``benchmarks/hotspots.py`` reads a
py-spy speedscope profile of this script.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import orjson
import psycopg
from kafka import TopicPartition
from kafka.admin import NewTopic
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protoagg_dagster.archive.assets import ARCHIVE_ASSET  # noqa: E402
from protoagg_dagster.archive.job import archive_kafka_batch  # noqa: E402
from protoagg_dagster.archive.partition_lease import PartitionLease  # noqa: E402
from protoagg_dagster.archive.run_tags import range_run_config  # noqa: E402
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource  # noqa: E402
from protoagg_dagster.resources.settings import ArchiverSettings  # noqa: E402

STEPS = ("consume", "dedupe", "encode", "append")
WORDS = (
    "user login ok",
    "cache miss key",
    "GET /api/v1/items 200",
    "payment accepted",
    "retrying upstream call",
    "disk usage 71%",
    "session expired",
    "job finished in 12ms",
)


# --------------------------------------------------------------------------------------------
# messages


def make_values(n: int, repeat_fraction: float, seed: int) -> tuple[list[bytes], int]:
    """N compact JSON values ``{"logId","timestamp","message"}``; ``repeat_fraction`` of them
    reuse a logId seen earlier. Returns the values and the number of distinct logIds."""
    rng = random.Random(seed)
    base = datetime(2026, 11, 1, 8, 0, 0, tzinfo=UTC)
    ids: list[str] = []
    values: list[bytes] = []
    for i in range(n):
        if ids and rng.random() < repeat_fraction:
            log_id = ids[rng.randrange(len(ids))]
        else:
            log_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            ids.append(log_id)
        ts = base + timedelta(milliseconds=i * 7 + rng.randrange(7))
        stamp = ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"
        message = f"{WORDS[i % len(WORDS)]} #{i}"
        values.append(orjson.dumps({"logId": log_id, "timestamp": stamp, "message": message}))
    return values, len(ids)


# --------------------------------------------------------------------------------------------
# services


def add_service_args(parser: argparse.ArgumentParser) -> None:
    """--bootstrap/--dsn/--gcs/--bucket/--admin-dsn with the PROTOAGG_* environment defaults."""
    parser.add_argument("--bootstrap", default=os.environ.get("PROTOAGG_KAFKA_BOOTSTRAP"))
    parser.add_argument("--dsn", default=os.environ.get("PROTOAGG_POSTGRES_DSN"))
    parser.add_argument("--gcs", default=os.environ.get("STORAGE_EMULATOR_HOST"))
    parser.add_argument("--bucket", default=os.environ.get("PROTOAGG_GCS_BUCKET", "logs"))
    parser.add_argument(
        "--admin-dsn",
        default=os.environ.get("PROTOAGG_BENCH_ADMIN_DSN"),
        help="superuser DSN: run against a fresh database, dropped afterwards",
    )


def require_service_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]
) -> None:
    missing = [name for name in names if not getattr(args, name)]
    if missing:
        parser.error(f"no value for {missing} (pass it, or export the PROTOAGG_* variables)")


def create_topic(kafka: KafkaResource, topic: str) -> None:
    admin = kafka.get_admin()
    try:
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        admin.close()


def produce(kafka: KafkaResource, topic: str, values: list[bytes]) -> float:
    started = time.perf_counter()
    producer = kafka.get_producer()
    try:
        for value in values:
            producer.send(topic, value=value, partition=0)
        producer.flush()
    finally:
        producer.close()
    return time.perf_counter() - started


def raw_consume(kafka: KafkaResource, topic: str, ends: dict[int, int]) -> tuple[float, int]:
    """Read and discard every partition from 0 to its end offset with one group-less consumer
    (the pipeline's consumer settings, assign + seek): the ceiling."""
    tps = [TopicPartition(topic, p) for p in ends]
    want = sum(ends.values())
    started = time.perf_counter()
    consumer = kafka.get_consumer()
    try:
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        count = 0
        deadline = time.monotonic() + 300
        while count < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"raw consume: only {count} of {want} messages in 300 s")
            for records in consumer.poll(timeout_ms=1000, max_records=10_000).values():
                count += len(records)
    finally:
        consumer.close()
    return time.perf_counter() - started, count


@contextmanager
def database(dsn: str, admin_dsn: str | None) -> Iterator[str]:
    """The DSN to use: ``dsn`` as is, or a fresh database created (and dropped) via admin_dsn."""
    if not admin_dsn:
        yield dsn
        return
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def code_version() -> str:
    """HEAD commit of the checkout, with '+dirty' when protoagg_dagster/ has local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "protoagg_dagster"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def processed_rows(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('processed_logs') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return 0
        row = conn.execute("SELECT count(*) FROM processed_logs").fetchone()
        return int(row[0]) if row else 0


# --------------------------------------------------------------------------------------------
# one Dagster run


class GCTimer:
    """Time spent in the cyclic garbage collector (per generation) while active."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            generation = info["generation"]
            self.seconds[generation] += time.perf_counter() - self._started
            self.count[generation] += 1

    def __enter__(self) -> GCTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": sum(self.seconds),
            "by_generation_s": self.seconds,
            "collections": self.count,
        }


def run_archive(
    resources: dict[str, Any],
    topic: str,
    n: int,
    profile_marker: str | None = None,
    gc_freeze: bool = False,
) -> dict[str, Any]:
    """Execute archive_kafka_batch over [0, n) in a fresh test instance; return its numbers."""
    if gc_freeze:
        gc.collect()
        gc.freeze()
    t0 = time.perf_counter()
    with dg.instance_for_test() as instance:
        t_instance = time.perf_counter() - t0
        if profile_marker:
            print(profile_marker, flush=True)
        launched_at = time.time()
        with GCTimer() as gc_timer:
            cpu_started = time.process_time()
            started = time.perf_counter()
            result = archive_kafka_batch.execute_in_process(
                run_config=range_run_config(topic, 0, 0, n),
                resources=resources,
                instance=instance,
                raise_on_error=True,
            )
            wall = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
        returned_at = launched_at + wall
        if not result.success:
            raise RuntimeError(f"run {result.run_id} failed")
        events = [
            e
            for e in result.get_asset_materialization_events()
            if e.asset_key == ARCHIVE_ASSET  # the topic entry's asset repeats its numbers
        ]
        if len(events) != 1:
            raise RuntimeError(f"expected one materialization, got {len(events)}")
        meta: dict[str, Any] = {k: v.value for k, v in events[0].materialization.metadata.items()}
        timeline = dagster_timeline(instance, result.run_id)
    seconds = {step: float(meta.get(f"seconds_{step}", 0.0)) for step in STEPS}
    steps_sum = sum(seconds.values())
    step_walls = timeline["steps"]
    run_start, run_end = timeline["run_start"], timeline["run_end"]
    breakdown = None
    # The job's one op (``archive``) runs the four STEPS; its wall holds them all.
    if run_start is not None and run_end is not None and step_walls:
        walls_sum = sum(step_walls.values())
        breakdown = {
            # execute_in_process called .. RUN_START: run creation, plan, resource-less setup
            "before_run_start": run_start - launched_at,
            # RUN_START .. RUN_SUCCESS minus the step walls: resources, between-step bookkeeping
            "run_outside_steps": (run_end - run_start) - walls_sum,
            # STEP_START..STEP_SUCCESS minus the op's own timed section: inputs, outputs, events
            "in_steps_outside_timed": walls_sum - steps_sum,
            # RUN_SUCCESS .. return to the caller
            "after_run_success": returned_at - run_end,
            # execute_in_process called .. first STEP_START; last STEP_SUCCESS .. RUN_SUCCESS
            "launch_to_first_step": timeline["first_step_start"] - launched_at,
            "last_step_to_run_success": run_end - timeline["last_step_end"],
        }
    return {
        "wall_s": wall,
        # CPU seconds of this process (all threads) during the run: less sensitive than wall
        # time to other load on the machine; wall - cpu ~ waiting on Kafka/PostgreSQL/GCS/disk
        "cpu_s": cpu,
        "instance_setup_s": t_instance,
        "seconds": seconds,
        "steps_sum_s": steps_sum,
        "fixed_s": wall - steps_sum,
        "fixed_breakdown_s": breakdown,
        "msgs_per_s": n / wall if wall > 0 else 0.0,
        "step_msgs_per_s": {s: (n / v if v > 0 else None) for s, v in seconds.items()},
        "dagster_step_wall_s": step_walls,
        # cyclic GC pauses inside the run (they land in step seconds and in the fixed cost)
        "gc": gc_timer.summary(),
        "dagster_run_wall_s": (run_end - run_start) if run_start and run_end else None,
        "records_read": meta.get("records_read"),
        "records_appended": meta.get("records_appended"),
        "duplicates_dropped": meta.get("duplicates_dropped"),
        # "dead_letters" (+ "tombstones") in newer ops, "rejected" in older ones
        "dead_letters": meta.get("dead_letters", meta.get("rejected")),
        "tombstones": meta.get("tombstones"),
        "bytes_appended": meta.get("bytes_appended"),
        "object_size": meta.get("object_size"),
        "already_archived": meta.get("already_archived"),
    }


def warm_up(resources: dict[str, Any], token: str) -> float:
    """Archive 100 messages of a throw-away topic (own object) in this process."""
    started = time.perf_counter()
    topic = f"bench-warmup-{token}"
    kafka = KafkaResource(bootstrap_servers=resources["kafka"].bootstrap_servers, topics=topic)
    create_topic(kafka, topic)
    produce(kafka, topic, make_values(100, 0.0, 1)[0])
    gcs = resources["gcs"]
    warm = {
        **resources,
        "kafka": kafka,
        "gcs": GCSResource(
            bucket=gcs.bucket,
            object_template=f"bench/{token}/warmup.pb",
            emulator_host=gcs.emulator_host,
        ),
    }
    run_archive(warm, topic, 100)
    return time.perf_counter() - started


def dagster_timeline(instance: dg.DagsterInstance, run_id: str) -> dict[str, Any]:
    """RUN_START / RUN_SUCCESS timestamps and each step's STEP_START..STEP_SUCCESS seconds."""
    run_start = run_end = None
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    walls: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            continue
        kind = event.event_type
        if kind == dg.DagsterEventType.RUN_START:
            run_start = entry.timestamp
        elif kind == dg.DagsterEventType.RUN_SUCCESS:
            run_end = entry.timestamp
        elif kind == dg.DagsterEventType.STEP_START and event.step_key:
            starts[event.step_key] = entry.timestamp
        elif kind == dg.DagsterEventType.STEP_SUCCESS and event.step_key in starts:
            walls[event.step_key] = entry.timestamp - starts[event.step_key]
            ends[event.step_key] = entry.timestamp
    return {
        "run_start": run_start,
        "run_end": run_end,
        "steps": walls,
        # first STEP_START and last STEP_SUCCESS: Dagster's cost around the ops
        "first_step_start": min(starts.values()) if starts else None,
        "last_step_end": max(ends.values()) if ends else None,
    }


# --------------------------------------------------------------------------------------------
# report


def fmt_rate(value: float | None) -> str:
    return f"{value:>12,.0f}" if value else f"{'-':>12}"


def print_table(n: int, report: dict[str, Any]) -> None:
    full, empty = report["full_run"], report["empty_run"]
    print()
    warm = "warm process" if report["warmup_s"] is not None else "cold process (first run)"
    if report["gc_freeze"]:
        warm += ", gc.freeze()"
    print(
        f"protoagg benchmark ({warm}): {n:,} messages, "
        f"avg {report['avg_value_bytes']:.0f} B/value, "
        f"{report['distinct_log_ids']:,} distinct logIds, topic {report['topic']}"
    )
    print(
        f"  produce (not measured)          {report['produce_s']:8.3f} s  "
        f"{n / report['produce_s']:>12,.0f} msg/s"
    )
    print(
        f"  raw consume ceiling             {report['raw_consume_s']:8.3f} s  "
        f"{fmt_rate(report['raw_consume_msgs_per_s'])} msg/s"
    )
    print()
    print(f"  {'':28}{'full run':>22}   {'empty run (re-run)':>24}")
    print(f"  {'':28}{'seconds':>10}{'msg/s':>12}   {'seconds':>10}{'msg/s':>14}")
    for step in STEPS:
        fs, es = full["seconds"][step], empty["seconds"][step]
        print(
            f"  {step:<28}{fs:10.3f}{fmt_rate(n / fs if fs else None)}   "
            f"{es:10.3f}  {fmt_rate(n / es if es else None)}"
        )
    print(
        f"  {'sum of steps':<28}{full['steps_sum_s']:10.3f}{'':12}   {empty['steps_sum_s']:10.3f}"
    )
    print(
        f"  {'fixed cost (wall - steps)':<28}{full['fixed_s']:10.3f}{'':12}   "
        f"{empty['fixed_s']:10.3f}"
    )
    print(
        f"  {'run wall (launch..return)':<28}{full['wall_s']:10.3f}"
        f"{fmt_rate(full['msgs_per_s'])}   {empty['wall_s']:10.3f}  "
        f"{fmt_rate(empty['msgs_per_s'])}"
    )
    print(
        f"  {'  Dagster RUN_START..SUCCESS':<28}{full['dagster_run_wall_s'] or 0:10.3f}"
        f"{'':12}   {empty['dagster_run_wall_s'] or 0:10.3f}"
    )
    for step in full["dagster_step_wall_s"]:
        fw = full["dagster_step_wall_s"][step]
        ew = empty["dagster_step_wall_s"].get(step, 0.0)
        print(f"  {'  Dagster op ' + step:<28}{fw:10.3f}{'':12}   {ew:10.3f}")
    fb, eb = full["fixed_breakdown_s"] or {}, empty["fixed_breakdown_s"] or {}
    for part in (
        "before_run_start",
        "run_outside_steps",
        "in_steps_outside_timed",
        "after_run_success",
    ):
        print(f"  {'  fixed: ' + part:<30}{fb.get(part, 0):8.3f}{'':12}   {eb.get(part, 0):10.3f}")
    print(
        f"  {'process CPU during the run':<28}{full['cpu_s']:10.3f}{'':12}   {empty['cpu_s']:10.3f}"
    )
    print(
        f"  {'cyclic GC pauses in the run':<28}{full['gc']['seconds']:10.3f}"
        f"{'':12}   {empty['gc']['seconds']:10.3f}   (collections gen0/1/2: "
        f"{full['gc']['collections']} / {empty['gc']['collections']})"
    )
    print(
        f"  {'instance_for_test() setup':<28}{full['instance_setup_s']:10.3f}{'':12}   "
        f"{empty['instance_setup_s']:10.3f}"
    )
    print(
        f"  records read/appended/dups: {full['records_read']}/{full['records_appended']}/"
        f"{full['duplicates_dropped']}; bytes appended {full['bytes_appended']:,}; "
        f"empty run appended {empty['records_appended']} "
        f"(already_archived={empty['already_archived']})"
    )
    print(
        f"  processed_logs rows before: {report['processed_logs_rows_before']:,}; code "
        f"{report['code']}; fresh database: {report['fresh_database']}"
    )
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", "-n", type=int, default=100_000)
    add_service_args(parser)
    parser.add_argument("--repeat-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--skip-empty", action="store_true", help="skip the re-run (step 4)")
    parser.add_argument(
        "--warmup",
        action="store_true",
        help="first archive 100 messages of another topic in this process, so "
        "the measured runs do not pay Dagster's first-run (lazy import) costs",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="experiment: gc.collect(); gc.freeze() before each measured run, so "
        "the collector stops rescanning the imported modules' objects",
    )
    parser.add_argument(
        "--profile-marker",
        action="store_true",
        help="print PROFILE-START before the full run's execute_in_process",
    )
    args = parser.parse_args()
    missing = [name for name in ("bootstrap", "dsn", "gcs") if not getattr(args, name)]
    if missing:
        parser.error(f"no value for {missing} (pass it, or export the PROTOAGG_* variables)")
    n = args.messages
    token = uuid.uuid4().hex[:10]
    topic = f"bench-{token}"
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    values, distinct = make_values(n, args.repeat_fraction, seed)
    with database(args.dsn, args.admin_dsn) as dsn:
        kafka = KafkaResource(bootstrap_servers=args.bootstrap, topics=topic)
        resources = {
            "kafka": kafka,
            "postgres": PostgresResource(dsn=dsn),
            "gcs": GCSResource(
                bucket=args.bucket,
                object_template=f"bench/{token}/log.pb",
                emulator_host=args.gcs,
            ),
            "archiver": ArchiverSettings(max_batch_messages=n),
            "lease": PartitionLease(postgres=PostgresResource(dsn=dsn)),
        }
        rows_before = processed_rows(dsn)
        create_topic(kafka, topic)
        produce_s = produce(kafka, topic, values)
        raw_s, raw_count = raw_consume(kafka, topic, {0: n})
        warmup_s = warm_up(resources, token) if args.warmup else None
        full = run_archive(
            resources, topic, n, "PROFILE-START" if args.profile_marker else None, args.gc_freeze
        )
        if full["records_appended"] != distinct:
            raise RuntimeError(f"appended {full['records_appended']} records, expected {distinct}")
        empty = (
            run_archive(resources, topic, n, gc_freeze=args.gc_freeze)
            if not args.skip_empty
            else None
        )

    report: dict[str, Any] = {
        "messages": n,
        "code": code_version(),
        "fresh_database": bool(args.admin_dsn),
        "topic": topic,
        "object": f"gs://{args.bucket}/bench/{token}/log.pb",
        "seed": seed,
        "avg_value_bytes": sum(map(len, values)) / n,
        "distinct_log_ids": distinct,
        "processed_logs_rows_before": rows_before,
        "produce_s": produce_s,
        "raw_consume_s": raw_s,
        "raw_consume_msgs": raw_count,
        "raw_consume_msgs_per_s": n / raw_s,
        "warmup_s": warmup_s,
        "gc_freeze": args.gc_freeze,
        "full_run": full,
        "empty_run": empty,
    }
    if empty is not None:
        print_table(n, report)
    print(json.dumps(_rounded(report), separators=(",", ":")))
    return 0


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
