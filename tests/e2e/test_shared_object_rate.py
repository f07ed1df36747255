"""Many partitions, one object, GCS's write rate: default settings through ``dagster-daemon``.

The default template ``log.pb`` is written by every partition. The proxy in front of the emulator
allows one mutation per second per object name (429 beyond it, like GCS). Every run must succeed
(no failed run, no step retry), the archive must hold each id once, and the throughput is printed
(``benchmarks/shared_object`` collects it for docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from protoagg_dagster.resources import GCSResource, PostgresResource
from tests.conftest import Services
from tests.helpers import (
    Stack,
    archive_with_daemon,
    check_archive,
    create_topic,
    log_value,
    produce,
)
from tests.support.dagster_deployment import DagsterDeployment, run_summaries
from tests.support.gcs_proxy import GcsProxy

PER_PARTITION = 1000  # two runs per partition at the default batch size of 500
DEADLINE_SECONDS = 600.0


@pytest.mark.parametrize("partitions", [1, 8, 32])
def test_partitions_sharing_one_object_archive_at_gcs_write_rate(
    stack: Stack, services: Services, postgres_dsn: str, tmp_path: Path, partitions: int
) -> None:
    topic = stack.kafka.topic_list()[0]
    create_topic(stack.kafka, topic, partitions=partitions)
    for p in range(partitions):
        produce(stack.kafka, topic, [log_value() for _ in range(PER_PARTITION)], partition=p)
    proxy = GcsProxy(services.gcs_url, mutation_interval=1.0)
    url = proxy.start()
    env = {
        "PROTOAGG_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
        "PROTOAGG_TOPICS": topic,
        "PROTOAGG_POSTGRES_DSN": postgres_dsn,
        "PROTOAGG_GCS_BUCKET": services.bucket,
        "PROTOAGG_GCS_OBJECT": stack.gcs.object_template,  # one object for every partition
        "STORAGE_EMULATOR_HOST": url,
    }
    deployment = DagsterDeployment("rate", tmp_path / "rate", env)
    try:
        elapsed = archive_with_daemon(
            deployment, postgres_dsn, topic, partitions, PER_PARTITION, DEADLINE_SECONDS
        )
    finally:
        proxy.close()
    runs = [r for r in run_summaries(deployment) if r.job_name == "archive_kafka_batch"]
    assert [r for r in runs if r.status != "SUCCESS" or r.step_retries] == []
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert (check.offsets, check.archived) == (partitions * PER_PARTITION,) * 2
    composes = proxy.count(kind="compose", status=200, object_name=stack.gcs.object_template)
    result = {
        "partitions": partitions,
        "messages": partitions * PER_PARTITION,
        "runs": len(runs),
        "composes": composes,
        "compose_429": proxy.count(kind="compose", status=429),
        "seconds": round(elapsed, 1),
        "messages_per_second": round(partitions * PER_PARTITION / elapsed, 1),
    }
    print(json.dumps(result))
    if os.environ.get("PROTOAGG_BENCH_OUT"):
        with open(os.environ["PROTOAGG_BENCH_OUT"], "a") as out:
            out.write(json.dumps(result) + "\n")


@pytest.mark.parametrize("writers", [1, 8, 32])
def test_writers_with_more_than_one_batch_a_second_share_the_objects_composes(
    services: Services, postgres_dsn: str, unique: str, writers: int
) -> None:
    """The sustained case the runs above never reach on two cores: every partition has a batch
    ready all the time. Appends per second grow with writers while composes stay at about one a
    second (each carrying up to 31 pieces)."""
    from tests.helpers import append_from_threads

    pieces, name = 8, f"{unique}/shared.pb"
    proxy = GcsProxy(services.gcs_url, mutation_interval=1.0)
    url = proxy.start()
    started = time.monotonic()
    try:
        gcs = GCSResource(bucket=services.bucket, emulator_host=url)
        results = append_from_threads(
            gcs, PostgresResource(dsn=postgres_dsn), name, writers, pieces
        )
        elapsed = time.monotonic() - started
        composes = proxy.count(kind="compose", status=200, object_name=name)
        compose_429 = proxy.count(kind="compose", status=429)
        content = gcs.get_bucket().blob(name).download_as_bytes()
    finally:
        proxy.close()
    assert sorted(data for data, _ in results.values()) == sorted(
        content.replace(b"><", b">\n<").split(b"\n")
    ) and all(r.appended for _, r in results.values())
    appends = writers * pieces
    if writers > 1:
        assert composes < appends / 2, (composes, appends)
    result = {
        "writers": writers,
        "appends": appends,
        "composes": composes,
        "compose_429": compose_429,
        "seconds": round(elapsed, 1),
        "appends_per_second": round(appends / elapsed, 1),
    }
    print(json.dumps(result))
    if os.environ.get("PROTOAGG_BENCH_OUT"):
        with open(os.environ["PROTOAGG_BENCH_OUT"], "a") as out:
            out.write(json.dumps(result) + "\n")
