"""Keeping Dagster's own storage bounded: delete finished runs and their events once old.

Dagster OSS never deletes runs or their event logs, and an archive that runs for months launches
runs all day. The ``prune_dagster_runs`` job, on the hourly ``dagster_run_retention`` schedule
(on by default), deletes finished runs of protoagg's archive and upkeep jobs older than
``PROTOAGG_KEEP_RUNS_DAYS`` (failed runs after ``PROTOAGG_KEEP_FAILED_RUNS_DAYS``), with their
events, through Dagster's own ``delete_run``, in chunks, at most ``max_runs`` per pass. It never
touches protoagg's ledger: which offsets are archived, and where, stays in PostgreSQL.

The sensor's lag observations belong to no run, so deleting runs leaves them: about two a
minute, forever. The same job deletes those of protoagg's assets older than the runs' limit,
keeping each asset's newest. Dagster has no call for that (``delete_run`` takes a run), so it
deletes them from the event log's own tables, as ``delete_run`` does for a run's events.
"""

import datetime

import dagster as dg
import sqlalchemy as db
from dagster._core.events import DagsterEventType
from dagster._core.instance.utils import RUNLESS_RUN_ID
from dagster._core.storage.event_log.schema import AssetEventTagsTable, SqlEventLogStorageTable
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from pydantic import Field

from protoagg_dagster.archive.assets import ARCHIVE_ASSET

# A chunk of runs is listed, then deleted one by one (each delete removes the run's events too).
CHUNK_RUNS = 100
# Observations are deleted this many at a time (one statement each).
CHUNK_OBSERVATIONS = 1_000
# The archive asset and each topic entry's (kafka_archive_<topic>): Dagster stores an asset key
# as its JSON list of parts.
OBSERVED_KEYS_LIKE = ARCHIVE_ASSET.to_string()[:-2] + "%"
# Runs of these jobs are deleted; restore runs are rare and kept.
PRUNED_JOBS = ("archive_kafka_batch", "maintain_archive", "prune_dagster_runs")
_DELETED_STATUSES = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.CANCELED)


class RunRetentionConfig(dg.Config):
    keep_days: float = Field(
        default=14.0,
        description="Finished (succeeded or canceled) runs older than this many days are deleted "
        "with their events.",
    )
    keep_failed_days: float = Field(
        default=60.0, description="Failed runs are kept this many days, for a person to look at."
    )
    max_runs: int = Field(
        default=20_000,
        description="Most runs one pass deletes (the hourly schedule catches up on a backlog).",
    )


@dg.op
def prune_runs(context: dg.OpExecutionContext, config: RunRetentionConfig) -> int:
    """Delete old finished runs of the archive and upkeep jobs; return how many."""
    now = datetime.datetime.now(datetime.UTC)
    deleted = 0
    for statuses, days in (
        (list(_DELETED_STATUSES), config.keep_days),
        ([dg.DagsterRunStatus.FAILURE], config.keep_failed_days),
    ):
        before = now - datetime.timedelta(days=days)
        for job in PRUNED_JOBS:
            deleted += _prune(context, job, statuses, before, config.max_runs - deleted)
    observations = prune_observations(
        context.instance, now - datetime.timedelta(days=config.keep_days), config.max_runs
    )
    context.log.info(
        f"deleted {deleted} runs and their events (finished over {config.keep_days:g} days ago, "
        f"failed over {config.keep_failed_days:g} days ago) and {observations} of the sensor's "
        "lag observations"
        + ("; more remain for the next pass" if deleted >= config.max_runs else "")
    )
    return deleted


def prune_observations(instance: dg.DagsterInstance, before: datetime.datetime, most: int) -> int:
    """Delete old runless observations of protoagg's assets; return how many.

    At most ``most``, those stored before ``before``, never an asset's newest.
    """
    storage = instance.event_log_storage
    if not isinstance(storage, SqlEventLogStorage):
        return 0  # not a SQL event log (none of Dagster's OSS storages): nothing to reach
    table = SqlEventLogStorageTable
    ours: db.ColumnElement[bool] = db.and_(
        table.c.run_id == RUNLESS_RUN_ID,
        table.c.dagster_event_type == DagsterEventType.ASSET_OBSERVATION.value,
        table.c.asset_key.like(OBSERVED_KEYS_LIKE),
    )
    # The event log stores UTC without a time zone.
    cutoff = before.astimezone(datetime.UTC).replace(tzinfo=None)
    # The index holds every asset event on every SQL storage, so it decides (and counts). SQLite
    # keeps a second copy of runless events in a shard of their own: those go up to the same
    # moment. On PostgreSQL both connections reach one table, and the second pass finds it done.
    with storage.index_connection() as conn:
        deleted, reached = _delete_old(conn, ours, cutoff, most)
    if reached is not None:
        with storage.run_connection(RUNLESS_RUN_ID) as conn:
            _delete_old(conn, ours, reached + datetime.timedelta(microseconds=1), most)
    return deleted


def _delete_old(
    conn: db.engine.Connection,
    ours: db.ColumnElement[bool],
    cutoff: datetime.datetime,
    most: int,
) -> tuple[int, datetime.datetime | None]:
    """Delete old observations of ``ours``; how many, and the latest time deleted.

    Up to ``most``, stored before ``cutoff``, oldest first, never an asset's newest.
    """
    table = SqlEventLogStorageTable
    newest = db.select(db.func.max(table.c.id)).where(ours).group_by(table.c.asset_key)
    kept = {row[0] for row in conn.execute(newest)}
    deleted, reached = 0, None
    while deleted < most:
        chosen = db.select(table.c.id, table.c.timestamp).where(ours, table.c.timestamp < cutoff)
        if kept:
            chosen = chosen.where(table.c.id.not_in(kept))
        limit = min(CHUNK_OBSERVATIONS, most - deleted)
        rows = conn.execute(chosen.order_by(table.c.id).limit(limit)).fetchall()
        if not rows:
            break
        ids = [row[0] for row in rows]
        conn.execute(table.delete().where(table.c.id.in_(ids)))
        conn.execute(AssetEventTagsTable.delete().where(AssetEventTagsTable.c.event_id.in_(ids)))
        deleted += len(ids)
        latest = max(row[1] for row in rows)
        reached = latest if reached is None else max(reached, latest)
    return deleted, reached


def _prune(
    context: dg.OpExecutionContext,
    job: str,
    statuses: list[dg.DagsterRunStatus],
    before: datetime.datetime,
    budget: int,
) -> int:
    deleted = 0
    while deleted < budget:
        records = context.instance.get_run_records(
            filters=dg.RunsFilter(job_name=job, statuses=statuses, updated_before=before),
            limit=min(CHUNK_RUNS, budget - deleted),
            ascending=True,
        )
        chunk = [r.dagster_run.run_id for r in records if r.dagster_run.run_id != context.run_id]
        if not chunk:
            return deleted
        for run_id in chunk:
            context.instance.delete_run(run_id)
        deleted += len(chunk)
    return deleted


def retention_job(keep_days: float, keep_failed_days: float) -> dg.JobDefinition:
    """The pruning job, configured with the deployment's retention settings."""

    @dg.job(
        name="prune_dagster_runs",
        executor_def=dg.in_process_executor,
        config={
            "ops": {
                "prune_runs": {
                    "config": {"keep_days": keep_days, "keep_failed_days": keep_failed_days}
                }
            }
        },
        description="Delete finished archive and upkeep runs (and their events) older than "
        "PROTOAGG_KEEP_RUNS_DAYS (failed: PROTOAGG_KEEP_FAILED_RUNS_DAYS). Never touches the "
        "ledger.",
    )
    def prune_dagster_runs() -> None:
        prune_runs()

    return prune_dagster_runs


def retention_schedule(job: dg.JobDefinition) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="dagster_run_retention",
        job=job,
        cron_schedule="47 * * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Hourly: delete old finished runs and their events from Dagster's storage.",
    )
