"""Dead letters: messages that cannot become a ``ProtoLog``, kept whole with the reason.

Each is one JSON line (an *envelope*) so a person can read the dead-letter object with any tool;
key, header values and the original value are base64, so the bytes survive exactly.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from protoagg_dagster.core.errors import ArchiveFormatError
from protoagg_dagster.core.records import KafkaMessage, Rejection

DEFAULT_TEMPLATE = "dead-letters/{topic}/{partition}.jsonl"


@dataclass(frozen=True)
class DeadLetter:
    """A decoded envelope."""

    message: KafkaMessage
    reason: str
    detail: str


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def encode_envelopes(rejections: Iterable[Rejection]) -> bytes:
    """One JSON line per rejected message, in the order given."""
    lines = []
    for rejection in rejections:
        message = rejection.message
        lines.append(
            json.dumps(
                {
                    "topic": message.topic,
                    "partition": message.partition,
                    "offset": message.offset,
                    "timestamp_ms": message.timestamp_ms,
                    "timestamp_type": message.timestamp_type,
                    "key_b64": _b64(message.key),
                    "headers": [[name, _b64(value)] for name, value in message.headers],
                    "value_b64": _b64(message.value),
                    "reason": rejection.reason,
                    "detail": rejection.detail,
                },
                separators=(",", ":"),
            )
        )
    return "".join(line + "\n" for line in lines).encode()


def iter_dead_letters(lines: Iterable[bytes]) -> Iterator[DeadLetter]:
    """Decode envelopes; raise ArchiveFormatError naming the line of a broken one."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            message = KafkaMessage(
                topic=raw["topic"],
                partition=int(raw["partition"]),
                offset=int(raw["offset"]),
                timestamp_ms=int(raw["timestamp_ms"]),
                key=_unb64(raw["key_b64"]),
                value=_unb64(raw["value_b64"]),
                headers=tuple((name, _unb64(value)) for name, value in raw["headers"]),
                # Envelopes written before the type was kept: create time, Kafka's default.
                timestamp_type=int(raw.get("timestamp_type", 0)),
            )
            yield DeadLetter(message, str(raw["reason"]), str(raw["detail"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ArchiveFormatError(
                f"dead-letter line {number} is not an envelope: {exc}"
            ) from exc
