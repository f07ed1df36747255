"""End to end through the real Dagster path: dagster-daemon, kafka_offsets_sensor, queued runs.

    PYTHONPATH=. .venv/bin/python benchmarks/e2e_dagster.py [--smoke] [--messages N]
        [--configs NAME,...] [--part all|configs|plot] [--plot-batches 10000,50000,...]
        [--plot-messages N] [--plot-max-runs N]
        [--bootstrap HOST:PORT] [--gcs http://HOST:PORT] [--admin-dsn postgresql://...]

What a user gets: N seed-shaped messages (~120 B JSON, 5% repeated logIds,
``benchmarks/run_once.make_values``) are produced first (round robin over the partitions; the
produce rate is reported, not part of the measure), then a fresh Dagster deployment
(``tests/support/dagster_deployment.DagsterDeployment``: its own DAGSTER_HOME, the run queue of
``deploy/dagster.local.yaml``, a real ``dagster-daemon`` whose sensor launches runs in
subprocesses) archives the topic into a fresh PostgreSQL database (``--admin-dsn``) and a fresh
object name. The clock runs until every partition's ``archive_positions.next_offset`` is its end
offset with nothing claimed, and the archive object's ``protoagg-offsets`` metadata says so too.

Times (seconds, wall clock):

- ``boot``      daemon started .. the sensor created its first run (daemon + code server start)
- ``pipeline``  first run created .. everything archived: the archiving throughput's window
- ``cold``      daemon started .. everything archived (boot + pipeline)

``msgs/s`` is N / pipeline; ``ratio`` divides it by the raw consume ceiling measured in the same
invocation on the same topic (one kafka-python consumer, assign + seek, read and discard).
Each run's life is read back from the deployment's run storage: created (sensor) -> dequeued
(RUN_STARTING) -> RUN_START (process up) -> end, and the steps' own seconds from the
``kafka_archive`` materialization.

Configurations (``--configs``): ``defaults-Np`` (PROTOAGG_BATCH_SIZE=500, linger 15,
max batch 200000), ``large-Np`` (batch size 50000, max batch 500000), ``fast-Np`` (large with
PROTOAGG_KAFKA_CLIENT=confluent: the recommended throughput settings), ``whole-Np`` (max batch =
N: one run per partition), ``large-Np-objects`` (large, one object per partition:
PROTOAGG_GCS_OBJECT=.../{topic}/{partition}.pb). The plot sweep archives ``--plot-messages`` on
1 partition for each max_batch_messages in ``--plot-batches`` (capped at ``--plot-max-runs``
runs per point, so small batches use a smaller topic) and writes docs/img/throughput-vs-batch.png.

Full size (default): 1,000,000 messages through defaults-1p, defaults-4p, large-1p, large-4p and
large-4p-objects, then the plot sweep (about 9 minutes here; ``--part`` runs one half).
``--smoke``: 20,000 messages on a 1- and a 2-partition topic archived by ONE deployment with the
default settings (both topics at once, so they share the CPU; about 30 s); its one-point plot goes
to the deployment directory, not docs/img. Messages are produced with confluent-kafka when it is
installed (a benchmark-only dependency, ~30x faster here), else with the project's kafka-python.

The table, then one JSON line ``{"benchmark": "e2e_dagster", ...}`` (the last line of stdout).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from google.cloud import storage  # noqa: E402
from kafka.admin import NewTopic  # noqa: E402

from benchmarks.run_once import (  # noqa: E402
    _rounded,
    code_version,
    database,
    make_values,
    raw_consume,
)
from protoagg_dagster.archive.job import archive_kafka_batch  # noqa: E402
from protoagg_dagster.archive.ledger import read_progress  # noqa: E402
from protoagg_dagster.core.archive_object import last_compose  # noqa: E402
from protoagg_dagster.resources import GCSResource, KafkaResource  # noqa: E402
from tests.support.dagster_deployment import (  # noqa: E402
    DagsterDeployment,
    RunSummary,
    run_summaries,
    settled,
)

try:
    from confluent_kafka import Producer as ConfluentProducer

    PRODUCER = "confluent-kafka"
except ImportError:  # pragma: no cover - optional benchmark dependency
    ConfluentProducer = None
    PRODUCER = "kafka-python"

STEPS = ("consume", "dedupe", "encode", "append")
PLOT_PATH = ROOT / "docs" / "img" / "throughput-vs-batch.png"
DEFAULTS = {
    "PROTOAGG_BATCH_SIZE": "500",
    "PROTOAGG_LINGER_SECONDS": "15",
    "PROTOAGG_MAX_BATCH_MESSAGES": "200000",
}


# --------------------------------------------------------------------------------------------
# services


@dataclass
class Services:
    bootstrap: str
    gcs: str
    bucket: str
    admin_dsn: str

    def kafka(self, topic: str) -> KafkaResource:
        return KafkaResource(bootstrap_servers=self.bootstrap, topics=topic)

    def bucket_handle(self) -> storage.Bucket:
        return GCSResource(bucket=self.bucket, emulator_host=self.gcs).get_bucket()


def add_service_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=os.environ.get("PROTOAGG_KAFKA_BOOTSTRAP"))
    parser.add_argument("--gcs", default=os.environ.get("STORAGE_EMULATOR_HOST"))
    parser.add_argument("--bucket", default=os.environ.get("PROTOAGG_GCS_BUCKET", "logs"))
    parser.add_argument(
        "--admin-dsn",
        default=os.environ.get("PROTOAGG_BENCH_ADMIN_DSN"),
        help="superuser DSN: each configuration gets a fresh database, dropped afterwards",
    )


def services_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Services:
    missing = [name for name in ("bootstrap", "gcs", "admin_dsn") if not getattr(args, name)]
    if missing:
        parser.error(f"no value for {missing} (pass it, or export the PROTOAGG_* variables)")
    return Services(args.bootstrap, args.gcs, args.bucket, args.admin_dsn)


def create_topic(kafka: KafkaResource, topic: str, partitions: int) -> None:
    admin = kafka.get_admin()
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def delete_topics(kafka: KafkaResource, topics: list[str]) -> None:
    """Drop a benchmark's topics: a broker left with tens of thousands of partitions runs out of
    file descriptors (the bench broker's log directory failed at about 20,000)."""
    admin = kafka.get_admin()
    try:
        admin.delete_topics(topics)
    finally:
        admin.close()


def produce(kafka: KafkaResource, topic: str, values: list[bytes], partitions: int) -> float:
    """Send value i to partition i % partitions; seconds until all are acknowledged (acks=all).

    Uses confluent-kafka (librdkafka) when it is installed, a benchmark-only dependency about 30x
    faster than kafka-python here; otherwise the project's kafka-python producer. Producing is
    not part of any measure.
    """
    started = time.perf_counter()
    if PRODUCER == "confluent-kafka":
        producer = ConfluentProducer(
            {
                "bootstrap.servers": kafka.bootstrap_servers,
                "acks": "all",
                "linger.ms": 20,
                "batch.size": 1 << 20,
                "queue.buffering.max.messages": 1_000_000,
            }
        )
        for i, value in enumerate(values):
            while True:
                try:
                    producer.produce(topic, value, partition=i % partitions)
                    break
                except BufferError:
                    producer.poll(0.01)
        if producer.flush(120) != 0:
            raise RuntimeError(f"{topic}: messages still unacknowledged after 120 s")
        return time.perf_counter() - started
    producer = kafka.get_producer()
    try:
        for i, value in enumerate(values):
            producer.send(topic, value=value, partition=i % partitions)
        producer.flush()
    finally:
        producer.close()
    return time.perf_counter() - started


def end_offsets(kafka: KafkaResource, topic: str) -> dict[int, int]:
    return {p: end for p, (_, end) in kafka.offset_bounds(topic).items()}


@dataclass
class Topic:
    name: str
    partitions: int
    messages: int
    distinct: int
    value_bytes: int
    ends: dict[int, int]
    produce_s: float
    raw_consume_s: float

    @property
    def raw_msgs_per_s(self) -> float:
        return self.messages / self.raw_consume_s

    def summary(self) -> dict[str, Any]:
        return {
            "topic": self.name,
            "partitions": self.partitions,
            "messages": self.messages,
            "distinct_log_ids": self.distinct,
            "avg_value_bytes": self.value_bytes / self.messages,
            "produce_s": self.produce_s,
            "produce_msgs_per_s": self.messages / self.produce_s,
            "raw_consume_s": self.raw_consume_s,
            "raw_consume_msgs_per_s": self.raw_msgs_per_s,
        }


def make_topic(
    svc: Services, n: int, partitions: int, seed: int, log: Callable[[str], None]
) -> Topic:
    name = f"bench-e2e-{uuid.uuid4().hex[:8]}-{partitions}p"
    values, distinct = make_values(n, 0.05, seed)
    kafka = svc.kafka(name)
    create_topic(kafka, name, partitions)
    produce_s = produce(kafka, name, values, partitions)
    ends = end_offsets(kafka, name)
    if sum(ends.values()) != n:
        raise RuntimeError(f"{name}: end offsets {ends} do not add up to {n}")
    raw_s, _count = raw_consume(kafka, name, ends)
    topic = Topic(name, partitions, n, distinct, sum(map(len, values)), ends, produce_s, raw_s)
    log(
        f"topic {name}: {n:,} messages on {partitions} partition(s), produced in "
        f"{produce_s:.1f} s ({n / produce_s:,.0f} msg/s); raw consume {raw_s:.2f} s "
        f"({n / raw_s:,.0f} msg/s)"
    )
    return topic


# --------------------------------------------------------------------------------------------
# one deployment archiving one topic


@contextmanager
def fresh_database(svc: Services) -> Iterator[str]:
    with database(svc.admin_dsn, svc.admin_dsn) as dsn:
        yield dsn


def deployment_env(
    svc: Services, topic: str, dsn: str, object_template: str, settings: dict[str, str]
) -> dict[str, str]:
    return {
        "PROTOAGG_KAFKA_BOOTSTRAP": svc.bootstrap,
        "PROTOAGG_TOPICS": topic,
        "PROTOAGG_POSTGRES_DSN": dsn,
        "PROTOAGG_GCS_BUCKET": svc.bucket,
        "PROTOAGG_GCS_OBJECT": object_template,
        "STORAGE_EMULATOR_HOST": svc.gcs,
        **DEFAULTS,
        **settings,
    }


def archived_to(dsn: str, topic: str, ends: dict[int, int]) -> bool:
    """Every partition's position at its end offset, and nothing claimed but unconfirmed."""
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            progress = read_progress(conn, topic)
    except psycopg.errors.UndefinedTable:
        return False  # no run has created the schema yet
    return all(
        (state := progress.get(p)) is not None
        and state.next_offset == end
        and state.pending is None
        for p, end in ends.items()
    )


def objects_say_archived(
    bucket: storage.Bucket, object_names: dict[int, str], topic: str, ends: dict[int, int]
) -> dict[str, Any]:
    """The archive objects exist, carry the last-append marker, and their sizes.

    Which offsets each object holds is the ledger's (``archived_to``); the object only
    names its last piece.
    """
    sizes: dict[str, int] = {}
    ok = True
    for name in object_names.values():
        blob = bucket.get_blob(name)
        if blob is None:
            ok = False
            continue
        sizes[name] = int(blob.size or 0)
        ok = ok and bool(last_compose(blob.metadata))
    return {"ok": ok, "object_bytes": sum(sizes.values()), "objects": len(sizes)}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_stats(runs: list[RunSummary], origin: float) -> dict[str, Any]:
    """What the archive runs did: counts, their phases, steps and the idle gaps between them."""
    archive_runs = sorted(
        (r for r in runs if r.job_name == archive_kafka_batch.name), key=lambda r: r.created_time
    )
    queued = [r.launched_time - r.created_time for r in archive_runs if r.launched_time]
    launch = [
        r.start_time - r.launched_time for r in archive_runs if r.start_time and r.launched_time
    ]
    execute = [r.end_time - r.start_time for r in archive_runs if r.start_time and r.end_time]
    life = [r.end_time - r.created_time for r in archive_runs if r.end_time]
    steps = {s: 0.0 for s in STEPS}
    step_sums = []
    records = appended = duplicates = 0
    for r in archive_runs:
        # kafka_archive's: a topic entry's asset repeats its ranges' numbers, and the run's
        # seconds are on kafka_archive alone.
        for m in [m for m in r.materializations if "seconds_consume" in m]:
            run_steps = 0.0
            for s in STEPS:
                steps[s] += float(m.get(f"seconds_{s}", 0.0) or 0.0)
                run_steps += float(m.get(f"seconds_{s}", 0.0) or 0.0)
            step_sums.append(run_steps)
            records += int(m.get("records_read") or 0)
            appended += int(m.get("records_appended") or 0)
            duplicates += int(m.get("duplicates_dropped") or 0)
    # Per partition: from one run's end to the next run's creation (the sensor noticing).
    gaps = []
    by_partition: dict[str, list[RunSummary]] = {}
    for r in archive_runs:
        by_partition.setdefault(r.partition or "?", []).append(r)
    for rs in by_partition.values():
        for prev, nxt in itertools.pairwise(rs):
            if prev.end_time:
                gaps.append(nxt.created_time - prev.end_time)
    in_run_overhead = [
        (r.end_time - r.start_time)
        - sum(float(m.get(f"seconds_{s}", 0.0) or 0.0) for m in r.materializations for s in STEPS)
        for r in archive_runs
        if r.start_time and r.end_time
    ]
    return {
        "runs": len(archive_runs),
        "statuses": dict(Counter(r.status for r in archive_runs)),
        "step_retries": sum(len(r.step_retries) for r in archive_runs),
        "errors": [e for r in archive_runs for e in r.errors][:5],
        "first_created_at": archive_runs[0].created_time - origin if archive_runs else None,
        "runs_per_partition": {k: len(v) for k, v in sorted(by_partition.items())},
        "queued_s": {
            "median": median(queued),
            "max": max(queued, default=None),
            "sum": sum(queued),
        },
        "launch_s": {
            "median": median(launch),
            "max": max(launch, default=None),
            "sum": sum(launch),
        },
        "execute_s": {
            "median": median(execute),
            "max": max(execute, default=None),
            "sum": sum(execute),
        },
        "created_to_end_s": {"median": median(life), "sum": sum(life)},
        "sensor_gap_s": {"median": median(gaps), "max": max(gaps, default=None), "sum": sum(gaps)},
        "in_run_overhead_s": {"median": median(in_run_overhead), "sum": sum(in_run_overhead)},
        "steps_sum_s": steps,
        "records_read": records,
        "records_appended": appended,
        "duplicates_dropped": duplicates,
        "timeline": [
            {
                "partition": r.partition,
                "range": r.range_key.rsplit("-", 2)[-2:] if r.range_key else None,
                "created": round(r.created_time - origin, 2),
                "dequeued": round(r.launched_time - origin, 2) if r.launched_time else None,
                "start": round(r.start_time - origin, 2) if r.start_time else None,
                "end": round(r.end_time - origin, 2) if r.end_time else None,
                "status": r.status,
            }
            for r in archive_runs
        ],
    }


SENSOR_TICK = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \+0000.*Checking for new runs for sensor: "
    r"kafka_offsets_sensor"
)


def sensor_tick_intervals(log_path: Path) -> dict[str, Any]:
    """Seconds between the sensor's evaluations, from the daemon log (1 s resolution).

    The sensor asks for ``minimum_interval_seconds=5``; Dagster's sensor loop itself runs every
    5 s (``MIN_INTERVAL_LOOP_TIME``), so a tick that started a little after its loop iteration is
    not yet 5 s old at the next iteration and waits for the one after: 5 or 10 s.
    """
    times = []
    for line in log_path.read_text(errors="replace").splitlines():
        match = SENSOR_TICK.search(line)
        if match:
            moment = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
            times.append(moment.timestamp())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {
        "ticks": len(times),
        "median_s": median(gaps),
        "mean_s": sum(gaps) / len(gaps) if gaps else None,
        "max_s": max(gaps, default=None),
        "share_at_least_9_s": sum(1 for g in gaps if g >= 9) / len(gaps) if gaps else None,
    }


def io_manager_bytes(home: Path) -> dict[str, int]:
    """Bytes of op outputs pickled under DAGSTER_HOME/storage, per step.

    Dagster's default IO manager in a deployment (fs_io_manager) pickles every op output there
    and never deletes it (about 720 B per archived message before the job switched to
    mem_io_manager); with the in-memory IO manager this stays 0, so it guards a regression.
    """
    sizes: dict[str, int] = {}
    for result in (home / "storage").glob("*/*/result"):
        step = result.parent.name
        sizes[step] = sizes.get(step, 0) + result.stat().st_size
    sizes["total"] = sum(sizes.values())
    return sizes


def archive_with_daemon(
    svc: Services,
    topics: list[Topic],
    label: str,
    settings: dict[str, str],
    per_partition_objects: bool,
    deadline_s: float,
    home_root: Path,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Start one deployment archiving ``topics``, wait until all are archived and every run has
    finished, stop it; one result per topic (label ``<label>-<P>p`` when several topics)."""
    token = uuid.uuid4().hex[:8]
    prefix = f"bench-e2e/{token}-{label}"
    template = (
        f"{prefix}/{{topic}}/{{partition}}.pb" if per_partition_objects else f"{prefix}/log.pb"
    )
    bucket = svc.bucket_handle()
    done_at: dict[str, float] = {}
    with fresh_database(svc) as dsn:
        env = deployment_env(svc, ",".join(t.name for t in topics), dsn, template, settings)
        deployment = DagsterDeployment(label, home_root / f"{token}-{label}", env)
        origin = time.time()
        settled_at = None
        try:
            deployment.start()
            deadline = time.monotonic() + deadline_s
            while time.monotonic() < deadline and len(done_at) < len(topics):
                if not deployment.running():
                    raise RuntimeError(f"dagster-daemon exited\n{deployment.log_tail()}")
                for t in topics:
                    if t.name not in done_at and archived_to(dsn, t.name, t.ends):
                        done_at[t.name] = time.time()
                time.sleep(0.25)
            # The ledger is complete before the last run reports success (the asset checks and
            # the materialization come after the commit): let the runs finish, or stopping the
            # daemon would interrupt them.
            while len(done_at) == len(topics) and time.monotonic() < deadline + 60:
                if settled(deployment):
                    settled_at = time.time()
                    break
                time.sleep(0.5)
        finally:
            stopping = time.time()
            deployment.stop()
            stop_s = time.time() - stopping
        runs = run_summaries(deployment)
        io_bytes = io_manager_bytes(deployment.home)
        ticks = sensor_tick_intervals(deployment.log_path)
        checks = {
            t.name: objects_say_archived(
                bucket,
                {
                    p: (
                        f"{prefix}/{t.name}/{p}.pb" if per_partition_objects else f"{prefix}/log.pb"
                    )
                    for p in t.ends
                },
                t.name,
                t.ends,
            )
            for t in topics
        }
    results = []
    for topic in topics:
        mine = [r for r in runs if any(x.topic == topic.name for x in r.ranges)]
        stats = run_stats(mine, origin)
        name = label if len(topics) == 1 else f"{label}-{topic.partitions}p"
        result: dict[str, Any] = {
            "config": name,
            "partitions": topic.partitions,
            "messages": topic.messages,
            "settings": {**DEFAULTS, **settings},
            "object_template": template,
            "topics_in_deployment": len(topics),
            "stop_s": stop_s,
            "settle_s": settled_at - max(done_at.values()) if settled_at and done_at else None,
            **stats,
            # Op outputs pickled under DAGSTER_HOME/storage by a filesystem IO manager (whole
            # deployment, all topics): never deleted.
            "io_manager_pickles": io_bytes,
            "sensor_ticks": ticks,
            "objects_ok": checks[topic.name]["ok"],
            "object_bytes": checks[topic.name]["object_bytes"],
            "timed_out": topic.name not in done_at,
        }
        first = stats["first_created_at"]
        if topic.name not in done_at or first is None:
            log(f"  {name}: NOT archived within {deadline_s:.0f} s")
            result.update(
                {
                    "cold_s": None,
                    "pipeline_s": None,
                    "boot_s": first,
                    "msgs_per_s": None,
                    "ratio_to_raw": None,
                    "complete": False,
                }
            )
            results.append(result)
            continue
        cold = done_at[topic.name] - origin
        pipeline = cold - first
        result.update(
            {
                "boot_s": first,
                "pipeline_s": pipeline,
                "cold_s": cold,
                "msgs_per_s": topic.messages / pipeline,
                "cold_msgs_per_s": topic.messages / cold,
                "ratio_to_raw": (topic.messages / pipeline) / topic.raw_msgs_per_s,
                "complete": stats["records_appended"] == topic.distinct
                and checks[topic.name]["ok"]
                and settled_at is not None,
            }
        )
        log(
            f"  {name}: {topic.messages:,} msgs archived, boot {first:.1f} s + pipeline "
            f"{pipeline:.1f} s; {stats['runs']} runs; {topic.messages / pipeline:,.0f} msg/s "
            f"({result['ratio_to_raw']:.1%} of raw); appended {stats['records_appended']:,} of "
            f"{topic.distinct:,} distinct; metadata ok={checks[topic.name]['ok']}; "
            f"statuses {stats['statuses']}"
        )
        results.append(result)
    return results


# --------------------------------------------------------------------------------------------
# configurations


@dataclass(frozen=True)
class Config:
    name: str
    partitions: int
    settings: dict[str, str] = field(default_factory=dict)
    per_partition_objects: bool = False


def config_named(name: str, n: int) -> Config:
    """``defaults-4p``, ``large-1p``, ``fast-1p``, ``whole-1p``, ``large-4p-objects``,
    ``b20000-m100000-1p``."""
    parts = name.split("-")
    objects = parts[-1] == "objects"
    if objects:
        parts = parts[:-1]
    partitions = int(parts[-1].rstrip("p"))
    kind = "-".join(parts[:-1])
    per_partition = -(-n // partitions)
    if kind == "defaults":
        settings: dict[str, str] = {}
    elif kind == "large":
        settings = {"PROTOAGG_BATCH_SIZE": "50000", "PROTOAGG_MAX_BATCH_MESSAGES": "500000"}
    elif kind == "fast":
        # What docs/benchmarks.md recommends for throughput: large batches, the librdkafka reader.
        settings = {
            "PROTOAGG_BATCH_SIZE": "50000",
            "PROTOAGG_MAX_BATCH_MESSAGES": "500000",
            "PROTOAGG_KAFKA_CLIENT": "confluent",
        }
    elif kind == "whole":
        settings = {
            "PROTOAGG_BATCH_SIZE": str(min(50000, per_partition)),
            "PROTOAGG_MAX_BATCH_MESSAGES": str(max(per_partition, 500)),
        }
    elif kind.startswith("b") and "-m" in kind:
        b, m = kind[1:].split("-m")
        settings = {"PROTOAGG_BATCH_SIZE": b, "PROTOAGG_MAX_BATCH_MESSAGES": m}
    else:
        raise SystemExit(f"unknown configuration {name!r}")
    return Config(name, partitions, settings, objects)


# --------------------------------------------------------------------------------------------
# report


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    print()
    print(
        f"protoagg end to end through dagster-daemon ({report['cpus']} CPUs shared; code "
        f"{report['code']}; seed {report['seed']})"
    )
    for t in report["topics"]:
        print(
            f"  topic {t['topic']}: {t['messages']:,} msgs / {t['partitions']} partition(s), "
            f"{t['avg_value_bytes']:.0f} B avg, {t['distinct_log_ids']:,} distinct; produce "
            f"{t['produce_msgs_per_s']:,.0f} msg/s ({t['produce_s']:.1f} s); raw consume ceiling "
            f"{t['raw_consume_msgs_per_s']:,.0f} msg/s ({t['raw_consume_s']:.2f} s)"
        )
    print()
    head = (
        f"  {'config':<22}{'msgs':>9}{'runs':>5}{'boot s':>8}{'pipe s':>8}{'msg/s':>9}"
        f"{'%raw':>7}{'queued':>8}{'launch':>8}{'exec':>7}{'gap':>6}{'steps s':>9}{'ok':>4}"
    )
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in report["configs"]:
        steps = sum(r["steps_sum_s"].values())
        print(
            f"  {r['config']:<22}{r['messages']:>9,}{r['runs']:>5}{fmt(r['boot_s']):>8}"
            f"{fmt(r['pipeline_s']):>8}{fmt(r['msgs_per_s'], ',.0f'):>9}"
            f"{fmt(100 * r['ratio_to_raw'] if r['ratio_to_raw'] else None):>7}"
            f"{fmt(r['queued_s']['median']):>8}{fmt(r['launch_s']['median']):>8}"
            f"{fmt(r['execute_s']['median']):>7}{fmt(r['sensor_gap_s']['median']):>6}"
            f"{steps:>9.1f}{'yes' if r.get('complete') else 'NO':>4}"
        )
    print(
        "  (boot: daemon start -> first run created; pipe: first run created -> all archived; "
        "msg/s = msgs / pipe;\n   queued/launch/exec/gap: medians per run of created->dequeued, "
        "dequeued->RUN_START, RUN_START->end,\n   previous run's end -> next run created (same "
        "partition); steps s: sum over runs of consume+dedupe+encode+append)"
    )
    for r in report["configs"]:
        s = r["steps_sum_s"]
        print(
            f"  {r['config']}: steps consume {s['consume']:.1f} dedupe {s['dedupe']:.1f} encode "
            f"{s['encode']:.1f} append {s['append']:.1f} s; in-run Dagster overhead "
            f"{fmt(r['in_run_overhead_s']['sum'])} s; runs/partition {r['runs_per_partition']}; "
            f"statuses {r['statuses']}; object(s) {r['object_bytes']:,} B; "
            f"stop {r['stop_s']:.1f} s; op outputs pickled by the io manager "
            f"{r['io_manager_pickles']['total']:,} B"
        )
    if report.get("plot"):
        print()
        print("  throughput vs max_batch_messages (1 partition):")
        print(f"  {'max batch':>10}{'msgs':>9}{'runs':>6}{'pipe s':>8}{'msg/s':>9}{'%raw':>7}")
        for p in report["plot"]["points"]:
            print(
                f"  {p['max_batch_messages']:>10,}{p['messages']:>9,}{p['runs']:>6}"
                f"{fmt(p['pipeline_s']):>8}{fmt(p['msgs_per_s'], ',.0f'):>9}"
                f"{fmt(100 * p['ratio_to_raw'] if p['ratio_to_raw'] else None):>7}"
            )
        print(f"  plot: {report['plot']['png']}")
    print()


def save_plot(points: list[dict[str, Any]], raw: float | None, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [p for p in points if p["msgs_per_s"]]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    xs = [p["max_batch_messages"] for p in good]
    ys = [p["msgs_per_s"] for p in good]
    ax.plot(xs, ys, "o-", label="protoagg via dagster-daemon (first run -> archived)")
    for p in good:
        ax.annotate(
            f"{p['runs']} run{'s' if p['runs'] != 1 else ''}, {p['messages'] // 1000}k msgs",
            (p["max_batch_messages"], p["msgs_per_s"]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
        )
    if raw:
        ax.axhline(raw, color="grey", linestyle="--", label=f"raw consume ceiling {raw:,.0f} msg/s")
    ax.set_xscale("log")
    ax.set_xlabel("PROTOAGG_MAX_BATCH_MESSAGES (messages per run)")
    ax.set_ylabel("messages / second")
    ax.set_title("Archive throughput vs batch size (1 partition, backlog pre-produced)")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="20k messages on 1 and on 2 partitions, archived by ONE deployment (both topics at "
        "once, so their numbers share the CPU); the plot goes to a temporary file",
    )
    parser.add_argument("--messages", "-n", type=int, default=None)
    parser.add_argument("--configs", default=None, help="comma separated configuration names")
    parser.add_argument("--part", choices=("all", "configs", "plot"), default="all")
    parser.add_argument("--plot-messages", type=int, default=None)
    parser.add_argument("--plot-batches", default=None)
    parser.add_argument("--plot-max-runs", type=int, default=None)
    parser.add_argument("--plot-path", default=None)
    parser.add_argument("--deadline", type=float, default=None, help="seconds per configuration")
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--home", default=None, help="where the DAGSTER_HOMEs go (default: tmp)")
    add_service_args(parser)
    args = parser.parse_args()
    svc = services_from(parser, args)
    smoke = args.smoke
    n = args.messages or (20_000 if smoke else 1_000_000)
    names = (args.configs or ("defaults-1p,defaults-4p,large-1p,large-4p,large-4p-objects")).split(
        ","
    )
    plot_n = args.plot_messages or 300_000
    plot_batches = [
        int(x) for x in (args.plot_batches or "10000,50000,100000,200000,500000").split(",")
    ]
    plot_max_runs = args.plot_max_runs or 4
    deadline = args.deadline or (90.0 if smoke else 900.0)
    home_root = Path(args.home or f"/tmp/protoagg-bench-e2e-{uuid.uuid4().hex[:6]}")
    plot_path = (
        Path(args.plot_path)
        if args.plot_path
        else (home_root / "throughput-vs-batch.png" if smoke else PLOT_PATH)
    )

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.time()
    topics: dict[tuple[int, int], Topic] = {}

    def topic_for(messages: int, partitions: int) -> Topic:
        key = (messages, partitions)
        if key not in topics:
            # Distinct seeds: topics archived by one deployment share processed_logs, so equal
            # logIds would all be dropped as duplicates of the other topic's.
            seed = args.seed + 1000 * partitions + messages
            topics[key] = make_topic(svc, messages, partitions, seed, log)
        return topics[key]

    results: list[dict[str, Any]] = []
    plot = None
    if smoke:
        both = [topic_for(n, 1), topic_for(n, 2)]
        results = archive_with_daemon(svc, both, "defaults", {}, False, deadline, home_root, log)
        # The plot code on what the smoke has: the 1-partition topic at the default max batch.
        one = results[0]
        points = [plot_point(200_000, one)]
        plot = {
            "points": points,
            "png": save_plot(points, both[0].raw_msgs_per_s, plot_path),
            "raw_consume_msgs_per_s_1p": both[0].raw_msgs_per_s,
        }
    else:
        if args.part in ("all", "configs"):
            for config in (config_named(name.strip(), n) for name in names if name.strip()):
                topic = topic_for(n, config.partitions)
                results += archive_with_daemon(
                    svc,
                    [topic],
                    config.name,
                    config.settings,
                    config.per_partition_objects,
                    deadline,
                    home_root,
                    log,
                )
        if args.part in ("all", "plot"):
            points = []
            for m in plot_batches:
                topic = topic_for(min(plot_n, m * plot_max_runs), 1)
                (r,) = archive_with_daemon(
                    svc,
                    [topic],
                    f"plot-m{m}",
                    {
                        "PROTOAGG_MAX_BATCH_MESSAGES": str(m),
                        "PROTOAGG_BATCH_SIZE": str(min(500, m)),
                    },
                    False,
                    deadline,
                    home_root,
                    log,
                )
                points.append(plot_point(m, r))
            raws = [t.raw_msgs_per_s for (_, p), t in topics.items() if p == 1]
            raw = median(raws)
            plot = {
                "points": points,
                "png": save_plot(points, raw, plot_path),
                "raw_consume_msgs_per_s_1p": raw,
            }
    for r in results:
        r.pop("timeline", None) if not smoke and r["runs"] > 40 else None
    report: dict[str, Any] = {
        "benchmark": "e2e_dagster",
        "smoke": smoke,
        "messages": n,
        "code": code_version(),
        "dagster": __import__("dagster").__version__,
        "producer": PRODUCER,
        "cpus": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "seed": args.seed,
        "topics": [t.summary() for t in topics.values()],
        "configs": results,
        "plot": plot,
        "wall_s": time.time() - started,
    }
    print_table(report)
    print(
        f"  whole benchmark: {report['wall_s']:.0f} s; load average at the end "
        f"{report['loadavg_end'][0]:.1f}"
    )
    print(json.dumps(_rounded(report), separators=(",", ":")))
    return 0


def plot_point(max_batch: int, r: dict[str, Any]) -> dict[str, Any]:
    return {
        "max_batch_messages": max_batch,
        "messages": r["messages"],
        "runs": r["runs"],
        "pipeline_s": r["pipeline_s"],
        "boot_s": r["boot_s"],
        "msgs_per_s": r["msgs_per_s"],
        "ratio_to_raw": r["ratio_to_raw"],
        "exec_median_s": r["execute_s"]["median"],
        "launch_median_s": r["launch_s"]["median"],
        "queued_median_s": r["queued_s"]["median"],
        "gap_median_s": r["sensor_gap_s"]["median"],
        "complete": r.get("complete"),
    }


if __name__ == "__main__":
    sys.exit(main())
