"""Fixtures of the end-to-end tests: a full set of resources isolated per test, and the session's
shared Dagster deployment (tests/support/shared_deployment.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.resources.settings import ArchiverSettings
from tests.conftest import Services
from tests.helpers import Stack
from tests.support.shared_deployment import SharedDeployment, shared_deployment


@pytest.fixture(scope="module")
def shared(
    services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedDeployment]:
    """One ``dagster-daemon`` for a module's tests that do not kill it; a test keeps its data
    apart with a topic of its own (``shared.new_topic()``). Per module, not per session: idle, a
    deployment's sensor ticks and daemon loops cost about 5 s of CPU a minute, and the modules
    that use it run on different workers and finish early."""
    with shared_deployment(services, tmp_path_factory.mktemp("shared") / "home") as deployment:
        yield deployment


@pytest.fixture
def stack(services: Services, postgres_dsn: str, unique: str) -> Stack:
    topic = f"logs-{unique}"
    return Stack(
        kafka=KafkaResource(bootstrap_servers=services.kafka_bootstrap, topics=topic),
        postgres=PostgresResource(dsn=postgres_dsn),
        gcs=GCSResource(
            bucket=services.bucket,
            object_template=f"{unique}/log.pb",
            emulator_host=services.gcs_url,
        ),
        archiver=ArchiverSettings(
            batch_size=100, linger_seconds=0, max_batch_messages=100, lag_observation_seconds=0
        ),
    )
