"""The archive format seam: how Kafka messages become archived records, and how they read back.

Two formats implement ``ArchiveFormat``: ``log`` (the reference tool's ``ProtoLog`` of a JSON log
value, deduplicated by logId) and ``record`` (each Kafka record whole as ``KafkaRecord``,
deduplicated by offset through the ledger, and optionally by a content key). The ledger, the
dedupe window, the append, the sensor and the checks see only this interface, and a dedupe key
is always 128 bits written as a uuid (a logId is one; any other key is digested to one).

This module also reads the settings that choose a format per topic (``PROTOAGG_TOPICS`` entries
``NAME``, ``NAME:FORMAT``, ``/REGEX/``, ``/REGEX/:FORMAT``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import orjson

from protoagg_dagster.core.batch import BatchBuilder, frame_too_large, might_pass_frame_limit
from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.framing import (
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    ProtoLogFrames,
    encode_records,
    iter_records,
)
from protoagg_dagster.core.kafka_record import (
    ArchivedKafkaRecord,
    KafkaRecordFrames,
    encode_kafka_records,
    iter_kafka_records,
)
from protoagg_dagster.core.records import (
    DEFAULT_FIELDS,
    KafkaMessage,
    LogFields,
    Rejection,
    format_rfc3339,
    parse_log_value,
    parse_messages,
)

LOG = "log"
RECORD = "record"
FORMATS = (LOG, RECORD)
# Kafka's own topics (and, by convention, other tools' ones) start with an underscore.
INTERNAL_PREFIX = "_"
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}\Z")
# A pattern entry: the shortest /.../ followed by an optional :FORMAT and then a comma or the end,
# so a regex may itself contain commas (``/a{1,3}/``).
_PATTERN_ENTRY = re.compile(r"/(?P<regex>.+?)/(?::(?P<format>[^,]*))?\s*(?:,|\Z)", re.DOTALL)

ShowBytes = Callable[[bytes], object]
# Dedupe keys as text: a logId's 8-4-4-4-12 form, and a digest's 32 hex digits (both PostgreSQL
# uuid input).
UUID_TEXT_WIDTH = 36
DIGEST_TEXT_WIDTH = 32


class Claimable(Protocol):
    """What the ledger and the dedupe window need of a record: where it is, what dedupes it."""

    @property
    def offset(self) -> int: ...

    @property
    def dedupe_key(self) -> str | None: ...


class ArchiveFormat(Protocol):
    """One archive format: parse, encode, decode, and what must be unique or equal on checking."""

    @property
    def name(self) -> str: ...

    @property
    def identity_names_place(self) -> bool:
        """Whether ``identity`` names a record's place in Kafka (not a key its content gives)."""

    def parse(
        self, messages: Sequence[KafkaMessage], max_bytes: int
    ) -> tuple[list[Any], list[Rejection]]:
        """Records (``Claimable``, in offset order) and the messages that cannot be archived."""

    def encode(self, records: Iterable[Any]) -> bytes:
        """The frames of ``records``, in the order given."""

    def batch_builder(self, topic: str, partition: int, max_bytes: int) -> BatchBuilder:
        """Parses messages of one partition straight to ``encode``'s frames, chunk by chunk.

        The batch's records are those of ``parse``, its rejections the same, and its frames
        byte for byte those ``encode`` makes of the records.
        """

    def decode(self, stream: BinaryIO) -> Iterator[Any]:
        """The archived records of a stream; ``ArchiveFormatError`` names a bad frame."""

    def identity(self, record: Any) -> str:
        """What appears at most once in an archive (of a parsed or a decoded record)."""

    def content(self, record: Any) -> tuple[object, ...]:
        """What an archived record and the record re-read from Kafka must agree on."""

    def as_json(self, record: Any, show_bytes: ShowBytes) -> dict[str, object]:
        """A decoded record as a JSON object (``protoagg cat``)."""


def _within_frame_limit(
    records: list[Any],
    rejections: list[Rejection],
    encode: Callable[[Iterable[Any]], bytes],
    max_frame_bytes: int,
    messages: Sequence[KafkaMessage],
) -> tuple[list[Any], list[Rejection]]:
    """``parse``'s records and rejections with records too large to frame moved to the latter.

    The same rule as the batch builder's (``frame_too_large``), so the checker expects exactly
    the dead letters the archiver made.
    """
    large = {m.offset: m for m in messages if might_pass_frame_limit(m, max_frame_bytes)}
    if not large:
        return records, rejections
    kept, refused = [], list(rejections)
    for record in records:
        if record.offset not in large:
            kept.append(record)
            continue
        size = len(encode([record])) - FRAME_HEADER_BYTES
        if size > max_frame_bytes:
            refused.append(frame_too_large(large[record.offset], size, max_frame_bytes))
        else:
            kept.append(record)
    if len(refused) > len(rejections):
        refused.sort(key=lambda r: r.message.offset)
    return kept, refused


@dataclass(frozen=True)
class LogFormat:
    """JSON log values as ``ProtoLog`` frames, byte for byte the reference tool's."""

    fields: LogFields = DEFAULT_FIELDS
    name: str = LOG
    identity_names_place: bool = False
    max_frame_bytes: int = MAX_FRAME_BYTES

    def parse(
        self, messages: Sequence[KafkaMessage], max_bytes: int
    ) -> tuple[list[Any], list[Rejection]]:
        records, rejections = parse_messages(messages, max_bytes, self.fields)
        return _within_frame_limit(records, rejections, self.encode, self.max_frame_bytes, messages)

    def encode(self, records: Iterable[Any]) -> bytes:
        return encode_records(records)

    def batch_builder(self, topic: str, partition: int, max_bytes: int) -> BatchBuilder:
        fields = self.fields
        append = ProtoLogFrames().append

        def write(message: KafkaMessage, out: bytearray) -> str:
            record = parse_log_value(
                message.offset, message.value, max_bytes, fields, message.timestamp_ms
            )
            append(out, record)
            return record.log_id.lower()

        return BatchBuilder(
            topic, partition, write, key_width=UUID_TEXT_WIDTH, max_frame_bytes=self.max_frame_bytes
        )

    def decode(self, stream: BinaryIO) -> Iterator[Any]:
        return iter_records(stream, self.max_frame_bytes)

    def identity(self, record: Any) -> str:
        # The logId (a record of a FramedBatch has no other field). PostgreSQL's uuid (the
        # dedupe window) ignores case, so the archive must too.
        return str(record.dedupe_key).lower()

    def content(self, record: Any) -> tuple[object, ...]:
        return (record.log_id.lower(), record.seconds, record.nanos, record.message)

    def as_json(self, record: Any, show_bytes: ShowBytes) -> dict[str, object]:
        return {
            "logId": record.log_id,
            "timestamp": format_rfc3339(record.seconds, record.nanos),
            "message": record.message,
        }


@dataclass(frozen=True)
class DedupeKey:
    """What dedupes a record in the ``record`` format besides its offset.

    ``none``, ``key``, ``header:NAME`` or ``json:FIELD`` (a top-level field of a JSON value).
    """

    kind: str = "none"
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> DedupeKey:
        kind, colon, name = text.strip().partition(":")
        if kind in ("none", "key") and not colon:
            return cls(kind)
        if kind in ("header", "json") and name:
            return cls(kind, name)
        raise ConfigError(
            f"PROTOAGG_DEDUPE_KEY must be none, key, header:NAME or json:FIELD, got {text!r}"
        )

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind

    def source(self, record: ArchivedKafkaRecord | KafkaMessage) -> bytes | None:
        """The bytes that identify the record's content, or None (archived, never deduped)."""
        if self.kind == "key":
            return record.key
        if self.kind == "header":
            return next((v for k, v in record.headers if k == self.name), None)
        if self.kind == "json" and record.value is not None:
            try:
                obj = orjson.loads(record.value)
            except orjson.JSONDecodeError:
                return None
            if isinstance(obj, dict) and self.name in obj:
                # Canonical JSON of the field, so 1 and "1" stay different keys.
                return orjson.dumps(obj[self.name], option=orjson.OPT_SORT_KEYS)
        return None

    def digest(self, record: ArchivedKafkaRecord | KafkaMessage) -> str | None:
        """128 bits of the source, scoped to the topic: two topics' keys are unrelated."""
        if self.kind == "none":
            return None
        data = self.source(record)
        if data is None:
            return None
        scope = f"{record.topic}\0{self}\0".encode()
        return hashlib.blake2b(scope + data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class RecordFormat:
    """Every Kafka record, whole, as a ``KafkaRecord`` frame.

    Only a record whose frame would pass ``max_frame_bytes`` is rejected: readers refuse larger
    frames as corrupt.
    """

    dedupe: DedupeKey = DedupeKey()
    name: str = RECORD
    identity_names_place: bool = True
    max_frame_bytes: int = MAX_FRAME_BYTES

    def parse(
        self, messages: Sequence[KafkaMessage], max_bytes: int
    ) -> tuple[list[Any], list[Rejection]]:
        records = [
            ArchivedKafkaRecord(
                m.topic,
                m.partition,
                m.offset,
                m.timestamp_ms,
                m.timestamp_type,
                m.key,
                m.value,
                m.headers,
            )
            for m in messages
        ]
        if self.dedupe.kind != "none":
            digest = self.dedupe.digest
            records = [r._replace(dedupe_key=digest(r)) for r in records]
        return _within_frame_limit(records, [], self.encode, self.max_frame_bytes, messages)

    def encode(self, records: Iterable[Any]) -> bytes:
        return encode_kafka_records(records)

    def batch_builder(self, topic: str, partition: int, max_bytes: int) -> BatchBuilder:
        append = KafkaRecordFrames().append
        if self.dedupe.kind == "none":

            def write(message: KafkaMessage, out: bytearray) -> str | None:
                append(out, message)
                return None

            return BatchBuilder(
                topic, partition, write, key_width=0, max_frame_bytes=self.max_frame_bytes
            )
        digest = self.dedupe.digest

        def write_keyed(message: KafkaMessage, out: bytearray) -> str | None:
            append(out, message)
            return digest(message)

        return BatchBuilder(
            topic,
            partition,
            write_keyed,
            key_width=DIGEST_TEXT_WIDTH,
            max_frame_bytes=self.max_frame_bytes,
        )

    def decode(self, stream: BinaryIO) -> Iterator[Any]:
        digest = self.dedupe.digest if self.dedupe.kind != "none" else None
        return iter_kafka_records(stream, digest, self.max_frame_bytes)

    def identity(self, record: Any) -> str:
        return f"{record.topic}/{record.partition}@{record.offset}"

    def content(self, record: Any) -> tuple[object, ...]:
        return tuple(record[:8])

    def as_json(self, record: Any, show_bytes: ShowBytes) -> dict[str, object]:
        def shown(data: bytes | None) -> object:
            return None if data is None else show_bytes(data)

        seconds, millis = divmod(record.timestamp_ms, 1000)
        return {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "timestamp": format_rfc3339(seconds, millis * 1_000_000),
            "timestamp_type": _TIMESTAMP_TYPES.get(record.timestamp_type, "unspecified"),
            "key": shown(record.key),
            "value": shown(record.value),
            "headers": [[name, shown(value)] for name, value in record.headers],
        }


_TIMESTAMP_TYPES = {0: "create_time", 1: "log_append_time"}


def text_or_base64(data: bytes) -> object:
    """Valid UTF-8 as text, anything else as ``{"base64": ...}`` so a reader can tell."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return always_base64(data)


def always_base64(data: bytes) -> object:
    return {"base64": base64.b64encode(data).decode("ascii")}


@dataclass(frozen=True)
class FormatOptions:
    """The settings every topic of a format shares."""

    dedupe_key: str = "none"
    log_id_field: str = "logId"
    log_timestamp_field: str = "timestamp"
    log_message_field: str = "message"
    max_frame_bytes: int = MAX_FRAME_BYTES

    def build(self, name: str) -> ArchiveFormat:
        """The format called ``name``; ConfigError for an unknown one or a bad setting."""
        _check_format(name, "archive format")
        if name == LOG:
            for setting, value in (
                ("PROTOAGG_LOG_ID_FIELD", self.log_id_field),
                ("PROTOAGG_LOG_TIMESTAMP_FIELD", self.log_timestamp_field),
                ("PROTOAGG_LOG_MESSAGE_FIELD", self.log_message_field),
            ):
                if not value.strip():
                    raise ConfigError(f"{setting} must name a JSON field, got {value!r}")
            return LogFormat(
                LogFields(self.log_id_field, self.log_timestamp_field, self.log_message_field),
                max_frame_bytes=self.max_frame_bytes,
            )
        return RecordFormat(DedupeKey.parse(self.dedupe_key), max_frame_bytes=self.max_frame_bytes)


@dataclass(frozen=True)
class TopicRule:
    """One ``PROTOAGG_TOPICS`` entry: an exact topic name or a pattern, and its format."""

    format: str
    name: str | None = None
    pattern: re.Pattern[str] | None = None

    def matches(self, topic: str) -> bool:
        if self.name is not None:
            return topic == self.name
        assert self.pattern is not None
        # Internal topics only when named exactly: /.*/ must not archive __consumer_offsets.
        return not topic.startswith(INTERNAL_PREFIX) and self.pattern.fullmatch(topic) is not None

    def __str__(self) -> str:
        if self.name is not None:
            return f"{self.name}:{self.format}"
        assert self.pattern is not None
        return f"/{self.pattern.pattern}/:{self.format}"


def parse_topics(text: str, default_format: str = LOG) -> tuple[TopicRule, ...]:
    """The entries of ``PROTOAGG_TOPICS``; one ConfigError naming the first bad entry."""
    _check_format(default_format, "PROTOAGG_FORMAT")
    rules: list[TopicRule] = []
    pos = 0
    while pos < len(text):
        if text[pos] in ", \t\n":
            pos += 1
            continue
        if text[pos] == "/":
            match = _PATTERN_ENTRY.match(text, pos)
            if match is None:
                raise ConfigError(
                    f"PROTOAGG_TOPICS entry {text[pos:].split(',')[0]!r} is not /REGEX/ or "
                    "/REGEX/:FORMAT"
                )
            fmt = (match["format"] or "").strip() or default_format
            _check_format(fmt, f"PROTOAGG_TOPICS entry {match.group(0).rstrip(', ')!r}")
            try:
                pattern = re.compile(match["regex"])
            except re.error as exc:
                raise ConfigError(
                    f"PROTOAGG_TOPICS entry /{match['regex']}/ is not a valid regular expression: "
                    f"{exc}"
                ) from None
            rules.append(TopicRule(fmt, pattern=pattern))
            pos = match.end()
            continue
        end = text.find(",", pos)
        entry = text[pos : len(text) if end < 0 else end].strip()
        pos = len(text) if end < 0 else end + 1
        name, colon, fmt = entry.partition(":")
        name, fmt = name.strip(), fmt.strip()
        if _TOPIC_NAME.match(name) is None:
            raise ConfigError(
                f"PROTOAGG_TOPICS entry {entry!r}: {name!r} is not a Kafka topic name "
                "(letters, digits, '.', '_', '-'); write a pattern as /REGEX/"
            )
        if colon:
            _check_format(fmt, f"PROTOAGG_TOPICS entry {entry!r}")
        rules.append(TopicRule(fmt if colon else default_format, name=name))
    if not rules:
        raise ConfigError("PROTOAGG_TOPICS names no topic")
    return tuple(rules)


def _check_format(name: str, where: str) -> None:
    if name not in FORMATS:
        raise ConfigError(
            f"{where}: unknown archive format {name!r}; known formats are {', '.join(FORMATS)}"
        )


def rule_for(rules: Sequence[TopicRule], topic: str) -> TopicRule | None:
    """The first entry that matches ``topic`` (an exact name wins over an earlier pattern)."""
    named = next((r for r in rules if r.name == topic), None)
    return named or next((r for r in rules if r.matches(topic)), None)


def select_topics(rules: Sequence[TopicRule], existing: Iterable[str]) -> list[str]:
    """The topics to archive: every named one (existing or not), then pattern matches, sorted."""
    named = [r.name for r in rules if r.name is not None]
    patterns = [r for r in rules if r.pattern is not None]
    matched = sorted(
        {t for t in existing if t not in named and any(r.matches(t) for r in patterns)}
    )
    return list(dict.fromkeys(named)) + matched


def has_patterns(rules: Sequence[TopicRule]) -> bool:
    return any(r.pattern is not None for r in rules)


@dataclass(frozen=True)
class TopicFormats:
    """Which format each topic is archived in: the ``PROTOAGG_TOPICS`` entries and options."""

    rules: tuple[TopicRule, ...]
    default_format: str = LOG
    options: FormatOptions = FormatOptions()

    @classmethod
    def parse(
        cls, topics: str, default_format: str = LOG, options: FormatOptions | None = None
    ) -> TopicFormats:
        """Parse and validate everything at once, so a bad setting fails at load time."""
        rules = parse_topics(topics, default_format)
        formats = cls(rules, default_format, options or FormatOptions())
        for name in {r.format for r in formats.rules} | {default_format}:
            formats.options.build(name)
        return formats

    def format_for(self, topic: str) -> ArchiveFormat:
        """The format of ``topic``; a topic no entry names (launched by hand) takes the default."""
        rule = rule_for(self.rules, topic)
        return self.options.build(rule.format if rule is not None else self.default_format)
