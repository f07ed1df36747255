"""What an archive run records in Dagster: one materialization per asset, with its ranges.

Dagster keeps every event of every run; one materialization per asset and run (rather than one
per range) keeps its storage proportional to runs, not partitions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import dagster as dg

from protoagg_dagster.archive.assets import ARCHIVE_ASSET
from protoagg_dagster.archive.run_parts import Appended, EncodedRun, Failed
from protoagg_dagster.core.dedupe_scope import Scope, described


def run_events(
    bucket: str,
    scope: Scope,
    encoded: EncodedRun,
    appended: Sequence[Appended],
    failed: Sequence[Failed],
    seconds: dict[str, float],
    checks: Sequence[dg.AssetCheckEvaluation],
) -> Iterator[dg.AssetMaterialization | dg.AssetCheckEvaluation]:
    """The run's materializations (the archive's, and each topic entry's of its ranges)."""
    assets: dict[dg.AssetKey, list[Appended]] = {ARCHIVE_ASSET: []}
    for done in appended:
        for key in done.part.claimed.consumed.assets:
            assets.setdefault(key, []).append(done)
    # Each range's own numbers go on its topic entry's asset; the whole archive's asset lists
    # them only when some range has no such asset, so a run stores them once.
    listed_apart = all(len(done.part.claimed.consumed.assets) > 1 for done in appended)
    for key, mine in assets.items():
        whole = key == ARCHIVE_ASSET
        yield dg.AssetMaterialization(
            asset_key=key,
            description=f"{len(mine)} ranges",
            metadata={
                **asset_metadata(bucket, scope, mine, with_ranges=not whole or not listed_apart),
                # What belongs to the run, not to a topic (its steps' seconds, the ranges that
                # failed or had nothing to do), once: Dagster keeps every entry of every event.
                **(run_metadata(mine, failed, seconds, encoded.done) if whole else {}),
            },
        )
    yield from checks


def asset_metadata(
    bucket: str, scope: Scope, appended: Sequence[Appended], with_ranges: bool = True
) -> dict[str, Any]:
    """The numbers of the appended ranges of one asset, and (``with_ranges``) which they were.

    ``ranges``: ``{topic: {partition: [start, end, records appended]}}``; without them,
    ``ranges_by_topic`` counts them per topic.
    """
    claimed = [a.part.claimed for a in appended]
    reasons = Counter(r.reason for c in claimed for r in c.dead_letters)
    formats = sorted({c.consumed.format.name for c in claimed})
    objects = sorted({f"gs://{bucket}/{a.batch.object_name}" for a in appended})
    by_topic: dict[str, dict[str, list[int]]] = {}
    for a in appended:
        batch = a.batch.batch
        by_topic.setdefault(batch.topic, {})[str(batch.partition)] = [
            batch.start,
            batch.end,
            a.records,
        ]
    listing = (
        {"ranges": dg.JsonMetadataValue(by_topic)}
        if with_ranges
        else {"ranges_by_topic": dg.JsonMetadataValue({t: len(p) for t, p in by_topic.items()})}
    )
    return {
        **listing,
        "ranges_appended": len(appended),
        "format": ", ".join(formats),
        "objects": dg.JsonMetadataValue(objects[:20]),
        "records_read": sum(c.consumed.records.messages for c in claimed),
        "duplicates_dropped": sum(c.claim.duplicates for c in claimed),
        # Its own topics': a topic entry's asset says "from topic X".
        "duplicate_means": described(scope, sorted({c.claim.batch.topic for c in claimed})),
        "dead_letters": sum(len(c.dead_letters) for c in claimed),
        "dead_letters_by_reason": dg.JsonMetadataValue(dict(reasons)),
        "tombstones": sum(c.tombstones for c in claimed),
        "records_appended": sum(a.records for a in appended),
        "bytes_appended": sum(len(a.part.data) for a in appended if a.records),
    }


def run_metadata(
    appended: Sequence[Appended],
    failed: Sequence[Failed],
    seconds: dict[str, float],
    done: int,
) -> dict[str, Any]:
    """The run's own numbers: failed ranges, ranges without work, each step's seconds."""
    claimed = [a.part.claimed for a in appended]
    read_count = sum(c.consumed.records.messages for c in claimed)
    total = sum(seconds.values())
    return {
        "ranges_failed": dg.JsonMetadataValue([str(f) for f in failed[:20]]),
        # Already archived (by an earlier attempt or another run), or left to a later run.
        "ranges_without_work": done,
        **{f"seconds_{step}": dg.FloatMetadataValue(round(s, 4)) for step, s in seconds.items()},
        # Consume parses each chunk as it arrives: this much of seconds_consume.
        "seconds_consume_parsing": dg.FloatMetadataValue(
            float(round(sum(c.consumed.records.parse_seconds for c in claimed), 4))
        ),
        "messages_per_second": dg.FloatMetadataValue(
            float(round(read_count / total, 1)) if total > 0 else 0.0
        ),
    }
