"""The archive as Dagster assets: all of it, and one asset per ``PROTOAGG_TOPICS`` entry.

``kafka_archive`` is materialized by every archive_kafka_batch run; the asset of the run's topic
entry (``kafka_archive_<topic>``, or ``kafka_archive_re_<pattern>_<hash>`` for a pattern) is
materialized with it, carrying the same batch metadata, checks and lag, so a team can watch its
topic alone.
"""

import hashlib
import re
from collections.abc import Sequence

import dagster as dg

from protoagg_dagster.core.formats import TopicRule

ARCHIVE_ASSET = dg.AssetKey("kafka_archive")

archive_asset = dg.AssetSpec(
    ARCHIVE_ASSET,
    description="Every Kafka message of the archived topics, framed as uint32 LE length | "
    "ProtoLog (log format) or KafkaRecord (record format), in GCS. Materialized by each "
    "archive_kafka_batch run.",
    group_name="protoagg",
)


def topic_asset_key(rule: TopicRule) -> dg.AssetKey:
    """The asset of one topic entry; a short hash keeps names that sanitize alike apart."""
    text = rule.name if rule.name is not None else rule.pattern.pattern if rule.pattern else ""
    slug = re.sub(r"[^A-Za-z0-9_]", "_", text)
    if rule.name is None or slug != text:
        slug = f"{slug}_{hashlib.sha256(text.encode()).hexdigest()[:6]}"
    return dg.AssetKey(("kafka_archive_" if rule.name is not None else "kafka_archive_re_") + slug)


def topic_asset_specs(rules: Sequence[TopicRule]) -> list[dg.AssetSpec]:
    return [
        dg.AssetSpec(
            topic_asset_key(rule),
            description=f"The archive of PROTOAGG_TOPICS entry {rule} (format {rule.format}): "
            "its batches, checks and lag.",
            group_name="protoagg",
        )
        for rule in rules
    ]
