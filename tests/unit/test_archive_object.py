import pytest

from protoagg_dagster.core.archive_object import (
    OFFSETS_METADATA_KEY,
    archive_format,
    archived_offsets,
    metadata_after_append,
    object_name,
    temp_object_name,
    validate_template,
)
from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.planning import OffsetRange

# 2026-11-28T05:15:00Z
MOMENT_MS = 1_795_842_900_000


def test_default_template_is_the_reference_tools_object() -> None:
    assert object_name("log.pb", "logs", 3, MOMENT_MS) == "log.pb"


def test_template_fields_come_from_the_batch() -> None:
    name = object_name(
        "{topic}/{partition}/{year}/{month}/{day}/{hour}-{date}.pb", "logs", 3, MOMENT_MS
    )
    assert name == "logs/3/2026/11/28/05-2026-11-28.pb"


@pytest.mark.parametrize("template", ["", "  ", "{nope}.pb", "{topic", "_protoagg/tmp/x"])
def test_bad_templates_name_the_setting(template: str) -> None:
    with pytest.raises(ConfigError, match="PROTOAGG_GCS_OBJECT"):
        validate_template(template)


def test_metadata_keeps_other_partitions_and_other_keys() -> None:
    first = metadata_after_append(None, OffsetRange("logs", 0, 0, 10))
    second = metadata_after_append({**first, "owner": "team"}, OffsetRange("logs", 1, 0, 7))
    third = metadata_after_append(second, OffsetRange("logs", 0, 10, 25))
    assert archived_offsets(third) == {"logs/0": 25, "logs/1": 7}
    assert third["owner"] == "team"


def test_corrupt_offsets_metadata_is_an_error() -> None:
    with pytest.raises(ConfigError):
        archived_offsets({OFFSETS_METADATA_KEY: "{not json"})


def test_temp_names_differ_per_attempt_and_sit_under_the_reserved_prefix() -> None:
    batch = OffsetRange("logs", 0, 5, 9)
    a, b = temp_object_name(batch, "a"), temp_object_name(batch, "b")
    assert a != b
    assert a.startswith("_protoagg/tmp/logs/0/5-9-")


def test_metadata_records_the_format_and_refuses_a_second_one() -> None:
    first = metadata_after_append(None, OffsetRange("a", 0, 0, 10), "record")
    assert archive_format(first) == "record"
    assert archive_format(metadata_after_append(first, OffsetRange("b", 0, 0, 3), "record")) == (
        "record"
    )
    with pytest.raises(ConfigError, match=r"cannot mix formats.*\{topic\}"):
        metadata_after_append(first, OffsetRange("logs", 0, 0, 5), "log")
    # Objects written before formats were recorded hold log frames.
    legacy = metadata_after_append(None, OffsetRange("logs", 0, 0, 5))
    assert archive_format(legacy) == "log"
    with pytest.raises(ConfigError, match="cannot mix formats"):
        metadata_after_append(legacy, OffsetRange("x", 0, 0, 5), "record")
