"""The sensor that watches Kafka partitions and launches runs of bounded offset ranges.

A run archives the ranges of many partitions (``core.planning.plan_runs`` groups them).

Each tick lists the topics anew (a pattern entry picks up topics created since) and records the
lag of every partition (messages and seconds behind the last stable offset, and the messages open
transactions hold back) as an observation of the archive asset and of each topic entry's asset.
It also fails STARTED runs whose worker is gone (their lease stays free; see
``protoagg_dagster.archive.leases``), so that a deployment killed with its runs resumes every
partition by itself.
"""

import datetime
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg
import psycopg
from dagster._core.events import JobFailureData, RunFailureReason
from kafka import KafkaConsumer, TopicPartition

from protoagg_dagster.archive import leases
from protoagg_dagster.archive.assets import ARCHIVE_ASSET, topic_asset_key
from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.ledger import (
    AppendedBatch,
    PartitionProgress,
    begin_partition,
    latest_appended,
    ledger_connection,
    read_progress,
)
from protoagg_dagster.archive.run_tags import (
    RANGE_TAG,
    partition_key,
    ranges_run_config,
    ranges_tags,
    run_ranges,
)
from protoagg_dagster.archive.tick_backoff import one_line_failures
from protoagg_dagster.core import settings
from protoagg_dagster.core.errors import ConfigError, MissingCredentials
from protoagg_dagster.core.formats import TopicRule, rule_for
from protoagg_dagster.core.liveness import StartedRun, judge
from protoagg_dagster.core.planning import (
    OffsetRange,
    PartitionView,
    RunBatch,
    plan_runs,
)
from protoagg_dagster.core.storage_bill import bill_findings, expected_appends_per_day
from protoagg_dagster.kafka.reader import offsets_at_time, timestamps_at
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.resources.settings import ArchiverSettings

# A STARTED run whose lease stays free this long is dead. Long against the moments a live run
# goes without it (between RUN_START and taking it, between letting go and RUN_SUCCESS: well
# under a second), short against "resume within a minute" after a restart.
DEAD_AFTER_SECONDS = 20.0
# The same for a run that has not yet taken its lease: it is still starting up, which a starved
# CPU stretched past 20 s (a live run was failed and retried). It has claimed nothing, so only its
# own range waits if it did die; Dagster's max_runtime_seconds still ends one that hangs.
STARTUP_GRACE_SECONDS = 300.0


@dataclass
class SensorCursor:
    """The backlog clock, liveness clocks per run, and what was checked when.

    ``bill_checked``: the bucket's settings were read for what appends cost (first tick);
    ``observed_at``: when the lag was last observed. Dagster stores the cursor at every tick,
    so it holds nothing per partition: its size grows with the runs in flight, not with
    partitions. Only a convenience: the ledger's archived positions are the
    truth (a partition's first offset, when ``start_from`` is not ``earliest``, is written
    there at once), so a lost cursor costs at most one extra linger period.
    """

    # Since when a backlog lingers (None: nothing waits).
    backlog_since: float | None
    # Per STARTED run whose lease was last seen free: since when (a lost cursor restarts the
    # clock, which only delays declaring a dead run dead).
    lease_free_since: dict[str, float]
    bill_checked: bool = False
    observed_at: float = 0.0

    @classmethod
    def loads(cls, text: str | None) -> "SensorCursor":
        if not text:
            return cls(None, {})
        raw = json.loads(text)
        since = raw.get("backlog_since")
        if isinstance(since, dict):  # a cursor of before, with a clock per topic: the oldest
            since = min(since.values(), default=None)
        return cls(
            None if since is None else float(since),
            dict(raw.get("lease_free_since", {})),
            bool(raw.get("bill_checked", False)),
            float(raw.get("observed_at", 0.0)),
        )

    def dumps(self) -> str:
        return json.dumps(
            {
                "backlog_since": self.backlog_since,
                "lease_free_since": self.lease_free_since,
                "bill_checked": self.bill_checked,
                "observed_at": self.observed_at,
            },
            sort_keys=True,
        )


@dg.sensor(
    job=archive_kafka_batch,
    minimum_interval_seconds=max(1, settings.SENSOR_INTERVAL_SECONDS.read_int()),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Reads each partition's end offset and archived position, and launches a run "
    "for the next bounded range when batch_size messages wait or linger_seconds have passed.",
)
@one_line_failures
def kafka_offsets_sensor(
    context: dg.SensorEvaluationContext,
    kafka: KafkaResource,
    postgres: PostgresResource,
    gcs: GCSResource,
    archiver: ArchiverSettings,
) -> dg.SensorResult:
    cursor = SensorCursor.loads(context.cursor)
    limits = archiver.limits()
    rules = archiver.topic_formats(kafka.topics).rules
    now = time.time()
    unfinished = context.instance.get_run_records(
        filters=dg.RunsFilter(job_name=archive_kafka_batch.name, statuses=NOT_FINISHED)
    )
    # A run failed below stays in flight for this tick: run retries relaunch it, or the next
    # tick does.
    in_flight = _runs_in_flight(unfinished)
    # One consumer answers the whole tick: each new one spends ~0.1 s on metadata first, and
    # the runs this tick requests are created only when it returns.
    consumer = kafka.get_consumer()
    try:
        bounds = {
            topic: kafka.offset_bounds(topic, consumer) for topic in kafka.topic_list(consumer)
        }
        with ledger_connection(postgres) as conn:
            progress = {topic: read_progress(conn, topic) for topic in bounds}
            keys = {partition_key(t, p) for t, partitions in bounds.items() for p in partitions}
            taken = leases.held(conn, {leases.partition_lease(key) for key in keys})
            suspect = _fail_dead_runs(context, conn, unfinished, cursor, now)
            stalled = {
                partition_key(r.topic, r.partition)
                for record in unfinished
                if record.dagster_run.run_id in suspect
                for r in run_ranges(record.dagster_run)
            }
            # Once per cursor: it reads every partition's last batch.
            biggest = (
                None
                if cursor.bill_checked
                else max(latest_appended(conn), key=lambda b: b.object_size or 0, default=None)
            )
        # A partition whose lease is taken has a live run, maybe another deployment's (whose
        # range this sensor cannot know, so it launches nothing after it).
        for key in keys:
            if leases.partition_lease(key) in taken and key not in in_flight:
                in_flight[key] = InFlight(1, None)
        bill: dict[str, dg.MetadataValue] = {}
        if not cursor.bill_checked:
            try:
                bill = _storage_bill(context, gcs, archiver, biggest, bounds)
            except MissingCredentials as exc:
                # Every run would fail the same way: say it once per tick, launch nothing.
                return dg.SensorResult(skip_reason=str(exc), cursor=cursor.dumps())
            cursor.bill_checked = True
        behind: dict[TopicPartition, tuple[int, int]] = {}  # next offset, messages behind
        held: dict[TopicPartition, int] = {}  # messages of open transactions, past the stable end
        marks = kafka.topics_high_watermarks({t: sorted(b) for t, b in bounds.items()})
        views: list[PartitionView] = []
        first_offsets: list[tuple[str, int, int]] = []
        for topic, known in progress.items():
            for partition, end in marks[topic].items():
                held[TopicPartition(topic, partition)] = max(end - bounds[topic][partition][1], 0)
            starts = _next_offsets(
                consumer, topic, bounds[topic], known, archiver.start_choice(), first_offsets
            )
            for partition, (_, log_end) in bounds[topic].items():
                key = partition_key(topic, partition)
                state = known.get(partition)
                view = PartitionView(
                    topic=topic,
                    partition=partition,
                    next_offset=starts[partition],
                    end_offset=log_end,
                    pending=state.pending if state is not None else None,
                    in_flight=in_flight.get(key, NONE_IN_FLIGHT).runs,
                    in_flight_end=in_flight.get(key, NONE_IN_FLIGHT).end,
                    stalled=key in stalled,
                )
                views.append(view)
                behind[TopicPartition(topic, partition)] = (
                    view.next_offset,
                    max(log_end - view.next_offset, 0),
                )
        if first_offsets:
            # A partition's first offset (start_from latest or a time) is resolved once and kept
            # in the ledger, where the first run's claim would have put it.
            with ledger_connection(postgres) as conn, conn.transaction():
                for topic, partition, offset in first_offsets:
                    begin_partition(conn, topic, partition, offset)
        plan = plan_runs(views, cursor.backlog_since, limits, now)
        cursor.backlog_since = plan.backlog_since
        requests = []
        for run in plan.runs:
            context.log.info(f"launching {run}: {run.reason}")
            requests.append(_run_request(context.instance, run))
        observations: list[dg.AssetObservation] = []
        if bill or now - cursor.observed_at >= archiver.lag_observation_seconds:
            shown = _most_behind(behind, held)
            oldest = timestamps_at(
                consumer, {tp: behind[tp][0] for tp in shown if behind[tp][1] > 0}
            )
            observations = _lag_observations(rules, behind, shown, oldest, held, now, bill)
            cursor.observed_at = now
    finally:
        consumer.close()
    return dg.SensorResult(run_requests=requests, cursor=cursor.dumps(), asset_events=observations)


def _storage_bill(
    context: dg.SensorEvaluationContext,
    gcs: GCSResource,
    archiver: ArchiverSettings,
    biggest: AppendedBatch | None,
    bounds: dict[str, dict[int, tuple[int, int]]],
) -> dict[str, dg.MetadataValue]:
    """Warn (log and metadata) about bucket settings that make each append cost a copy."""
    try:
        bucket = gcs.bucket_settings()
        name = biggest.object_name if biggest is not None else gcs.object_template
        archive = gcs.object_settings(name) if "{" not in name else None
    except MissingCredentials:
        raise
    except ConfigError as exc:
        context.log.warning(f"bucket settings not checked: {exc}")
        return {}
    partitions = sum(len(partitions) for partitions in bounds.values())
    findings = bill_findings(
        bucket, archive, expected_appends_per_day(partitions, archiver.linger_seconds)
    )
    for finding in findings:
        context.log.warning(f"GCS {finding.level}: {finding.line()}")
    if not findings:
        return {"storage_bill": dg.TextMetadataValue("bucket settings add no cost per append")}
    return {
        "storage_bill": dg.MarkdownMetadataValue(
            "\n".join(f"- **{f.level} {f.setting}**: {f.detail}. Fix: {f.fix}" for f in findings)
        )
    }


def _next_offsets(
    consumer: KafkaConsumer,
    topic: str,
    bounds: dict[int, tuple[int, int]],
    known: dict[int, PartitionProgress],
    start_from: str | int,
    first_offsets: list[tuple[str, int, int]],
) -> dict[int, int]:
    """The first offset to archive per partition: the ledger's position, else ``start_from``.

    The partitions resolved by ``latest`` or a time are added to ``first_offsets``, to be kept.
    """
    result: dict[int, int] = {}
    unresolved = []
    for partition, (log_start, log_end) in bounds.items():
        state = known.get(partition)
        if state is not None and state.next_offset is not None:
            result[partition] = state.next_offset
        elif start_from == "earliest":
            result[partition] = log_start
        elif start_from == "latest":
            result[partition] = log_end
            first_offsets.append((topic, partition, log_end))
        else:
            unresolved.append(partition)
    if unresolved:
        assert isinstance(start_from, int)
        found = offsets_at_time(
            consumer, [TopicPartition(topic, p) for p in unresolved], start_from
        )
        for tp, offset in found.items():
            result[tp.partition] = offset if offset is not None else bounds[tp.partition][1]
            first_offsets.append((topic, tp.partition, result[tp.partition]))
    return result


def _run_request(instance: dg.DagsterInstance, run: RunBatch) -> dg.RunRequest:
    # Ranges relaunched after a failed run need a fresh run key: Dagster skips a known one.
    attempts = instance.get_runs_count(filters=dg.RunsFilter(tags={RANGE_TAG: run.run_key}))
    return dg.RunRequest(
        run_key=run.run_key if attempts == 0 else f"{run.run_key}-retry{attempts}",
        run_config=ranges_run_config(run.ranges),
        tags=ranges_tags(run.ranges, run.run_key, run.follows),
    )


@dataclass(frozen=True)
class InFlight:
    """A partition's unfinished runs: how many, and the end of the last range (None: unknown)."""

    runs: int
    end: int | None


NONE_IN_FLIGHT = InFlight(0, None)


def _runs_in_flight(unfinished: Sequence[dg.RunRecord]) -> dict[str, InFlight]:
    """Per partition: its unfinished runs and where the last of their ranges ends."""
    found: dict[str, InFlight] = {}
    for record in unfinished:
        for target in run_ranges(record.dagster_run):
            key = partition_key(target.topic, target.partition)
            before = found.get(key, NONE_IN_FLIGHT)
            end = None if before.runs and before.end is None else max(target.end, before.end or 0)
            found[key] = InFlight(before.runs + 1, end)
    return found


# Partitions named in a lag observation, the most behind first: an observation is stored
# whole, so its size must not grow with the partitions.
OBSERVED_PARTITIONS = 20


def _most_behind(
    behind: dict[TopicPartition, tuple[int, int]], held: dict[TopicPartition, int]
) -> set[TopicPartition]:
    """The OBSERVED_PARTITIONS partitions most behind (messages, then open transactions)."""
    ranked = sorted(behind, key=lambda tp: (-behind[tp][1], -held.get(tp, 0), tp))
    return set(ranked[:OBSERVED_PARTITIONS])


def _lag_observations(
    rules: tuple[TopicRule, ...],
    behind: dict[TopicPartition, tuple[int, int]],
    shown: set[TopicPartition],
    oldest: dict[TopicPartition, int],
    held: dict[TopicPartition, int],
    now: float,
    bill: dict[str, dg.MetadataValue],
) -> list[dg.AssetObservation]:
    """One observation for the whole archive (with the bill, if any), one per topic entry.

    The totals cover every partition; the partitions named one by one, and the oldest waiting
    message, only the OBSERVED_PARTITIONS most behind.
    """
    mine: dict[dg.AssetKey, list[TopicPartition]] = {ARCHIVE_ASSET: sorted(behind)}
    for tp in sorted(behind):
        rule = rule_for(rules, tp.topic)
        if rule is not None:
            mine.setdefault(topic_asset_key(rule), []).append(tp)
    return [
        _lag_observation(
            key,
            {tp: behind[tp] for tp in tps},
            shown,
            oldest,
            held,
            now,
            bill if key == ARCHIVE_ASSET else {},
        )
        for key, tps in mine.items()
    ]


def _lag_observation(
    asset_key: dg.AssetKey,
    behind: dict[TopicPartition, tuple[int, int]],
    shown: set[TopicPartition],
    oldest: dict[TopicPartition, int],
    held: dict[TopicPartition, int],
    now: float,
    extra: dict[str, dg.MetadataValue],
) -> dg.AssetObservation:
    seconds = {tp: max(now - ts / 1000, 0.0) for tp, ts in oldest.items() if tp in behind}
    metadata: dict[str, dg.MetadataValue] = {
        "lag_messages": dg.IntMetadataValue(sum(lag for _, lag in behind.values())),
        "lag_seconds_max": dg.FloatMetadataValue(round(max(seconds.values(), default=0.0), 1)),
        # Not yet archivable: an open transaction holds its partition at the last stable offset.
        "open_transaction_messages": dg.IntMetadataValue(sum(held.get(tp, 0) for tp in behind)),
    }
    # One entry for the partitions most behind, not three numbers each: Dagster keeps every
    # entry of every observation (each one its own JSON object, about 150 bytes).
    most_behind = {
        f"{tp.topic}/{tp.partition}": [lag, round(seconds.get(tp, 0.0), 1), held.get(tp, 0)]
        for tp, (_, lag) in sorted(behind.items())
        if tp in shown
    }
    if most_behind:
        metadata["most_behind"] = dg.JsonMetadataValue(most_behind)
    metadata.update(extra)
    return dg.AssetObservation(asset_key=asset_key, metadata=metadata)


# Queued and not-yet-started runs count: launching the same range again while one waits in the
# run queue would only queue a twin.
NOT_FINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def _fail_dead_runs(
    context: dg.SensorEvaluationContext,
    conn: psycopg.Connection,
    unfinished: Sequence[dg.RunRecord],
    cursor: SensorCursor,
    now: float,
) -> set[str]:
    """Fail each STARTED run whose lease has stayed free: its worker died without a word.

    Returns the runs no follow-up should be launched behind: those failed now, and those whose
    lease has been free for DEAD_AFTER_SECONDS but that are not failed yet because they never
    took it (dead while booting, or starved; failed only after STARTUP_GRACE_SECONDS). A
    follow-up behind one would find the range before it unarchived and leave its own out, and
    one would be launched at every tick.
    """
    started: dict[str, list[OffsetRange]] = {}
    start_times: dict[str, float] = {}
    for record in unfinished:
        run = record.dagster_run
        targets = run_ranges(run)
        if run.status == dg.DagsterRunStatus.STARTED and record.start_time and targets:
            started[run.run_id] = targets
            start_times[run.run_id] = record.start_time
    alive = leases.held(conn, [leases.run_lease(run_id) for run_id in started])
    free = [run_id for run_id in started if leases.run_lease(run_id) not in alive]
    took = leases.ever_taken(conn, free)
    watched = [
        StartedRun(run_id, leases.run_lease(run_id), start_times[run_id], run_id in took)
        for run_id in started
    ]
    verdict = judge(
        watched, alive, cursor.lease_free_since, now, DEAD_AFTER_SECONDS, STARTUP_GRACE_SECONDS
    )
    cursor.lease_free_since = verdict.free_since
    # Not at once when a lease is free: a run that just ended its work lets go of it a moment
    # before Dagster marks it finished, and its partitions' follow-ups must not wait a tick.
    suspect = {
        run_id for run_id, since in verdict.free_since.items() if now - since >= DEAD_AFTER_SECONDS
    } | set(verdict.dead)
    for run_id, since in verdict.dead.items():
        held = ", ".join(f"{r.topic}/{r.partition}" for r in started[run_id][:5])
        more = len(started[run_id]) - 5
        current = context.instance.get_run_by_id(run_id)
        # Finished between the query and now: its lease was free because it was done.
        if current is None or current.status != dg.DagsterRunStatus.STARTED:
            continue
        free_at = datetime.datetime.fromtimestamp(since, datetime.UTC).strftime("%H:%M:%S UTC")
        message = (
            f"worker gone: lock of its run ({held}{f' and {more} more' if more > 0 else ''}) "
            f"free since {free_at} "
            f"({now - since:.0f} s, lease {leases.run_lease(run_id)!r}); the run's process died "
            "(its deployment was killed or its host lost). Marked failed so the partition "
            "resumes; the next run of this range finishes whatever the dead one claimed."
        )
        context.log.warning(f"run {run_id}: {message}")
        context.instance.report_run_failed(
            current,
            message,
            JobFailureData(error=None, failure_reason=RunFailureReason.UNEXPECTED_TERMINATION),
        )
        cursor.lease_free_since.pop(run_id, None)
    return suspect
