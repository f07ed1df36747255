"""How an archive run names its range: tags, run config, and the partition read back from a run."""

from __future__ import annotations

from typing import Any

import dagster as dg

PARTITION_TAG = "protoagg/partition"
RANGE_TAG = "protoagg/range"
# On a run the sensor launched while the run before it was still in flight: the offset that run
# ends at, where this one must find the partition archived to.
FOLLOWS_TAG = "protoagg/follows"
# On backfill runs, valued like PARTITION_TAG: the run queue starts a backfill's runs of one
# partition one at a time, in the order they were submitted, so none waits on another's range.
BACKFILL_PARTITION_TAG = "protoagg/backfill-partition"


def range_tags(
    topic: str, partition: int, start: int, end: int, follows: bool = False
) -> dict[str, str]:
    """Tags of a run: the run queue limits runs per ``protoagg/partition`` value."""
    tags = {
        PARTITION_TAG: partition_key(topic, partition),
        RANGE_TAG: f"{topic}-{partition}-{start}-{end}",
    }
    if follows:
        tags[FOLLOWS_TAG] = str(start)
    return tags


def is_follow_up(run: dg.DagsterRun) -> bool:
    return FOLLOWS_TAG in run.tags


def queued_behind(run: dg.DagsterRun) -> bool:
    """Whether the run was queued to start while another run of its partition still works."""
    return FOLLOWS_TAG in run.tags or BACKFILL_PARTITION_TAG in run.tags


def range_run_config(topic: str, partition: int, start: int, end: int) -> dict[str, object]:
    return {
        "ops": {
            "consume": {
                "config": {
                    "topic": topic,
                    "partition": partition,
                    "start_offset": start,
                    "end_offset": end,
                }
            }
        }
    }


def run_partition(run: dg.DagsterRun) -> tuple[str, int] | None:
    """``(topic, partition)`` an archive run works on, from its run config.

    The config, not the tag: runs launched by hand from the Launchpad usually carry no tags, and
    the config is what the run's ops actually read.
    """
    found = run_range(run)
    return None if found is None else (found[0], found[1])


def run_range(run: dg.DagsterRun) -> tuple[str, int, int, int] | None:
    """``(topic, partition, start, end)`` of an archive run, from its run config."""
    try:
        ops: Any = run.run_config["ops"]
        config = ops["consume"]["config"]
        return (
            str(config["topic"]),
            int(config["partition"]),
            int(config["start_offset"]),
            int(config["end_offset"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def partition_key(topic: str, partition: int) -> str:
    """The ``protoagg/partition`` tag value; also the name of the partition's lease."""
    return f"{topic}-{partition}"
