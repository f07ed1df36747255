"""An archive run's config: the sensor's one line per topic, and the list written by hand."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from protoagg_dagster.archive.run_parts import ArchiveRunConfig
from protoagg_dagster.archive.run_tags import config_ranges, ranges_run_config, run_ranges
from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.planning import OffsetRange, offsets_text, parse_offsets

RANGES = [
    OffsetRange("logs", 0, 100, 200),
    OffsetRange("logs", 3, 40, 90),
    OffsetRange("orders.eu", 12, 7_000_000_000, 7_000_000_500),
    OffsetRange("logs", 2, 0, 0),
]


def test_the_line_per_topic_gives_back_every_range() -> None:
    text = offsets_text(RANGES)
    assert text == {"logs": "0:100-200,3:40-90,2:0-0", "orders.eu": "12:7000000000-7000000500"}
    back = [r for topic, line in text.items() for r in parse_offsets(topic, line)]
    assert sorted(back, key=str) == sorted(RANGES, key=str)


def test_spaces_separate_ranges_as_commas_do() -> None:
    assert parse_offsets("t", " 0:1-2 ,\n 5:3-9 ") == [
        OffsetRange("t", 0, 1, 2),
        OffsetRange("t", 5, 3, 9),
    ]


@pytest.mark.parametrize("bad", ["0:100", "0-100", "x:1-2", "0:5-1", "-1:0-3", "0:1-2-3"])
def test_a_malformed_range_is_named_in_the_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="offsets of topic t"):
        parse_offsets("t", f"1:0-1,{bad}")


def test_a_thousand_ranges_take_a_fifth_of_the_bytes_of_the_list() -> None:
    many = [
        OffsetRange(f"topic-{t}", p, 10_000 + p, 10_020 + p) for t in range(4) for p in range(250)
    ]
    listed = [
        {"topic": r.topic, "partition": r.partition, "start_offset": r.start, "end_offset": r.end}
        for r in many
    ]
    compact = json.dumps(ranges_run_config(many))
    assert len(compact) * 5 < len(json.dumps(listed))
    assert config_ranges(json.loads(compact)) == many


def test_a_run_takes_either_form_or_both() -> None:
    config = ArchiveRunConfig(
        ranges=[{"topic": "a", "partition": 1, "start_offset": 5, "end_offset": 9}],
        offsets={"a": "0:0-4", "b": "1:2-3"},
    )
    assert config.offset_ranges() == [
        OffsetRange("a", 1, 5, 9),
        OffsetRange("a", 0, 0, 4),
        OffsetRange("b", 1, 2, 3),
    ]
    with pytest.raises(dg.Failure, match="at most one range per partition"):
        ArchiveRunConfig(
            ranges=[{"topic": "a", "partition": 0, "start_offset": 5, "end_offset": 9}],
            offsets={"a": "0:0-4"},
        ).offset_ranges()
    with pytest.raises(dg.Failure, match="'0:4' is not partition:start-end"):
        ArchiveRunConfig(offsets={"a": "0:4"}).offset_ranges()


def test_runs_of_before_are_read_from_their_list() -> None:
    # Runs launched before the one-line form (in flight at an upgrade, or kept in the UI).
    before = {
        "ops": {
            "consume": {
                "config": {
                    "ranges": [{"topic": "a", "partition": 2, "start_offset": 0, "end_offset": 7}]
                }
            }
        }
    }
    assert run_ranges(dg.DagsterRun(job_name="x", run_config=before)) == [OffsetRange("a", 2, 0, 7)]
    assert run_ranges(dg.DagsterRun(job_name="x", run_config={})) == []
