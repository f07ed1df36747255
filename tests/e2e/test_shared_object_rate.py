"""Many partitions, one object, GCS's write rate, through ``dagster-daemon``.

The module's shared deployment (tests/support/shared_deployment.py) writes each topic to one
object, ``shared/{topic}/log.pb``, whatever the partition, as the default template ``log.pb`` does.
Its proxy in front of the emulator allows one mutation per second per object name (429 beyond it,
like GCS). Every run must succeed (no failed run, no step retry), the archive must hold each id
once, and the throughput is printed (``benchmarks/shared_object`` collects it for
docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from protoagg_dagster.resources import GCSResource, PostgresResource
from tests.conftest import Services
from tests.helpers import check_archive, create_topic, log_value, produce
from tests.support.gcs_proxy import GcsProxy
from tests.support.shared_deployment import SharedDeployment

PER_PARTITION = 1000  # one run per partition: the shared deployment's runs are 1,000 messages
DEADLINE_SECONDS = 600.0
# 32 partitions are 32 runs booting at once: four minutes of both cores, the suite's costliest
# test, for the same assertions as 8 (the writers' test below keeps 32 appenders in the suite).
# The benchmark (benchmarks/shared_object.py, which sets PROTOAGG_BENCH_OUT) runs all three.
PARTITIONS = [1, 8, 32] if os.environ.get("PROTOAGG_BENCH_OUT") else [1, 8]


@pytest.mark.parametrize("partitions", PARTITIONS)
def test_partitions_sharing_one_object_archive_at_gcs_write_rate(
    shared: SharedDeployment, partitions: int
) -> None:
    topic = shared.new_topic()
    stack = shared.stack(topic)
    name = shared.object_name(topic)
    started = time.monotonic()
    create_topic(stack.kafka, topic, partitions=partitions)
    for p in range(partitions):
        produce(stack.kafka, topic, [log_value() for _ in range(PER_PARTITION)], partition=p)
    elapsed = shared.wait_archived(topic, partitions, PER_PARTITION, DEADLINE_SECONDS, started)
    runs = shared.runs(topic)
    assert [r for r in runs if r.status != "SUCCESS" or r.step_retries] == []
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert (check.offsets, check.archived) == (partitions * PER_PARTITION,) * 2
    result = {
        "partitions": partitions,
        "messages": partitions * PER_PARTITION,
        "runs": len(runs),
        "composes": shared.proxy.count(kind="compose", status=200, object_name=name),
        "compose_429": shared.proxy.count(kind="compose", status=429, object_name=name),
        # From the topic's creation (the daemon is up already) to every partition archived.
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
