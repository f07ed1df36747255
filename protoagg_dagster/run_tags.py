"""How an archive run names its range: tags, run config, and the partition read back from a run."""

from __future__ import annotations

from typing import Any

import dagster as dg

PARTITION_TAG = "protoagg/partition"
RANGE_TAG = "protoagg/range"


def range_tags(topic: str, partition: int, start: int, end: int) -> dict[str, str]:
    """Tags of a run: one run per partition at a time is enforced on ``protoagg/partition``."""
    return {
        PARTITION_TAG: partition_key(topic, partition),
        RANGE_TAG: f"{topic}-{partition}-{start}-{end}",
    }


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
    try:
        ops: Any = run.run_config["ops"]
        config = ops["consume"]["config"]
        return str(config["topic"]), int(config["partition"])
    except (KeyError, TypeError, ValueError):
        return None


def partition_key(topic: str, partition: int) -> str:
    """The ``protoagg/partition`` tag value; also the name of the partition's lease."""
    return f"{topic}-{partition}"
