"""Service outages: a run survives PostgreSQL and Kafka restarts and GCS 503/429 bursts through
retries with backoff; a permanent error (wrong password) fails at once, naming the setting.

Restarts use dedicated servers, so the shared test services are never disturbed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from protoagg_dagster.archive import ops
from protoagg_dagster.core.settings import KAFKA_CLIENTS
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.services.kafka import KafkaService
from protoagg_dagster.services.postgres import PostgresService
from tests.conftest import Services, restart_ports
from tests.helpers import (
    Stack,
    archive,
    check_archive,
    create_topic,
    log_value,
    memory_instance,
    produce,
    topic_of,
)
from tests.support.gcs_proxy import GcsProxy

RETRY_EVENT = "STEP_UP_FOR_RETRY"


def run_range(stack: Stack, end: int) -> dg.ExecuteInProcessResult:
    with memory_instance() as instance:
        return ops_job_run(stack, end, instance)


def ops_job_run(stack: Stack, end: int, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    from protoagg_dagster.archive.job import archive_kafka_batch
    from protoagg_dagster.archive.run_tags import range_run_config

    return archive_kafka_batch.execute_in_process(
        run_config=range_run_config(topic_of(stack), 0, 0, end),
        resources=stack.resources(),
        instance=instance,
        raise_on_error=False,
    )


def assert_archived_exactly_once(stack: Stack, count: int) -> None:
    records, _ = archive(stack)
    assert len(records) == len({r.log_id for r in records}) == count
    check = check_archive(stack)
    assert check.ok, check.summary()


def restart_before_first_call(
    monkeypatch: pytest.MonkeyPatch, name: str, restart: Any
) -> list[int]:
    """Patch ``ops.<name>`` so that its first call restarts a server first; count calls."""
    original = getattr(ops, name)
    calls: list[int] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            restart()
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, name, wrapper)
    return calls


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[PostgresService]:
    service = PostgresService(tmp_path / "pg", port=restart_ports()[2])
    service.up()
    yield service
    service.down()


@pytest.fixture(scope="module")
def kafka_to_restart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaService]:
    """One dedicated broker for the module's restart tests (a broker's start costs seconds):
    each test restarts it under its own topic."""
    port, controller_port, _ = restart_ports()
    service = KafkaService(
        tmp_path_factory.mktemp("kafka"), port=port, controller_port=controller_port
    )
    service.up()
    yield service
    service.down()


@pytest.fixture
def own_kafka(kafka_to_restart: KafkaService) -> KafkaService:
    kafka_to_restart.up()  # a no-op unless the test before left it down
    return kafka_to_restart


def test_postgres_restart_mid_run_is_retried_and_archives_once(
    stack: Stack, own_postgres: PostgresService, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = replace(stack, postgres=PostgresResource(dsn=own_postgres.dsn))
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, [log_value() for _ in range(50)])

    def restart() -> None:
        # The dedupe op's connection is open: the restart terminates it under the claim.
        own_postgres.down()
        own_postgres.up()

    calls = restart_before_first_call(monkeypatch, "claim_batch", restart)
    result = run_range(stack, 50)
    assert result.success
    assert len(calls) == 2
    assert any(e.event_type_value == RETRY_EVENT for e in result.all_events)
    assert_archived_exactly_once(stack, 50)


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_kafka_restart_mid_run_is_survived_and_archives_once(
    stack: Stack, own_kafka: KafkaService, monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    topic = topic_of(stack)
    stack = replace(
        stack,
        kafka=KafkaResource(bootstrap_servers=own_kafka.bootstrap, topics=topic, client=client),
    )
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, [log_value() for _ in range(50)])

    def restart() -> None:
        # The consume op's consumer is connected: the broker goes away under it and returns.
        own_kafka.down()
        own_kafka.up()

    restart_before_first_call(monkeypatch, "read_together", restart)
    result = run_range(stack, 50)
    assert result.success
    assert_archived_exactly_once(stack, 50)


def test_gcs_503_and_429_bursts_are_retried_and_archive_once(
    stack: Stack, services: Services
) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, [log_value() for _ in range(50)])
    proxy = GcsProxy(services.gcs_url)
    with proxy as url:
        proxy.fail_next(2, 429, kind="upload")
        proxy.fail_next(3, 503, kind="compose")
        proxied = replace(
            stack,
            gcs=GCSResource(
                bucket=stack.gcs.bucket,
                object_template=stack.gcs.object_template,
                emulator_host=url,
            ),
        )
        result = run_range(proxied, 50)
    assert result.success
    assert proxy.count(kind="upload", status=429, fault="fail") == 2
    assert proxy.count(kind="compose", status=503, fault="fail") == 3
    assert_archived_exactly_once(stack, 50)


def test_a_wrong_postgres_password_fails_at_once_naming_the_setting(
    stack: Stack, services: Services
) -> None:
    bad = services.postgres_admin_dsn.replace(":postgres@", ":wrong@")
    stack = replace(stack, postgres=PostgresResource(dsn=bad))
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, [log_value() for _ in range(5)])
    result = run_range(stack, 5)
    assert not result.success
    assert not any(e.event_type_value == RETRY_EVENT for e in result.all_events)
    # The run's lease connects first, as its resources start: the run fails before any step.
    errors = [
        str(error)
        for e in result.all_events
        if (error := getattr(e.event_specific_data, "error", None)) is not None
    ]
    assert any("PROTOAGG_POSTGRES_DSN" in error for error in errors)
