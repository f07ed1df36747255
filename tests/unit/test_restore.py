"""Restore's pure decisions: selection, shaping, partitions, progress, identity."""

from __future__ import annotations

import json

import pytest

from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.framing import ArchivedRecord
from protoagg_dagster.core.kafka_record import ArchivedKafkaRecord
from protoagg_dagster.core.restore import (
    RestoreSpec,
    Selection,
    Tallies,
    check_partitions,
    kafka_python_refuses,
    log_out,
    parse_progress,
    progress_key,
    progress_value,
    record_out,
    summary,
    target_partition,
)
from protoagg_dagster.resources.kafka import KafkaResource

SPEC = RestoreSpec(("gs://b/o",), "out")
RECORD = ArchivedKafkaRecord("src", 2, 41, 1_700_000_000_123, 1, b"k", b"v", (("h", b""),))


@pytest.mark.parametrize(
    ("selection", "partition", "offset", "ms", "selected"),
    [
        (Selection(), 0, 0, 0, True),
        (Selection(partition=1), 0, 5, 0, False),
        (Selection(partition=1), 1, 5, 0, True),
        (Selection(from_offset=5), 1, 4, 0, False),
        (Selection(from_offset=5), 1, 5, 0, True),
        (Selection(to_offset=5), 1, 5, 0, False),
        (Selection(to_offset=5), 1, 4, 0, True),
        (Selection(from_time_ms=100), 0, 0, 99, False),
        (Selection(from_time_ms=100), 0, 0, 100, True),
        (Selection(to_time_ms=100), 0, 0, 100, False),
        (Selection(to_time_ms=100), None, None, 99, True),
        # A log record has no offset: offset bounds do not apply to it.
        (Selection(from_offset=5), None, None, 0, True),
    ],
)
def test_selection_bounds_are_inclusive_from_and_exclusive_to(
    selection: Selection, partition: int | None, offset: int | None, ms: int, selected: bool
) -> None:
    assert selection.selects(partition, offset, ms) is selected


def test_only_partition_and_offset_bounds_need_places() -> None:
    assert not Selection(from_time_ms=1, to_time_ms=2).needs_places
    assert Selection(partition=0).needs_places and Selection(to_offset=9).needs_places


def test_a_record_is_sent_as_the_original_in_its_partition_with_create_time() -> None:
    assert record_out(RECORD, SPEC, 3) == (2, b"k", b"v", [("h", b"")], 1_700_000_000_123)


def test_source_headers_follow_the_records_own() -> None:
    spec = RestoreSpec(("x",), "out", source_headers=True)
    _, _, _, headers, _ = record_out(RECORD, spec, 3)
    assert headers == [
        ("h", b""),
        ("protoagg-source-topic", b"src"),
        ("protoagg-source-partition", b"2"),
        ("protoagg-source-offset", b"41"),
    ]


@pytest.mark.parametrize(
    ("record", "refused"),
    [
        (RECORD._replace(key=None, value=None), True),
        (RECORD._replace(headers=(("h", None),)), True),
        (RECORD._replace(key=None), False),  # a keyless record
        (RECORD._replace(value=None), False),  # a tombstone
        (RECORD, False),
    ],
)
def test_records_kafka_python_refuses_are_told_apart_and_kept_whole(
    record: ArchivedKafkaRecord, refused: bool
) -> None:
    out = record_out(record, SPEC, 3)
    assert out[1:4] == (record.key, record.value, list(record.headers))
    assert kafka_python_refuses(out) is refused


# Kafka's own murmur2 test vectors (UtilsTest.testMurmur2), as Java's signed ints.
JAVA_MURMUR2 = {b"21": -973932308, b"foobar": -790332482, b"abc": 479470107}


def test_the_key_partitioner_is_kafkas_murmur2() -> None:
    for key, java in JAVA_MURMUR2.items():
        # Utils.toPositive(murmur2(key)) % partitions, as the Java client's partitioner does.
        assert target_partition(0, key, 7, "key") == (java & 0x7FFFFFFF) % 7
    assert target_partition(7, None, 3, "key") == 1
    assert target_partition(7, b"a", 3, "same") == 7


def test_a_log_record_is_the_input_json_line_keyless_unless_asked() -> None:
    log = ArchivedRecord(0, 0, "0f0e", 1_762_000_000, 90_000_000, "hi \u00e9")
    partition, key, value, headers, ms = log_out(log, SPEC)
    assert (partition, key, headers, ms) == (None, None, [], 1_762_000_000_090)
    assert value is not None
    assert list(json.loads(value).items()) == [
        ("logId", "0f0e"),
        ("timestamp", "2025-11-01T12:26:40.090Z"),
        ("message", "hi \u00e9"),
    ]
    keyed = RestoreSpec(("x",), "out", key="logId")
    assert log_out(log, keyed)[1] == b"0f0e"
    nanos = log._replace(nanos=123_456_789)
    assert json.loads(log_out(nanos, SPEC)[2] or b"")["timestamp"].endswith(".123456789Z")


def test_too_few_partitions_are_refused_unless_by_key() -> None:
    tallies = Tallies()
    tallies.add(0, 10)
    tallies.add(2, 10)
    assert tallies.partitions_needed() == 3
    with pytest.raises(ConfigError, match=r"has 2 partitions .* partition 2; .*--partitioner key"):
        check_partitions("out", 2, tallies, "same")
    check_partitions("out", 2, tallies, "key")
    check_partitions("out", 3, tallies, "same")


def test_a_log_archive_needs_one_partition() -> None:
    tallies = Tallies()
    tallies.add(-1, 5)
    assert tallies.partitions_needed() == 1


def test_progress_keeps_the_last_value_per_object_of_this_restore_only() -> None:
    rid, other = SPEC.restore_id, "someoneelse"
    pairs = [
        (progress_key(rid, "gs://b/1"), progress_value(10, SPEC)),
        (progress_key(other, "gs://b/1"), progress_value(99, SPEC)),
        (progress_key(rid, "gs://b/2"), progress_value(3, SPEC)),
        (progress_key(rid, "gs://b/1"), progress_value(25, SPEC)),
        (None, b"ignored"),
        (progress_key(rid, "gs://b/3"), None),
    ]
    assert parse_progress(rid, pairs) == {"gs://b/1": 25, "gs://b/2": 3}


def test_the_restore_id_changes_with_what_is_written_and_only_that() -> None:
    same = RestoreSpec(("gs://b/o",), "out")
    assert same.restore_id == SPEC.restore_id
    assert SPEC.transactional_id == f"protoagg-restore-{SPEC.restore_id}"
    changed = [
        RestoreSpec(("gs://b/p",), "out"),
        RestoreSpec(("gs://b/o",), "out2"),
        RestoreSpec(("gs://b/o",), "out", Selection(partition=1)),
        RestoreSpec(("gs://b/o",), "out", partitioner="key"),
        RestoreSpec(("gs://b/o",), "out", key="logId"),
        RestoreSpec(("gs://b/o",), "out", source_headers=True),
    ]
    assert len({s.restore_id for s in changed} | {SPEC.restore_id}) == len(changed) + 1


def test_a_second_complete_run_says_it_wrote_nothing() -> None:
    assert summary(Tallies(), 40, {"gs://b/o": 40}) == (
        "nothing to restore: all 40 selected records were restored by an earlier run"
    )
    tallies = Tallies()
    tallies.add(0, 2_000_000, now=1.0)
    tallies.add(0, 1_000_000, now=3.5)
    assert summary(tallies, 0, {}) == (
        "restored 2 records (3.00 MB)\n  partition 0: 2 records, 3.00 MB, 2.5 s"
    )


def test_an_unknown_kafka_client_is_refused_by_its_setting_name() -> None:
    kafka = KafkaResource(bootstrap_servers="127.0.0.1:1", client="kafka-java")
    with pytest.raises(ConfigError, match="PROTOAGG_KAFKA_CLIENT"):
        kafka.get_transactional_producer("protoagg-restore-x")
