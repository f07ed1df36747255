import io

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protoagg_dagster.core.errors import ArchiveFormatError, ConfigError
from protoagg_dagster.core.formats import LogFormat, RecordFormat
from protoagg_dagster.core.framing import iter_frame_runs, iter_records
from protoagg_dagster.core.kafka_record import ArchivedKafkaRecord
from protoagg_dagster.core.records import LogRecord
from protoagg_dagster.core.table_days import (
    DayState,
    day_key,
    day_of,
    days_to_write,
    parse_day,
    ready_through,
)
from protoagg_dagster.iceberg.columns import _decode_with_upb, layout_of, record_times
from protoagg_dagster.iceberg.log_frames import decode_log_frames

DAY = parse_day("2026-11-01")
START = DAY * 86_400


def test_days_are_utc_dates_and_back() -> None:
    assert day_key(DAY) == "2026-11-01"
    assert day_of(START) == DAY and day_of(START - 1) == DAY - 1
    assert day_of(-1) == -1  # before 1970 too: floor, not truncation
    with pytest.raises(ConfigError, match="YYYY-MM-DD"):
        parse_day("1 Nov")


@pytest.mark.parametrize(
    ("name", "watermarks", "grace", "last"),
    [
        ("no partition yet", {}, 0, None),
        ("one partition at the day's end", {0: START + 86_400}, 0, DAY),
        ("a second short of it", {0: START + 86_399}, 0, DAY - 1),
        ("the grace holds the day back", {0: START + 86_400 + 59}, 60, DAY - 1),
        ("past the grace", {0: START + 86_400 + 60}, 60, DAY),
        ("the slowest partition decides", {0: START + 3 * 86_400, 1: START + 86_400}, 0, DAY),
    ],
)
def test_ready_through(name: str, watermarks: dict[int, int], grace: int, last: int | None) -> None:
    assert ready_through(watermarks, grace) == last


@pytest.mark.parametrize(
    ("name", "days", "expected"),
    [
        ("never written", {DAY: DayState(5)}, [DAY]),
        ("written from the latest batch", {DAY: DayState(5, 5)}, []),
        ("a late batch made it stale", {DAY: DayState(7, 5)}, [DAY]),
        ("not passed yet", {DAY + 1: DayState(5)}, []),
        (
            "oldest first, at most the limit",
            {d: DayState(1) for d in range(DAY, DAY - 5, -1)},
            [
                DAY - 4,
                DAY - 3,
                DAY - 2,
            ],
        ),
    ],
)
def test_days_to_write(name: str, days: dict[int, DayState], expected: list[int]) -> None:
    assert days_to_write(days, {0: START + 86_400}, 0, limit=3) == expected


def _log(second: int, nanos: int = 123_456_789, message: str = "m") -> LogRecord:
    return LogRecord(0, f"00000000-0000-4000-8000-{second:012d}", second, nanos, message)


def test_log_columns_keep_the_day_in_row_groups_of_the_size_asked() -> None:
    records = [_log(START - 1), *(_log(START + i) for i in range(5)), _log(START + 86_400)]
    columns = layout_of("log").columns(DAY)
    stream = io.BytesIO(LogFormat().encode(records))
    tables = [*columns.feed(stream, 3, rows=2), columns.take()]
    assert [t.num_rows for t in tables] == [2, 2, 1]
    table = pa.concat_tables(tables)
    assert table.column("log_id").to_pylist() == [r.log_id for r in records[1:6]]
    assert table.column("partition").to_pylist() == [3] * 5
    assert table.column("offset").null_count == 5
    micros = table.column("timestamp").cast(pa.int64()).to_pylist()
    assert micros == [(START + i) * 1_000_000 + 123_456 for i in range(5)]


def test_record_columns_keep_null_apart_from_empty() -> None:
    stamp = START * 1000 + 5
    records = [
        ArchivedKafkaRecord("t", 0, 7, stamp, 0, None, b"", (("h", None), ("e", b""))),
        ArchivedKafkaRecord("t", 0, 8, stamp, 1, b"", None, ()),
        ArchivedKafkaRecord("t", 0, 9, stamp + 86_400_000, 0, b"k", b"v", ()),
    ]
    columns = layout_of("record").columns(DAY)
    tables = [*columns.feed(io.BytesIO(RecordFormat().encode(records)), 0, rows=10)]
    table = columns.take()
    assert not tables and table.num_rows == 2
    assert table.column("key").to_pylist() == [None, b""]
    assert table.column("value").to_pylist() == [b"", None]
    assert table.column("timestamp_type").to_pylist() == ["create_time", "log_append_time"]
    assert table.column("headers").to_pylist()[0] == [
        {"key": "h", "value": None},
        {"key": "e", "value": b""},
    ]


def test_frame_runs_span_chunk_boundaries_and_refuse_a_truncated_end() -> None:
    records = [_log(START + i, message="x" * i) for i in range(50)]
    data = LogFormat().encode(records)
    runs = list(iter_frame_runs(io.BytesIO(data), chunk_bytes=64))
    payloads = [buffer[a:b] for buffer, spans in runs for a, b in spans]
    assert len(payloads) == 50 and len(runs) > 1
    assert b"".join(len(p).to_bytes(4, "little") + p for p in payloads) == data
    with pytest.raises(ArchiveFormatError, match="truncated"):
        list(iter_frame_runs(io.BytesIO(data[:-3]), chunk_bytes=64))
    assert list(record_times("log", io.BytesIO(data))) == [
        r.seconds for r in iter_records(io.BytesIO(data))
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-(2**40), 2**40),
            st.integers(0, 999_999_999),
            st.text(max_size=300),
            st.sampled_from([36, 0, 35]),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_the_numpy_decoder_equals_upb_or_declines(rows: list[tuple[int, int, str, int]]) -> None:
    records = [
        LogRecord(0, "a" * width, second, nanos, text) for second, nanos, text, width in rows
    ]
    data = LogFormat().encode(records)
    ((buffer, spans),) = list(iter_frame_runs(io.BytesIO(data)))
    fast = decode_log_frames(buffer, spans)
    if any(width != 36 for *_, width in rows):
        assert fast is None
        return
    assert fast is not None
    slow = _decode_with_upb(buffer, spans)
    assert fast.log_ids.to_pylist() == slow.log_ids.to_pylist()
    assert fast.seconds.tolist() == slow.seconds.tolist() == [r.seconds for r in records]
    assert fast.nanos.tolist() == slow.nanos.tolist() == [r.nanos for r in records]
    assert fast.messages.to_pylist() == slow.messages.to_pylist() == [r.message for r in records]
