"""Kafka administration protoagg needs: creating a topic (produce, restore)."""

from __future__ import annotations

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from protoagg_dagster.core.errors import BackendError
from protoagg_dagster.core.kafka_client import KafkaClientSettings
from protoagg_dagster.kafka.clients import refusal_of


def create_topic(
    admin: KafkaAdminClient,
    topic: str,
    partitions: int,
    configs: dict[str, str] | None = None,
    client: KafkaClientSettings | None = None,
) -> None:
    """Create ``topic`` with ``partitions`` partitions (and ``configs``) unless it exists.

    Replication is the cluster's default (-1), so a production cluster keeps its own policy.
    ``admin`` is closed when done. ``client``: the settings ``admin`` was made with, to say what
    a refusal means.
    """
    new = NewTopic(topic, partitions, replication_factor=-1, topic_configs=configs or {})
    try:
        admin.create_topics([new])
    except TopicAlreadyExistsError:
        pass
    except KafkaError as exc:
        refusal = None if client is None else refusal_of(client, exc, f"CREATE on Topic {topic!r}")
        if refusal is not None:
            raise refusal from exc
        raise BackendError(f"creating Kafka topic {topic!r} failed: {exc}") from exc
    finally:
        admin.close()
