"""The sensor that writes each day once the archive has passed it, and again when it went stale.

Each tick indexes the batches appended since the last one (a bounded number, each read once
through its byte range), then asks the pure ``days_to_write`` which days every partition has
passed by the grace and which the index says are unwritten or stale, and requests one run per
topic and day. The run key names the index state, so a day is requested again only when a
batch touching it was indexed after the day was written.
"""

from collections.abc import Iterator

import dagster as dg

from protoagg_dagster.archive.ledger import ledger_connection
from protoagg_dagster.core.formats import TopicRule
from protoagg_dagster.core.table_days import day_key, days_to_write
from protoagg_dagster.iceberg.assets import JOB_NAME, named_topics, table_asset_key
from protoagg_dagster.iceberg.day_index import (
    day_states,
    ensure_index_schema,
    index_batches,
    watermarks,
)
from protoagg_dagster.resources import GCSResource, PostgresResource

SENSOR_NAME = "iceberg_days_sensor"
# Bounds one tick's work: batches read for the index (Dagster gives a sensor 60 s), runs requested.
BATCHES_PER_TICK = 200
INDEX_SECONDS_PER_TICK = 20.0
RUNS_PER_TICK = 20


def build_days_sensor(rules: tuple[TopicRule, ...], grace_seconds: int) -> dg.SensorDefinition:
    formats = named_topics(rules)

    @dg.sensor(
        name=SENSOR_NAME,
        job_name=JOB_NAME,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Writes a day of each topic table once every partition's archive has "
        "passed the day's end plus PROTOAGG_ICEBERG_GRACE_SECONDS; rewrites a stale day.",
    )
    def iceberg_days_sensor(
        context: dg.SensorEvaluationContext, gcs: GCSResource, postgres: PostgresResource
    ) -> Iterator[dg.RunRequest | dg.SkipReason]:
        if not formats:
            yield dg.SkipReason("no PROTOAGG_TOPICS entry names a topic")
            return
        with ledger_connection(postgres) as conn:
            ensure_index_schema(conn)
            indexed = index_batches(
                conn, gcs.get_bucket(), formats, BATCHES_PER_TICK, INDEX_SECONDS_PER_TICK
            )
            plans = {topic: (day_states(conn, topic), watermarks(conn, topic)) for topic in formats}
        requested = 0
        for topic, (states, marks) in plans.items():
            for day in days_to_write(states, marks, grace_seconds, RUNS_PER_TICK - requested):
                requested += 1
                yield dg.RunRequest(
                    run_key=f"iceberg {topic} {day_key(day)} {states[day].indexed}",
                    partition_key=day_key(day),
                    asset_selection=[table_asset_key(topic)],
                    tags={"protoagg/iceberg-topic": topic},
                )
        if not requested:
            yield dg.SkipReason(f"indexed {indexed} batches; no day is due")

    return iceberg_days_sensor
