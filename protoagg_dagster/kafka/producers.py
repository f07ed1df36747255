"""Transactional producers for restore: kafka-python's and librdkafka's, behind one protocol."""

from __future__ import annotations

from typing import Any, Protocol

import confluent_kafka

from protoagg_dagster.core.errors import BackendError
from protoagg_dagster.core.kafka_client import KafkaClientSettings
from protoagg_dagster.kafka.clients import LibrdkafkaErrors, librdkafka_refusal

Headers = list[tuple[str, bytes | None]]


class TransactionalProducer(Protocol):
    """What a restore needs of a transactional producer; kafka-python's ``KafkaProducer`` has it.

    Errors are ``BackendError`` or kafka-python's ``KafkaError`` (wrapped by the caller).
    """

    def init_transactions(self) -> None: ...

    def begin_transaction(self) -> None: ...

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> object: ...

    def commit_transaction(self) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


class ConfluentTransactionalProducer:
    """librdkafka's transactional producer behind ``TransactionalProducer``.

    ``send`` hands a record to librdkafka's queue without a future per record; a failed delivery
    fails the transaction's ``commit_transaction``, so no per-record callback is needed.
    """

    def __init__(self, config: dict[str, Any], client: KafkaClientSettings) -> None:
        self._client = client
        self._errors = LibrdkafkaErrors(client)
        self._producer = confluent_kafka.Producer({**config, "error_cb": self._errors})
        self._errors.await_brokers(self._producer)

    def init_transactions(self) -> None:
        self._call(self._producer.init_transactions)

    def begin_transaction(self) -> None:
        self._call(self._producer.begin_transaction)

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        # -1 lets librdkafka's partitioner choose. librdkafka reads timestamp 0 as "now", so a
        # record archived with timestamp 0 gets the send time (kafka-python would keep 0).
        part = -1 if partition is None else partition
        while True:
            try:
                self._producer.produce(
                    topic,
                    value,
                    key,
                    part,
                    timestamp=timestamp_ms or 0,
                    # Its stubs want str | bytes values in a list, which list invariance
                    # will not take from our bytes-only headers.
                    headers=headers,  # type: ignore[arg-type]
                )
                break
            except BufferError:
                # The local queue is full: let the sender drain it, then retry this record.
                self._producer.poll(0.05)
            except confluent_kafka.KafkaException as exc:
                self._raise_refusal(exc, f"WRITE on Topic {topic!r}")
                raise BackendError(f"Kafka refused a record for {topic!r}: {exc}") from exc
        # Serves delivery reports so librdkafka's queue of them does not grow without bound.
        self._producer.poll(0)

    def commit_transaction(self) -> None:
        self._call(self._producer.commit_transaction)

    def close(self, timeout: float | None = None) -> None:
        self._producer.flush(-1 if timeout is None else timeout)

    def _call(self, step: Any) -> None:
        try:
            step()
        except confluent_kafka.KafkaException as exc:
            self._raise_refusal(exc, "")
            raise BackendError(f"Kafka transaction step failed: {exc}") from exc

    def _raise_refusal(self, exc: confluent_kafka.KafkaException, needs: str) -> None:
        self._errors.check()
        error = exc.args[0] if exc.args else None
        if isinstance(error, confluent_kafka.KafkaError):
            refusal = librdkafka_refusal(self._client, error, needs)
            if refusal is not None:
                raise refusal from exc
