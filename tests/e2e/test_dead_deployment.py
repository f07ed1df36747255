"""A whole Dagster deployment killed while it archives: every partition resumes by itself.

Real ``dagster dev`` / ``dagster-daemon`` processes (tests/support/dagster_deployment.py) run the
code location of tests/support/slow_code.py, which only adds delays in consume and before the
compose so a kill can land inside a step. A kill is SIGKILL of the deployment's whole process
group (daemon, webserver, code server, run workers): Dagster's run storage keeps what the dead
processes left, runs STARTED forever included. The sensor must find those by their leases, fail
them with the reason, and resume; the archive must end exactly once.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
from dagster._core.events import DagsterEventType

from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.run_tags import run_ranges
from protoagg_dagster.archive.sensor import STARTUP_GRACE_SECONDS
from protoagg_dagster.resources import KafkaResource
from tests.conftest import ROOT, Services
from tests.helpers import (
    Stack,
    archive,
    archived_to_end,
    check_archive,
    create_topic,
    log_value,
    produce,
)
from tests.support.dagster_deployment import DagsterDeployment, settled
from tests.support.dagster_web import free_port, wait_until

SLOW_CODE = "tests.support.slow_code"
WORKER_GONE = "worker gone: lock of "
UNFINISHED = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
}


def seed(stack: Stack, topic: str, partitions: int, per_partition: int) -> dict[str, list[str]]:
    """Produce ``per_partition`` log messages to each partition, a few ids repeated; returns the
    distinct ids of each partition in offset order, keyed ``topic/partition``."""
    create_topic(stack.kafka, topic, partitions=partitions)
    kafka = KafkaResource(bootstrap_servers=stack.kafka.bootstrap_servers, topics=topic)
    expected = {}
    for p in range(partitions):
        ids: list[str] = []
        for i in range(per_partition):
            ids.append(ids[i - 7] if i % 50 == 49 else str(uuid.uuid4()))
        values = [log_value(log_id, message=f"{topic}/{p} #{i}") for i, log_id in enumerate(ids)]
        assert produce(kafka, topic, values, partition=p) == per_partition
        expected[f"{topic}/{p}"] = list(dict.fromkeys(ids))
    return expected


def deployment_env(
    stack: Stack, services: Services, dsn: str, topics: str, max_batch: int, delays: str
) -> dict[str, str]:
    return {
        "PROTOAGG_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
        "PROTOAGG_TOPICS": topics,
        "PROTOAGG_POSTGRES_DSN": dsn,
        "PROTOAGG_GCS_BUCKET": services.bucket,
        "PROTOAGG_GCS_OBJECT": stack.gcs.object_template,
        "STORAGE_EMULATOR_HOST": services.gcs_url,
        "PROTOAGG_BATCH_SIZE": "100",
        "PROTOAGG_LINGER_SECONDS": "0",
        "PROTOAGG_MAX_BATCH_MESSAGES": str(max_batch),
        "PROTOAGG_TEST_DELAYS": delays,
    }


def assert_exactly_once(stack: Stack, expected: dict[str, list[str]]) -> None:
    """Each distinct id once, in offset order per partition; every offset accounted for."""
    records, url = archive(stack)
    found: dict[str, list[str]] = defaultdict(list)
    for record in records:
        found[record.message.split(" #")[0]].append(record.log_id)
    for partition, ids in expected.items():
        assert found[partition] == ids, f"{partition} in {url}: not each id once in offset order"
    assert set(found) == set(expected)
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert check.archived == sum(len(ids) for ids in expected.values())


def step_events(instance: dg.DagsterInstance, run_id: str) -> list[tuple[str, str, float]]:
    """(event type, step, time) of a run's step starts (a retry's: STEP_RESTARTED) and ends."""
    return [
        (entry.dagster_event.event_type_value, entry.step_key or "", entry.timestamp)
        for entry in instance.all_logs(
            run_id,
            of_type={
                DagsterEventType.STEP_START,
                DagsterEventType.STEP_RESTARTED,
                DagsterEventType.STEP_SUCCESS,
                DagsterEventType.STEP_FAILURE,
            },
        )
        if entry.dagster_event is not None
    ]


def unfinished_runs(instance: dg.DagsterInstance) -> list[dg.RunRecord]:
    return list(
        instance.get_run_records(
            filters=dg.RunsFilter(job_name=archive_kafka_batch.name, statuses=list(UNFINISHED))
        )
    )


def failure_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [
        entry.message or (entry.dagster_event.message if entry.dagster_event else "") or ""
        for entry in instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE)
    ]


def keys_of(run: dg.DagsterRun) -> set[str]:
    """``topic/partition`` of each range of an archive run (a run holds many partitions)."""
    targets = run_ranges(run)
    assert targets
    return {f"{r.topic}/{r.partition}" for r in targets}


STARTS = ("STEP_START", "STEP_RESTARTED")
# The archive op's log line as each of its steps ends (ops.py); a range's failure is logged as
# "consume: 1 range(s) failed", which does not match.
STEP_DONE = {
    "consume": re.compile(r"consume: \d+ messages"),
    "dedupe": re.compile(r"dedupe: \d+ new"),
}


def steps_done(instance: dg.DagsterInstance, run_id: str, since: float) -> set[str]:
    """Which of the archive op's steps logged their end since ``since``."""
    return {
        step
        for entry in instance.all_logs(run_id)
        if entry.dagster_event is None and entry.timestamp >= since
        for step, done in STEP_DONE.items()
        if done.match(entry.user_message)
    }


class Moment:
    """Conditions on a deployment's run storage that pick the moment of a kill."""

    def __init__(self, deployment: DagsterDeployment, since: Callable[[], float]) -> None:
        self.deployment = deployment
        self.since = since

    def in_step(self, step: str) -> Callable[[], bool]:
        """A run is inside the archive op's ``step`` (consume, or append: after dedupe; the encode
        between them takes hundredths of a second)."""
        assert step in ("consume", "append")

        def holds() -> bool:
            with self.deployment.instance() as instance:
                for record in unfinished_runs(instance):
                    run_id = record.dagster_run.run_id
                    events = step_events(instance, run_id)
                    if not events or events[-1][0] not in STARTS:
                        continue
                    done = steps_done(instance, run_id, events[-1][2])
                    inside = "consume" not in done if step == "consume" else "dedupe" in done
                    # Well inside the op (slow_code's delays are seconds long).
                    if inside and time.time() - events[-1][2] > 0.5:
                        return True
            return False

        return holds

    def between_runs(self, partition: str) -> Callable[[], bool]:
        """The partition's last run finished since the restart and its next one has not begun."""

        def holds() -> bool:
            with self.deployment.instance() as instance:
                records = [
                    r
                    for r in instance.get_run_records(
                        filters=dg.RunsFilter(job_name=archive_kafka_batch.name)
                    )
                    if partition in keys_of(r.dagster_run)
                ]
            done_since = [
                r
                for r in records
                if r.dagster_run.status == dg.DagsterRunStatus.SUCCESS
                and (r.end_time or 0) > self.since()
            ]
            busy = [
                r
                for r in records
                if r.dagster_run.status
                in (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED)
            ]
            return bool(done_since) and not busy

        return holds


def next_start(deployment: DagsterDeployment, partition: str, after: float) -> float | None:
    """When the first run of ``partition`` that started after ``after`` began executing."""
    with deployment.instance() as instance:
        starts = [
            r.start_time
            for r in instance.get_run_records(
                filters=dg.RunsFilter(job_name=archive_kafka_batch.name)
            )
            if r.start_time is not None
            and r.start_time > after
            and partition in keys_of(r.dagster_run)
        ]
    return min(starts, default=None)


def graphql(port: int, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body


RUN_EVENTS = """
query Events($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection { events { __typename ... on MessageEvent { message } } }
  }
}
"""


def backfill(
    services: Services, dsn: str, port: int, topic: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = {
        "PROTOAGG_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
        "PROTOAGG_POSTGRES_DSN": dsn,
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "protoagg"),
            "backfill",
            "--topic",
            topic,
            "--dagster",
            f"127.0.0.1:{port}",
            "--max-batch-messages",
            "400",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_whole_deployment_killed_three_times_resumes_every_partition_exactly_once(
    stack: Stack, services: Services, postgres_dsn: str, unique: str, tmp_path: Path
) -> None:
    topic, backfilled = f"logs-{unique}", f"old-{unique}"
    # Four runs a partition: the three kills land in its first two, the rest resume after them.
    per_partition, max_batch = 4000, 1000
    expected = seed(stack, topic, 2, per_partition)
    expected |= seed(stack, backfilled, 1, 1600)
    port = free_port()
    env = deployment_env(stack, services, postgres_dsn, topic, max_batch, "consume=2,compose=2")
    deployment = DagsterDeployment("dev", tmp_path / "dev", env, module=SLOW_CODE, dev_port=port)
    restarted_at = [time.time()]
    moment = Moment(deployment, lambda: restarted_at[-1])
    kills = [
        ("in consume", moment.in_step("consume")),
        ("in append", moment.in_step("append")),
        ("between runs", moment.between_runs(f"{topic}/0")),
    ]
    resumes: list[str] = []
    stuck_runs: set[str] = set()

    def alive() -> None:
        if not deployment.running():
            raise AssertionError("dagster dev exited")

    try:
        deployment.start()
        wait_until("the webserver answers", lambda: _answers(port), 120, alive)
        queued = backfill(services, postgres_dsn, port, backfilled, "--no-wait")
        assert queued.returncode == 0, queued.stdout + queued.stderr
        for label, condition in kills:
            # A kill that lands between a run's RUN_START and its lease (it happened) leaves a
            # STARTED run that took no lease: the sensor gives it STARTUP_GRACE_SECONDS before
            # failing it, and its partitions have no quiet moment until then.
            wait_until(
                f"a moment {label}", condition, STARTUP_GRACE_SECONDS + 120, alive, poll_s=0.2
            )
            with deployment.instance() as instance:
                busy = {
                    key: r.dagster_run.run_id
                    for r in unfinished_runs(instance)
                    if r.dagster_run.status != dg.DagsterRunStatus.QUEUED
                    for key in keys_of(r.dagster_run)
                }
            killed = deployment.kill()
            stuck_runs |= set(busy.values())
            restarted_at.append(time.time())
            deployment.start()
            watched = sorted(busy) or [f"{topic}/0"]
            for partition in watched:
                wait_until(
                    f"a run of {partition} starts after the restart",
                    lambda p=partition: next_start(deployment, p, restarted_at[-1]) is not None,
                    240,
                    alive,
                )
                resumed = next_start(deployment, partition, restarted_at[-1])
                assert resumed is not None
                resumes.append(
                    f"kill {label} ({len(killed)} processes; busy: {sorted(busy)}): "
                    f"{partition} ran again {resumed - restarted_at[-1]:.1f} s after the restart"
                )
        wait_until(
            "every partition is archived to its end with nothing pending",
            lambda: archived_to_end(postgres_dsn, topic, 2, per_partition),
            600,
            alive,
        )
        wait_until("every run finished", lambda: settled(deployment), 180, alive)
        # The same command again finishes whatever the kills left of the backfill.
        again = backfill(services, postgres_dsn, port, backfilled)
        assert again.returncode == 0, again.stdout + again.stderr
        assert archived_to_end(postgres_dsn, backfilled, 1, 1600)
        with deployment.instance() as instance:
            reasons = {run_id: failure_messages(instance, run_id) for run_id in stuck_runs}
        dead = [run_id for run_id, messages in reasons.items() if messages]
        assert dead, f"no run failed after the kills: {reasons}"
        for run_id in dead:
            assert any(WORKER_GONE in m or "to start" in m for m in reasons[run_id]), reasons
        # What the UI shows for a run failed by the sensor.
        by_sensor = [r for r in dead if any(WORKER_GONE in m for m in reasons[r])]
        assert by_sensor, reasons
        shown = graphql(port, RUN_EVENTS, {"runId": by_sensor[0]})["data"]["logsForRun"]
        messages = [e.get("message", "") for e in shown["events"]]
        assert any(m.startswith(WORKER_GONE) for m in messages), messages
    except BaseException:
        print(deployment.log_tail(120))
        raise
    finally:
        print("\n".join(["resume times:", *resumes]))
        if deployment.running():
            deployment.stop()
    print(f"backfill, second pass: {again.stdout.strip().splitlines()[-1:]}")
    assert_exactly_once(
        replace(
            stack,
            kafka=KafkaResource(
                bootstrap_servers=services.kafka_bootstrap, topics=f"{topic},{backfilled}"
            ),
        ),
        expected,
    )
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM archive_batches WHERE state <> 'appended'"
        ).fetchone() == (0,)


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
            return True
    except OSError:
        return False


def test_a_slow_run_is_never_declared_dead(
    stack: Stack, services: Services, postgres_dsn: str, unique: str, tmp_path: Path
) -> None:
    topic = f"logs-{unique}"
    expected = seed(stack, topic, 1, 300)
    # Consume takes 50 s: more than twice the sensor's dead-run grace and many sensor ticks.
    env = deployment_env(stack, services, postgres_dsn, topic, 1000, "consume=50")
    deployment = DagsterDeployment("slow", tmp_path / "slow", env, module=SLOW_CODE)
    try:
        deployment.start()
        wait_until(
            "the partition is archived",
            lambda: archived_to_end(postgres_dsn, topic, 1, 300),
            300,
            lambda: None,
        )
        wait_until("every run finished", lambda: settled(deployment), 60)
    except BaseException:
        print(deployment.log_tail(120))
        raise
    finally:
        deployment.stop()
    with deployment.instance() as instance:
        runs = instance.get_run_records(filters=dg.RunsFilter(job_name=archive_kafka_batch.name))
        statuses = [r.dagster_run.status for r in runs]
        took = [(r.end_time or 0) - (r.start_time or 0) for r in runs]
    print(f"runs: {statuses}, seconds: {[round(t) for t in took]}")
    assert statuses == [dg.DagsterRunStatus.SUCCESS]
    assert took[0] > 50
    assert_exactly_once(stack, expected)


LEFT_OUT = "left out, their leases held by other live runs: "


def left_out(instance: dg.DagsterInstance, run_id: str) -> set[str]:
    """``topic/partition`` of the ranges a run left alone: another live run held their leases
    (the lease resource's log line), so the run never worked them."""
    found: set[str] = set()
    for entry in instance.all_logs(run_id):
        message = entry.user_message or ""
        if message.startswith("holding the leases") and LEFT_OUT in message:
            for key in message.split(LEFT_OUT, 1)[1].split(", "):
                topic, partition = key.rsplit("-", 1)
                found.add(f"{topic}/{partition}")
    return found


def working_spans(
    deployment: DagsterDeployment, killed_at: Iterable[float]
) -> dict[str, list[tuple[float, float, str]]]:
    """Per partition, when each run executed steps: first step start to last step end (a run
    killed mid-step ends at the kill). A run's ranges whose leases it did not get are not its."""
    kills = sorted(killed_at)
    spans: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    with deployment.instance() as instance:
        for record in instance.get_run_records(
            filters=dg.RunsFilter(job_name=archive_kafka_batch.name)
        ):
            events = step_events(instance, record.dagster_run.run_id)
            if not events:
                continue
            start = events[0][2]
            end = events[-1][2]
            if events[-1][0] in STARTS:
                end = next((k for k in kills if k > start), time.time())
            for key in keys_of(record.dagster_run) - left_out(instance, record.dagster_run.run_id):
                spans[key].append(
                    (start, end, f"{deployment.name}:{record.dagster_run.run_id[:8]}")
                )
    return spans


def test_two_deployments_one_killed_the_other_keeps_archiving(
    stack: Stack, services: Services, postgres_dsn: str, unique: str, tmp_path: Path
) -> None:
    # Two runs a partition: B still has runs to finish once A is killed in its first.
    topic, partitions, per_partition = f"logs-{unique}", 4, 900
    # A topic only A archives: A's runs always have a range to read, so the moment A works
    # in a step comes (B's runs may take every shared range's lease first, as they did once
    # under load, leaving A's runs nothing to read).
    own = f"own-{unique}"
    expected = seed(stack, topic, partitions, per_partition)
    expected |= seed(stack, own, 1, per_partition)
    env = deployment_env(stack, services, postgres_dsn, topic, 450, "consume=1,compose=1")
    env_a = {**env, "PROTOAGG_TOPICS": f"{topic},{own}", "PROTOAGG_TEST_DELAYS": "consume=3"}
    a = DagsterDeployment("A", tmp_path / "A", env_a, module=SLOW_CODE)
    b = DagsterDeployment("B", tmp_path / "B", env, module=SLOW_CODE)
    killed_at: list[float] = []

    def b_alive() -> None:
        if not b.running():
            raise AssertionError("B's daemon exited")

    def b_finished_runs() -> int:
        with b.instance() as instance:
            return instance.get_runs_count(
                filters=dg.RunsFilter(
                    job_name=archive_kafka_batch.name, statuses=[dg.DagsterRunStatus.SUCCESS]
                )
            )

    try:
        a.start()
        b.start()
        wait_until("A works in a step", Moment(a, time.time).in_step("consume"), 180, b_alive)
        before = b_finished_runs()
        killed_at.append(time.time())  # before: B may take over the instant A's runs die
        a.kill()
        wait_until(
            "B finishes two more runs while A is dead",
            lambda: b_finished_runs() >= before + 2,
            180,
            b_alive,
        )
        a.start()
        wait_until(
            "every partition is archived with nothing pending",
            lambda: (
                archived_to_end(postgres_dsn, topic, partitions, per_partition)
                and archived_to_end(postgres_dsn, own, 1, per_partition)
            ),
            600,
            b_alive,
        )
        wait_until("every run of A and B finished", lambda: settled(a) and settled(b), 180)
    except BaseException:
        print(a.log_tail(80))
        print(b.log_tail(80))
        raise
    finally:
        for deployment in (a, b):
            if deployment.running():
                deployment.stop()
    spans: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for deployment in (a, b):
        for partition, found in working_spans(deployment, killed_at).items():
            spans[partition] += found
    overlapping = []
    for partition, found in spans.items():
        found.sort()
        latest = found[0]
        for span in found[1:]:
            if span[0] < latest[1]:
                overlapping.append((partition, latest[2], span[2]))
            latest = max(latest, span, key=lambda s: s[1])
    owners = Counter(label.split(":")[0] for found in spans.values() for *_, label in found)
    print(f"runs that executed steps, by deployment: {dict(owners)}")
    assert overlapping == [], f"two live runs worked one partition at once: {dict(spans)}"
    assert owners["B"] > 0 and owners["A"] > 0
    both = KafkaResource(bootstrap_servers=services.kafka_bootstrap, topics=f"{topic},{own}")
    assert_exactly_once(replace(stack, kafka=both), expected)
