"""Kafka through kafka-python: consumers that read assigned ranges, producers, admin."""

from __future__ import annotations

from typing import Any

import dagster as dg
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from pydantic import Field

from protoagg_dagster.core.errors import BackendError, ConfigError
from protoagg_dagster.core.formats import has_patterns, parse_topics, select_topics
from protoagg_dagster.core.settings import split_list


class KafkaResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Connection settings for the Kafka cluster whose topics are archived."""

    bootstrap_servers: str = Field(description="Comma-separated host:port list of brokers.")
    topics: str = Field(
        default="logs",
        description="Comma-separated topics to archive: NAME, NAME:FORMAT, /REGEX/ or "
        "/REGEX/:FORMAT (a pattern also matches topics created later, never internal ones).",
    )
    security_protocol: str = Field(
        default="PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_mechanism: str | None = Field(default=None, description="e.g. PLAIN, SCRAM-SHA-512.")
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: str | None = Field(default=None, description="SASL password (use an EnvVar).")
    ssl_cafile: str | None = Field(default=None, description="CA bundle for SSL.")
    request_timeout_ms: int = Field(default=30_000, description="Broker request timeout.")
    fetch_max_bytes: int = Field(
        default=64 * 1024 * 1024, description="Upper bound on one fetch response."
    )

    def topic_list(self) -> list[str]:
        """The topics to archive now: the named ones, and those the patterns match today."""
        rules = parse_topics(self.topics)
        if not has_patterns(rules):
            return select_topics(rules, [])
        consumer = self.get_consumer()
        try:
            existing = consumer.topics()
        except KafkaError as exc:
            raise BackendError(f"listing Kafka topics failed: {exc}") from exc
        finally:
            consumer.close()
        return select_topics(rules, existing)

    def _common(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "bootstrap_servers": split_list(self.bootstrap_servers),
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
            "client_id": "protoagg",
        }
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_username,
            "sasl_plain_password": self.sasl_password,
            "ssl_cafile": self.ssl_cafile,
        }
        config.update({key: value for key, value in optional.items() if value is not None})
        return config

    def get_consumer(self) -> KafkaConsumer:
        """A group-less consumer: offsets are chosen by assign + seek, never committed.

        It reads committed records only, and its end offsets are the last stable offsets: an open
        transaction holds its partition back, an aborted one is never archived.
        """
        return self._consumer("read_committed")

    def high_watermarks(self, topic: str, partitions: list[int]) -> dict[int, int]:
        """The offset after the last record written, committed or not, of each partition.

        Above the last stable offset by what open transactions hold.
        """
        consumer = self._consumer("read_uncommitted")
        try:
            tps = [TopicPartition(topic, p) for p in partitions]
            return {tp.partition: end for tp, end in consumer.end_offsets(tps).items()}
        except KafkaError as exc:
            raise BackendError(f"Kafka high watermarks of {topic!r} failed: {exc}") from exc
        finally:
            consumer.close()

    def _consumer(self, isolation_level: str) -> KafkaConsumer:
        return self._connect(
            KafkaConsumer,
            group_id=None,
            isolation_level=isolation_level,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=self.fetch_max_bytes,
            max_partition_fetch_bytes=min(self.fetch_max_bytes, 16 * 1024 * 1024),
            consumer_timeout_ms=1000,
            # Reading must never create a topic that a typo named.
            allow_auto_create_topics=False,
        )

    def get_producer(self) -> KafkaProducer:
        return self._connect(KafkaProducer, acks="all", linger_ms=20, batch_size=256 * 1024)

    def get_transactional_producer(self, transactional_id: str) -> KafkaProducer:
        """A producer whose writes become visible only with ``commit_transaction``.

        Larger batches than ``get_producer``: a restore sends a whole transaction at once.
        """
        return self._connect(
            KafkaProducer,
            transactional_id=transactional_id,
            acks="all",
            linger_ms=50,
            batch_size=1024 * 1024,
        )

    def get_admin(self) -> KafkaAdminClient:
        return self._connect(KafkaAdminClient)

    def offset_bounds(self, topic: str) -> dict[int, tuple[int, int]]:
        """Each partition's first retained offset and last stable offset.

        The last stable offset ends what is committed: it stays below an open transaction.
        """
        consumer = self.get_consumer()
        try:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                raise ConfigError(
                    f"Kafka topic {topic!r} does not exist on {self.bootstrap_servers} "
                    "(check PROTOAGG_TOPICS)"
                )
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            begins = consumer.beginning_offsets(tps)
            ends = consumer.end_offsets(tps)
            return {tp.partition: (begins[tp], ends[tp]) for tp in tps}
        except KafkaError as exc:
            raise BackendError(f"Kafka offsets of {topic!r} failed: {exc}") from exc
        finally:
            consumer.close()

    def _connect(self, factory: Any, **extra: Any) -> Any:
        try:
            return factory(**self._common(), **extra)
        except KafkaError as exc:
            raise BackendError(
                f"no Kafka broker answers at {self.bootstrap_servers} "
                "(check PROTOAGG_KAFKA_BOOTSTRAP, or start one with `protoagg services up`)"
            ) from exc
