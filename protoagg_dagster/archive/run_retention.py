"""Keeping Dagster's own storage bounded: delete finished runs and their events once old.

Dagster OSS never deletes runs or their event logs, and an archive that runs for months launches
runs all day. The ``prune_dagster_runs`` job, on the hourly ``dagster_run_retention`` schedule
(on by default), deletes finished runs of protoagg's archive and upkeep jobs older than
``PROTOAGG_KEEP_RUNS_DAYS`` (failed runs after ``PROTOAGG_KEEP_FAILED_RUNS_DAYS``), with their
events, through Dagster's own ``delete_run``, in chunks, at most ``max_runs`` per pass. It never
touches protoagg's ledger: which offsets are archived, and where, stays in PostgreSQL.
"""

import datetime

import dagster as dg
from pydantic import Field

# A chunk of runs is listed, then deleted one by one (each delete removes the run's events too).
CHUNK_RUNS = 100
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
    context.log.info(
        f"deleted {deleted} runs and their events (finished over {config.keep_days:g} days ago, "
        f"failed over {config.keep_failed_days:g} days ago)"
        + ("; more remain for the next pass" if deleted >= config.max_runs else "")
    )
    return deleted


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
