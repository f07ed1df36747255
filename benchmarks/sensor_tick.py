"""How long one evaluation of kafka_offsets_sensor takes at 100, 1,000 and 10,000 partitions.

    PYTHONPATH=. .venv/bin/python benchmarks/sensor_tick.py [--partitions 100,1000,10000]
        [--ticks 5] [--bootstrap HOST:PORT] [--gcs http://HOST:PORT] [--admin-dsn postgresql://...]

For each size: topics of at most 1,000 partitions each (matched by one PROTOAGG_TOPICS pattern),
one message in every partition, a fresh PostgreSQL database; the sensor evaluated in process with
the default settings but a linger of an hour (the ticks measured plan and launch nothing, as
most ticks of a quiet cluster) against a test instance. Reported per size: the first tick (it
also reads the bucket's settings), the median and slowest of the next ``--ticks``, the cursor's
size, and one tick with linger 0, which launches every partition (at most max_runs_per_tick
runs). Dagster
gives a sensor evaluation 60 s by default (``DAGSTER_SENSOR_GRPC_TIMEOUT_SECONDS``).

The table, then one JSON line ``{"benchmark": "sensor_tick", ...}`` (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dagster as dg  # noqa: E402

from benchmarks.e2e_dagster import (  # noqa: E402
    add_service_args,
    create_topic,
    fresh_database,
    produce,
    services_from,
)
from benchmarks.run_once import code_version  # noqa: E402
from protoagg_dagster.archive.sensor import kafka_offsets_sensor  # noqa: E402
from protoagg_dagster.resources import (  # noqa: E402
    GCSResource,
    KafkaResource,
    PostgresResource,
)
from protoagg_dagster.resources.settings import ArchiverSettings  # noqa: E402

TOPIC_PARTITIONS = 1000


def tick(
    resources: dict[str, Any], instance: dg.DagsterInstance, cursor: str | None
) -> tuple[float, dg.SensorResult]:
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        started = time.perf_counter()
        result = kafka_offsets_sensor(context)
        elapsed = time.perf_counter() - started
    assert isinstance(result, dg.SensorResult)
    return elapsed, result


def measure(svc: Any, partitions: int, ticks: int) -> dict[str, Any]:
    token = uuid.uuid4().hex[:8]
    topics = [
        (f"bench-tick-{token}-{i}", min(TOPIC_PARTITIONS, partitions - i * TOPIC_PARTITIONS))
        for i in range((partitions + TOPIC_PARTITIONS - 1) // TOPIC_PARTITIONS)
    ]
    for name, count in topics:
        kafka = svc.kafka(name)
        create_topic(kafka, name, count)
        produce(kafka, name, [b'{"logId": "x"}'] * count, count)
    with fresh_database(svc) as dsn, dg.instance_for_test() as instance:
        resources: dict[str, Any] = {
            "kafka": KafkaResource(
                bootstrap_servers=svc.bootstrap, topics=f"/bench-tick-{token}-.*/"
            ),
            "postgres": PostgresResource(dsn=dsn),
            "gcs": GCSResource(
                bucket=svc.bucket, object_template=f"bench-tick/{token}.pb", emulator_host=svc.gcs
            ),
            # Lingering for an hour: the measured ticks plan and launch nothing.
            "archiver": ArchiverSettings(linger_seconds=3600),
        }
        first, result = tick(resources, instance, None)
        cursor = result.cursor
        seconds = []
        for _ in range(ticks):
            elapsed, result = tick(resources, instance, cursor)
            assert not result.run_requests
            cursor = result.cursor
            seconds.append(elapsed)
        launching = {**resources, "archiver": ArchiverSettings(linger_seconds=0)}
        launch_s, launched = tick(launching, instance, cursor)
    return {
        "partitions": partitions,
        "topics": len(topics),
        "first_tick_s": first,
        "tick_median_s": statistics.median(seconds),
        "tick_max_s": max(seconds),
        "cursor_bytes": len(cursor or ""),
        "launching_tick_s": launch_s,
        "runs_launched": len(launched.run_requests or []),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", default="100,1000,10000")
    parser.add_argument("--ticks", type=int, default=5)
    add_service_args(parser)
    args = parser.parse_args()
    svc = services_from(parser, args)
    rows = [measure(svc, int(n), args.ticks) for n in args.partitions.split(",")]
    print(
        f"{'partitions':>10} {'first s':>8} {'median s':>9} {'max s':>6} {'cursor B':>9} "
        f"{'launch s':>9} {'runs':>5}"
    )
    for r in rows:
        print(
            f"{r['partitions']:>10,} {r['first_tick_s']:>8.2f} {r['tick_median_s']:>9.2f} "
            f"{r['tick_max_s']:>6.2f} {r['cursor_bytes']:>9} {r['launching_tick_s']:>9.2f} "
            f"{r['runs_launched']:>5}"
        )
    print(json.dumps({"benchmark": "sensor_tick", "code": code_version(), "sizes": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
