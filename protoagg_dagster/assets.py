"""The archive as a Dagster asset: materialized by every archive_kafka_batch run."""

import dagster as dg

ARCHIVE_ASSET = dg.AssetKey("kafka_archive")

archive_asset = dg.AssetSpec(
    ARCHIVE_ASSET,
    description="Every Kafka message of the archived topics, framed as uint32 LE length | "
    "ProtoLog, in GCS. Materialized by each archive_kafka_batch run.",
    group_name="protoagg",
)
