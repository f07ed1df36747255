"""Scheduled upkeep: move the dedupe window forward, drop what left it, and remove orphans.

Runs as the ``maintain_archive`` job on the hourly ``archive_maintenance`` schedule.
"""

import time

import dagster as dg
from pydantic import Field

from protoagg_dagster.archive import leases
from protoagg_dagster.archive.dedupe_window import advance_window, epoch_day
from protoagg_dagster.archive.ledger import forget_queued_uploads, ledger_connection, stale_claims
from protoagg_dagster.archive.store import remove_orphaned_temp_objects
from protoagg_dagster.resources import GCSResource, PostgresResource


class WindowConfig(dg.Config):
    keep_days: int = Field(
        default=7,
        description="Days of logIds kept for dedupe (at least this many, at most about twice: "
        "the window is two spans of keep_days days). A message redelivered after its id left "
        "the window is archived again; longer windows cost storage, not per-batch time.",
    )


class CleanupConfig(dg.Config):
    temp_older_than_seconds: int = Field(
        default=3600,
        description="Temporary uploads older than this belong to dead runs and are deleted.",
    )
    stale_claim_seconds: int = Field(
        default=900, description="Claimed batches older than this are reported as stuck."
    )


@dg.op
def advance_dedupe_window(
    context: dg.OpExecutionContext, config: WindowConfig, postgres: PostgresResource
) -> None:
    """Start a new span of the dedupe window when due and drop spans that left the window."""
    with ledger_connection(postgres) as conn:
        change = advance_window(conn, epoch_day(), config.keep_days)
    context.log.info(
        f"dedupe window: claiming into the span that started on day {change.current_day}"
        + (" (new span)" if change.created else "")
        + (f"; dropped {', '.join(change.dropped)}" if change.dropped else "; nothing to drop")
    )
    for span, claims in change.kept:
        # The adopting run finds a claim's records by its ids: dropping them would drop those.
        context.log.warning(
            f"dedupe window: {span} left the window but is kept: it holds the ids of "
            f"{', '.join(map(str, claims))}, claimed and not yet appended; it is dropped once "
            "they are (their runs keep failing: see the stuck claims below)"
        )


@dg.op
def remove_orphans(
    context: dg.OpExecutionContext,
    config: CleanupConfig,
    gcs: GCSResource,
    postgres: PostgresResource,
) -> None:
    """Delete temporary objects of dead runs; report claimed batches nobody finished."""
    removed = remove_orphaned_temp_objects(gcs.get_bucket(), config.temp_older_than_seconds)
    for name in removed:
        context.log.info(f"removed orphaned temporary object gs://{gcs.bucket}/{name}")
    context.log.info(f"cleanup: {len(removed)} orphaned temporary objects removed")
    with ledger_connection(postgres) as conn:
        forgotten = forget_queued_uploads(conn, time.time() - config.temp_older_than_seconds)
        stuck = stale_claims(conn, time.time() - config.stale_claim_seconds)
        # A run lives an hour at most (max_runtime_seconds): a day-old note is of no live run.
        leases.forget_taken(conn, 86_400)
    context.log.info(f"cleanup: {forgotten} queue entries of dead runs' uploads forgotten")
    for batch in stuck:
        # The sensor relaunches a claimed range before anything else; one stuck for long means
        # its runs keep failing, which needs a person.
        context.log.warning(f"claimed batch {batch} has not been appended for a long time")


@dg.job(executor_def=dg.in_process_executor, description="Dedupe window and orphan cleanup.")
def maintain_archive() -> None:
    advance_dedupe_window()
    remove_orphans()


archive_maintenance = dg.ScheduleDefinition(
    name="archive_maintenance",
    job=maintain_archive,
    cron_schedule="17 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly: advance the dedupe window, drop expired days, remove orphaned uploads.",
)
