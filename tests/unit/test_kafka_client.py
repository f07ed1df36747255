"""One Kafka client configuration: checks, both clients' names, refusals, tokens (no broker)."""

from __future__ import annotations

import base64
import datetime
import json
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import errors as kafka_errors

from protoagg_dagster.archive import tick_backoff
from protoagg_dagster.core import kafka_client
from protoagg_dagster.core.errors import AccessRefused, BackendError, ConfigError
from protoagg_dagster.core.kafka_client import KafkaClientSettings, gcp_kafka_token
from protoagg_dagster.kafka import clients
from protoagg_dagster.resources import kafka_tokens
from protoagg_dagster.resources.kafka_tokens import CachedToken

BOOT = "broker-1:9093,broker-2:9093"
SCRAM = {
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "archiver",
    "sasl_password": "pw",
}
MTLS = {
    "security_protocol": "SSL",
    "ssl_cafile": "/ca.pem",
    "ssl_certfile": "/client.pem",
    "ssl_keyfile": "/client.key",
    "ssl_key_password": "kpw",
}


def settings(**fields: str) -> KafkaClientSettings:
    return KafkaClientSettings(bootstrap_servers=BOOT, **fields)


@pytest.mark.parametrize(
    ("fields", "refused_with"),
    [
        ({}, None),
        (SCRAM, None),
        (MTLS, None),
        ({**SCRAM, "sasl_mechanism": "OAUTHBEARER", "oauth_provider": "gcp"}, None),
        ({"security_protocol": "SASL_PLAIN"}, "PROTOAGG_KAFKA_SECURITY_PROTOCOL must be one of"),
        ({"sasl_mechanism": "PLAIN"}, "needs PROTOAGG_KAFKA_SECURITY_PROTOCOL=SASL_SSL"),
        ({**SCRAM, "sasl_mechanism": "GSSAPI"}, "PROTOAGG_KAFKA_SASL_MECHANISM must be one of"),
        ({**SCRAM, "sasl_password": ""}, "SCRAM-SHA-512 needs PROTOAGG_KAFKA_SASL_PASSWORD"),
        ({**SCRAM, "sasl_mechanism": "OAUTHBEARER"}, "PROTOAGG_KAFKA_OAUTH_PROVIDER must be"),
        (
            {**SCRAM, "sasl_mechanism": "OAUTHBEARER", "oauth_provider": "oidc"},
            "oidc token provider needs PROTOAGG_KAFKA_OAUTH_TOKEN_URL",
        ),
        ({"ssl_cafile": "/ca.pem"}, "PROTOAGG_KAFKA_SSL_CAFILE set but"),
        ({**MTLS, "ssl_certfile": ""}, "PROTOAGG_KAFKA_SSL_KEYFILE needs PROTOAGG_KAFKA_SSL_CERTF"),
        ({"properties": "{oops"}, "PROTOAGG_KAFKA_PROPERTIES must be a JSON object"),
        ({"properties": '{"x": [1]}'}, "PROTOAGG_KAFKA_PROPERTIES must be a JSON object of"),
        ({"properties": '{"java:x": 1}'}, "unknown client prefix"),
    ],
)
def test_combinations_no_client_can_connect_with_are_refused(
    fields: dict[str, str], refused_with: str | None
) -> None:
    if refused_with is None:
        assert settings(**fields).check() == []
    else:
        with pytest.raises(ConfigError, match=refused_with):
            settings(**fields).check()


def test_turning_hostname_checks_off_or_plain_passwords_in_clear_warn() -> None:
    [warning] = settings(**MTLS, ssl_check_hostname="false").check()
    assert "PROTOAGG_KAFKA_SSL_CHECK_HOSTNAME=false" in warning
    plain = {**SCRAM, "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"}
    assert "unencrypted" in settings(**plain).check()[0]


def test_mutual_tls_reaches_both_clients_under_their_names() -> None:
    client = settings(**MTLS)
    assert client.kafka_python_options() == {
        "bootstrap_servers": ["broker-1:9093", "broker-2:9093"],
        "security_protocol": "SSL",
        "ssl_check_hostname": True,
        "ssl_cafile": "/ca.pem",
        "ssl_certfile": "/client.pem",
        "ssl_keyfile": "/client.key",
        "ssl_password": "kpw",
    }
    assert client.librdkafka_options() == {
        "bootstrap.servers": BOOT,
        "security.protocol": "SSL",
        "ssl.ca.location": "/ca.pem",
        "ssl.endpoint.identification.algorithm": "https",
        "ssl.certificate.location": "/client.pem",
        "ssl.key.location": "/client.key",
        "ssl.key.password": "kpw",
    }


def test_without_a_ca_file_both_clients_trust_the_system_store() -> None:
    client = settings(**SCRAM, ssl_check_hostname="false")
    assert "ssl_cafile" not in client.kafka_python_options()  # kafka-python: load_default_certs
    assert client.kafka_python_options()["ssl_check_hostname"] is False
    rd = client.librdkafka_options()
    assert rd["ssl.ca.location"] == "probe"
    assert rd["ssl.endpoint.identification.algorithm"] == "none"
    assert (rd["sasl.username"], rd["sasl.password"]) == ("archiver", "pw")


def test_extra_properties_go_to_the_client_they_name() -> None:
    props = json.dumps(
        {
            "connections.max.idle.ms": 60000,
            "librdkafka:socket.keepalive.enable": True,
            "kafka-python:retry.backoff.ms": 50,
        }
    )
    client = settings(properties=props)
    assert client.librdkafka_options()["socket.keepalive.enable"] is True
    assert "retry.backoff.ms" not in client.librdkafka_options()
    consumer = clients.kafka_python_config(client, KafkaConsumer, None)
    assert consumer["connections_max_idle_ms"] == 60000
    assert consumer["retry_backoff_ms"] == 50
    assert "socket_keepalive_enable" not in consumer
    # A property one kafka-python class lacks is left out of that class only...
    fetch = settings(properties='{"fetch.max.bytes": 1024}')
    assert clients.kafka_python_config(fetch, KafkaConsumer, None)["fetch_max_bytes"] == 1024
    assert "fetch_max_bytes" not in clients.kafka_python_config(fetch, KafkaAdminClient, None)
    # ...one no kafka-python class knows is refused, naming the client that takes it.
    unknown = settings(properties='{"socket.keepalive.enable": true}')
    with pytest.raises(ConfigError, match=r"'librdkafka:socket\.keepalive\.enable'"):
        clients.kafka_python_config(unknown, KafkaConsumer, None)


def test_kafka_python_retries_a_lost_broker_at_least_every_second_unless_told() -> None:
    # Its own 30 s cap left a connected reader idle for half a minute after a broker restart.
    for factory in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        assert (
            clients.kafka_python_config(settings(), factory, None)["reconnect_backoff_max_ms"]
            == clients.RECONNECT_BACKOFF_MAX_MS
            == 1000
        )
    slower = settings(properties='{"reconnect.backoff.max.ms": 10000}')
    assert clients.kafka_python_config(slower, KafkaConsumer, None)["reconnect_backoff_max_ms"] == (
        10000
    )


def test_oauthbearer_hands_both_clients_the_token_provider() -> None:
    client = settings(**{**SCRAM, "sasl_mechanism": "OAUTHBEARER", "oauth_provider": "gcp"})
    tokens = CachedToken(lambda: ("tok", 4_000_000_000.0))
    python = clients.kafka_python_config(client, KafkaConsumer, tokens)
    assert "sasl_plain_password" not in python
    assert python["sasl_oauth_token_provider"].token() == "tok"
    rd = clients.librdkafka_config(client, tokens)
    assert "sasl.password" not in rd
    assert rd["oauth_cb"]("") == ("tok", 4_000_000_000.0)


def test_a_cached_token_is_fetched_again_only_near_its_expiry() -> None:
    fetched: list[float] = []

    def fetch() -> tuple[str, float]:
        expiry = 0.0 if not fetched else 4_000_000_000.0  # the first one has expired
        fetched.append(expiry)
        return f"t{len(fetched)}", expiry

    tokens = CachedToken(fetch)
    assert [tokens.token()[0] for _ in range(3)] == ["t1", "t2", "t2"]


def _b64(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_the_gcp_token_is_googles_documented_jwt_wrapping_the_access_token() -> None:
    token = gcp_kafka_token("ya29.access", "arch@p.iam.gserviceaccount.com", 1000.0, 4600.0)
    header, claims, signature = token.split(".")
    assert "=" not in token
    assert _b64(header) == {"typ": "JWT", "alg": "GOOG_OAUTH2_TOKEN"}
    assert _b64(claims) == {
        "exp": 4600.0,
        "iat": 1000.0,
        "iss": "Google",
        "scope": "kafka",
        "sub": "arch@p.iam.gserviceaccount.com",
    }
    assert base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)) == b"ya29.access"


REFUSALS = [
    (
        kafka_errors.SaslAuthenticationFailedError("Authentication failed: invalid credentials"),
        "Kafka authentication failed",
        "PROTOAGG_KAFKA_SASL_PASSWORD",
    ),
    (
        kafka_errors.KafkaConnectionError(
            "Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
            "self-signed certificate in certificate chain (_ssl.c:1006)"
        ),
        "TLS verification of the Kafka broker broker-1:9093 failed",
        "check PROTOAGG_KAFKA_SSL_CAFILE",
    ),
    (
        kafka_errors.KafkaConnectionError(
            "Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
            "Hostname mismatch, certificate is not valid for 'broker-1'. (_ssl.c:1006)"
        ),
        "TLS verification",
        "PROTOAGG_KAFKA_SSL_CHECK_HOSTNAME=false",
    ),
    (
        kafka_errors.KafkaConnectionError(
            "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert certificate required"
        ),
        "Kafka authentication failed",
        "PROTOAGG_KAFKA_SSL_CERTFILE",
    ),
    (
        kafka_errors.TopicAuthorizationFailedError({"logs"}),
        "Kafka refused User:archiver: not authorized",
        "Grant it the ACL READ and DESCRIBE (WRITE to produce) on Topic logs",
    ),
]


@pytest.mark.parametrize(("error", "says", "fix"), REFUSALS)
def test_each_refusal_says_what_is_wrong_and_the_setting_to_fix(
    error: Exception, says: str, fix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clients, "presented_certificate", lambda _host: "subject CN=x")
    refusal = clients.refusal_of(settings(**SCRAM), error, needs="")
    assert isinstance(refusal, AccessRefused)
    assert says in str(refusal)
    assert fix in str(refusal)


def test_a_broker_that_does_not_answer_is_no_refusal() -> None:
    refused = kafka_errors.KafkaConnectionError("[Errno 111] Connection refused")
    assert clients.refusal_of(settings(**SCRAM), refused, needs="") is None
    text = kafka_client.unreachable(settings(**SCRAM), 6.0, "Connection refused")
    assert text.startswith("no Kafka broker answers at broker-1:9093,broker-2:9093 within 6 s")
    assert "PROTOAGG_KAFKA_BOOTSTRAP" in text


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def error(self, line: str) -> None:
        self.lines.append(line)


class FakeContext:
    def __init__(self) -> None:
        self.log = FakeLog()


def test_a_refused_sensor_tick_logs_one_line_and_the_next_ticks_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    failure: list[Exception] = [AccessRefused("Kafka authentication failed at b: nope")]

    @tick_backoff.one_line_failures
    def evaluate(context: FakeContext) -> Any:
        calls.append(1)
        if failure:
            raise failure[0]
        return "ran"

    clock = [100.0]
    monkeypatch.setattr(tick_backoff.time, "monotonic", lambda: clock[0])
    context = FakeContext()
    first = evaluate(context)
    assert first.skip_reason.skip_message == "Kafka authentication failed at b: nope"
    assert context.log.lines == ["Kafka authentication failed at b: nope (asking again in 10 s)"]
    clock[0] += 5
    assert "asking again in 5 s" in evaluate(context).skip_reason.skip_message
    assert len(calls) == 1  # the waiting tick did not ask Kafka
    clock[0] += 6
    evaluate(context)
    assert len(calls) == 2
    assert context.log.lines[-1].endswith("(asking again in 20 s)")  # doubled
    clock[0] += 21
    failure[:] = [BackendError("no Kafka broker answers at b")]
    assert evaluate(context).skip_reason.skip_message == "no Kafka broker answers at b"
    clock[0] += 1
    failure.clear()
    assert evaluate(context) == "ran"  # an unreachable broker is asked again at the next tick


class FakeCredentials:
    """What google.auth.default() hands back for a service account."""

    def __init__(self) -> None:
        self.token: str | None = None
        self.expiry: datetime.datetime | None = None
        self.service_account_email = "archiver@proj.iam.gserviceaccount.com"

    def refresh(self, _request: object) -> None:
        self.token = "ya29.fresh"
        self.expiry = datetime.datetime(2030, 1, 1, 12, 0)  # naive UTC, as google-auth keeps it


def test_the_gcp_provider_wraps_application_default_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import google.auth

    asked: list[object] = []

    def default(scopes: list[str]) -> tuple[FakeCredentials, str]:
        asked.append(scopes)
        return FakeCredentials(), "proj"

    monkeypatch.setattr(google.auth, "default", default)
    token, expiry = kafka_tokens.gcp_token()
    assert asked == [["https://www.googleapis.com/auth/cloud-platform"]]
    header, claims, access = token.split(".")
    assert _b64(header)["alg"] == "GOOG_OAUTH2_TOKEN"
    assert _b64(claims)["sub"] == "archiver@proj.iam.gserviceaccount.com"
    assert base64.urlsafe_b64decode(access + "=" * (-len(access) % 4)) == b"ya29.fresh"
    assert expiry == _b64(claims)["exp"] == 1893499200.0  # 2030-01-01T12:00:00Z
