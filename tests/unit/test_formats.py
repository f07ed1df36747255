"""The archive format seam without services: topic entries, dedupe digests, encode/decode."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protoagg_dagster.core.dedupe_scope import Scope, described, parse_scope
from protoagg_dagster.core.errors import ArchiveFormatError, ConfigError
from protoagg_dagster.core.formats import (
    DedupeKey,
    FormatOptions,
    LogFormat,
    RecordFormat,
    TopicFormats,
    always_base64,
    parse_topics,
    select_topics,
    text_or_base64,
)
from protoagg_dagster.core.framing import encode_records
from protoagg_dagster.core.kafka_record import ArchivedKafkaRecord
from protoagg_dagster.core.records import KafkaMessage, LogRecord
from protoagg_dagster.pb.record_pb2 import KafkaRecord

optional_bytes = st.none() | st.binary(max_size=40)
messages = st.lists(
    st.builds(
        KafkaMessage,
        topic=st.text(min_size=1, max_size=20),
        partition=st.integers(0, 2**31 - 1),
        offset=st.integers(0, 2**62),
        timestamp_ms=st.integers(-(2**40), 2**45),
        key=optional_bytes,
        value=optional_bytes,
        headers=st.lists(
            st.tuples(st.sampled_from(["a", "b", "ü"]), optional_bytes), max_size=3
        ).map(tuple),
        timestamp_type=st.sampled_from([0, 1]),
    ),
    max_size=20,
)


@given(messages)
def test_record_format_round_trips_every_field_null_and_empty_apart(
    batch: list[KafkaMessage],
) -> None:
    archive = RecordFormat()
    records, rejections = archive.parse(batch, 1)
    assert rejections == []
    back = list(archive.decode(io.BytesIO(archive.encode(records))))
    assert back == records
    assert [(r.topic, r.partition, r.offset, r.timestamp_ms) for r in back] == [
        (m.topic, m.partition, m.offset, m.timestamp_ms) for m in batch
    ]
    assert [(r.timestamp_type, r.key, r.value, r.headers) for r in back] == [
        (m.timestamp_type, m.key, m.value, m.headers) for m in batch
    ]


def test_record_frame_is_the_kafka_record_message_of_the_contract() -> None:
    record = ArchivedKafkaRecord("t", 2, 7, 1_500, 1, b"", None, (("h", None), ("h", b"x")))
    data = RecordFormat().encode([record])
    message = KafkaRecord.FromString(data[4:])
    assert int.from_bytes(data[:4], "little") == len(data) - 4
    assert (message.topic, message.partition, message.offset) == ("t", 2, 7)
    assert (message.timestamp.seconds, message.timestamp.nanos) == (1, 500_000_000)
    assert message.timestamp_type == 2  # LOG_APPEND_TIME
    assert message.HasField("key") and message.key == b""
    assert not message.HasField("value")
    assert [(h.key, h.HasField("value")) for h in message.headers] == [("h", False), ("h", True)]


def test_log_format_bytes_are_the_reference_encoding() -> None:
    record = LogRecord(3, "0b5c1a1e-0000-4000-8000-000000000001", 1_700_000_000, 5, "hi")
    assert LogFormat().encode([record]) == encode_records([record])


def test_a_frame_that_is_not_a_kafka_record_is_named() -> None:
    frames = RecordFormat().encode([ArchivedKafkaRecord("t", 0, 0, 0, 0, None, b"v", ())])
    bad = frames + (3).to_bytes(4, "little") + b"\xff\xff\xff"
    with pytest.raises(ArchiveFormatError, match=r"record 1 at byte \d+: 3-byte frame is not a"):
        list(RecordFormat().decode(io.BytesIO(bad)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("logs", ["logs:log"]),
        ("a, b:record ,c:log", ["a:log", "b:record", "c:log"]),
        ("/orders-.*/", ["/orders-.*/:record"]),
        ("/x{1,3}/:log,y", ["/x{1,3}/:log", "y:record"]),
    ],
)
def test_topic_entries(text: str, expected: list[str]) -> None:
    default = "log" if text in ("logs", "a, b:record ,c:log") else "record"
    assert [str(rule) for rule in parse_topics(text, default)] == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "names no topic"),
        ("a:csv", "unknown archive format 'csv'"),
        ("/(/", "not a valid regular expression"),
        ("/a/:json", "unknown archive format 'json'"),
        ("bad name", "not a Kafka topic name"),
    ],
)
def test_a_bad_topic_entry_is_one_clear_error(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        TopicFormats.parse(text)


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        (FormatOptions(dedupe_key="header:"), "PROTOAGG_DEDUPE_KEY"),
        (FormatOptions(dedupe_key="value"), "PROTOAGG_DEDUPE_KEY"),
        (FormatOptions(log_id_field=" "), "PROTOAGG_LOG_ID_FIELD"),
        (FormatOptions(log_message_field=""), "PROTOAGG_LOG_MESSAGE_FIELD"),
    ],
)
def test_bad_format_options_fail_at_load(options: FormatOptions, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        TopicFormats.parse("a:log,b:record", "log", options)


def test_patterns_match_later_topics_but_never_internal_ones_unless_named() -> None:
    rules = parse_topics("/.*/:record,__consumer_offsets")
    existing = ["orders", "__consumer_offsets", "__transaction_state", "_schemas", "audit"]
    assert select_topics(rules, existing) == ["__consumer_offsets", "audit", "orders"]
    formats = TopicFormats(rules)
    assert formats.format_for("orders").name == "record"
    assert formats.format_for("__consumer_offsets").name == "log"


def record(topic: str = "t", **fields: object) -> ArchivedKafkaRecord:
    base = ArchivedKafkaRecord(topic, 0, 0, 0, 0, None, None, ())
    return base._replace(**fields)


def test_dedupe_digests_are_128_bits_scoped_to_the_topic() -> None:
    by_key = DedupeKey.parse("key")
    one = by_key.digest(record(key=b"k"))
    assert one is not None and len(bytes.fromhex(one)) == 16
    assert by_key.digest(record(key=b"k" * 10_000)) is not None
    assert len(by_key.digest(record(key=b"k" * 10_000)) or "") == len(one)
    assert by_key.digest(record("other", key=b"k")) != one
    assert by_key.digest(record(key=None)) is None
    assert by_key.digest(record(key=b"")) is not None  # an empty key is a key


def test_header_and_json_keys() -> None:
    header = DedupeKey.parse("header:id")
    assert header.digest(record(headers=(("x", b"1"), ("id", b"a"), ("id", b"b")))) == (
        header.digest(record(headers=(("id", b"a"),)))
    )
    assert header.digest(record(headers=(("x", b"1"),))) is None
    field = DedupeKey.parse("json:id")
    assert field.digest(record(value=b'{"id": 1}')) == field.digest(record(value=b'{"id":1,"n":2}'))
    assert field.digest(record(value=b'{"id": 1}')) != field.digest(record(value=b'{"id": "1"}'))
    assert field.digest(record(value=b"\xffnot json")) is None
    assert field.digest(record(value=b'{"other": 1}')) is None
    assert DedupeKey.parse("none").digest(record(key=b"k")) is None


def test_record_json_marks_bytes_that_are_not_text() -> None:
    shown = RecordFormat().as_json(
        record(key=b"\xff", value=b"text", headers=(("h", None),)), text_or_base64
    )
    assert shown["key"] == {"base64": "/w=="}
    assert shown["value"] == "text"
    assert shown["headers"] == [["h", None]]
    assert RecordFormat().as_json(record(value=b"text"), always_base64)["value"] == {
        "base64": "dGV4dA=="
    }
    assert json.dumps(shown)


@pytest.mark.parametrize(
    ("text", "scope"), [("topic", "topic"), ("deployment", "deployment"), (" Topic ", "topic")]
)
def test_dedupe_scopes_parse(text: str, scope: str) -> None:
    assert parse_scope(text) == scope


def test_an_unknown_dedupe_scope_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="PROTOAGG_DEDUPE_SCOPE"):
        parse_scope("partition")


@pytest.mark.parametrize(
    ("scope", "topics", "says"),
    [
        ("topic", ["orders"], "archived from topic orders within"),
        ("topic", ["orders", "refunds"], "from its own topic (each of orders, refunds) within"),
        ("deployment", ["orders", "refunds"], "from any topic of this deployment within"),
    ],
)
def test_the_metadata_says_what_counted_as_a_duplicate_of_what(
    scope: Scope, topics: list[str], says: str
) -> None:
    assert says in described(scope, topics)
