"""Sizes with limits: one frame-size limit for writer and readers; larger records become dead
letters with the reason, never frames the readers would refuse."""

from __future__ import annotations

import io
from dataclasses import replace

import dagster as dg
import pytest

from protoagg_dagster.archive.store import sequence_blobs
from protoagg_dagster.core.dead_letters import iter_dead_letters
from protoagg_dagster.core.errors import ArchiveFormatError
from protoagg_dagster.core.formats import FormatOptions
from protoagg_dagster.reading.archive_reader import list_dead_letters
from protoagg_dagster.resources import GCSResource
from tests.helpers import (
    Stack,
    archived_records,
    check_archive,
    create_topic,
    log_value,
    produce,
    run_sensor_until_idle,
    topic_of,
    uncompressed,
    with_topics,
)

LIMIT = 100_000


@pytest.mark.parametrize("archive_format", ["record", "log"])
def test_a_record_above_the_frame_limit_is_a_dead_letter_and_the_archive_reads(
    stack: Stack, archive_format: str
) -> None:
    topic = topic_of(stack)
    stack = with_topics(
        stack,
        f"{topic}:{archive_format}",
        max_frame_bytes=LIMIT,
        max_message_bytes=10 * LIMIT,
        max_dead_letter_ratio=1.0,
    )
    create_topic(stack.kafka, topic)
    big = b'{"logId": "6f1c1f7e-3a54-4b0c-9a8e-2f0b8f0c9d11", "timestamp": "2026-11-01T08:00:00Z", '
    big += b'"message": "' + b"x" * (2 * LIMIT) + b'"}'
    small = (
        b'{"logId": "0b7a3c52-58f3-4d0f-8c53-3b2b0f6f7a10", "timestamp": "2026-11-01T08:00:01Z"}'
    )
    produce(stack.kafka, topic, [small, big, small.replace(b"0b7a", b"1b7a")])
    with dg.instance_for_test() as instance:
        run_sensor_until_idle(stack, instance)

    assert [
        r.offset if archive_format == "record" else r.log_id[:4] for r in archived_records(stack)
    ] == ([0, 2] if archive_format == "record" else ["0b7a", "1b7a"])
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert (check.archived, check.dead_letters) == (2, 1)
    blob = stack.gcs.get_bucket().get_blob(f"dead-letters/{topic}/0.jsonl")
    assert blob is not None
    [letter] = iter_dead_letters(io.BytesIO(uncompressed(blob).read()))
    assert (letter.message.offset, letter.reason) == (1, "frame_too_large")
    assert f"PROTOAGG_MAX_FRAME_BYTES {LIMIT}" in letter.detail


def test_readers_refuse_a_frame_above_the_same_limit() -> None:
    options = FormatOptions(max_frame_bytes=LIMIT)
    oversized = (LIMIT + 1).to_bytes(4, "little") + b"\0" * (LIMIT + 1)
    for name in ("log", "record"):
        with pytest.raises(ArchiveFormatError, match=f"{LIMIT}-byte frame limit"):
            list(options.build(name).decode(io.BytesIO(oversized)))


def test_dead_letter_objects_roll_over_like_archive_objects(stack: Stack) -> None:
    topic = topic_of(stack)
    stack = replace(stack, gcs=GCSResource(**{**stack.gcs.model_dump(), "max_object_bytes": 4000}))
    create_topic(stack.kafka, topic)
    # Four runs of 100 messages, each setting aside ten (about 2 KB of envelopes per run).
    produce(
        stack.kafka,
        topic,
        [b"not json %d" % i if i % 10 == 0 else log_value(second=i) for i in range(400)],
    )
    with dg.instance_for_test() as instance:
        run_sensor_until_idle(stack, instance)
    base = f"dead-letters/{topic}/0.jsonl"
    members = [blob.name for blob in sequence_blobs(stack.gcs.get_bucket(), base)]
    assert len(members) >= 2, members
    assert all(blob.size <= 4000 for blob in sequence_blobs(stack.gcs.get_bucket(), base))
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert (check.archived, check.dead_letters) == (360, 40)
    listing = io.StringIO()
    assert list_dead_letters(f"gs://{stack.gcs.bucket}/{base}", listing, with_values=False) == 40
