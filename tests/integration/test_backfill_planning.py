"""Backfill ranges resolved against a real broker: offsets, times (offsets-for-times), clamping."""

from __future__ import annotations

import pytest

from protoagg_dagster.backfill.submit import resolve_ranges
from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.planning import OffsetRange, split_range
from protoagg_dagster.resources import KafkaResource
from tests.conftest import Services
from tests.helpers import create_topic, log_value

BASE_MS = 1_790_000_000_000


@pytest.fixture
def kafka_with_history(services: Services, unique: str) -> tuple[KafkaResource, str]:
    topic = f"t-{unique}"
    kafka = KafkaResource(bootstrap_servers=services.kafka_bootstrap, topics=topic)
    create_topic(kafka, topic, partitions=2)
    producer = kafka.get_producer()
    for partition in (0, 1):
        for i in range(30):
            producer.send(
                topic, value=log_value(), partition=partition, timestamp_ms=BASE_MS + i * 1000
            )
    producer.flush()
    producer.close()
    return kafka, topic


def test_times_are_translated_with_offsets_for_times(
    kafka_with_history: tuple[KafkaResource, str],
) -> None:
    kafka, topic = kafka_with_history
    ranges = resolve_ranges(kafka, topic, [1], None, None, BASE_MS + 10_000, BASE_MS + 20_500)
    assert ranges == [OffsetRange(topic, 1, 10, 21)]


def test_offsets_are_clamped_to_the_log_and_every_partition_is_the_default(
    kafka_with_history: tuple[KafkaResource, str],
) -> None:
    kafka, topic = kafka_with_history
    ranges = resolve_ranges(kafka, topic, None, 25, 1000, None, None)
    assert ranges == [OffsetRange(topic, 0, 25, 30), OffsetRange(topic, 1, 25, 30)]
    assert split_range(OffsetRange(topic, 0, 0, 30), 12) == [
        OffsetRange(topic, 0, 0, 12),
        OffsetRange(topic, 0, 12, 24),
        OffsetRange(topic, 0, 24, 30),
    ]


def test_an_unknown_partition_is_named(kafka_with_history: tuple[KafkaResource, str]) -> None:
    kafka, topic = kafka_with_history
    with pytest.raises(ConfigError, match="no partition"):
        resolve_ranges(kafka, topic, [7], 0, 10, None, None)
