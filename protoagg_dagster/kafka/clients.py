"""Every Kafka client protoagg opens, from one ``KafkaClientSettings``; refusals in plain words.

kafka-python retries a failed bootstrap until its timeout and then says only "Unable to
bootstrap"; the reason (a refused login, an untrusted certificate) is in its log. ``connect``
keeps those log records while a client bootstraps and turns the most telling one into one of
four refusals: authentication failed, TLS verification failed, not authorized, unreachable.
Often kafka-python reads only "socket disconnected" where the broker refused a login (it closes
the connection right after its answer): then librdkafka, which always reads the answer, asks
once more to tell why.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import confluent_kafka
from cryptography import x509
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import errors as kafka_errors
from kafka.net.sasl.oauth import AbstractTokenProvider

from protoagg_dagster.core import kafka_client as refusals
from protoagg_dagster.core import settings
from protoagg_dagster.core.errors import AccessRefused, BackendError, ConfigError
from protoagg_dagster.core.kafka_client import KafkaClientSettings

# How long a client may take to reach a broker and log in. A broker that answers does so in well
# under a second; a refusal must reach the user within 10 s, and an unreachable broker is retried
# by the caller (the op's retry policy, the sensor's next tick).
BOOTSTRAP_TIMEOUT_MS = 6_000
# kafka-python's default (30 s) doubles its wait after each refused connection, once for the
# broker and again for the metadata refresh that needs it: a connected client found a broker
# back from a 25 s restart only ~27 s later (a 60 s outage: ~33 s), where librdkafka took under
# a second. Java's client caps it at 1 s too; one connection attempt a second is nothing.
RECONNECT_BACKOFF_MAX_MS = 1_000
# librdkafka's second look after kafka-python's bootstrap failed: a refusal comes in under 1 s.
DIAGNOSIS_SECONDS = 3.0
_KAFKA_PYTHON_CLASSES = (KafkaConsumer, KafkaProducer, KafkaAdminClient)


class TokenSource(Protocol):
    """An OAUTHBEARER token provider: a token and when it expires (epoch seconds)."""

    def token(self) -> tuple[str, float]: ...


class _KafkaPythonTokens(AbstractTokenProvider):  # type: ignore[misc]
    """kafka-python's token provider interface over a ``TokenSource``."""

    def __init__(self, source: TokenSource) -> None:
        super().__init__()
        self._source = source

    def token(self) -> str:
        return self._source.token()[0]


def kafka_python_config(
    client: KafkaClientSettings, factory: Any, tokens: TokenSource | None
) -> dict[str, Any]:
    """``factory``'s (KafkaConsumer, KafkaProducer or KafkaAdminClient) keyword arguments."""
    options = client.kafka_python_options()
    options["bootstrap_timeout_ms"] = BOOTSTRAP_TIMEOUT_MS
    options["reconnect_backoff_max_ms"] = RECONNECT_BACKOFF_MAX_MS
    if client.uses_sasl and client.sasl_mechanism == "OAUTHBEARER":
        options["sasl_oauth_token_provider"] = _KafkaPythonTokens(_require(tokens))
    for dotted, value in client.client_properties("kafka-python").items():
        name = dotted.replace(".", "_")
        if name in factory.DEFAULT_CONFIG:
            options[name] = value
        elif not any(name in cls.DEFAULT_CONFIG for cls in _KAFKA_PYTHON_CLASSES):
            raise ConfigError(
                f"kafka-python has no property {dotted!r} ({settings.KAFKA_PROPERTIES.env}); "
                f"name it 'librdkafka:{dotted}' to give it to librdkafka only "
                f"({settings.KAFKA_CLIENT.env}=confluent)"
            )
    return options


def librdkafka_config(client: KafkaClientSettings, tokens: TokenSource | None) -> dict[str, Any]:
    """librdkafka's properties, with the OAUTHBEARER token callback when one is needed."""
    options = client.librdkafka_options()
    if client.uses_sasl and client.sasl_mechanism == "OAUTHBEARER":
        source = _require(tokens)

        def oauth_cb(_config: str) -> tuple[str, float]:
            return source.token()

        options["oauth_cb"] = oauth_cb
    return options


def _require(tokens: TokenSource | None) -> TokenSource:
    """``tokens``, with a token in hand.

    A provider that cannot give one fails here, in words, not inside a client that would retry
    the login until its timeout.
    """
    if tokens is None:  # KafkaClientSettings.check() refuses OAUTHBEARER without a provider
        raise ConfigError(f"SASL OAUTHBEARER needs {settings.KAFKA_OAUTH_PROVIDER.env}")
    tokens.token()  # kept by the provider for the client's own call
    return tokens


def connect(
    client: KafkaClientSettings, factory: Any, tokens: TokenSource | None, **extra: Any
) -> Any:
    """A kafka-python ``factory`` client, bootstrapped, or the reason it cannot be."""
    options = {**kafka_python_config(client, factory, tokens), **extra}
    started = time.monotonic()
    with _bootstrap_failures() as failures:
        try:
            return factory(**options)
        except kafka_errors.KafkaError as exc:
            seen = list(failures)
            refusal = _bootstrap_refusal(client, seen, tokens, exc, time.monotonic() - started)
            raise refusal from exc


class _FailureLog(logging.Handler):
    """Keeps the exceptions kafka-python logs while it bootstraps."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        self.seen.extend(arg for arg in args if isinstance(arg, BaseException))


@contextmanager
def _bootstrap_failures() -> Iterator[list[BaseException]]:
    # Its network layer logs every failed attempt with the exception as an argument.
    logger = logging.getLogger("kafka.net")
    handler = _FailureLog()
    logger.addHandler(handler)
    try:
        yield handler.seen
    finally:
        logger.removeHandler(handler)


def _bootstrap_refusal(
    client: KafkaClientSettings,
    failures: list[BaseException],
    tokens: TokenSource | None,
    final: BaseException,
    seconds: float,
) -> BackendError | AccessRefused:
    for failure in failures:
        refusal = refusal_of(client, failure, needs="")
        if refusal is not None:
            return refusal
    # A connection the broker accepted and then closed: TLS or a login went wrong.
    dropped = any("socket disconnected" in str(f) for f in failures)
    if dropped and client.security_protocol != "PLAINTEXT":
        refusal = _librdkafka_diagnosis(client, tokens)
        if refusal is not None:
            return refusal
    # The last thing that went wrong before kafka-python gave up ("Connection refused", ...).
    causes = [f for f in failures if not isinstance(f, kafka_errors.KafkaTimeoutError)]
    return BackendError(refusals.unreachable(client, seconds, str((causes or [final])[-1])))


def _librdkafka_diagnosis(
    client: KafkaClientSettings, tokens: TokenSource | None
) -> AccessRefused | None:
    """The refusal librdkafka meets with the same settings, if any, within a few seconds."""
    errors = LibrdkafkaErrors(client)
    # log_level 0: its own account of the failure on stderr would only repeat ours.
    config = {**librdkafka_config(client, tokens), "error_cb": errors, "log_level": 0}
    try:
        probe = confluent_kafka.Producer(config)
    except (confluent_kafka.KafkaException, ValueError):
        return None
    try:
        errors.await_brokers(probe, timeout=DIAGNOSIS_SECONDS)
    except AccessRefused as refusal:
        return refusal
    except BackendError:
        return None
    finally:
        probe.flush(0)
    return None


def refusal_of(client: KafkaClientSettings, exc: BaseException, needs: str) -> AccessRefused | None:
    """The refusal ``exc`` (kafka-python's) is, if it is one.

    ``needs``: the ACL an authorization error lacks ("" when the caller cannot tell).
    """
    text = str(exc)
    if isinstance(exc, kafka_errors.SaslAuthenticationFailedError):
        return AccessRefused(refusals.authentication_failed(client, _sasl_detail(text)))
    if isinstance(exc, kafka_errors.AuthorizationError):
        return AccessRefused(
            refusals.not_authorized(client, needs or _needs_of(exc), type(exc).__name__)
        )
    return _tls_refusal(client, text)


def _tls_refusal(client: KafkaClientSettings, text: str) -> AccessRefused | None:
    lowered = text.lower()
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        host = settings.split_list(client.bootstrap_servers)[0]
        detail = text.split("certificate verify failed:", 1)[-1].split("(_ssl.c")[0].strip()
        return AccessRefused(refusals.tls_failed(client, host, presented_certificate(host), detail))
    if any(alert in lowered for alert in _CLIENT_CERTIFICATE_ALERTS):
        return AccessRefused(refusals.client_certificate_refused(client))
    return None


# TLS alerts a broker sends when mutual TLS fails on the client's side (no or untrusted cert).
_CLIENT_CERTIFICATE_ALERTS = (
    "alert certificate required",
    "tlsv13_alert_certificate_required",
    "alert bad certificate",
    "alert unknown ca",
    "certificate_required",
)


def _sasl_detail(text: str) -> str:
    # kafka-python prefixes the broker's sentence with two class names.
    return text.rsplit("SaslAuthenticationFailedError:", 1)[-1].strip() or text


def _needs_of(exc: BaseException) -> str:
    """The ACL an authorization error names, as far as its type tells."""
    subject = (
        ", ".join(sorted(map(str, exc.args[0])))
        if exc.args and isinstance(exc.args[0], set | list | tuple)
        else ""
    )
    if isinstance(exc, kafka_errors.TopicAuthorizationFailedError):
        return f"READ and DESCRIBE (WRITE to produce) on Topic {subject}".rstrip()
    if isinstance(exc, kafka_errors.TransactionalIdAuthorizationFailedError):
        return "WRITE and DESCRIBE on the TransactionalId (prefix protoagg-restore-)"
    if isinstance(exc, kafka_errors.ClusterAuthorizationFailedError):
        return "IDEMPOTENT_WRITE on the Cluster (CREATE to create topics)"
    if isinstance(exc, kafka_errors.GroupAuthorizationFailedError):
        return f"READ on Group {subject}".rstrip()
    return "named in docs/operations.md"


def presented_certificate(host_port: str) -> str | None:
    """Subject, issuer and expiry of the certificate ``host_port`` presents, unverified."""
    host, _, port = host_port.rpartition(":")
    try:
        pem = ssl.get_server_certificate((host, int(port)), timeout=3)
        cert = x509.load_pem_x509_certificate(pem.encode())
    except (OSError, ValueError):
        return None
    until = cert.not_valid_after_utc.date().isoformat()
    return (
        f"subject {cert.subject.rfc4514_string()}, issued by {cert.issuer.rfc4514_string()}, "
        f"valid until {until}"
    )


# -- librdkafka ----------------------------------------------------------------------------------

_RD = confluent_kafka.KafkaError
_RD_AUTHORIZATION = {
    _RD.TOPIC_AUTHORIZATION_FAILED: "READ and DESCRIBE (WRITE to produce) on the Topic",
    _RD.CLUSTER_AUTHORIZATION_FAILED: "IDEMPOTENT_WRITE on the Cluster",
    _RD.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: (
        "WRITE and DESCRIBE on the TransactionalId (prefix protoagg-restore-)"
    ),
}


def librdkafka_refusal(
    client: KafkaClientSettings, error: confluent_kafka.KafkaError, needs: str = ""
) -> AccessRefused | None:
    """The refusal librdkafka's ``error`` is, if it is one."""
    code, text = error.code(), error.str()
    if code == _RD._AUTHENTICATION:
        detail = text.split("SASL authentication error:", 1)[-1].split("(after")[0].strip()
        if "ssl" in text.lower() and not client.uses_sasl:
            return _tls_refusal(client, text) or AccessRefused(
                refusals.authentication_failed(client, text)
            )
        return AccessRefused(refusals.authentication_failed(client, detail))
    if code in (_RD._SSL, _RD._TRANSPORT):
        return _tls_refusal(client, text)
    if code in _RD_AUTHORIZATION:
        return AccessRefused(
            refusals.not_authorized(client, needs or _RD_AUTHORIZATION[code], error.name())
        )
    return None


class LibrdkafkaErrors:
    """librdkafka's ``error_cb``: keeps the first refusal and the last error it reports.

    librdkafka retries everything in the background and reports why only to this callback; a
    refusal does not heal by retrying, so the client's next step raises it.
    """

    def __init__(self, client: KafkaClientSettings) -> None:
        self.client = client
        self.refusal: AccessRefused | None = None
        self.last: confluent_kafka.KafkaError | None = None

    def __call__(self, error: confluent_kafka.KafkaError) -> None:
        self.last = error
        if self.refusal is None:
            self.refusal = librdkafka_refusal(self.client, error)

    def check(self) -> None:
        if self.refusal is not None:
            raise self.refusal

    def await_brokers(
        self,
        handle: confluent_kafka.Consumer | confluent_kafka.Producer,
        timeout: float = BOOTSTRAP_TIMEOUT_MS / 1000,
    ) -> None:
        """Return once ``handle`` has the cluster's metadata; raise a refusal or unreachable."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            try:
                handle.list_topics(timeout=0.5)
                return
            except confluent_kafka.KafkaException:
                pass
            handle.poll(0)  # serves error_cb
            self.check()
            if time.monotonic() > deadline:
                detail = self.last.str() if self.last is not None else "no answer"
                raise BackendError(
                    refusals.unreachable(self.client, time.monotonic() - started, detail)
                )
