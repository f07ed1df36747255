"""Kafka: consumers that read assigned ranges, producers and admin.

``client`` (PROTOAGG_KAFKA_CLIENT) picks kafka-python or librdkafka (``confluent-kafka``) for the
archive read path (``get_reader``) and restore's transactional producer. The sensor's offset
look-ups, verification, backfill and the admin calls stay on kafka-python: they handle a few
requests per tick, not a message at a time.

Every client, of either library, is configured from ``client_settings()`` (one
``KafkaClientSettings``): the Dagster definitions build this resource with ``EnvVar`` secrets,
the CLI with ``from_env()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import confluent_kafka
import dagster as dg
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from pydantic import Field

from protoagg_dagster.core import settings
from protoagg_dagster.core.errors import AccessRefused, BackendError, ConfigError
from protoagg_dagster.core.formats import has_patterns, parse_topics, select_topics
from protoagg_dagster.core.kafka_client import FIELD_SETTINGS, KafkaClientSettings, not_authorized
from protoagg_dagster.core.settings import KAFKA_CLIENTS
from protoagg_dagster.kafka import clients
from protoagg_dagster.kafka.confluent_reader import ConfluentReader
from protoagg_dagster.kafka.producers import ConfluentTransactionalProducer, TransactionalProducer
from protoagg_dagster.kafka.reader import KafkaPythonReader, RangeReader
from protoagg_dagster.resources.kafka_tokens import token_source

log = logging.getLogger(__name__)
TOPIC_AUTHORIZATION_FAILED = 29  # Kafka's error code
_warned: set[str] = set()


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
    # The security fields are KafkaClientSettings' (core.kafka_client), each the setting of
    # FIELD_SETTINGS; secrets come as EnvVars, so Dagster stores and shows only their names.
    sasl_mechanism: str | None = Field(
        default=None, description="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER."
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: str | None = Field(default=None, description="SASL password (use an EnvVar).")
    ssl_cafile: str | None = Field(
        default=None, description="CA bundle for SSL; unset: the system's CA store."
    )
    ssl_certfile: str | None = Field(default=None, description="Client certificate (mTLS).")
    ssl_keyfile: str | None = Field(default=None, description="Client private key (mTLS).")
    ssl_key_password: str | None = Field(
        default=None, description="Password of the client key (use an EnvVar)."
    )
    ssl_check_hostname: str = Field(
        default="true", description="Check the broker certificate's host name (true/false)."
    )
    oauth_provider: str | None = Field(
        default=None, description="OAUTHBEARER token provider: gcp or oidc."
    )
    oauth_token_url: str | None = Field(default=None, description="oidc: token endpoint.")
    oauth_client_id: str | None = Field(default=None, description="oidc: client id.")
    oauth_client_secret: str | None = Field(
        default=None, description="oidc: client secret (use an EnvVar)."
    )
    oauth_scope: str | None = Field(default=None, description="oidc: scopes, space separated.")
    properties: str | None = Field(
        default=None,
        description="More client properties: a JSON object of Kafka's dotted names "
        "(PROTOAGG_KAFKA_PROPERTIES).",
    )
    request_timeout_ms: int = Field(default=30_000, description="Broker request timeout.")
    fetch_max_bytes: int = Field(
        default=64 * 1024 * 1024, description="Upper bound on one fetch response."
    )
    client: str = Field(
        default="kafka-python",
        description="Client library of the archive read path and restore's transactional "
        "producer: kafka-python or confluent (librdkafka, several times fewer CPU microseconds "
        "per message).",
    )

    @classmethod
    def from_env(cls, bootstrap: str | None = None, topics: str | None = None) -> KafkaResource:
        """The resource the environment's settings describe (the CLI's way; no Dagster)."""
        values: dict[str, Any] = {name: s.read() for name, s in FIELD_SETTINGS.items()}
        if bootstrap:
            values["bootstrap_servers"] = bootstrap
        return cls(
            **values,
            topics=topics if topics is not None else settings.TOPICS.read(),
            client=settings.KAFKA_CLIENT.read(),
        )

    def client_settings(self) -> KafkaClientSettings:
        """The checked settings every client is built from; warns once of an unsafe one."""
        values = {name: getattr(self, name) or "" for name in KafkaClientSettings.field_names()}
        client = KafkaClientSettings(**values)
        for warning in client.check():
            if warning not in _warned:
                _warned.add(warning)
                log.warning(warning)
        return client

    def topic_list(self, consumer: KafkaConsumer | None = None) -> list[str]:
        """The topics to archive now: the named ones, and those the patterns match today.

        ``consumer``: a ``get_consumer()`` to ask (and leave open), else a new one.
        """
        rules = parse_topics(self.topics)
        if not has_patterns(rules):
            return select_topics(rules, [])
        with self._consumer_for(consumer) as asked:
            try:
                existing = asked.topics()
            except KafkaError as exc:
                raise BackendError(f"listing Kafka topics failed: {exc}") from exc
        return select_topics(rules, existing)

    @contextmanager
    def _consumer_for(self, consumer: KafkaConsumer | None) -> Iterator[KafkaConsumer]:
        """``consumer`` as it is, else a new ``get_consumer()`` closed afterwards.

        A new consumer spends ~0.1 s fetching metadata before its first answer; a caller asking
        several questions in a row (the sensor, each tick) passes one.
        """
        if consumer is not None:
            yield consumer
            return
        fresh = self.get_consumer()
        try:
            yield fresh
        finally:
            fresh.close()

    def get_consumer(self) -> KafkaConsumer:
        """A group-less consumer: offsets are chosen by assign + seek, never committed.

        It reads committed records only, and its end offsets are the last stable offsets: an open
        transaction holds its partition back, an aborted one is never archived.
        """
        return self._consumer("read_committed")

    def get_reader(self) -> RangeReader:
        """The archive read path's client (``client``), read_committed either way."""
        if self._client() == "confluent":
            return ConfluentReader(
                self.confluent_consumer_config(),
                self.request_timeout_ms / 1000,
                self.client_settings(),
            )
        return KafkaPythonReader(self.get_consumer())

    def confluent_consumer_config(self) -> dict[str, Any]:
        """librdkafka's settings for ``get_consumer``'s behaviour: assigned, never committed."""
        return {
            **self._confluent_common(),
            # librdkafka wants a group even for a consumer that is only ever assigned: nothing
            # joins it, and with no commits it never holds an offset.
            "group.id": "protoagg-reader",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            # Tells a read that ends on offsets holding no record that nothing more is coming.
            "enable.partition.eof": True,
            "socket.timeout.ms": self.request_timeout_ms,
            "fetch.max.bytes": self.fetch_max_bytes,
            "max.partition.fetch.bytes": min(self.fetch_max_bytes, 16 * 1024 * 1024),
            # Prefetch a whole default batch (200,000 messages) while Python builds messages.
            "queued.min.messages": 200_000,
        }

    def _confluent_common(self) -> dict[str, Any]:
        client = self.client_settings()
        return {
            "client.id": "protoagg",
            **clients.librdkafka_config(client, token_source(client)),
        }

    def _client(self) -> str:
        if self.client not in KAFKA_CLIENTS:
            raise ConfigError(
                f"PROTOAGG_KAFKA_CLIENT must be one of {', '.join(KAFKA_CLIENTS)}, "
                f"got {self.client!r}"
            )
        return self.client

    def high_watermarks(self, topic: str, partitions: list[int]) -> dict[int, int]:
        """The offset after the last record written, committed or not, of each partition.

        Above the last stable offset by what open transactions hold.
        """
        return self.topics_high_watermarks({topic: partitions})[topic]

    def topics_high_watermarks(
        self, partitions: Mapping[str, list[int]]
    ) -> dict[str, dict[int, int]]:
        """``high_watermarks`` of several topics, asked through one consumer."""
        consumer = self._consumer("read_uncommitted")
        try:
            tps = [TopicPartition(t, p) for t, numbers in partitions.items() for p in numbers]
            ends = consumer.end_offsets(tps) if tps else {}
        except KafkaError as exc:
            raise BackendError(
                f"Kafka high watermarks of {', '.join(map(repr, partitions))} failed: {exc}"
            ) from exc
        finally:
            consumer.close()
        found: dict[str, dict[int, int]] = {topic: {} for topic in partitions}
        for tp, end in ends.items():
            found[tp.topic][tp.partition] = end
        return found

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

    def get_transactional_producer(self, transactional_id: str) -> TransactionalProducer:
        """A producer whose writes become visible only with ``commit_transaction``.

        Larger batches than ``get_producer``: a restore sends a whole transaction at once.
        """
        if self._client() == "confluent":
            return self._confluent_producer(transactional_id)
        producer: TransactionalProducer = self._connect(
            KafkaProducer,
            transactional_id=transactional_id,
            acks="all",
            linger_ms=50,
            batch_size=1024 * 1024,
        )
        return producer

    def _confluent_producer(self, transactional_id: str) -> ConfluentTransactionalProducer:
        config: dict[str, Any] = {
            **self._confluent_common(),
            "transactional.id": transactional_id,
            "request.timeout.ms": self.request_timeout_ms,
            # Java's and kafka-python's partitioner, should a record carry no partition.
            "partitioner": "murmur2_random",
            "linger.ms": 50,
            "batch.size": 1024 * 1024,
        }
        try:
            return ConfluentTransactionalProducer(config, self.client_settings())
        except confluent_kafka.KafkaException as exc:
            raise BackendError(f"the Kafka producer cannot start: {exc}") from exc

    def get_admin(self) -> KafkaAdminClient:
        return self._connect(KafkaAdminClient)

    def offset_bounds(
        self, topic: str, consumer: KafkaConsumer | None = None
    ) -> dict[int, tuple[int, int]]:
        """Each partition's first retained offset and last stable offset.

        The last stable offset ends what is committed: it stays below an open transaction.
        ``consumer``: a ``get_consumer()`` to ask (and leave open), else a new one.
        """
        with self._consumer_for(consumer) as asked:
            try:
                partitions = asked.partitions_for_topic(topic)
                if not partitions:
                    self._refuse_unauthorized(topic)
                    raise ConfigError(
                        f"Kafka topic {topic!r} does not exist on {self.bootstrap_servers} "
                        "(check PROTOAGG_TOPICS)"
                    )
                tps = [TopicPartition(topic, p) for p in sorted(partitions)]
                begins = asked.beginning_offsets(tps)
                ends = asked.end_offsets(tps)
                return {tp.partition: (begins[tp], ends[tp]) for tp in tps}
            except KafkaError as exc:
                self.raise_refusal(exc, f"READ and DESCRIBE on Topic {topic!r}")
                raise BackendError(f"Kafka offsets of {topic!r} failed: {exc}") from exc

    def _refuse_unauthorized(self, topic: str) -> None:
        """Raise a refusal if ``topic`` looked absent only because we may not describe it."""
        # A consumer's metadata leaves out the topics it may not describe, as if they did not
        # exist; only a request naming the topic gets the broker's TOPIC_AUTHORIZATION_FAILED.
        admin = self.get_admin()
        try:
            described = admin.describe_topics([topic])
        except KafkaError:
            return
        finally:
            admin.close()
        if any(d.get("error_code") == TOPIC_AUTHORIZATION_FAILED for d in described):
            raise AccessRefused(
                not_authorized(
                    self.client_settings(),
                    f"DESCRIBE and READ on Topic {topic!r}",
                    "TOPIC_AUTHORIZATION_FAILED",
                )
            )

    def raise_refusal(self, exc: BaseException, needs: str) -> None:
        """Raise ``exc`` (kafka-python's) as a refusal if it is one; ``needs``: the ACL."""
        refusal = clients.refusal_of(self.client_settings(), exc, needs)
        if refusal is not None:
            raise refusal from exc

    def _connect(self, factory: Any, **extra: Any) -> Any:
        client = self.client_settings()
        return clients.connect(
            client,
            factory,
            token_source(client),
            request_timeout_ms=self.request_timeout_ms,
            client_id="protoagg",
            **extra,
        )
