"""Producing a JSON-lines file to Kafka, one message per line (the seed's console-producer step)."""

from __future__ import annotations

from pathlib import Path

from kafka.errors import KafkaError

from protoagg_dagster.core.errors import BackendError, ConfigError
from protoagg_dagster.kafka.admin import create_topic
from protoagg_dagster.resources.kafka import KafkaResource


def produce_file(
    path: Path, topic: str, bootstrap: str | None = None, partitions: int | None = None
) -> int:
    """Send every non-empty line of ``path`` as one message; return how many were sent.

    Kafka is the environment's (``KafkaResource.from_env``), at ``bootstrap`` when given.
    """
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    kafka = KafkaResource.from_env(bootstrap, topics=topic)
    if partitions is not None:
        create_topic(kafka.get_admin(), topic, partitions, client=kafka.client_settings())
    producer = kafka.get_producer()
    sent = 0
    try:
        with path.open("rb") as lines:
            for line in lines:
                value = line.rstrip(b"\r\n")
                if value:
                    producer.send(topic, value=value)
                    sent += 1
        producer.flush()
    except KafkaError as exc:
        kafka.raise_refusal(exc, f"WRITE and DESCRIBE on Topic {topic!r}")
        raise BackendError(
            f"producing to {topic!r} at {kafka.bootstrap_servers} failed: {exc}"
        ) from exc
    finally:
        producer.close()
    return sent
