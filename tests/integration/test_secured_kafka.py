"""Both clients against the secured broker: every login works, every refusal says what is wrong.

Wrong password, wrong CA, no client certificate, no ACLs and no broker are five different
sentences, each within 10 s, each naming the setting (or the ACL) to fix; a refusal is a
``ConfigError`` (nothing retries it), an unreachable broker a ``BackendError`` (retried).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from protoagg_dagster.cli.doctor import Deployment, Finding
from protoagg_dagster.cli.doctor import _kafka as doctor_kafka
from protoagg_dagster.core.errors import AccessRefused, BackendError, ConfigError
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.settings import KAFKA_CLIENTS
from protoagg_dagster.resources import GCSResource, KafkaResource
from tests.conftest import Services
from tests.helpers import log_value
from tests.support.dagster_web import free_port
from tests.support.secured_kafka import NOBODY, USER, SecuredKafka, unsecured_token

Env = Callable[[SecuredKafka], dict[str, str]]


def _without_certificate(secured: SecuredKafka) -> dict[str, str]:
    return {k: v for k, v in secured.mtls_env().items() if "CERT" not in k and "_KEY" not in k}


# case: (settings, exception type, how the message starts, what it names to fix)
REFUSALS: dict[str, tuple[Env, type[Exception], str, str]] = {
    "wrong password": (
        lambda s: s.scram_env(password="not-the-password"),
        AccessRefused,
        "Kafka authentication failed at",
        "Check PROTOAGG_KAFKA_SASL_USERNAME and PROTOAGG_KAFKA_SASL_PASSWORD",
    ),
    "wrong CA": (
        lambda s: {**s.scram_env(), "PROTOAGG_KAFKA_SSL_CAFILE": str(s.pki.other_ca)},
        AccessRefused,
        "TLS verification of the Kafka broker 127.0.0.1:",
        "subject CN=broker, issued by CN=protoagg test CA",
    ),
    "no client certificate": (
        _without_certificate,
        AccessRefused,
        "Kafka authentication failed at",
        "Check PROTOAGG_KAFKA_SSL_CERTFILE",
    ),
    "no ACLs": (
        lambda s: s.scram_env(user=NOBODY),
        AccessRefused,
        f"Kafka refused User:{NOBODY}: not authorized",
        "Grant it the ACL",
    ),
    "no broker": (
        lambda s: {**s.scram_env(), "PROTOAGG_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"},
        BackendError,
        "no Kafka broker answers at",
        "check PROTOAGG_KAFKA_BOOTSTRAP",
    ),
}


def _read_offsets(kafka: KafkaResource, topic: str) -> None:
    """What the sensor and a run ask first: kafka-python's offsets, librdkafka's first read."""
    if kafka.client == "kafka-python":
        kafka.offset_bounds(topic)
        return
    reader = kafka.get_reader()
    try:
        for _chunk in reader.read_chunks(OffsetRange(topic, 0, 0, 1), 1 << 20, 10.0):
            pass
    finally:
        reader.close()


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
@pytest.mark.parametrize("case", REFUSALS)
def test_each_refusal_is_its_own_sentence_within_ten_seconds(
    secured_kafka: SecuredKafka, unique: str, case: str, client: str
) -> None:
    topic = f"sec-{unique}"
    secured_kafka.create_topic(topic)
    settings, kind, starts, names = REFUSALS[case]
    kafka = secured_kafka.resource(settings(secured_kafka), topics=topic, client=client)
    started = time.monotonic()
    with pytest.raises(kind) as refused:
        _read_offsets(kafka, topic)
    seconds = time.monotonic() - started
    message = str(refused.value)
    print(f"{case} ({client}, {seconds:.1f} s): {message}")
    assert seconds < 10
    assert message.startswith(starts)
    assert names in message
    assert "\n" not in message
    # A refusal is a ConfigError, so neither a retry policy nor run retries repeat it.
    assert isinstance(refused.value, ConfigError) == (kind is AccessRefused)


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_scram_and_mutual_tls_logins_read_with_both_clients(
    secured_kafka: SecuredKafka, unique: str, client: str
) -> None:
    topic = f"sec-{unique}"
    secured_kafka.create_topic(topic)
    writer = secured_kafka.resource(secured_kafka.scram_env(), topics=topic)
    producer = writer.get_producer()
    for i in range(3):
        producer.send(topic, value=log_value(message=f"#{i}"), partition=0)
    producer.flush()
    producer.close()
    for env in (secured_kafka.scram_env(), secured_kafka.mtls_env()):
        kafka = secured_kafka.resource(env, topics=topic, client=client)
        assert kafka.offset_bounds(topic) == {0: (0, 3)}
        reader = kafka.get_reader()
        try:
            chunks = reader.read_chunks(OffsetRange(topic, 0, 0, 3), 1 << 20, 30.0)
            assert [m.offset for chunk in chunks for m in chunk] == [0, 1, 2]
        finally:
            reader.close()


class _TokenEndpoint(BaseHTTPRequestHandler):
    """An OIDC token endpoint granting client credentials ``protoagg:oidc-secret``."""

    def do_POST(self) -> None:
        import base64

        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        wanted = "Basic " + base64.b64encode(b"protoagg:oidc-secret").decode()
        if self.headers.get("Authorization") != wanted:
            self._answer(401, {"error": "invalid_client"})
            return
        self._answer(200, {"access_token": unsecured_token(USER), "expires_in": 3600})

    def _answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def token_url() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/token"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_oauthbearer_tokens_from_an_oidc_endpoint_log_both_clients_in(
    secured_kafka: SecuredKafka, unique: str, token_url: str, client: str
) -> None:
    topic = f"sec-{unique}"
    secured_kafka.create_topic(topic)
    env = {
        "PROTOAGG_KAFKA_BOOTSTRAP": secured_kafka.sasl_bootstrap,
        "PROTOAGG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "PROTOAGG_KAFKA_SASL_MECHANISM": "OAUTHBEARER",
        "PROTOAGG_KAFKA_SSL_CAFILE": str(secured_kafka.pki.ca),
        "PROTOAGG_KAFKA_OAUTH_PROVIDER": "oidc",
        "PROTOAGG_KAFKA_OAUTH_TOKEN_URL": token_url,
        "PROTOAGG_KAFKA_OAUTH_CLIENT_ID": "protoagg",
        "PROTOAGG_KAFKA_OAUTH_CLIENT_SECRET": "oidc-secret",
    }
    kafka = secured_kafka.resource(env, topics=topic, client=client)
    producer = kafka.get_producer()
    producer.send(topic, value=log_value(), partition=0)
    producer.flush()
    producer.close()
    assert kafka.offset_bounds(topic) == {0: (0, 1)}  # the token's subject holds the ACLs
    _read_offsets(kafka, topic)
    wrong = {**env, "PROTOAGG_KAFKA_OAUTH_CLIENT_SECRET": "wrong"}
    refused = secured_kafka.resource(wrong, topics=topic, client=client)
    with pytest.raises(AccessRefused, match=r"token endpoint .* refused the client credentials"):
        _read_offsets(refused, topic)


def test_doctor_names_the_acls_a_principal_lacks(
    secured_kafka: SecuredKafka, unique: str, services: Services
) -> None:
    topic = f"sec-{unique}"
    secured_kafka.create_topic(topic)

    def kafka_findings(env: dict[str, str]) -> list[Finding]:
        deployment = Deployment(
            kafka=secured_kafka.resource(env, topics=topic),
            postgres_dsn="",
            gcs=GCSResource(bucket=services.bucket, emulator_host=services.gcs_url),
            linger_seconds=1.0,
            dagster_yaml=None,
        )
        return list(doctor_kafka(deployment))

    ok = kafka_findings(secured_kafka.scram_env())
    assert [f.status for f in ok] == ["OK", "OK"]
    assert f"User:{USER} may DESCRIBE and READ it" in ok[1].detail
    answer, refused = kafka_findings(secured_kafka.scram_env(user=NOBODY))
    assert answer.status == "OK"
    assert (refused.status, refused.check) == ("FAIL", "kafka acl")
    assert f"User:{NOBODY} may not DESCRIBE topic '{topic}'" in refused.detail
    assert f"grant User:{NOBODY} DESCRIBE and READ on Topic '{topic}'" in refused.fix
    [wrong] = kafka_findings(secured_kafka.scram_env(password="not-it"))
    assert wrong.status == "FAIL" and "Kafka authentication failed" in wrong.detail
