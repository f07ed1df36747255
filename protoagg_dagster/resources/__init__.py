"""One thin Dagster resource per backend: Kafka, PostgreSQL, GCS."""

from protoagg_dagster.resources.gcs import GCSResource
from protoagg_dagster.resources.kafka import KafkaResource
from protoagg_dagster.resources.postgres import PostgresResource

__all__ = ["GCSResource", "KafkaResource", "PostgresResource"]
