"""Batching and start-up settings of the archiver: a resource the sensor and ops share."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.planning import BatchLimits

START_FROM_CHOICES = ("earliest", "latest")


class ArchiverSettings(dg.ConfigurableResource):  # type: ignore[type-arg]
    """How much to put in one run, and where a never-archived partition starts."""

    batch_size: int = Field(default=500, description="Launch a run once this many messages wait.")
    linger_seconds: float = Field(
        default=15.0, description="...or once the oldest waiting message has waited this long."
    )
    max_batch_messages: int = Field(
        default=200_000, description="Most messages one run reads (bounds its memory)."
    )
    max_batch_bytes: int = Field(
        default=128 * 1024 * 1024, description="Most value bytes one run reads (bounds memory)."
    )
    max_message_bytes: int = Field(
        default=1024 * 1024, description="Larger messages are rejected as dead letters."
    )
    max_dead_letter_ratio: float = Field(
        default=0.2,
        description="A run whose share of dead letters exceeds this fails (after archiving).",
    )
    start_from: str = Field(
        default="earliest",
        description="Where a partition with no archive yet starts: earliest or latest.",
    )

    def limits(self) -> BatchLimits:
        return BatchLimits(
            batch_size=self.batch_size,
            linger_seconds=self.linger_seconds,
            max_batch_messages=self.max_batch_messages,
            max_batch_bytes=self.max_batch_bytes,
        )

    def start_choice(self) -> str:
        if self.start_from not in START_FROM_CHOICES:
            raise ConfigError(
                f"PROTOAGG_START_FROM must be one of {START_FROM_CHOICES}, got {self.start_from!r}"
            )
        return self.start_from
