"""Shared test helpers: producing seed-shaped messages and building resources for a test."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from kafka.admin import NewTopic

from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.settings_resource import ArchiverSettings


@dataclass(frozen=True)
class Stack:
    kafka: KafkaResource
    postgres: PostgresResource
    gcs: GCSResource
    archiver: ArchiverSettings

    def resources(self) -> dict[str, object]:
        return {
            "kafka": self.kafka,
            "postgres": self.postgres,
            "gcs": self.gcs,
            "archiver": self.archiver,
        }


def log_value(log_id: str | None = None, message: str = "hello", second: int = 0) -> bytes:
    return json.dumps(
        {
            "logId": log_id or str(uuid.uuid4()),
            "timestamp": f"2026-11-01T08:00:{second % 60:02d}.123456789Z",
            "message": message,
        }
    ).encode()


def create_topic(kafka: KafkaResource, topic: str, partitions: int = 1) -> None:
    admin = kafka.get_admin()
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def produce(kafka: KafkaResource, topic: str, values: Iterable[bytes], partition: int = 0) -> int:
    producer = kafka.get_producer()
    count = 0
    try:
        for value in values:
            producer.send(topic, value=value, partition=partition)
            count += 1
        producer.flush()
    finally:
        producer.close()
    return count


def topic_of(stack: Stack) -> str:
    return stack.kafka.topic_list()[0]
