"""How protoagg connects to Kafka, the same for every entry point.

The settings, checked; the two clients' property names for them; and the words for a broker's
refusals.

The sensor, the ops, the restore job, ``protoagg doctor`` and every CLI command build their clients
from one ``KafkaClientSettings`` (through ``KafkaResource``), so a setting added here reaches all.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from protoagg_dagster.core import settings
from protoagg_dagster.core.errors import ConfigError

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
OAUTH_PROVIDERS = ("gcp", "oidc")
CLIENT_PREFIXES = ("kafka-python:", "librdkafka:")
# What archiving needs on each topic (docs/operations.md, "Least privilege"): no group, no write.
ARCHIVE_TOPIC_OPERATIONS = ("DESCRIBE", "READ")

# The settings of KafkaClientSettings' fields, by field name: definitions.py wires each as an
# EnvVar when set (so no secret is stored by Dagster), the CLI reads them from the environment.
FIELD_SETTINGS: Mapping[str, settings.Setting] = {
    "bootstrap_servers": settings.KAFKA_BOOTSTRAP,
    "security_protocol": settings.KAFKA_SECURITY_PROTOCOL,
    "sasl_mechanism": settings.KAFKA_SASL_MECHANISM,
    "sasl_username": settings.KAFKA_SASL_USERNAME,
    "sasl_password": settings.KAFKA_SASL_PASSWORD,
    "ssl_cafile": settings.KAFKA_SSL_CAFILE,
    "ssl_certfile": settings.KAFKA_SSL_CERTFILE,
    "ssl_keyfile": settings.KAFKA_SSL_KEYFILE,
    "ssl_key_password": settings.KAFKA_SSL_KEY_PASSWORD,
    "ssl_check_hostname": settings.KAFKA_SSL_CHECK_HOSTNAME,
    "oauth_provider": settings.KAFKA_OAUTH_PROVIDER,
    "oauth_token_url": settings.KAFKA_OAUTH_TOKEN_URL,
    "oauth_client_id": settings.KAFKA_OAUTH_CLIENT_ID,
    "oauth_client_secret": settings.KAFKA_OAUTH_CLIENT_SECRET,
    "oauth_scope": settings.KAFKA_OAUTH_SCOPE,
    "properties": settings.KAFKA_PROPERTIES,
}


@dataclass(frozen=True)
class KafkaClientSettings:
    """Where the brokers are and how to prove who we are to them. Empty text means unset."""

    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_key_password: str = field(default="", repr=False)
    ssl_check_hostname: str = "true"
    oauth_provider: str = ""
    oauth_token_url: str = ""
    oauth_client_id: str = ""
    oauth_client_secret: str = field(default="", repr=False)
    oauth_scope: str = ""
    properties: str = field(default="", repr=False)

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, **overrides: str
    ) -> KafkaClientSettings:
        """Every field from its environment variable (the CLI's way); ``overrides`` win."""
        values = {name: setting.read(environ) for name, setting in FIELD_SETTINGS.items()}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    # -- checks ---------------------------------------------------------------------------------

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def checks_hostname(self) -> bool:
        return _flag(settings.KAFKA_SSL_CHECK_HOSTNAME, self.ssl_check_hostname)

    def check(self) -> list[str]:
        """Raise ``ConfigError`` for a combination no client can connect with; return warnings."""
        protocol = self.security_protocol
        if protocol not in SECURITY_PROTOCOLS:
            allowed = SECURITY_PROTOCOLS
            raise ConfigError(_one_of(settings.KAFKA_SECURITY_PROTOCOL, protocol, allowed))
        warnings: list[str] = []
        if self.uses_sasl:
            self._check_sasl()
        elif self.sasl_mechanism:
            raise ConfigError(
                f"{settings.KAFKA_SASL_MECHANISM.env}={self.sasl_mechanism} needs "
                f"{settings.KAFKA_SECURITY_PROTOCOL.env}=SASL_SSL (or SASL_PLAINTEXT), "
                f"not {protocol}"
            )
        tls_files = [s.env for s in _TLS_SETTINGS if getattr(self, _field_of(s))]
        if tls_files and not self.uses_tls:
            raise ConfigError(
                f"{', '.join(tls_files)} set but {settings.KAFKA_SECURITY_PROTOCOL.env}="
                f"{protocol} does not use TLS (SSL or SASL_SSL)"
            )
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ConfigError(
                f"{settings.KAFKA_SSL_KEYFILE.env} needs {settings.KAFKA_SSL_CERTFILE.env}: "
                "the client certificate that goes with the key"
            )
        if self.uses_tls and not self.checks_hostname:
            warnings.append(
                f"{settings.KAFKA_SSL_CHECK_HOSTNAME.env}=false: the broker's certificate is "
                "not checked against its host name, so anyone with a certificate from the same "
                "CA can pose as the broker"
            )
        if protocol == "SASL_PLAINTEXT" and self.sasl_mechanism == "PLAIN":
            warnings.append(
                "SASL PLAIN over SASL_PLAINTEXT sends the password unencrypted; use SASL_SSL"
            )
        self.client_properties("kafka-python")  # a malformed value fails here, not in a client
        return warnings

    def _check_sasl(self) -> None:
        mechanism = self.sasl_mechanism
        if mechanism not in SASL_MECHANISMS:
            raise ConfigError(_one_of(settings.KAFKA_SASL_MECHANISM, mechanism, SASL_MECHANISMS))
        if mechanism != "OAUTHBEARER":
            missing = [
                s.env
                for s in (settings.KAFKA_SASL_USERNAME, settings.KAFKA_SASL_PASSWORD)
                if not getattr(self, _field_of(s))
            ]
            if missing:
                raise ConfigError(f"SASL {mechanism} needs {' and '.join(missing)}")
            return
        if self.oauth_provider not in OAUTH_PROVIDERS:
            raise ConfigError(
                _one_of(settings.KAFKA_OAUTH_PROVIDER, self.oauth_provider, OAUTH_PROVIDERS)
                + " (SASL OAUTHBEARER needs a token provider)"
            )
        if self.oauth_provider == "oidc":
            missing = [
                s.env
                for s in (
                    settings.KAFKA_OAUTH_TOKEN_URL,
                    settings.KAFKA_OAUTH_CLIENT_ID,
                    settings.KAFKA_OAUTH_CLIENT_SECRET,
                )
                if not getattr(self, _field_of(s))
            ]
            if missing:
                raise ConfigError(f"the oidc token provider needs {', '.join(missing)}")

    # -- the clients' names ---------------------------------------------------------------------

    def client_properties(self, client: str) -> dict[str, Any]:
        """PROTOAGG_KAFKA_PROPERTIES for ``client`` (kafka-python or librdkafka), dotted names."""
        if not self.properties.strip():
            return {}
        try:
            raw = json.loads(self.properties)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{settings.KAFKA_PROPERTIES.env} must be a JSON object: {exc}"
            ) from None
        if not isinstance(raw, dict) or not all(
            isinstance(v, str | int | float | bool) for v in raw.values()
        ):
            raise ConfigError(
                f"{settings.KAFKA_PROPERTIES.env} must be a JSON object of names to strings, "
                'numbers or booleans, e.g. {"connections.max.idle.ms": 60000}'
            )
        chosen: dict[str, Any] = {}
        for name, value in raw.items():
            target, _, bare = name.rpartition(":")
            if target and f"{target}:" not in CLIENT_PREFIXES:
                raise ConfigError(
                    f"{settings.KAFKA_PROPERTIES.env}: {name!r} has an unknown client prefix "
                    f"(use {' or '.join(CLIENT_PREFIXES)})"
                )
            if not target or target == client:
                chosen[bare] = value
        return chosen

    def kafka_python_options(self) -> dict[str, Any]:
        """kafka-python's keyword arguments, without the OAUTHBEARER token provider object.

        The PROTOAGG_KAFKA_PROPERTIES for kafka-python are left to ``kafka.clients``, which
        knows which of its classes takes which.
        """
        options: dict[str, Any] = {
            "bootstrap_servers": settings.split_list(self.bootstrap_servers),
            "security_protocol": self.security_protocol,
        }
        if self.uses_sasl:
            options["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_mechanism != "OAUTHBEARER":
                options["sasl_plain_username"] = self.sasl_username
                options["sasl_plain_password"] = self.sasl_password
        if self.uses_tls:
            # No CA file: kafka-python loads the system's CA store (ssl.load_default_certs).
            options["ssl_check_hostname"] = self.checks_hostname
            optional = {
                "ssl_cafile": self.ssl_cafile,
                "ssl_certfile": self.ssl_certfile,
                "ssl_keyfile": self.ssl_keyfile,
                "ssl_password": self.ssl_key_password,
            }
            options.update({k: v for k, v in optional.items() if v})
        return options

    def librdkafka_options(self) -> dict[str, Any]:
        """librdkafka's properties, without the OAUTHBEARER token callback."""
        options: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.uses_sasl:
            options["sasl.mechanism"] = self.sasl_mechanism
            if self.sasl_mechanism != "OAUTHBEARER":
                options["sasl.username"] = self.sasl_username
                options["sasl.password"] = self.sasl_password
        if self.uses_tls:
            # "probe": the system's CA store wherever this distribution keeps it; the wheels'
            # built-in OpenSSL directory does not exist on most machines.
            options["ssl.ca.location"] = self.ssl_cafile or "probe"
            options["ssl.endpoint.identification.algorithm"] = (
                "https" if self.checks_hostname else "none"
            )
            if self.ssl_certfile:
                options["ssl.certificate.location"] = self.ssl_certfile
                # kafka-python reads the key from the certificate file when no key file is set.
                options["ssl.key.location"] = self.ssl_keyfile or self.ssl_certfile
            if self.ssl_key_password:
                options["ssl.key.password"] = self.ssl_key_password
        options.update(self.client_properties("librdkafka"))
        return options

    # -- what to tell the user ------------------------------------------------------------------

    def principal(self) -> str:
        """Who the broker sees, in an ACL's words, as far as the client can tell."""
        if self.uses_sasl and self.sasl_mechanism == "OAUTHBEARER":
            return "the OAUTHBEARER token's subject"
        if self.uses_sasl:
            return f"User:{self.sasl_username}"
        if self.ssl_certfile:
            return f"the principal of the client certificate {self.ssl_certfile}"
        return "User:ANONYMOUS"

    def credential_settings(self) -> str:
        """The settings to fix when the broker refuses who we are."""
        if self.uses_sasl and self.sasl_mechanism == "OAUTHBEARER":
            names = [settings.KAFKA_OAUTH_PROVIDER.env]
            if self.oauth_provider == "oidc":
                names += [
                    settings.KAFKA_OAUTH_CLIENT_ID.env,
                    settings.KAFKA_OAUTH_CLIENT_SECRET.env,
                    settings.KAFKA_OAUTH_SCOPE.env,
                ]
            return ", ".join(names)
        if self.uses_sasl:
            return (
                f"{settings.KAFKA_SASL_USERNAME.env} and {settings.KAFKA_SASL_PASSWORD.env} "
                f"({settings.KAFKA_SASL_MECHANISM.env}={self.sasl_mechanism})"
            )
        return (
            f"{settings.KAFKA_SSL_CERTFILE.env}, {settings.KAFKA_SSL_KEYFILE.env} and "
            f"{settings.KAFKA_SSL_KEY_PASSWORD.env} (the broker asks for a client certificate)"
        )

    def ca_source(self) -> str:
        if self.ssl_cafile:
            return f"{settings.KAFKA_SSL_CAFILE.env}={self.ssl_cafile}"
        return f"the system's CA store ({settings.KAFKA_SSL_CAFILE.env} is unset)"


_TLS_SETTINGS = (
    settings.KAFKA_SSL_CAFILE,
    settings.KAFKA_SSL_CERTFILE,
    settings.KAFKA_SSL_KEYFILE,
    settings.KAFKA_SSL_KEY_PASSWORD,
)


def _field_of(setting: settings.Setting) -> str:
    return next(name for name, s in FIELD_SETTINGS.items() if s is setting)


def _one_of(setting: settings.Setting, value: str, allowed: tuple[str, ...]) -> str:
    return f"{setting.env} must be one of {', '.join(allowed)}, got {value!r}"


def _flag(setting: settings.Setting, value: str) -> bool:
    return setting.read_bool({setting.env: value})


# -- refusals ------------------------------------------------------------------------------------


def authentication_failed(client: KafkaClientSettings, detail: str) -> str:
    return (
        f"Kafka authentication failed at {client.bootstrap_servers}: {detail}. "
        f"Check {client.credential_settings()}."
    )


def client_certificate_refused(client: KafkaClientSettings) -> str:
    shown = client.ssl_certfile or "none (PROTOAGG_KAFKA_SSL_CERTFILE is unset)"
    return (
        f"Kafka authentication failed at {client.bootstrap_servers}: the broker refused the TLS "
        f"handshake for want of a client certificate it trusts (sent: {shown}). Check "
        f"{settings.KAFKA_SSL_CERTFILE.env}, {settings.KAFKA_SSL_KEYFILE.env} and "
        f"{settings.KAFKA_SSL_KEY_PASSWORD.env}."
    )


def tls_failed(client: KafkaClientSettings, host: str, certificate: str | None, detail: str) -> str:
    """TLS verification of the broker failed; ``certificate`` describes what it presented."""
    shown = f"the certificate it presented ({certificate})" if certificate else "its certificate"
    if "hostname mismatch" in detail.lower() or "not valid for" in detail.lower():
        fix = (
            f"connect by a name the certificate holds ({settings.KAFKA_BOOTSTRAP.env}), or only "
            f"if you must, {settings.KAFKA_SSL_CHECK_HOSTNAME.env}=false"
        )
    else:
        fix = f"check {settings.KAFKA_SSL_CAFILE.env}: it must hold the CA that signed it"
    return (
        f"TLS verification of the Kafka broker {host} failed: {shown} is not trusted by "
        f"{client.ca_source()} ({detail}); {fix}."
    )


def not_authorized(client: KafkaClientSettings, needs: str, detail: str) -> str:
    """``needs``: the ACL missing, e.g. "READ and DESCRIBE on Topic 'logs'"."""
    return (
        f"Kafka refused {client.principal()}: not authorized ({detail}). Grant it the ACL "
        f"{needs} (docs/operations.md, Least privilege), or check {client.credential_settings()}."
    )


def unreachable(client: KafkaClientSettings, seconds: float, detail: str) -> str:
    return (
        f"no Kafka broker answers at {client.bootstrap_servers} within {seconds:.0f} s "
        f"({detail}); check {settings.KAFKA_BOOTSTRAP.env} and "
        f"{settings.KAFKA_SECURITY_PROTOCOL.env}={client.security_protocol}, or start one with "
        "`protoagg services up`"
    )


# -- OAUTHBEARER tokens --------------------------------------------------------------------------


def gcp_kafka_token(access_token: str, email: str, issued_at: float, expires_at: float) -> str:
    """The OAUTHBEARER token Google Cloud's managed Kafka takes: a Google access token in a JWT.

    Three base64url parts without padding, as Google's client libraries make it: the header
    ``{"typ": "JWT", "alg": "GOOG_OAUTH2_TOKEN"}``; the claims ``exp``, ``iat``, ``iss``
    (``Google``), ``scope`` (``kafka``) and ``sub`` (the principal's email); and the access
    token itself in place of a signature.
    """
    header = {"typ": "JWT", "alg": "GOOG_OAUTH2_TOKEN"}
    claims = {
        "exp": expires_at,
        "iat": issued_at,
        "iss": "Google",
        "scope": "kafka",
        "sub": email,
    }
    return ".".join(
        _b64url(part.encode()) for part in (json.dumps(header), json.dumps(claims), access_token)
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")
