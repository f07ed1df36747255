"""The Kafka settings reach librdkafka under its own names (no broker needed: nothing connects)."""

from __future__ import annotations

import certifi
import confluent_kafka
import pytest

from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.settings import KAFKA_CLIENT
from protoagg_dagster.resources import KafkaResource

SECURE = {
    "bootstrap_servers": "127.0.0.1:1,127.0.0.2:1",
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "archiver",
    "sasl_password": "s3cret",
    "ssl_cafile": certifi.where(),
}


def test_sasl_and_ssl_settings_map_to_librdkafka_names() -> None:
    config = KafkaResource(**SECURE, client="confluent").confluent_consumer_config()
    assert {
        key: config[key]
        for key in (
            "bootstrap.servers",
            "security.protocol",
            "sasl.mechanism",
            "sasl.username",
            "sasl.password",
            "ssl.ca.location",
        )
    } == {
        "bootstrap.servers": "127.0.0.1:1,127.0.0.2:1",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "archiver",
        "sasl.password": "s3cret",
        "ssl.ca.location": certifi.where(),
    }


def test_the_reader_never_commits_and_reads_committed_records_only() -> None:
    config = KafkaResource(bootstrap_servers="127.0.0.1:1", client="confluent")
    consumer = config.confluent_consumer_config()
    assert consumer["isolation.level"] == "read_committed"
    assert consumer["enable.auto.commit"] is False
    assert consumer["enable.auto.offset.store"] is False
    assert consumer["enable.partition.eof"] is True
    # Unset security settings are left to librdkafka's defaults, not passed empty.
    assert consumer["security.protocol"] == "PLAINTEXT"
    assert not any(key.startswith(("sasl.", "ssl.")) for key in consumer)


def test_librdkafka_accepts_the_secure_consumer_config() -> None:
    # Built without connecting: ConfluentReader itself waits for the brokers.
    config = KafkaResource(**SECURE, client="confluent").confluent_consumer_config()
    confluent_kafka.Consumer(config).close()


def test_a_setting_librdkafka_refuses_is_a_config_error() -> None:
    kafka = KafkaResource(
        bootstrap_servers="127.0.0.1:1",
        properties='{"librdkafka:no.such.property": 1}',
        client="confluent",
    )
    with pytest.raises(ConfigError, match="Kafka consumer cannot start"):
        kafka.get_reader()


def test_kafka_python_stays_the_default_client() -> None:
    assert KAFKA_CLIENT.read({}) == "kafka-python"
    assert KafkaResource(bootstrap_servers="127.0.0.1:1").client == "kafka-python"


def test_an_unknown_client_is_refused_for_the_reader_too() -> None:
    kafka = KafkaResource(bootstrap_servers="127.0.0.1:1", client="kafka-java")
    with pytest.raises(ConfigError, match="PROTOAGG_KAFKA_CLIENT"):
        kafka.get_reader()
