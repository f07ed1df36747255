"""The Iceberg capability's Dagster definitions: table assets, the days sensor, maintenance."""

import datetime

import dagster as dg
from pydantic import Field

from protoagg_dagster.core import settings
from protoagg_dagster.core.formats import TopicRule
from protoagg_dagster.core.table_days import day_key, parse_day
from protoagg_dagster.iceberg.assets import GROUP, JOB_NAME, build_table_assets, named_topics
from protoagg_dagster.iceberg.sensor import build_days_sensor
from protoagg_dagster.resources import GCSResource
from protoagg_dagster.resources.iceberg import IcebergResource


class TableCleanupConfig(dg.Config):
    keep_snapshots_hours: float = Field(
        default_factory=lambda: settings.ICEBERG_KEEP_SNAPSHOTS_HOURS.read_float(),
        description="Snapshots older than this are expired (never the current one).",
    )
    orphan_age_seconds: float = Field(
        default_factory=lambda: settings.ICEBERG_ORPHAN_AGE_SECONDS.read_float(),
        description="Unreferenced files younger than this are kept (a write may be committing).",
    )


def build_maintenance(rules: tuple[TopicRule, ...]) -> dg.JobDefinition:
    topics = sorted(named_topics(rules))

    @dg.op
    def clean_tables(
        context: dg.OpExecutionContext,
        config: TableCleanupConfig,
        gcs: GCSResource,
        iceberg: IcebergResource,
    ) -> None:
        """Expire old snapshots of each topic table and delete the files none references."""
        from protoagg_dagster.iceberg.maintenance import clean_table  # loads pyiceberg

        catalog = iceberg.get_catalog()
        client = gcs.get_client()
        for topic in topics:
            identifier = (iceberg.namespace, topic)
            if not catalog.table_exists(identifier):
                continue
            cleaned = clean_table(
                catalog.load_table(identifier),
                client,
                datetime.timedelta(hours=config.keep_snapshots_hours),
                datetime.timedelta(seconds=config.orphan_age_seconds),
            )
            context.log.info(
                f"{cleaned.table}: {cleaned.snapshots_expired} snapshots expired, "
                f"{cleaned.snapshots_kept} kept; {cleaned.files_deleted} files deleted, "
                f"{cleaned.files_kept} kept"
            )

    @dg.job(
        name="maintain_iceberg",
        executor_def=dg.in_process_executor,
        description="Expire old snapshots of the topic tables; delete unreferenced files.",
    )
    def maintain_iceberg() -> None:
        clean_tables()

    return maintain_iceberg


def build_iceberg_defs(rules: tuple[TopicRule, ...]) -> dg.Definitions:
    """Everything of the capability for the topic entries ``rules``."""
    start = day_key(parse_day(settings.ICEBERG_START_DATE.read()))
    partitions = dg.DailyPartitionsDefinition(start_date=start, timezone="UTC")
    assets = build_table_assets(rules, partitions)
    job = dg.define_asset_job(
        JOB_NAME, selection=dg.AssetSelection.groups(GROUP), partitions_def=partitions
    )
    maintenance = build_maintenance(rules)
    return dg.Definitions(
        assets=assets,
        jobs=[job, maintenance],
        sensors=[build_days_sensor(rules, settings.ICEBERG_GRACE_SECONDS.read_int())],
        schedules=[
            dg.ScheduleDefinition(
                name="iceberg_maintenance",
                job=maintenance,
                cron_schedule="43 3 * * *",
                default_status=dg.DefaultScheduleStatus.RUNNING,
                description="Daily: expire old snapshots of the topic tables, delete "
                "unreferenced files.",
            )
        ],
    )
