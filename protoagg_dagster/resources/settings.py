"""Batching, start-up and format settings of the archiver: a resource the sensor and ops share."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from protoagg_dagster.core.dedupe_scope import Scope, parse_scope
from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.formats import FORMATS, LOG, FormatOptions, TopicFormats
from protoagg_dagster.core.framing import MAX_FRAME_BYTES
from protoagg_dagster.core.planning import BatchLimits
from protoagg_dagster.core.records import RecordRejected, parse_rfc3339

START_FROM_CHOICES = ("earliest", "latest")


class ArchiverSettings(dg.ConfigurableResource):  # type: ignore[type-arg]
    """How much to put in one run, and where a never-archived partition starts."""

    batch_size: int = Field(default=500, description="Launch a run once this many messages wait.")
    linger_seconds: float = Field(
        default=15.0, description="...or once the oldest waiting message has waited this long."
    )
    max_batch_messages: int = Field(
        default=200_000,
        description="Most messages one run reads, all its ranges together (bounds its memory).",
    )
    max_batch_bytes: int = Field(
        default=128 * 1024 * 1024,
        description="Most value bytes one run reads, all its ranges together (bounds memory).",
    )
    max_partitions_per_run: int = Field(
        default=1000, description="Most partitions whose ranges one run archives."
    )
    max_runs_per_tick: int = Field(
        default=16,
        description="Most archive runs one sensor tick launches; the rest go at the next tick.",
    )
    lag_observation_seconds: float = Field(
        default=60.0,
        description="Least seconds between two lag observations of the sensor (each one is "
        "stored by Dagster for good).",
    )
    max_message_bytes: int = Field(
        default=1024 * 1024, description="Larger messages are rejected as dead letters."
    )
    max_frame_bytes: int = Field(
        default=MAX_FRAME_BYTES,
        description="Largest archive frame: a record whose frame would be larger becomes a dead "
        "letter (readers refuse larger frames as corrupt).",
    )
    max_dead_letter_ratio: float = Field(
        default=0.2,
        description="A run whose share of dead letters exceeds this fails (after archiving).",
    )
    start_from: str = Field(
        default="earliest",
        description="Where a partition with no archive yet starts: earliest, latest, or an "
        "RFC 3339 time (the first message at or after it).",
    )

    format: str = Field(
        default=LOG,
        description=f"Archive format of topics whose PROTOAGG_TOPICS entry names none: "
        f"{' or '.join(FORMATS)}.",
    )
    dedupe_key: str = Field(
        default="none",
        description="record format: content dedupe besides the offset: none, key, header:NAME "
        "or json:FIELD (records without such a key are archived).",
    )
    dedupe_scope: str = Field(
        default="topic",
        description="What a dedupe key is a duplicate of: the same key archived from its own "
        "topic (topic) or from any topic of the deployment (deployment).",
    )
    log_id_field: str = Field(default="logId", description="log format: JSON field of the id.")
    log_timestamp_field: str = Field(
        default="timestamp",
        description="log format: JSON field of the RFC 3339 timestamp; 'kafka' takes the "
        "record's Kafka timestamp.",
    )
    log_message_field: str = Field(
        default="message",
        description="log format: JSON field of the message; '*' keeps the whole value.",
    )

    def format_options(self) -> FormatOptions:
        return FormatOptions(
            self.dedupe_key,
            self.log_id_field,
            self.log_timestamp_field,
            self.log_message_field,
            self.max_frame_bytes,
        )

    def scope(self) -> Scope:
        return parse_scope(self.dedupe_scope)

    def topic_formats(self, topics: str) -> TopicFormats:
        """The format of each topic of ``topics`` (a PROTOAGG_TOPICS value)."""
        return TopicFormats.parse(topics, self.format, self.format_options())

    def limits(self) -> BatchLimits:
        return BatchLimits(
            batch_size=self.batch_size,
            linger_seconds=self.linger_seconds,
            max_batch_messages=self.max_batch_messages,
            max_batch_bytes=self.max_batch_bytes,
            max_partitions_per_run=self.max_partitions_per_run,
            max_runs_per_tick=self.max_runs_per_tick,
        )

    def start_choice(self) -> str | int:
        """``earliest``, ``latest``, or a time in epoch milliseconds."""
        if self.start_from in START_FROM_CHOICES:
            return self.start_from
        try:
            seconds, nanos = parse_rfc3339(self.start_from)
        except RecordRejected:
            raise ConfigError(
                f"PROTOAGG_START_FROM must be earliest, latest or an RFC 3339 time, got "
                f"{self.start_from!r}"
            ) from None
        return seconds * 1000 + nanos // 1_000_000
