"""Many partitions under steady traffic, through ``dagster-daemon``: latency, runs, Dagster bytes.

    PYTHONPATH=. .venv/bin/python benchmarks/steady_partitions.py [--topics 4]
        [--partitions 250] [--rate 2000] [--seconds 600] [--sample 10]
        [--set PROTOAGG_NAME=VALUE ...] [--dagster-storage sqlite|postgres]
        [--bootstrap HOST:PORT] [--gcs http://HOST:PORT] [--admin-dsn postgresql://...]

``--topics`` topics of ``--partitions`` partitions each (1,000 in all by default). A fresh Dagster
deployment (``tests/support/dagster_deployment.DagsterDeployment``: DAGSTER_HOME with SQLite
storage, the run queue of ``deploy/dagster.local.yaml``) archives them with the default settings
into a fresh PostgreSQL database, one object per topic. After the daemon has booted, a producer
(librdkafka) sends ``--rate`` seed-shaped messages per second for ``--seconds``, each with a new
logId, round-robin over every partition of every topic.

Latency is produce -> archived: from a message's send time to the ``appended_at`` the ledger
records for the batch that holds its offset (the moment its compose is done and confirmed). Every
``--sample``-th message's send time and offset (from its delivery report) are kept.

``--dagster-storage postgres`` gives the deployment production's storage (PostgreSQL through
dagster-postgres, as ``deploy/dagster.production.yaml``) in a fresh database of the benchmark's
PostgreSQL; Dagster's growth is then that database's size (tables, indexes, TOAST) plus the compute
logs under DAGSTER_HOME. Two sizes are reported: the files' growth (what was written, row versions
that PostgreSQL's autovacuum has not yet made reusable included) and what Dagster keeps (the
growth measured after ``VACUUM FULL`` at the start and at the end, which leaves only live rows:
the size the database tends to over months, since the dead versions' space is reused). With
``sqlite`` (the default, ``deploy/dagster.local.yaml``) it is
DAGSTER_HOME's.

``--set`` overrides a setting of the deployment (repeatable), e.g. ``--set
PROTOAGG_MAX_PARTITIONS_PER_RUN=256``.

Reported: the rate achieved, latency p50/p95/p99/max, archive runs launched and per minute,
the machine's CPU busy share over the steady window (/proc/stat: everything on the machine,
Kafka, PostgreSQL and the emulator included) and its split by kind of process
(``cpu_split.py``), archived bytes (the ledger's appended bytes) and
Dagster's own storage growth (DAGSTER_HOME over a fresh one) per archived MB.

The table, then one JSON line ``{"benchmark": "steady_partitions", ...}`` (the last line).
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import json
import statistics
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from confluent_kafka import Producer  # noqa: E402

from benchmarks.cpu_split import CpuSplit  # noqa: E402
from benchmarks.e2e_dagster import (  # noqa: E402
    DEFAULTS,
    add_service_args,
    archived_to,
    create_topic,
    delete_topics,
    deployment_env,
    end_offsets,
    fresh_database,
    services_from,
)
from benchmarks.latency import percentile, value  # noqa: E402
from benchmarks.partition_burst import empty_home_bytes, storage_bytes  # noqa: E402
from benchmarks.run_once import code_version  # noqa: E402
from tests.support.dagster_deployment import (  # noqa: E402
    DagsterDeployment,
    run_summaries,
    settled,
)


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class SteadyProducer:
    """Sends round-robin over every partition; keeps every ``sample``-th message's send time."""

    def __init__(self, bootstrap: str, targets: list[tuple[str, int]], sample: int) -> None:
        self.targets = targets
        self.sample = sample
        self.sent: dict[tuple[str, int, int], float] = {}
        self.failed = 0
        self.count = 0
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "linger.ms": 20,
                "queue.buffering.max.messages": 1_000_000,
            }
        )

    def send(self, value: bytes) -> None:
        topic, partition = self.targets[self.count % len(self.targets)]
        kept = self.count % self.sample == 0
        sent = time.time()

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                self.failed += 1
            elif kept:
                self.sent[(msg.topic(), msg.partition(), msg.offset())] = sent

        while True:
            try:
                self._producer.produce(topic, value, partition=partition, on_delivery=delivered)
                break
            except BufferError:
                self._producer.poll(0.01)
        self._producer.poll(0)
        self.count += 1

    def steady(self, rate: int, seconds: float) -> tuple[float, float]:
        started = time.time()
        total = int(rate * seconds)
        i = 0
        while i < total:
            due = min(int((time.time() - started) * rate), total)
            while i < due:
                # A new logId each: nothing is a duplicate, every message is archived.
                self.send(value(str(uuid.uuid4()), i, time.time()))
                i += 1
            time.sleep(0.01)
        if self._producer.flush(120) != 0:
            raise RuntimeError("messages still unacknowledged after 120 s")
        return started, time.time()


def warm_up(
    producer: SteadyProducer, rate: int, svc: Any, dsn: str, topics: list[str], deployment: Any
) -> int:
    """One second of the steady rate, archived; returns the messages sent (none sampled)."""
    producer.steady(rate, 1.0)
    ends = {t: end_offsets(svc.kafka(t), t) for t in topics}
    deadline = time.monotonic() + 300
    while not all(archived_to(dsn, t, ends[t]) for t in topics):
        if time.monotonic() > deadline or not deployment.running():
            raise RuntimeError(f"the warm-up was not archived\n{deployment.log_tail()}")
        time.sleep(1)
    while not settled(deployment):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm-up's runs did not finish\n{deployment.log_tail()}")
        time.sleep(1)
    producer.sent.clear()
    return producer.count


def appended_times(dsn: str) -> dict[tuple[str, int], tuple[list[int], list[tuple[int, float]]]]:
    """Per partition: the appended batches' start offsets (sorted) and (end, appended_at)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT topic, partition, start_offset, end_offset, extract(epoch FROM appended_at) "
            "FROM archive_batches WHERE state = 'appended' ORDER BY topic, partition, start_offset"
        ).fetchall()
    found: dict[tuple[str, int], tuple[list[int], list[tuple[int, float]]]] = defaultdict(
        lambda: ([], [])
    )
    for topic, partition, start, end, at in rows:
        starts, ends = found[(topic, partition)]
        starts.append(start)
        ends.append((end, float(at)))
    return found


def latencies(dsn: str, sent: dict[tuple[str, int, int], float]) -> tuple[list[float], int]:
    """Each sampled message's produce -> archived seconds, and how many were not found."""
    batches = appended_times(dsn)
    values, missing = [], 0
    for (topic, partition, offset), at in sent.items():
        starts, ends = batches.get((topic, partition), ([], []))
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0 or offset >= ends[i][0]:
            missing += 1
            continue
        values.append(ends[i][1] - at)
    return values, missing


def archived_bytes(dsn: str) -> tuple[int, int]:
    """The ledger's appended bytes, and its appends: (run, object) pairs, one upload and one
    compose each (the class A operations; the temporary object's delete is free)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(appended_bytes), 0), count(DISTINCT (run_id, object_name)) "
            "FROM archive_batches WHERE state = 'appended'"
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def with_postgres_storage(home: Path, dsn: str) -> None:
    """DAGSTER_HOME/dagster.yaml: the local instance's queue and daemons, production's storage."""
    home.mkdir(parents=True, exist_ok=True)
    url = dsn.replace("postgresql://", "postgresql+psycopg2://", 1)
    local = (ROOT / "deploy" / "dagster.local.yaml").read_text()
    (home / "dagster.yaml").write_text(f"storage:\n  postgres:\n    postgres_url: {url}\n{local}")


def database_bytes(dsn: str, compact: bool = False) -> int:
    """The database's size; with ``compact`` after VACUUM FULL (live rows only)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if compact:
            conn.execute("VACUUM FULL")
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return int(row[0])


def table_bytes(dsn: str) -> dict[str, int]:
    """Each of Dagster's tables with its indexes and TOAST."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT relname, pg_total_relation_size(oid) FROM pg_class"
            " WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace"
        ).fetchall()
    return {name: int(size) for name, size in rows}


def dagster_breakdown(dsn: str, tables0: dict[str, int]) -> dict[str, Any]:
    """Where Dagster's bytes went: each table's growth since ``tables0``, and the event log's
    stored bytes by event type (``pg_column_size``: after PostgreSQL's compression)."""
    grown = {name: size - tables0.get(name, 0) for name, size in table_bytes(dsn).items()}
    with psycopg.connect(dsn) as conn:
        events = conn.execute(
            "SELECT coalesce(dagster_event_type, 'log message'), count(*),"
            " sum(pg_column_size(event)), sum(length(event))"
            " FROM event_logs GROUP BY 1 ORDER BY 3 DESC LIMIT 10"
        ).fetchall()
        event_rows = conn.execute("SELECT count(*) FROM event_logs").fetchone()
        run_bodies = conn.execute(
            "SELECT count(*), sum(pg_column_size(run_body)), sum(length(run_body)) FROM runs"
        ).fetchone()
    return {
        "tables": dict(sorted(grown.items(), key=lambda kv: -kv[1])[:8]),
        "events": {kind: [n, stored, raw] for kind, n, stored, raw in events},
        "run_bodies": list(run_bodies or ()),
        "event_rows": int(event_rows[0]) if event_rows else 0,
    }


def dump_rows(dsn: str, path: Path) -> None:
    """The last archive run's event rows, the last sensor tick and check execution, as stored."""
    with psycopg.connect(dsn) as conn:
        run = conn.execute(
            "SELECT run_id FROM runs WHERE pipeline_name = 'archive_kafka_batch'"
            " AND status = 'SUCCESS' ORDER BY create_timestamp DESC LIMIT 1"
        ).fetchone()
        rows = conn.execute(
            "SELECT coalesce(dagster_event_type, 'log message'), pg_column_size(event), event"
            " FROM event_logs WHERE run_id = %s ORDER BY id",
            (run[0] if run else "",),
        ).fetchall()
        others = [
            ("run", *row)
            for row in conn.execute(
                "SELECT pg_column_size(run_body), run_body FROM runs WHERE run_id = %s",
                (run[0] if run else "",),
            ).fetchall()
        ]
        stored_bodies = (("job_ticks", "tick_body"), ("asset_check_executions", "evaluation_event"))
        for table, column in stored_bodies:
            others += [
                (table, *row)
                for row in conn.execute(
                    f"SELECT pg_column_size({column}), {column} FROM {table}"
                    " ORDER BY id DESC LIMIT 2"
                ).fetchall()
            ]
        tags = conn.execute(
            "SELECT key, value FROM run_tags WHERE run_id = %s", (run[0] if run else "",)
        ).fetchall()
    with path.open("w") as out:
        for kind, stored, text in [*rows, *others]:
            out.write(f"## {kind} {stored} B stored, {len(text or '')} B raw\n{text}\n")
        out.write(f"## run_tags\n{tags}\n")


def run_phases(runs: list[Any]) -> dict[str, float | None]:
    """Where a run's time goes, the median over ``runs`` of each phase (seconds).

    queued: created until dequeued; booting: dequeued until RUN_START (the run worker's process
    starts and imports); preparing: RUN_START until the first step starts (resources, the
    leases); each step, from the run's materialization; finishing: the last step's end until
    the run ends.
    """
    phases: dict[str, list[float]] = {}

    def add(name: str, a: float | None, b: float | None) -> None:
        if a is not None and b is not None:
            phases.setdefault(name, []).append(b - a)

    for r in runs:
        add("queued", r.created_time, r.launched_time)
        add("booting", r.launched_time, r.start_time)
        add("preparing", r.start_time, r.work_start)
        add("finishing", r.work_end, r.end_time)
        add("whole run", r.start_time, r.end_time)
        for metadata in r.materializations[:1]:
            for key, seconds in metadata.items():
                if key.startswith("seconds_") and isinstance(seconds, float):
                    phases.setdefault(key.removeprefix("seconds_"), []).append(seconds)
    return {name: statistics.median(values) for name, values in phases.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topics", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=250, help="per topic")
    parser.add_argument("--rate", type=int, default=2000, help="messages per second, in all")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--sample", type=int, default=10, help="keep every n-th send time")
    parser.add_argument("--drain", type=float, default=600.0, help="seconds to wait after")
    parser.add_argument("--dagster-storage", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--dump-rows",
        type=Path,
        help="with postgres storage: write the last archive run's event rows, the last two sensor "
        "ticks and check executions to this file (what each of Dagster's rows holds)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PROTOAGG_NAME=VALUE",
        help="a setting of the deployment (repeatable)",
    )
    add_service_args(parser)
    args = parser.parse_args()
    svc = services_from(parser, args)
    overrides = dict(item.split("=", 1) for item in args.set)
    token = uuid.uuid4().hex[:8]
    topics = [f"bench-steady-{token}-{t}" for t in range(args.topics)]
    for topic in topics:
        create_topic(svc.kafka(topic), topic, args.partitions)
    atexit.register(delete_topics, svc.kafka(topics[0]), topics)
    targets = [(t, p) for p in range(args.partitions) for t in topics]
    home = ROOT / ".protoagg" / "bench-steady" / token
    result: dict[str, Any] = {
        "benchmark": "steady_partitions",
        "code": code_version(),
        "topics": args.topics,
        "partitions": args.topics * args.partitions,
        "rate": args.rate,
        "seconds": args.seconds,
        "settings": {**DEFAULTS, **overrides},
        "dagster_storage": args.dagster_storage,
    }
    producer = SteadyProducer(svc.bootstrap, targets, args.sample)
    with fresh_database(svc) as dsn, fresh_database(svc) as dagster_dsn:
        if args.dagster_storage == "postgres":
            with_postgres_storage(home, dagster_dsn)
        env = deployment_env(
            svc, ",".join(topics), dsn, f"bench-steady/{token}/{{topic}}/log.pb", overrides
        )
        deployment = DagsterDeployment("steady", home, env)
        if args.dagster_storage == "postgres":
            with deployment.instance():
                pass  # creates Dagster's tables before the daemon starts
        ends: dict[str, dict[int, int]] = {}
        try:
            deployment.start()
            time.sleep(20)  # the daemon and its code server boot; not measured
            # Warm-up, not measured: a first run stores what Dagster writes once (the job's
            # snapshots, the assets' rows), which a 10-minute window would count as growth.
            warm_count = warm_up(producer, args.rate, svc, dsn, topics, deployment)
            archived0, appends0 = archived_bytes(dsn)
            baseline_at = time.time()
            database0 = database_bytes(dagster_dsn)
            if args.dagster_storage == "postgres":
                kept0 = database_bytes(dagster_dsn, compact=True)
                tables0 = table_bytes(dagster_dsn)
            busy0, total0 = cpu_ticks()
            split = CpuSplit().start()
            started, ended = producer.steady(args.rate, args.seconds)
            split.stop()
            busy1, total1 = cpu_ticks()
            ends = {t: end_offsets(svc.kafka(t), t) for t in topics}
            deadline = time.monotonic() + args.drain
            drained = None
            while time.monotonic() < deadline:
                if all(archived_to(dsn, t, ends[t]) for t in topics):
                    drained = time.time() - ended
                    break
                if not deployment.running():
                    raise RuntimeError(f"dagster-daemon exited\n{deployment.log_tail()}")
                time.sleep(1)
            settle = time.monotonic() + 180
            while not settled(deployment) and time.monotonic() < settle:
                time.sleep(1)
        finally:
            deployment.stop()
        database1 = database_bytes(dagster_dsn)
        if args.dagster_storage == "postgres":
            kept1 = database_bytes(dagster_dsn, compact=True)
            # Each table's growth in live rows (both sizes after VACUUM FULL).
            result["dagster_breakdown"] = dagster_breakdown(dagster_dsn, tables0)
            if args.dump_rows:
                dump_rows(dagster_dsn, args.dump_rows)
        found, missing = latencies(dsn, producer.sent)
        appended, appends = archived_bytes(dsn)
        appended, appends = appended - archived0, appends - appends0
        # Read while the databases exist (with postgres storage Dagster's runs are in one).
        runs = [
            r
            for r in run_summaries(deployment)
            if r.job_name == "archive_kafka_batch" and r.created_time >= baseline_at
        ]
    in_window = [r for r in runs if started <= r.created_time <= ended]
    result["run_phases_median_s"] = run_phases(in_window)
    sizes = storage_bytes(home)
    if args.dagster_storage == "postgres":
        written = database1 - database0 + sizes["compute_logs"]
        dagster = kept1 - kept0 + sizes["compute_logs"]
        result["dagster_bytes_written"] = written
    else:
        empty = empty_home_bytes(home.with_name(home.name + "-empty"))
        dagster = sizes["storage"] + sizes["compute_logs"] - empty
    sent = producer.count - warm_count
    result.update(
        {
            "sent": sent,
            "achieved_rate": sent / (ended - started),
            "delivery_failures": producer.failed,
            "drained_s_after_producing": drained,
            "latency_s": {
                "sampled": len(found),
                "missing": missing,
                "p50": percentile(found, 50),
                "p95": percentile(found, 95),
                "p99": percentile(found, 99),
                "max": max(found, default=None),
            },
            "runs": len(runs),
            "runs_failed": sum(r.status != "SUCCESS" for r in runs),
            "runs_per_minute_steady": len(in_window) / ((ended - started) / 60),
            "cpu_busy_share": (busy1 - busy0) / max(total1 - total0, 1),
            "cpu_seconds_by_process": split.seconds(),
            "archived_bytes": appended,
            "appends": appends,
            "class_a_operations": 2 * appends,
            "dagster_bytes_per_run": dagster / len(runs) if runs else None,
            "dagster_bytes": dagster,
            "dagster_bytes_per_archived_mb": dagster / (appended / 1e6) if appended else None,
            "dagster_share_of_archive": dagster / appended if appended else None,
        }
    )
    lat = result["latency_s"]

    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    print(f"{result['partitions']} partitions ({args.topics} topics), {args.seconds:.0f} s:")
    print(f"  sent                    {sent:,} ({result['achieved_rate']:,.0f} msg/s)")
    print(f"  drained after producing {sec(drained)} s")
    print(
        f"  produce -> archived     p50 {sec(lat['p50'])} s, p95 {sec(lat['p95'])} s, "
        f"p99 {sec(lat['p99'])} s, max {sec(lat['max'])} s "
        f"({lat['sampled']:,} sampled, {missing} not archived)"
    )
    print(
        f"  archive runs            {len(runs)} ({result['runs_failed']} not succeeded), "
        f"{result['runs_per_minute_steady']:.1f} per minute while producing"
    )
    print(
        "  a run's time (median)   "
        + ", ".join(f"{k} {v:.1f} s" for k, v in result["run_phases_median_s"].items() if v)
    )
    print(f"  machine CPU busy        {result['cpu_busy_share']:.0%} of 2 cores' time")
    for kind, used in result["cpu_seconds_by_process"].items():
        print(f"    {kind:21} {used:7.1f} CPU s ({used / (ended - started) / 2:.0%} of 2 cores)")
    print(f"  archived                {appended / 1e6:.1f} MB")
    print(
        f"  Dagster storage growth  {dagster / 1e6:.2f} MB "
        f"({(result['dagster_share_of_archive'] or 0):.2%} of the archive, "
        f"{args.dagster_storage} storage"
        + (", live rows after VACUUM FULL)" if args.dagster_storage == "postgres" else ")")
    )
    if "dagster_bytes_written" in result:
        written = result["dagster_bytes_written"]
        print(
            f"    files grew            {written / 1e6:.2f} MB ({written / appended:.2%}; dead row "
            "versions included)"
        )
    if breakdown := result.get("dagster_breakdown"):
        print(f"  compute logs            {sizes['compute_logs'] / 1e6:.2f} MB")
        print(
            "  Dagster's tables grew   (live) "
            + ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in breakdown["tables"].items())
        )
        print(
            "  run bodies              {} runs, {} B stored, {} B raw".format(
                *breakdown["run_bodies"]
            )
        )
        for kind, (n, stored, raw) in breakdown["events"].items():
            print(
                f"    {kind:28} {n:6} events {stored / 1e3:9.1f} KB stored {raw / 1e3:9.1f} KB raw"
            )
    print(json.dumps(result))
    return 0 if drained is not None and missing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
