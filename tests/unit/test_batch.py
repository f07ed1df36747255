"""Parsing straight to frames (``FramedBatch``) gives what parse then encode give, byte for byte."""

from __future__ import annotations

import itertools
import json
import pickle

from hypothesis import given
from hypothesis import strategies as st

from protoagg_dagster.core.batch import FramedBatch
from protoagg_dagster.core.formats import ArchiveFormat, DedupeKey, LogFormat, RecordFormat
from protoagg_dagster.core.records import KafkaMessage

MAX_BYTES = 200
good_values = st.builds(
    lambda log_id, second, nanos, zone, message: json.dumps(
        {
            "logId": str(log_id).upper() if second % 2 else str(log_id),
            "timestamp": f"2026-11-01T08:00:{second:02d}.{nanos:09d}{zone}",
            "message": message,
        },
        ensure_ascii=False,
    ).encode(),
    st.uuids(),
    st.integers(0, 60),
    st.integers(0, 999_999_999),
    st.sampled_from(["Z", "+01:30", "-00:00", "z"]),
    st.text(max_size=40),
)
bad_values = st.sampled_from(
    [None, b"junk", b"[]", b'{"logId": "x"}', b"{" + b" " * MAX_BYTES + b"}", b"\xff"]
)
values = st.lists(st.one_of(good_values, bad_values), max_size=30)
headers = st.lists(
    st.tuples(st.sampled_from(["k", "ü"]), st.none() | st.binary(max_size=8)), max_size=2
).map(tuple)


def messages_of(batch_values: list[bytes | None], hdrs: list[tuple] | None = None) -> list:
    return [
        KafkaMessage(
            "t",
            3,
            10 + 2 * n,
            1_700_000_000_000 + n,
            b"k" if n % 3 else None,
            v,
            (hdrs[n % len(hdrs)] if hdrs else ()),
            n % 2,
        )
        for n, v in enumerate(batch_values)
    ]


def build(archive: ArchiveFormat, messages: list[KafkaMessage], cuts: list[int]) -> FramedBatch:
    """Built from chunks split at ``cuts``, as the reader delivers them."""
    builder = archive.batch_builder("t", 3, MAX_BYTES)
    bounds = sorted({0, len(messages), *(c % (len(messages) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        builder.add(messages[start:end])
    return builder.finish()


def assert_same_as_parse_then_encode(
    archive: ArchiveFormat, messages: list[KafkaMessage], cuts: list[int], keep: list[bool]
) -> None:
    records, rejections = archive.parse(messages, MAX_BYTES)
    batch = build(archive, messages, cuts)
    rows = batch.rows()
    assert batch.frames == archive.encode(records)
    assert batch.rejections == tuple(rejections)
    assert batch.messages == len(messages)
    assert batch.first_timestamp_ms == (messages[0].timestamp_ms if messages else 0)
    assert [r.offset for r in rows] == [r.offset for r in records]
    assert [r.dedupe_key for r in rows] == [
        None if r.dedupe_key is None else r.dedupe_key.lower() for r in records
    ]
    assert [archive.identity(r) for r in rows] == [archive.identity(r) for r in records]
    kept = [i for i, k in enumerate(keep[: len(rows)]) if k]
    assert batch.frames_of([rows[i] for i in kept]) == archive.encode(records[i] for i in kept)


@given(values, st.lists(st.integers(0, 40), max_size=4), st.lists(st.booleans(), max_size=30))
def test_log_batch_is_parse_then_encode(
    batch_values: list[bytes | None], cuts: list[int], keep: list[bool]
) -> None:
    assert_same_as_parse_then_encode(LogFormat(), messages_of(batch_values), cuts, keep)


@given(
    st.lists(st.none() | st.binary(max_size=20) | good_values, max_size=20),
    st.lists(headers, min_size=1, max_size=3),
    st.sampled_from(["none", "key", "header:k", "json:logId"]),
    st.lists(st.integers(0, 40), max_size=4),
    st.lists(st.booleans(), max_size=20),
)
def test_record_batch_is_parse_then_encode(
    batch_values: list[bytes | None],
    hdrs: list[tuple],
    dedupe: str,
    cuts: list[int],
    keep: list[bool],
) -> None:
    archive = RecordFormat(DedupeKey.parse(dedupe))
    assert_same_as_parse_then_encode(archive, messages_of(batch_values, hdrs), cuts, keep)


def test_rejected_first_message_still_dates_the_batch() -> None:
    batch = build(LogFormat(), messages_of([b"junk", None]), [])
    assert (len(batch), batch.messages, batch.first_timestamp_ms) == (0, 2, 1_700_000_000_000)
    assert [r.reason for r in batch.rejections] == ["not_json", "tombstone"]


def test_rows_pickle_with_their_batch() -> None:
    batch = build(LogFormat(), messages_of([b"junk", *good_examples(3)]), [1])
    rows = pickle.loads(pickle.dumps(batch.rows()))
    assert [r.offset for r in rows] == list(batch.offsets)
    assert rows[0].batch is rows[2].batch
    assert rows[0].batch.frames_of(rows[1:]) == batch.frames_of(batch.rows()[1:])


def good_examples(count: int) -> list[bytes]:
    return [
        json.dumps(
            {
                "logId": f"0b5c1a1e-0000-4000-8000-00000000000{i}",
                "timestamp": "2026-01-01T00:00:00Z",
            }
        ).encode()
        for i in range(count)
    ]
