"""The runs a backfill queues: one per range, each partition's ranges ranked in offset order."""

from __future__ import annotations

from typing import Any

from protoagg_dagster.backfill.submit import PRIORITY_TAG, submit
from protoagg_dagster.core.planning import OffsetRange


class RecordingClient:
    """Takes the place of Dagster's GraphQL client: keeps what was submitted."""

    def __init__(self) -> None:
        self.tags: list[dict[str, str]] = []

    def submit_job_execution(self, job_name: str, **kwargs: Any) -> str:
        self.tags.append(kwargs["tags"])
        return f"run-{len(self.tags)}"


def test_a_partitions_later_ranges_rank_below_its_earlier_ones() -> None:
    client = RecordingClient()
    batches = [
        OffsetRange("logs", 0, 0, 400),
        OffsetRange("logs", 1, 0, 400),
        OffsetRange("logs", 0, 400, 800),
        OffsetRange("logs", 1, 400, 800),
        OffsetRange("logs", 0, 800, 1200),
    ]
    submitted = submit(client, batches, "label")  # type: ignore[arg-type]
    assert [s.batch for s in submitted] == batches
    priorities = [int(tags[PRIORITY_TAG]) for tags in client.tags]
    # Dagster starts the highest priority first: 0..400 of each partition, then 400..800, ...
    assert priorities == [0, 0, -1, -1, -2]
