"""Crash anywhere: a run SIGKILLed at each step boundary, then the normal machinery finishes.

Every time the archive must hold each distinct logId of the range exactly once, in offset order;
no claim may be left hiding a message, and a cleanup pass removes leftover temporary objects.
"""

from __future__ import annotations

import json
import signal

import pytest

from protoagg_dagster.archive.ledger import ledger_connection, read_progress
from protoagg_dagster.archive.store import remove_orphaned_temp_objects
from protoagg_dagster.core.archive_object import TEMP_PREFIX
from tests.e2e.run_range import CRASH_POINTS
from tests.helpers import (
    Stack,
    archive,
    archived_records,
    check_archive,
    create_topic,
    log_value,
    memory_instance,
    produce,
    run_in_subprocess,
    run_sensor_until_idle,
    topic_of,
    with_topics,
)


@pytest.mark.parametrize("crash_at", sorted(CRASH_POINTS))
def test_crash_at_each_step_then_recovery_archives_exactly_once(
    stack: Stack, crash_at: str
) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    first = [log_value() for _ in range(60)]
    # Repeats inside the crashed range and across ranges: dedupe must survive the crash too.
    values = first + first[10:20] + [log_value() for _ in range(30)]
    produce(stack.kafka, topic, values)

    crashed = run_in_subprocess(stack, topic, 0, 0, 70, crash_at=crash_at)
    assert crashed.wait(timeout=180) == -signal.SIGKILL

    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)

    bucket = stack.gcs.get_bucket()
    removed = remove_orphaned_temp_objects(bucket, older_than_seconds=0, topic=topic)
    assert not list(bucket.list_blobs(prefix=f"{TEMP_PREFIX}{topic}/"))
    if crash_at in ("after_upload", "after_compose"):
        assert any(name.startswith(f"{TEMP_PREFIX}{topic}/0/0-70-") for name in removed)

    records, _ = archive(stack)
    distinct = list(dict.fromkeys(json.loads(v)["logId"] for v in values))
    assert [r.log_id for r in records] == distinct
    with ledger_connection(stack.postgres) as conn:
        progress = read_progress(conn, topic)[0]
    assert progress.pending is None
    assert progress.next_offset == len(values)
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert (check.offsets, check.archived, check.duplicates) == (len(values), len(distinct), 10)


@pytest.mark.parametrize("crash_at", ["after_claim", "after_compose", "before_commit"])
def test_record_format_crash_then_recovery_archives_every_offset_once(
    stack: Stack, crash_at: str
) -> None:
    topic = topic_of(stack)
    stack = with_topics(stack, f"{topic}:record")
    create_topic(stack.kafka, topic)
    # Same values again and again: the record format archives each offset, whatever it holds.
    values = [b"\xff\x00same"] * 50 + [b""] * 30
    produce(stack.kafka, topic, values)

    crashed = run_in_subprocess(stack, topic, 0, 0, 70, crash_at=crash_at)
    assert crashed.wait(timeout=180) == -signal.SIGKILL
    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)

    records = archived_records(stack)
    assert [(r.offset, r.value) for r in records] == list(enumerate(values))
    with ledger_connection(stack.postgres) as conn:
        progress = read_progress(conn, topic)[0]
    assert progress.pending is None
    assert progress.next_offset == len(values)
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert (check.offsets, check.archived, check.duplicates) == (len(values), len(values), 0)
