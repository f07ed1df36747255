import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protoagg_dagster.core.records import (
    KafkaMessage,
    RecordRejected,
    format_rfc3339,
    parse_log_value,
    parse_messages,
    parse_rfc3339,
)

LOG_ID = "2b1c8f7e-4f2a-4bd5-9a39-3c1e0a9b7d11"


def value(**fields: object) -> bytes:
    base: dict[str, object] = {"logId": LOG_ID, "timestamp": "2024-03-01T12:34:56Z", "message": "m"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_parse_keeps_fields_and_nanoseconds() -> None:
    record = parse_log_value(7, value(timestamp="2024-03-01T12:34:56.123456789Z"), 1024)
    assert record.offset == 7
    assert record.log_id == LOG_ID
    assert (record.seconds, record.nanos) == (1709296496, 123456789)
    assert record.message == "m"


def test_utc_offsets_are_converted() -> None:
    assert parse_rfc3339("2024-01-01T01:00:00+01:00") == parse_rfc3339("2024-01-01T00:00:00Z")
    assert parse_rfc3339("2023-12-31T19:30:00-04:30") == parse_rfc3339("2024-01-01T00:00:00Z")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "tombstone"),
        (b"not json", "not_json"),
        (b"[1, 2]", "not_object"),
        (b"\xff\xfe{}", "invalid_utf8"),
        (value(logId=...), "missing_log_id"),
        (value(logId=""), "missing_log_id"),
        (value(logId=42), "missing_log_id"),
        (value(logId="not-a-uuid"), "bad_log_id"),
        (value(logId="{" + LOG_ID + "}"), "bad_log_id"),
        (value(timestamp=...), "bad_timestamp"),
        (value(timestamp="yesterday"), "bad_timestamp"),
        (value(timestamp="2024-02-30T00:00:00Z"), "bad_timestamp"),
        (value(timestamp="2024-01-01T24:00:00Z"), "bad_timestamp"),
        (value(timestamp="2024-01-01T00:00:00"), "bad_timestamp"),
        (value(timestamp="0001-01-01T00:00:00+01:00"), "timestamp_out_of_range"),
        (value(message=5), "bad_message"),
        (b"{" + b" " * 2000 + b"}", "too_large"),
    ],
)
def test_bad_values_are_rejected_with_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(RecordRejected) as info:
        parse_log_value(0, raw, 1024)
    assert info.value.reason == reason


def test_extra_fields_are_ignored() -> None:
    record = parse_log_value(0, value(level="INFO", extra={"a": 1}), 1024)
    assert record.message == "m"


def test_parse_messages_splits_good_from_bad_in_order() -> None:
    messages = [
        KafkaMessage("t", 0, offset, 0, None, raw)
        for offset, raw in enumerate([value(), b"junk", value(message="second")])
    ]
    records, rejections = parse_messages(messages, 1024)
    assert [r.offset for r in records] == [0, 2]
    assert [(r.message.offset, r.reason) for r in rejections] == [(1, "not_json")]


moments = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)


@given(moment=moments, nanos=st.integers(0, 999_999_999), shift=st.integers(-23 * 60, 23 * 60))
def test_rfc3339_matches_datetime_arithmetic(moment: datetime, nanos: int, shift: int) -> None:
    moment = moment.replace(microsecond=0)
    local = moment.astimezone(timezone(timedelta(minutes=shift)))
    sign, minutes = ("+" if shift >= 0 else "-"), abs(shift)
    text = (
        f"{local.year:04d}-{local.month:02d}-{local.day:02d}T{local.hour:02d}:{local.minute:02d}:"
        f"{local.second:02d}.{nanos:09d}{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    )
    seconds, parsed_nanos = parse_rfc3339(text)
    assert seconds == (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1)
    assert parsed_nanos == nanos


@given(seconds=st.integers(-62_135_596_800, 253_402_300_799), nanos=st.integers(0, 999_999_999))
def test_format_then_parse_round_trips(seconds: int, nanos: int) -> None:
    assert parse_rfc3339(format_rfc3339(seconds, nanos)) == (seconds, nanos)


@given(moment=moments, nanos=st.integers(0, 999_999_999), digits=st.integers(0, 9))
def test_the_usual_utc_form_reads_as_its_offset_form(
    moment: datetime, nanos: int, digits: int
) -> None:
    fraction = f".{nanos:09d}"[: digits + 1] if digits else ""
    text = f"{moment.year:04d}-" + moment.strftime("%m-%dT%H:%M:%S") + fraction
    assert parse_rfc3339(text + "Z") == parse_rfc3339(text + "+00:00")
