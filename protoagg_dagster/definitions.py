"""The single Definitions of protoagg: the archive's and the Iceberg tables' defs, resources.

Connection settings come from their environment variable when it is set (``EnvVar``: resolved at
run time, never shown in the UI), else from the local-services default in ``core.settings``.
Batch tuning knobs and the format settings are plain values read (and checked) when the code
location loads.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from protoagg_dagster.archive.assets import archive_asset, topic_asset_specs
from protoagg_dagster.archive.checks import build_archive_checks
from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.partition_lease import PartitionLease
from protoagg_dagster.archive.run_retention import retention_job, retention_schedule
from protoagg_dagster.archive.sensor import kafka_offsets_sensor
from protoagg_dagster.archive.upkeep import archive_maintenance, maintain_archive
from protoagg_dagster.core import settings
from protoagg_dagster.core.archive_object import check_one_format_per_object
from protoagg_dagster.core.kafka_client import FIELD_SETTINGS, KafkaClientSettings
from protoagg_dagster.iceberg.defs import build_iceberg_defs
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.resources.iceberg import IcebergResource
from protoagg_dagster.resources.settings import ArchiverSettings
from protoagg_dagster.restore.job import restore_archive


def _value(setting: settings.Setting) -> str | dg.EnvVar:
    return dg.EnvVar(setting.env) if setting.env in os.environ else setting.default


# A bad compression name or level fails here, when the code location loads, not in a run.
codec = settings.read_codec()


def _template(setting: settings.Setting) -> str | dg.EnvVar:
    """An object template as set, else its default name with the codec's suffix."""
    return dg.EnvVar(setting.env) if setting.env in os.environ else setting.default + codec.suffix


def _kafka_connection() -> dict[str, Any]:
    """Every Kafka connection setting, as an EnvVar when set: no secret is stored or shown."""
    fields: dict[str, Any] = {"bootstrap_servers": settings.KAFKA_BOOTSTRAP.default}
    fields.update(
        {field: dg.EnvVar(s.env) for field, s in FIELD_SETTINGS.items() if os.environ.get(s.env)}
    )
    return fields


# An impossible combination of Kafka settings (SASL without a password, a key without its
# certificate, ...) fails here, when the code location loads, not in a run.
KafkaClientSettings.from_environ().check()


postgres = PostgresResource(dsn=_value(settings.POSTGRES_DSN))
archiver = ArchiverSettings(
    batch_size=settings.BATCH_SIZE.read_int(),
    linger_seconds=settings.LINGER_SECONDS.read_float(),
    max_batch_messages=settings.MAX_BATCH_MESSAGES.read_int(),
    max_batch_bytes=settings.MAX_BATCH_BYTES.read_int(),
    max_partitions_per_run=settings.MAX_PARTITIONS_PER_RUN.read_int(),
    max_runs_per_tick=settings.MAX_RUNS_PER_TICK.read_int(),
    max_message_bytes=settings.MAX_MESSAGE_BYTES.read_int(),
    max_frame_bytes=settings.MAX_FRAME_BYTES.read_int(),
    max_dead_letter_ratio=settings.MAX_DEAD_LETTER_RATIO.read_float(),
    start_from=_value(settings.START_FROM),
    format=settings.FORMAT.read(),
    dedupe_key=settings.DEDUPE_KEY.read(),
    dedupe_scope=settings.DEDUPE_SCOPE.read(),
    log_id_field=settings.LOG_ID_FIELD.read(),
    log_timestamp_field=settings.LOG_TIMESTAMP_FIELD.read(),
    log_message_field=settings.LOG_MESSAGE_FIELD.read(),
)
# A bad topic entry, format, dedupe key or scope, or a template that would mix formats in one
# object, fails here, when the code location loads, not in a run.
topic_rules = archiver.topic_formats(settings.TOPICS.read()).rules
archiver.scope()
check_one_format_per_object(
    settings.object_template(settings.GCS_OBJECT, codec.suffix),
    {rule.format for rule in topic_rules},
)

# Dagster keeps every run and event forever unless something deletes them.
prune_dagster_runs = retention_job(
    settings.KEEP_RUNS_DAYS.read_float(), settings.KEEP_FAILED_RUNS_DAYS.read_float()
)

# One Definitions at module scope: Dagster's loader refuses a module holding two.
defs = dg.Definitions.merge(
    dg.Definitions(
        assets=[archive_asset, *topic_asset_specs(topic_rules)],
        asset_checks=[build_archive_checks(topic_rules)],
        jobs=[archive_kafka_batch, maintain_archive, prune_dagster_runs, restore_archive],
        schedules=[archive_maintenance, retention_schedule(prune_dagster_runs)],
        sensors=[kafka_offsets_sensor],
        resources={
            # Op outputs stay in memory: the default filesystem IO manager pickled every batch to
            # disk three times (measured: 21 µs per message, more than any step, and disk that only
            # grew).
            "io_manager": dg.mem_io_manager,
            "kafka": KafkaResource(
                topics=_value(settings.TOPICS),
                client=_value(settings.KAFKA_CLIENT),
                **_kafka_connection(),
            ),
            "postgres": postgres,
            "lease": PartitionLease(postgres=postgres),
            "gcs": GCSResource(
                bucket=_value(settings.GCS_BUCKET),
                object_template=_template(settings.GCS_OBJECT),
                dead_letter_template=_template(settings.GCS_DEAD_LETTERS),
                compression=codec.name,
                compression_level=codec.level,
                max_object_bytes=settings.MAX_OBJECT_BYTES.read_int(),
                create_bucket=settings.GCS_CREATE_BUCKET.read_bool(),
                emulator_host=_value(settings.STORAGE_EMULATOR_HOST),
            ),
            "archiver": archiver,
            "iceberg": IcebergResource(
                postgres_dsn=_value(settings.POSTGRES_DSN),
                bucket=_value(settings.GCS_BUCKET),
                warehouse_prefix=settings.ICEBERG_PREFIX.read(),
                namespace=settings.ICEBERG_NAMESPACE.read(),
                rest_uri=_value(settings.ICEBERG_REST_URI),
                catalog_properties=_value(settings.ICEBERG_CATALOG_PROPERTIES),
                emulator_host=_value(settings.STORAGE_EMULATOR_HOST),
            ),
        },
    ),
    build_iceberg_defs(topic_rules),
)
