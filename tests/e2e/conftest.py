"""Fixtures of the end-to-end tests: a full set of resources isolated per test."""

from __future__ import annotations

import pytest

from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.resources.settings import ArchiverSettings
from tests.conftest import Services
from tests.helpers import Stack


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
