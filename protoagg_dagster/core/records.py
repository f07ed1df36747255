"""Kafka messages and the log records parsed from them (the ``log`` archive format's input).

Input values are JSON objects ``{"logId": uuid, "timestamp": RFC 3339, "message": text}`` (the
field names are configurable, ``LogFields``). Parsing either gives a ``LogRecord`` or raises
``RecordRejected`` with a short machine-readable reason, so a bad message can be set aside without
stopping the batch.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import orjson

# protobuf Timestamp's documented range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))\Z"
)
# The form producers nearly always write (UTC, 'T' and 'Z'): its fields sit at fixed places, so
# it is read by slicing, with the date and time of day up to the minute cached (``_minute_start``).
_UTC_FORM = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?Z\Z")
# The canonical 8-4-4-4-12 form only: PostgreSQL and uuid.UUID accept more spellings (braces, no
# dashes, urn:), and admitting them would let one id hide behind two strings in the archive.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
# A null value: a deletion marker of a compacted topic. It carries no log, so it is counted and
# skipped rather than dead-lettered.
TOMBSTONE = "tombstone"
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


class KafkaMessage(NamedTuple):
    """One message as read from a partition, value bytes untouched.

    A NamedTuple: batches build hundreds of thousands of these.
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    # kafka-python's code: 0 create time, 1 log-append time (-1: none, pre-0.10 messages).
    timestamp_type: int = 0


class LogRecord(NamedTuple):
    """A parsed log message: the ``ProtoLog`` fields plus its Kafka offset.

    A NamedTuple rather than a frozen dataclass: batches hold hundreds of thousands of these and
    a frozen dataclass costs several times more to construct.
    """

    offset: int
    log_id: str
    seconds: int
    nanos: int
    message: str

    @property
    def dedupe_key(self) -> str:
        """A logId is its own 128-bit dedupe key, so the dedupe window stores it unchanged."""
        return self.log_id


@dataclass(frozen=True, slots=True)
class LogFields:
    """Which JSON fields of a value hold the log's id, timestamp and message.

    ``timestamp == KAFKA_TIMESTAMP`` takes the record's Kafka timestamp; ``message ==
    WHOLE_VALUE`` keeps the whole value as the message text.
    """

    log_id: str = "logId"
    timestamp: str = "timestamp"
    message: str = "message"


KAFKA_TIMESTAMP = "kafka"
WHOLE_VALUE = "*"
DEFAULT_FIELDS = LogFields()


class RecordRejected(ValueError):
    """A message cannot become a ``ProtoLog``; ``reason`` is a stable short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_rfc3339(text: str) -> tuple[int, int]:
    """Seconds since the epoch and nanoseconds of an RFC 3339 timestamp, without losing precision.

    ``datetime.fromisoformat`` truncates to microseconds, so the fields are converted by hand.
    """
    if _UTC_FORM.match(text) is not None:
        minute = _minute_start(text[:16])
        second = int(text[17:19])
        if minute is not None and second <= 60:
            seconds = minute + second
            if MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS:
                return seconds, int(text[20:-1].ljust(9, "0")) if len(text) > 20 else 0
        # Not a valid instant after all: the full parse below says why.
    match = _RFC3339.match(text)
    if match is None:
        raise RecordRejected("bad_timestamp", f"not an RFC 3339 timestamp: {text[:64]!r}")
    (
        _,
        _,
        _,
        hour_text,
        minute_text,
        second_text,
        fraction,
        _,
        sign,
        offset_hours,
        offset_minutes,
    ) = match.groups()
    days = _epoch_day(text[:10])
    if days is None:
        raise RecordRejected("bad_timestamp", f"no such date: {text[:64]!r}")
    hour, minute, second = int(hour_text), int(minute_text), int(second_text)
    # A leap second (:60) has no place in protobuf's smeared time; it becomes the next second.
    if hour > 23 or minute > 59 or second > 60:
        raise RecordRejected("bad_timestamp", f"no such time of day: {text[:64]!r}")
    seconds = days * 86_400 + hour * 3_600 + minute * 60 + second
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    if sign:
        if int(offset_hours) > 23 or int(offset_minutes) > 59:
            raise RecordRejected("bad_timestamp", f"no such UTC offset: {text[:64]!r}")
        shift = int(offset_hours) * 3_600 + int(offset_minutes) * 60
        seconds += -shift if sign == "+" else shift
    if not MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS:
        raise RecordRejected("timestamp_out_of_range", f"outside protobuf Timestamp: {text!r}")
    return seconds, nanos


@functools.lru_cache(maxsize=4096)
def _minute_start(text: str) -> int | None:
    """Seconds since the epoch of ``YYYY-MM-DDTHH:MM`` (UTC), or None if no such minute."""
    days = _epoch_day(text[:10])
    hour, minute = int(text[11:13]), int(text[14:16])
    if days is None or hour > 23 or minute > 59:
        return None
    return days * 86_400 + hour * 3_600 + minute * 60


@functools.lru_cache(maxsize=4096)
def _epoch_day(date: str) -> int | None:
    """Days since 1970-01-01 of ``YYYY-MM-DD``, or None if no such date.

    Cached: the messages of a batch share very few dates.
    """
    year, month, day = int(date[:4]), int(date[5:7]), int(date[8:10])
    if not 1 <= month <= 12 or not 1 <= day <= _days_in_month(year, month):
        return None
    return _days_from_civil(year, month, day)


def _days_in_month(year: int, month: int) -> int:
    if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
        return 29
    return _DAYS_IN_MONTH[month - 1]


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


def format_rfc3339(seconds: int, nanos: int) -> str:
    """The canonical UTC form (``...Z``) of a protobuf Timestamp, for readers and reports."""
    days, rest = divmod(seconds, 86_400)
    year, month, day = _civil_from_days(days)
    hour, rest = divmod(rest, 3_600)
    minute, second = divmod(rest, 60)
    text = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"


def _civil_from_days(days: int) -> tuple[int, int, int]:
    days += 719_468
    era = days // 146_097
    day_of_era = days - era * 146_097
    year_of_era = (
        day_of_era - day_of_era // 1_460 + day_of_era // 36_524 - day_of_era // 146_096
    ) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    mp = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * mp + 2) // 5 + 1
    month = mp + (3 if mp < 10 else -9)
    return year_of_era + era * 400 + (month <= 2), month, day


def parse_log_value(
    offset: int,
    value: bytes | None,
    max_bytes: int,
    fields: LogFields = DEFAULT_FIELDS,
    timestamp_ms: int = 0,
) -> LogRecord:
    """Parse one Kafka message value into a ``LogRecord`` or raise ``RecordRejected``.

    Unknown extra fields are ignored: the archive keeps the three ``ProtoLog`` fields only.
    ``timestamp_ms`` (the record's Kafka timestamp) is used when ``fields.timestamp`` says so.
    """
    if value is None:
        raise RecordRejected(TOMBSTONE, "null value")
    if len(value) > max_bytes:
        raise RecordRejected("too_large", f"{len(value)} bytes > limit {max_bytes}")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        reason = "invalid_utf8" if "utf-8" in str(exc).lower() else "not_json"
        raise RecordRejected(reason, str(exc)) from None
    if not isinstance(obj, dict):
        raise RecordRejected("not_object", f"JSON {type(obj).__name__}, expected an object")
    log_id = obj.get(fields.log_id)
    if not isinstance(log_id, str) or not log_id:
        raise RecordRejected("missing_log_id", f"{fields.log_id} is missing, empty or not a string")
    if _UUID.match(log_id) is None:
        raise RecordRejected("bad_log_id", f"{fields.log_id} is not a UUID: {log_id[:64]!r}")
    if fields.timestamp == KAFKA_TIMESTAMP:
        seconds, millis = divmod(timestamp_ms, 1000)
        nanos = millis * 1_000_000
    else:
        timestamp = obj.get(fields.timestamp)
        if not isinstance(timestamp, str):
            raise RecordRejected("bad_timestamp", f"{fields.timestamp} is missing or not a string")
        seconds, nanos = parse_rfc3339(timestamp)
    if fields.message == WHOLE_VALUE:
        # orjson accepted the bytes, so they are valid UTF-8.
        message = value.decode()
    else:
        message = obj.get(fields.message, "")
        if not isinstance(message, str):
            raise RecordRejected(
                "bad_message", f"{fields.message} is a {type(message).__name__}, not text"
            )
    return LogRecord(offset, log_id, seconds, nanos, message)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message that could not become a ``ProtoLog``, kept whole with the reason."""

    message: KafkaMessage
    reason: str
    detail: str


def parse_messages(
    messages: Sequence[KafkaMessage], max_bytes: int, fields: LogFields = DEFAULT_FIELDS
) -> tuple[list[LogRecord], list[Rejection]]:
    """Parse a batch; bad messages are returned as rejections instead of stopping the batch."""
    records: list[LogRecord] = []
    rejections: list[Rejection] = []
    for message in messages:
        try:
            records.append(
                parse_log_value(
                    message.offset, message.value, max_bytes, fields, message.timestamp_ms
                )
            )
        except RecordRejected as exc:
            rejections.append(Rejection(message, exc.reason, exc.detail))
    return records, rejections
