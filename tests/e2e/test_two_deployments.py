"""Two independent Dagster deployments archive one topic at once, plus a backfill: each id once.

Each deployment has its own DAGSTER_HOME (SQLite run storage, the run queue of
deploy/dagster.local.yaml) and its own ``dagster-daemon``, whose
sensor launches real runs in subprocesses; both share Kafka, PostgreSQL and the GCS object.
Meanwhile backfill runs archive overlapping ranges of partition 0 in processes of their own.
Nothing is coordinated but through PostgreSQL and GCS, yet the archive must hold every distinct
logId exactly once, and runs of different partitions must still execute at the same time.

GCS is fake-gcs-server behind the test proxy (tests/support/gcs_proxy.py), which enforces
generation preconditions like real GCS and makes every upload of a batch take a few seconds, as
a production-sized batch would. Without that a run here lasts about as long as the daemon takes
to boot the next run's process, and two runs of one deployment would rarely meet.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psycopg

from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.resources import GCSResource
from tests.conftest import Services
from tests.helpers import (
    Stack,
    archive,
    archived_to_end,
    check_archive,
    create_topic,
    log_value,
    produce,
    run_in_subprocess,
)
from tests.support.dagster_deployment import (
    DagsterDeployment,
    RunSummary,
    run_summaries,
    settled,
)
from tests.support.gcs_proxy import GcsProxy

PER_PARTITION = 2000
MAX_BATCH = 500  # several runs per partition
# (partition, start, end) of the backfill runs, over offsets the sensors archive too.
BACKFILLS = ((0, 0, PER_PARTITION // 2), (0, 0, 3 * PER_PARTITION // 4))
UPLOAD_SECONDS = 4.0  # latency of each batch upload (outside the per-object append lock)
DONE_DEADLINE = 240.0
SETTLE_DEADLINE = 120.0


def seed_ids() -> tuple[list[str], list[str]]:
    """LogIds of both partitions, with repeats within a partition (often across run ranges) and
    across partitions."""
    p0: list[str] = []
    for i in range(PER_PARTITION):
        p0.append(p0[i - 10] if i % 15 == 14 else str(uuid.uuid4()))
    p1: list[str] = []
    for i in range(PER_PARTITION):
        if i % 20 == 19:
            p1.append(p0[(i * 7) % PER_PARTITION])
        elif i % 25 == 24:
            p1.append(p1[i - 400] if i >= 400 else p1[i - 12])
        else:
            p1.append(str(uuid.uuid4()))
    return p0, p1


def wait_until(
    what: str, condition: Callable[[], bool], deadline_s: float, check: Callable[[], None]
) -> None:
    """Poll ``condition`` until it holds; ``check`` raises when waiting is hopeless."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        check()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s:.0f} s waiting until {what}")
        time.sleep(0.5)


def cross_partition_pairs(
    runs: list[RunSummary], topic: str, together: Callable[[RunSummary, RunSummary], bool]
) -> list[tuple[RunSummary, RunSummary]]:
    zero = [r for r in runs if r.partition == f"{topic}-0"]
    one = [r for r in runs if r.partition == f"{topic}-1"]
    return [(a, b) for a in zero for b in one if together(a, b)]


def same_partition_pairs(runs: list[RunSummary]) -> list[tuple[str, str]]:
    """Runs of one partition that were inside their ops at the same time."""
    return [
        (a.run_id, b.run_id)
        for i, a in enumerate(runs)
        for b in runs[i + 1 :]
        if a.partition == b.partition and a.works_together(b)
    ]


def test_two_deployments_and_a_backfill_archive_every_id_once(
    stack: Stack, services: Services, postgres_dsn: str, unique: str, tmp_path: Path
) -> None:
    topic = stack.kafka.topic_list()[0]
    create_topic(stack.kafka, topic, partitions=2)
    ids = seed_ids()
    for p, part in enumerate(ids):
        values = [
            log_value(log_id, message=f"p{p} #{i}", second=i) for i, log_id in enumerate(part)
        ]
        assert produce(stack.kafka, topic, values, partition=p) == PER_PARTITION
    distinct = set(ids[0]) | set(ids[1])

    proxy = GcsProxy(services.gcs_url)
    gcs_url = proxy.start()
    proxy.stall_next(1_000_000, UPLOAD_SECONDS, kind="upload")
    through_proxy = replace(
        stack,
        gcs=GCSResource(
            bucket=stack.gcs.bucket,
            object_template=stack.gcs.object_template,
            emulator_host=gcs_url,
        ),
    )
    env = {
        "PROTOAGG_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
        "PROTOAGG_TOPICS": topic,
        "PROTOAGG_POSTGRES_DSN": postgres_dsn,
        "PROTOAGG_GCS_BUCKET": services.bucket,
        "PROTOAGG_GCS_OBJECT": stack.gcs.object_template,
        "STORAGE_EMULATOR_HOST": gcs_url,
        "PROTOAGG_BATCH_SIZE": "100",
        "PROTOAGG_LINGER_SECONDS": "0",
        "PROTOAGG_MAX_BATCH_MESSAGES": str(MAX_BATCH),
    }
    assert stack.gcs.object_template == f"{unique}/log.pb"
    deployments = [DagsterDeployment(name, tmp_path / name, env) for name in ("A", "B")]
    backfills = []
    timings: dict[str, float] = {}
    started = time.monotonic()
    wall_origin = time.time()

    def daemons_alive() -> None:
        for deployment in deployments:
            if not deployment.running():
                raise AssertionError(f"dagster-daemon of {deployment.name} exited")

    def any_run() -> bool:
        for deployment in deployments:
            with deployment.instance() as instance:
                if instance.get_runs_count() > 0:
                    return True
        return False

    try:
        for deployment in deployments:
            deployment.start()
        wait_until("a deployment creates a run", any_run, 120, daemons_alive)
        timings["first run"] = time.monotonic() - started
        backfills = [run_in_subprocess(through_proxy, topic, *bounds) for bounds in BACKFILLS]
        wait_until(
            "both partitions are archived to their end offsets with nothing pending",
            lambda: archived_to_end(postgres_dsn, topic, 2, PER_PARTITION),
            DONE_DEADLINE,
            daemons_alive,
        )
        timings["archived"] = time.monotonic() - started
        backfill_codes = [proc.wait(timeout=120) for proc in backfills]
        wait_until(
            "every run has finished and every failed run due for a retry has it",
            lambda: all(settled(d) for d in deployments),
            SETTLE_DEADLINE,
            daemons_alive,
        )
        timings["settled"] = time.monotonic() - started
    except BaseException:
        for deployment in deployments:
            print(deployment.log_tail())
        raise
    finally:
        for proc in backfills:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for deployment in deployments:
            deployment.stop()
        proxy.close()
    timings["stopped"] = time.monotonic() - started

    all_runs = {d.name: run_summaries(d) for d in deployments}
    runs = {
        name: [r for r in rs if r.job_name == archive_kafka_batch.name]
        for name, rs in all_runs.items()
    }
    report_runs(runs, all_runs, timings, backfill_codes, wall_origin)
    report_ledger(postgres_dsn, runs)
    print(f"GCS requests through the proxy (method, kind, status): {dict(proxy.stats)}")

    # The archive: every distinct logId exactly once, every offset accounted for.
    records, url = archive(stack)
    archived_ids = Counter(r.log_id for r in records)
    assert {k: n for k, n in archived_ids.items() if n > 1} == {}, f"ids archived twice in {url}"
    assert set(archived_ids) == distinct
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM processed_logs").fetchone() == (len(distinct),)
        assert conn.execute(
            "SELECT count(*) FROM archive_batches WHERE state <> 'appended'"
        ).fetchone() == (0,)
    check = check_archive(stack)
    print(check.summary())
    assert check.ok, check.summary()
    assert check.offsets == 2 * PER_PARTITION
    assert check.archived + check.duplicates == 2 * PER_PARTITION
    assert (check.dead_letters, check.tombstones) == (0, 0)

    # Both deployments really ran, and each ran one run per partition at a time.
    for name, rs in runs.items():
        assert rs, f"deployment {name} launched no run"
        assert same_partition_pairs(rs) == [], f"{name} ran one partition twice at once"
    assert {r.partition for rs in runs.values() for r in rs} == {f"{topic}-0", f"{topic}-1"}
    assert all(code is not None for code in backfill_codes)
    # Whether runs of the two partitions overlapped here depends on how fast the daemon launches
    # them on a loaded machine, so it is reported, not asserted; that a busy partition never
    # holds up another is proven deterministically in test_pipeline.py.
    parallel = {
        name: cross_partition_pairs(rs, topic, RunSummary.overlaps) for name, rs in runs.items()
    }
    print(f"overlapping partition-0/partition-1 runs: { {n: len(p) for n, p in parallel.items()} }")


def report_runs(
    runs: dict[str, list[RunSummary]],
    all_runs: dict[str, list[RunSummary]],
    timings: dict[str, float],
    backfill_codes: list[int],
    origin: float,
) -> None:
    """Print what happened (shown with ``pytest -s`` or on failure)."""
    rounded = {k: round(v, 1) for k, v in timings.items()}
    print(f"\ntimings (s since the daemons started): {json.dumps(rounded)}")
    print(f"backfills {BACKFILLS}: exit codes {backfill_codes}")
    print("runs (seconds since the daemons started):")
    for run in sorted(
        (r for rs in all_runs.values() for r in rs),
        key=lambda r: (r.created_time, r.run_id),
    ):
        print("  " + run.line(origin))
    for name, rs in runs.items():
        statuses = dict(Counter(r.status for r in rs))
        step_retries = sum(len(r.step_retries) for r in rs)
        retried_runs = sum(1 for r in rs if r.parent_run_id)
        print(
            f"{name}: {len(rs)} archive runs {statuses}, {step_retries} step retries, "
            f"{retried_runs} run retries; other jobs: {len(all_runs[name]) - len(rs)}"
        )
    topic_runs = [r for rs in runs.values() for r in rs]
    topic = (topic_runs[0].partition or "").rsplit("-", 1)[0] if topic_runs else ""
    for label, together in (
        ("executing (RUN_START..end)", RunSummary.overlaps),
        ("dequeued (RUN_STARTING..end)", RunSummary.active_together),
    ):
        counts = {
            name: len(cross_partition_pairs(rs, topic, together)) for name, rs in runs.items()
        }
        across = len(cross_partition_pairs(topic_runs, topic, together))
        print(
            f"partition-0/partition-1 run pairs {label} at once: per deployment {counts}, "
            f"any deployment {across}"
        )


def report_ledger(dsn: str, runs: dict[str, list[RunSummary]]) -> None:
    owners = {r.run_id: r.deployment for rs in runs.values() for r in rs}
    with psycopg.connect(dsn) as conn:
        batches = conn.execute(
            "SELECT partition, start_offset, end_offset, state, claimed, run_id "
            "FROM archive_batches ORDER BY partition, start_offset"
        ).fetchall()
    print("ledger batches (partition, offsets, state, ids claimed, claimed by):")
    for partition, start, end, state, claimed, run_id in batches:
        print(f"  p{partition} {start}-{end} {state} {claimed} {owners.get(run_id, 'backfill')}")
