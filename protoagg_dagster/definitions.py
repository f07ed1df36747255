"""The single Definitions of protoagg: job, sensor, archive asset and resources.

Each setting comes from its environment variable when that is set (resolved at run time, never
shown in the UI), else from the local-services default in ``core.settings``.
"""

from __future__ import annotations

import os

import dagster as dg

from protoagg_dagster.core import settings
from protoagg_dagster.jobs import archive_kafka_batch
from protoagg_dagster.ops import ARCHIVE_ASSET
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.sensors import kafka_offsets_sensor
from protoagg_dagster.settings_resource import ArchiverSettings


def _value(setting: settings.Setting) -> str | dg.EnvVar:
    return dg.EnvVar(setting.env) if setting.env in os.environ else setting.default


def _int(setting: settings.Setting) -> int | dg.EnvVar:
    return dg.EnvVar.int(setting.env) if setting.env in os.environ else int(setting.default)


def _float(setting: settings.Setting) -> float | dg.EnvVar:
    return dg.EnvVar.float(setting.env) if setting.env in os.environ else float(setting.default)


archive_asset = dg.AssetSpec(
    ARCHIVE_ASSET,
    description="Every Kafka message of the archived topics, framed as uint32 LE length | "
    "ProtoLog, in GCS. Materialized by each archive_kafka_batch run.",
    group_name="protoagg",
)

defs = dg.Definitions(
    assets=[archive_asset],
    jobs=[archive_kafka_batch],
    sensors=[kafka_offsets_sensor],
    resources={
        "kafka": KafkaResource(
            bootstrap_servers=_value(settings.KAFKA_BOOTSTRAP), topics=_value(settings.TOPICS)
        ),
        "postgres": PostgresResource(dsn=_value(settings.POSTGRES_DSN)),
        "gcs": GCSResource(
            bucket=_value(settings.GCS_BUCKET),
            object_template=_value(settings.GCS_OBJECT),
            emulator_host=_value(settings.STORAGE_EMULATOR_HOST),
        ),
        "archiver": ArchiverSettings(
            batch_size=_int(settings.BATCH_SIZE),
            linger_seconds=_float(settings.LINGER_SECONDS),
            max_batch_messages=_int(settings.MAX_BATCH_MESSAGES),
            max_batch_bytes=_int(settings.MAX_BATCH_BYTES),
            max_message_bytes=_int(settings.MAX_MESSAGE_BYTES),
            start_from=_value(settings.START_FROM),
        ),
    },
)
