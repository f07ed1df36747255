"""Bad messages never stop the archive and never disappear: they become dead letters."""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import replace

import pytest

from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.run_tags import range_run_config
from protoagg_dagster.core.dead_letters import iter_dead_letters
from protoagg_dagster.core.framing import iter_records
from protoagg_dagster.resources.settings import ArchiverSettings
from tests.helpers import (
    Stack,
    check_archive,
    create_topic,
    log_value,
    memory_instance,
    run_sensor_until_idle,
    topic_of,
)

GOOD_ID = str(uuid.uuid4())
BAD_CASES: list[tuple[str, bytes | None]] = [
    ("not_json", b"this is not json"),
    ("not_object", b'["a", "list"]'),
    ("missing_log_id", json.dumps({"timestamp": "2026-01-01T00:00:00Z", "message": "m"}).encode()),
    ("missing_log_id", json.dumps({"logId": "", "timestamp": "2026-01-01T00:00:00Z"}).encode()),
    ("bad_log_id", json.dumps({"logId": "42", "timestamp": "2026-01-01T00:00:00Z"}).encode()),
    ("bad_timestamp", json.dumps({"logId": str(uuid.uuid4())}).encode()),
    ("bad_timestamp", json.dumps({"logId": str(uuid.uuid4()), "timestamp": "tuesday"}).encode()),
    (
        "timestamp_out_of_range",
        json.dumps({"logId": str(uuid.uuid4()), "timestamp": "0001-01-01T00:00:00+05:00"}).encode(),
    ),
    (
        "bad_message",
        json.dumps(
            {"logId": str(uuid.uuid4()), "timestamp": "2026-01-01T00:00:00Z", "message": 7}
        ).encode(),
    ),
    ("invalid_utf8", b'{"logId": "\xff\xfe"}'),
    ("too_large", log_value(message="x" * 3000)),
    ("tombstone", None),
]


def produce_mixed(stack: Stack, topic: str) -> list[tuple[bytes | None, str | None]]:
    """Good and bad values interleaved, each with the reason it must be set aside for (or None)."""
    cases: list[tuple[bytes | None, str | None]] = []
    for reason, bad in BAD_CASES:
        cases += [(log_value(), None), (bad, reason)]
    cases.append(
        (log_value(GOOD_ID, "extra fields are ignored")[:-1] + b', "level": "INFO"}', None)
    )
    producer = stack.kafka.get_producer()
    try:
        for value, _ in cases:
            producer.send(topic, value=value, key=b"k", headers=[("source", b"test")], partition=0)
        producer.flush()
    finally:
        producer.close()
    return cases


def test_each_bad_message_becomes_a_dead_letter_and_good_ones_are_archived(stack: Stack) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    small = replace(
        stack,
        archiver=ArchiverSettings(
            batch_size=10,
            linger_seconds=0,
            max_batch_messages=10,
            max_message_bytes=2048,
            max_dead_letter_ratio=1.0,
        ),
    )
    cases = produce_mixed(small, topic)
    with memory_instance() as instance:
        runs = run_sensor_until_idle(small, instance)
    assert runs == 3  # 25 offsets in runs of at most 10
    bucket = stack.gcs.get_bucket()
    archive_blob = bucket.get_blob(stack.gcs.object_template)
    assert archive_blob is not None
    archived = list(iter_records(io.BytesIO(archive_blob.download_as_bytes())))
    good = [json.loads(value)["logId"] for value, reason in cases if reason is None and value]
    assert [r.log_id for r in archived] == good
    assert archived[-1].log_id == GOOD_ID

    letters_blob = bucket.get_blob(f"dead-letters/{topic}/0.jsonl")
    assert letters_blob is not None
    letters = list(iter_dead_letters(io.BytesIO(letters_blob.download_as_bytes())))
    expected = [(reason, value) for value, reason in cases if reason not in (None, "tombstone")]
    assert [(d.reason, d.message.value) for d in letters] == expected
    assert all(
        d.message.key == b"k" and d.message.headers == (("source", b"test"),) for d in letters
    )
    # Nothing lost: every offset is archived, a dead letter, or the one tombstone.
    check = check_archive(small)
    assert check.ok, check.summary()
    assert (check.offsets, check.archived, check.dead_letters, check.tombstones) == (
        len(cases),
        len(archived),
        len(letters),
        1,
    )


def test_a_topic_of_junk_fails_the_run_loudly_but_keeps_every_message(stack: Stack) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    producer = stack.kafka.get_producer()
    junk = [f"plain text line {i}".encode() for i in range(20)]
    for value in junk:
        producer.send(topic, value=value, partition=0)
    producer.flush()
    producer.close()
    with memory_instance() as instance:
        result = archive_kafka_batch.execute_in_process(
            run_config=range_run_config(topic, 0, 0, 20),
            resources=stack.resources(),
            instance=instance,
            raise_on_error=False,
        )
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure]
    assert "PROTOAGG_MAX_DEAD_LETTER_RATIO" in str(failure[0].step_failure_data.error)
    blob = stack.gcs.get_bucket().get_blob(f"dead-letters/{topic}/0.jsonl")
    assert blob is not None
    letters = list(iter_dead_letters(io.BytesIO(blob.download_as_bytes())))
    assert [d.message.value for d in letters] == junk


@pytest.mark.parametrize("template", ["{nope}.pb", ""])
def test_a_bad_object_template_fails_naming_the_setting(stack: Stack, template: str) -> None:
    from protoagg_dagster.core.errors import ConfigError
    from protoagg_dagster.resources import GCSResource

    with pytest.raises(ConfigError, match="PROTOAGG_GCS_OBJECT"):
        GCSResource(bucket="logs", object_template=template).get_bucket()
