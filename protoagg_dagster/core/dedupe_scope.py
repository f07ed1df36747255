"""What a dedupe key is a duplicate of: the same key from its own topic, or from any topic.

``topic`` (the default): a message repeated inside its own topic is dropped, the reference
tool's case; two topics carrying the same logIds are two archives. ``deployment``: a key archived
from any topic of the deployment (its PostgreSQL database) drops it everywhere. Record-format
keys are digested with their topic (``formats.DedupeKey``), so they only ever match inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from protoagg_dagster.core.errors import ConfigError

Scope = Literal["topic", "deployment"]
TOPIC: Scope = "topic"
DEPLOYMENT: Scope = "deployment"
SCOPES: tuple[Scope, ...] = (TOPIC, DEPLOYMENT)


def parse_scope(text: str) -> Scope:
    """``PROTOAGG_DEDUPE_SCOPE``'s value, or a ConfigError naming it."""
    value = text.strip().lower()
    if value == TOPIC:
        return TOPIC
    if value == DEPLOYMENT:
        return DEPLOYMENT
    raise ConfigError(f"PROTOAGG_DEDUPE_SCOPE must be topic or deployment, not {text!r}")


def key_prefix(topic: str) -> str:
    """What a topic-scoped key is digested with; a space never occurs in a Kafka topic name."""
    return f"{topic} "


def described(scope: Scope, topics: Sequence[str]) -> str:
    """What counted as a duplicate of what, for batches of ``topics`` (the asset's metadata)."""
    if scope != TOPIC:
        where = "any topic of this deployment"
    elif len(topics) == 1:
        where = f"topic {topics[0]}"
    else:  # a run of several topics: each record's own
        where = f"its own topic (each of {', '.join(topics)})"
    return (
        f"a record whose dedupe key (logId, or PROTOAGG_DEDUPE_KEY) was already archived from "
        f"{where} within the dedupe window, or appears at an earlier offset of the same batch "
        f"(PROTOAGG_DEDUPE_SCOPE={scope})"
    )
