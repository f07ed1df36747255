"""Run one archive_kafka_batch in this process: ``python -m tests.e2e.run_range SPEC_JSON``.

Tests start several of these at once to get truly concurrent runs (Dagster's in-process execution
is not thread-safe). SPEC_JSON: {"resources": {...resource fields...}, "range": [topic, p, a, b]}.
"""

from __future__ import annotations

import json
import sys

import dagster as dg

from protoagg_dagster.jobs import archive_kafka_batch, range_run_config
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.settings_resource import ArchiverSettings

KINDS = {
    "kafka": KafkaResource,
    "postgres": PostgresResource,
    "gcs": GCSResource,
    "archiver": ArchiverSettings,
}


def main() -> int:
    spec = json.loads(sys.argv[1])
    resources = {name: KINDS[name](**fields) for name, fields in spec["resources"].items()}
    topic, partition, start, end = spec["range"]
    with dg.instance_for_test() as instance:
        result = archive_kafka_batch.execute_in_process(
            run_config=range_run_config(topic, partition, start, end),
            resources=resources,
            instance=instance,
            raise_on_error=False,
        )
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
