"""The configuration vocabulary shared by the CLI, the Dagster resources, docker compose and docs.

Each setting is one environment variable with a default that points at the local services that
``protoagg services up`` starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from protoagg_dagster.core.compression import Codec, parse_codec
from protoagg_dagster.core.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    """An environment variable and its default."""

    env: str
    default: str
    help: str

    def read(self, environ: Mapping[str, str] | None = None) -> str:
        source = os.environ if environ is None else environ
        return source.get(self.env, self.default)

    def read_bool(self, environ: Mapping[str, str] | None = None) -> bool:
        text = self.read(environ).strip().lower()
        if text not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{self.env} must be true or false ({self.help}), got {text!r}")
        return text in ("true", "1", "yes")

    def read_int(self, environ: Mapping[str, str] | None = None) -> int:
        return int(self._read_number(environ))

    def read_float(self, environ: Mapping[str, str] | None = None) -> float:
        return self._read_number(environ)

    def _read_number(self, environ: Mapping[str, str] | None) -> float:
        text = self.read(environ)
        try:
            value = float(text) if "." in text else int(text)
        except ValueError:
            raise ConfigError(f"{self.env} must be a number ({self.help}), got {text!r}") from None
        return value


KAFKA_BOOTSTRAP = Setting(
    "PROTOAGG_KAFKA_BOOTSTRAP", "127.0.0.1:9094", "Kafka bootstrap servers, comma separated"
)
KAFKA_SECURITY_PROTOCOL = Setting(
    "PROTOAGG_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
)
KAFKA_SASL_MECHANISM = Setting(
    "PROTOAGG_KAFKA_SASL_MECHANISM",
    "",
    "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER; empty: no SASL",
)
KAFKA_SASL_USERNAME = Setting("PROTOAGG_KAFKA_SASL_USERNAME", "", "SASL user name")
KAFKA_SASL_PASSWORD = Setting("PROTOAGG_KAFKA_SASL_PASSWORD", "", "SASL password (a secret)")
KAFKA_SSL_CAFILE = Setting(
    "PROTOAGG_KAFKA_SSL_CAFILE", "", "CA bundle file for SSL; empty: the system's CA store"
)
KAFKA_SSL_CERTFILE = Setting(
    "PROTOAGG_KAFKA_SSL_CERTFILE", "", "client certificate (PEM) for mutual TLS"
)
KAFKA_SSL_KEYFILE = Setting(
    "PROTOAGG_KAFKA_SSL_KEYFILE", "", "client private key (PEM) for mutual TLS"
)
KAFKA_SSL_KEY_PASSWORD = Setting(
    "PROTOAGG_KAFKA_SSL_KEY_PASSWORD", "", "password of an encrypted client key (a secret)"
)
KAFKA_SSL_CHECK_HOSTNAME = Setting(
    "PROTOAGG_KAFKA_SSL_CHECK_HOSTNAME",
    "true",
    "check that the broker's certificate names the host connected to (false: warns)",
)
KAFKA_OAUTH_PROVIDER = Setting(
    "PROTOAGG_KAFKA_OAUTH_PROVIDER",
    "",
    "OAUTHBEARER tokens from: gcp (Application Default Credentials, Google Cloud's managed "
    "Kafka) or oidc (an OIDC client-credentials token endpoint)",
)
KAFKA_OAUTH_TOKEN_URL = Setting("PROTOAGG_KAFKA_OAUTH_TOKEN_URL", "", "oidc: the token endpoint")
KAFKA_OAUTH_CLIENT_ID = Setting("PROTOAGG_KAFKA_OAUTH_CLIENT_ID", "", "oidc: client id")
KAFKA_OAUTH_CLIENT_SECRET = Setting(
    "PROTOAGG_KAFKA_OAUTH_CLIENT_SECRET", "", "oidc: client secret (a secret)"
)
KAFKA_OAUTH_SCOPE = Setting(
    "PROTOAGG_KAFKA_OAUTH_SCOPE", "", "oidc: scopes to ask for, space separated"
)
KAFKA_PROPERTIES = Setting(
    "PROTOAGG_KAFKA_PROPERTIES",
    "",
    "more client properties as a JSON object of Kafka's dotted names, e.g. "
    '{"connections.max.idle.ms": 60000}; a "librdkafka:" or "kafka-python:" prefix gives one '
    "to that client only",
)
KAFKA_CLIENTS = ("kafka-python", "confluent")
KAFKA_CLIENT = Setting(
    "PROTOAGG_KAFKA_CLIENT",
    "kafka-python",
    "client of the archive read path and restore's producer: kafka-python|confluent (librdkafka)",
)
TOPICS = Setting(
    "PROTOAGG_TOPICS",
    "logs",
    "topics to archive, comma separated: NAME, NAME:FORMAT, /REGEX/ or /REGEX/:FORMAT",
)
FORMAT = Setting("PROTOAGG_FORMAT", "log", "archive format of topics that name none: log|record")
DEDUPE_KEY = Setting(
    "PROTOAGG_DEDUPE_KEY",
    "none",
    "record format: content dedupe key besides the offset: none|key|header:NAME|json:FIELD",
)
DEDUPE_SCOPE = Setting(
    "PROTOAGG_DEDUPE_SCOPE",
    "topic",
    "what a dedupe key is a duplicate of: the same key from its own topic (topic) or from any "
    "topic of the deployment (deployment)",
)
LOG_ID_FIELD = Setting("PROTOAGG_LOG_ID_FIELD", "logId", "log format: JSON field of the log id")
LOG_TIMESTAMP_FIELD = Setting(
    "PROTOAGG_LOG_TIMESTAMP_FIELD",
    "timestamp",
    "log format: JSON field of the RFC 3339 timestamp; kafka: the record's Kafka timestamp",
)
LOG_MESSAGE_FIELD = Setting(
    "PROTOAGG_LOG_MESSAGE_FIELD",
    "message",
    "log format: JSON field of the message text; *: the whole value",
)
POSTGRES_DSN = Setting(
    "PROTOAGG_POSTGRES_DSN",
    "postgresql://protoagg:protoagg@127.0.0.1:5432/protoagg",
    "PostgreSQL DSN of the dedupe database",
)
GCS_BUCKET = Setting("PROTOAGG_GCS_BUCKET", "logs", "GCS bucket that holds the archive")
GCS_OBJECT = Setting(
    "PROTOAGG_GCS_OBJECT",
    "log.pb",
    "archive object name template; fields {topic} {partition} {date} {year} {month} {day} {hour}",
)
STORAGE_EMULATOR_HOST = Setting(
    "STORAGE_EMULATOR_HOST",
    "",
    "GCS emulator endpoint (local: http://127.0.0.1:4443); unset means real GCS with"
    " Application Default Credentials",
)

BATCH_SIZE = Setting("PROTOAGG_BATCH_SIZE", "500", "launch a run once this many messages wait")
LINGER_SECONDS = Setting(
    "PROTOAGG_LINGER_SECONDS", "15", "...or once the oldest waiting message is this old"
)
MAX_BATCH_MESSAGES = Setting(
    "PROTOAGG_MAX_BATCH_MESSAGES", "200000", "most messages one run reads (all its ranges)"
)
MAX_BATCH_BYTES = Setting(
    "PROTOAGG_MAX_BATCH_BYTES",
    str(128 * 1024 * 1024),
    "most value bytes one run reads (all its ranges)",
)
MAX_PARTITIONS_PER_RUN = Setting(
    "PROTOAGG_MAX_PARTITIONS_PER_RUN",
    "1000",
    "most partitions whose ranges one run archives, of any topics",
)
MAX_RUNS_PER_TICK = Setting(
    "PROTOAGG_MAX_RUNS_PER_TICK",
    "16",
    "most archive runs one sensor tick launches; the rest go at the next tick, most behind first",
)
MAX_OBJECT_BYTES = Setting(
    "PROTOAGG_MAX_OBJECT_BYTES",
    str(256 * 2**30),
    "an archive object this large continues in the next of a numbered sequence "
    "(log.pb, log.0001.pb, ...)",
)
MAX_MESSAGE_BYTES = Setting(
    "PROTOAGG_MAX_MESSAGE_BYTES", str(1024 * 1024), "larger messages are rejected"
)
MAX_FRAME_BYTES = Setting(
    "PROTOAGG_MAX_FRAME_BYTES",
    str(64 * 1024 * 1024),
    "largest archive frame: a record whose frame would be larger becomes a dead letter, and "
    "readers refuse a larger length prefix as corrupt",
)
GCS_CREATE_BUCKET = Setting(
    "PROTOAGG_GCS_CREATE_BUCKET", "false", "create the bucket if it is missing (true/false)"
)
GCS_DEAD_LETTERS = Setting(
    "PROTOAGG_GCS_DEAD_LETTERS",
    "dead-letters/{topic}/{partition}.jsonl",
    "object template for messages that cannot be archived",
)
MAX_DEAD_LETTER_RATIO = Setting(
    "PROTOAGG_MAX_DEAD_LETTER_RATIO", "0.2", "a run with a larger dead-letter share fails"
)
COMPRESSION = Setting(
    "PROTOAGG_COMPRESSION",
    "none",
    "compression of archive and dead-letter objects: none|gzip|zstd (default names get .gz/.zst)",
)
COMPRESSION_LEVEL = Setting(
    "PROTOAGG_COMPRESSION_LEVEL", "", "gzip 1..9 (default 6), zstd 1..22 (default 3)"
)
SENSOR_INTERVAL_SECONDS = Setting(
    "PROTOAGG_SENSOR_INTERVAL_SECONDS",
    "2",
    "least seconds between two evaluations of kafka_offsets_sensor (the daemon looks every 5 s)",
)
KEEP_RUNS_DAYS = Setting(
    "PROTOAGG_KEEP_RUNS_DAYS",
    "14",
    "finished archive runs older than this many days are deleted from Dagster with their events",
)
KEEP_FAILED_RUNS_DAYS = Setting(
    "PROTOAGG_KEEP_FAILED_RUNS_DAYS", "60", "failed runs are kept this many days"
)
START_FROM = Setting(
    "PROTOAGG_START_FROM", "earliest", "where a never-archived partition starts: earliest|latest"
)
ICEBERG_NAMESPACE = Setting(
    "PROTOAGG_ICEBERG_NAMESPACE", "protoagg", "Iceberg namespace of the topic tables"
)
ICEBERG_PREFIX = Setting(
    "PROTOAGG_ICEBERG_PREFIX", "iceberg", "the tables' files go under gs://BUCKET/PREFIX/"
)
ICEBERG_REST_URI = Setting(
    "PROTOAGG_ICEBERG_REST_URI",
    "",
    "REST catalog endpoint (BigLake metastore, Polaris, Lakekeeper); empty: the SQL catalog in"
    " PostgreSQL (schema protoagg_iceberg)",
)
ICEBERG_CATALOG_PROPERTIES = Setting(
    "PROTOAGG_ICEBERG_CATALOG_PROPERTIES",
    "",
    "more Iceberg catalog properties, KEY=VALUE comma separated (e.g. token=..., header.X=...)",
)
ICEBERG_START_DATE = Setting(
    "PROTOAGG_ICEBERG_START_DATE", "2024-01-01", "first day (UTC) of the daily table partitions"
)
ICEBERG_GRACE_SECONDS = Setting(
    "PROTOAGG_ICEBERG_GRACE_SECONDS",
    "3600",
    "a day is written once every partition archived records this far past its end",
)
ICEBERG_KEEP_SNAPSHOTS_HOURS = Setting(
    "PROTOAGG_ICEBERG_KEEP_SNAPSHOTS_HOURS",
    "168",
    "table maintenance expires snapshots older than this (never the current one)",
)
ICEBERG_ORPHAN_AGE_SECONDS = Setting(
    "PROTOAGG_ICEBERG_ORPHAN_AGE_SECONDS",
    "3600",
    "unreferenced table files younger than this are kept (a write may be about to commit)",
)

ALL_SETTINGS: tuple[Setting, ...] = (
    KAFKA_BOOTSTRAP,
    KAFKA_SECURITY_PROTOCOL,
    KAFKA_SASL_MECHANISM,
    KAFKA_SASL_USERNAME,
    KAFKA_SASL_PASSWORD,
    KAFKA_SSL_CAFILE,
    KAFKA_SSL_CERTFILE,
    KAFKA_SSL_KEYFILE,
    KAFKA_SSL_KEY_PASSWORD,
    KAFKA_SSL_CHECK_HOSTNAME,
    KAFKA_OAUTH_PROVIDER,
    KAFKA_OAUTH_TOKEN_URL,
    KAFKA_OAUTH_CLIENT_ID,
    KAFKA_OAUTH_CLIENT_SECRET,
    KAFKA_OAUTH_SCOPE,
    KAFKA_PROPERTIES,
    KAFKA_CLIENT,
    TOPICS,
    FORMAT,
    DEDUPE_KEY,
    DEDUPE_SCOPE,
    LOG_ID_FIELD,
    LOG_TIMESTAMP_FIELD,
    LOG_MESSAGE_FIELD,
    POSTGRES_DSN,
    GCS_BUCKET,
    GCS_OBJECT,
    STORAGE_EMULATOR_HOST,
    BATCH_SIZE,
    LINGER_SECONDS,
    MAX_BATCH_MESSAGES,
    MAX_BATCH_BYTES,
    MAX_PARTITIONS_PER_RUN,
    MAX_RUNS_PER_TICK,
    MAX_OBJECT_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_FRAME_BYTES,
    GCS_CREATE_BUCKET,
    GCS_DEAD_LETTERS,
    MAX_DEAD_LETTER_RATIO,
    START_FROM,
    SENSOR_INTERVAL_SECONDS,
    KEEP_RUNS_DAYS,
    KEEP_FAILED_RUNS_DAYS,
    COMPRESSION,
    COMPRESSION_LEVEL,
    ICEBERG_NAMESPACE,
    ICEBERG_PREFIX,
    ICEBERG_REST_URI,
    ICEBERG_CATALOG_PROPERTIES,
    ICEBERG_START_DATE,
    ICEBERG_GRACE_SECONDS,
    ICEBERG_KEEP_SNAPSHOTS_HOURS,
    ICEBERG_ORPHAN_AGE_SECONDS,
)


def read_codec(environ: Mapping[str, str] | None = None) -> Codec:
    """The codec PROTOAGG_COMPRESSION and PROTOAGG_COMPRESSION_LEVEL name."""
    return parse_codec(COMPRESSION.read(environ), COMPRESSION_LEVEL.read(environ))


def object_template(setting: Setting, suffix: str, environ: Mapping[str, str] | None = None) -> str:
    """The setting's template: as written when set, else its default name plus ``suffix``."""
    source = os.environ if environ is None else environ
    return source[setting.env] if setting.env in source else setting.default + suffix


def split_list(value: str) -> list[str]:
    """Split a comma separated setting, dropping blanks."""
    return [item.strip() for item in value.split(",") if item.strip()]
