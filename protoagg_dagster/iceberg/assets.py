"""One Iceberg table per named ``PROTOAGG_TOPICS`` entry, as a daily-partitioned Dagster asset.

``iceberg/<topic>`` (the table ``<namespace>.<topic>``) is downstream of the topic's archive
asset. Materializing a day indexes the batches appended since the last look, writes the day from
the batches holding its records and checks the table's row count for the day against the
archive's. A pattern entry (``/REGEX/``) gets no table: its topics are not known when the code
location loads.
"""

import hashlib
import re

import dagster as dg

from protoagg_dagster.archive.assets import topic_asset_key
from protoagg_dagster.archive.ledger import ledger_connection
from protoagg_dagster.core.formats import TopicRule
from protoagg_dagster.core.table_days import parse_day
from protoagg_dagster.iceberg.day_index import archived_rows, ensure_index_schema, index_batches
from protoagg_dagster.resources import GCSResource, PostgresResource
from protoagg_dagster.resources.iceberg import IcebergResource

GROUP = "iceberg"
JOB_NAME = "iceberg_tables"
ROW_COUNT = "rows_equal_archive"
# Batches one materialization indexes before writing (the sensor indexes the rest as it goes).
INDEX_LIMIT = 100_000


def table_asset_key(topic: str) -> dg.AssetKey:
    """``iceberg/<topic>``; a short hash keeps topics whose names sanitize alike apart."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", topic)
    if slug != topic:
        slug = f"{slug}_{hashlib.sha256(topic.encode()).hexdigest()[:6]}"
    return dg.AssetKey(("iceberg", slug))


def named_topics(rules: tuple[TopicRule, ...]) -> dict[str, str]:
    """Topic → format of every entry that names a topic."""
    return {rule.name: rule.format for rule in rules if rule.name is not None}


def build_table_assets(
    rules: tuple[TopicRule, ...], partitions: dg.DailyPartitionsDefinition
) -> list[dg.AssetsDefinition]:
    formats = named_topics(rules)
    return [_table_asset(rule, partitions, formats) for rule in rules if rule.name is not None]


def _table_asset(
    rule: TopicRule, partitions: dg.DailyPartitionsDefinition, formats: dict[str, str]
) -> dg.AssetsDefinition:
    assert rule.name is not None
    topic, key = rule.name, table_asset_key(rule.name)

    @dg.asset(
        key=key,
        partitions_def=partitions,
        deps=[topic_asset_key(rule)],
        group_name=GROUP,
        description=f"Iceberg table of topic {topic} (format {rule.format}), one UTC day per "
        "partition, written from the archive's records of the day in one commit.",
        check_specs=[
            dg.AssetCheckSpec(
                ROW_COUNT,
                asset=key,
                description="The day's rows in the table equal the archive's records of the day.",
            )
        ],
    )
    def day_table(
        context: dg.AssetExecutionContext,
        gcs: GCSResource,
        postgres: PostgresResource,
        iceberg: IcebergResource,
    ) -> dg.MaterializeResult:  # type: ignore[type-arg]
        # pyiceberg and pyarrow load when a day is written, not in every archive run's process.
        from protoagg_dagster.iceberg.writer import day_filter, write_day

        day = parse_day(context.partition_key)
        bucket = gcs.get_bucket()
        catalog = iceberg.get_catalog()
        with ledger_connection(postgres) as conn:
            ensure_index_schema(conn)
            index_batches(conn, bucket, formats, INDEX_LIMIT)
            written = write_day(conn, bucket, catalog, iceberg.namespace, topic, rule.format, day)
            expected = archived_rows(conn, topic, day)
        table = catalog.load_table((iceberg.namespace, topic))
        in_table = sum(
            task.file.record_count for task in table.scan(row_filter=day_filter(day)).plan_files()
        )
        context.log.info(
            f"{topic} {context.partition_key}: {written.rows} rows from {written.batches} "
            f"batches in {len(written.files)} files"
            + ("" if written.committed else " (not committed: the day holds newer data)")
        )
        return dg.MaterializeResult(
            metadata={
                "rows": written.rows,
                "batches": written.batches,
                "files": len(written.files),
                "committed": written.committed,
                "index_seq": written.seq,
                "table": f"{iceberg.namespace}.{topic}",
                "snapshot_id": str(written.snapshot_id),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=ROW_COUNT,
                    passed=in_table == expected,
                    metadata={"table_rows": in_table, "archive_records": expected},
                )
            ],
        )

    return day_table
