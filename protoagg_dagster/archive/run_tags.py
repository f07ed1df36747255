"""How an archive run names its ranges: tags, run config, and the ranges read back from a run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.planning import OffsetRange, offsets_text, parse_all_offsets

# On a run of one range only (a backfill's, or a sensor run that found one partition ready): the
# partition, so the UI can filter a partition's runs. A run of several ranges has no such tag;
# which partitions a run holds is its run config, read by ``run_ranges``.
PARTITION_TAG = "protoagg/partition"
# The run's key (``RunBatch.run_key``): a relaunch of the same ranges counts its attempts by it.
RANGE_TAG = "protoagg/range"
# On a run the sensor launched while runs before its ranges were still in flight: each range
# must find its partition archived up to its start, after waiting for the partition's lease.
FOLLOWS_TAG = "protoagg/follows"
# On backfill runs, valued like PARTITION_TAG: the run queue starts a backfill's runs of one
# partition one at a time, in the order they were submitted, so none waits on another's range.
BACKFILL_PARTITION_TAG = "protoagg/backfill-partition"


def ranges_tags(ranges: Sequence[OffsetRange], key: str, follows: bool = False) -> dict[str, str]:
    """Tags of a run archiving ``ranges``, launched under the run key ``key``."""
    # No count of partitions: the run key says it ("+N" more ranges), and each tag is a row
    # Dagster keeps, with its indexes, for every run.
    tags = {RANGE_TAG: key}
    if len(ranges) == 1:
        tags[PARTITION_TAG] = partition_key(ranges[0].topic, ranges[0].partition)
    if follows:
        tags[FOLLOWS_TAG] = "true"
    return tags


def range_tags(
    topic: str, partition: int, start: int, end: int, follows: bool = False
) -> dict[str, str]:
    """Tags of a run of one range."""
    batch = OffsetRange(topic, partition, start, end)
    return ranges_tags([batch], batch.run_key, follows)


def is_follow_up(run: dg.DagsterRun) -> bool:
    return FOLLOWS_TAG in run.tags


def queued_behind(run: dg.DagsterRun) -> bool:
    """Whether the run was queued to start while other runs of its partitions still work."""
    return FOLLOWS_TAG in run.tags or BACKFILL_PARTITION_TAG in run.tags


# The op that takes the ranges. Runs of before the one-op job (in flight at an upgrade, or kept in
# the UI) name their first op, consume: their ranges are still read, so the sensor counts them.
RANGES_OP = "archive"
RANGES_OP_BEFORE = "consume"


def ranges_run_config(ranges: Sequence[OffsetRange]) -> dict[str, object]:
    return {"ops": {RANGES_OP: {"config": {"offsets": offsets_text(ranges)}}}}


def range_run_config(topic: str, partition: int, start: int, end: int) -> dict[str, object]:
    """The run config of one range."""
    return ranges_run_config([OffsetRange(topic, partition, start, end)])


def run_ranges(run: dg.DagsterRun) -> list[OffsetRange]:
    """The ranges an archive run works on, from its run config (empty: not an archive run).

    The config, not the tags: runs launched by hand from the Launchpad usually carry no tags,
    and the config is what the run's ops actually read.
    """
    return config_ranges(run.run_config)


def config_ranges(run_config: Mapping[str, Any]) -> list[OffsetRange]:
    """The ranges of an archive run's config, in either form (``ArchiveRunConfig``)."""
    try:
        ops = run_config["ops"]
        config: Any = ops[RANGES_OP if RANGES_OP in ops else RANGES_OP_BEFORE]["config"]
        listed = [
            OffsetRange(
                str(r["topic"]), int(r["partition"]), int(r["start_offset"]), int(r["end_offset"])
            )
            for r in config.get("ranges", [])
        ]
        return listed + parse_all_offsets(config.get("offsets", {}))
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError):
        return []


def partition_key(topic: str, partition: int) -> str:
    """``topic-partition``: the PARTITION_TAG value, and the name of the partition's lease."""
    return f"{topic}-{partition}"
