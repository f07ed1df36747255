"""Compressed archives through the real pipeline: what the standard tools and every reader see."""

from __future__ import annotations

import io
import json
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from protoagg_dagster.archive.checks import FRAMING, evaluate_batch
from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.ledger import latest_appended, ledger_connection
from protoagg_dagster.archive.run_tags import range_run_config
from protoagg_dagster.core.archive_object import COMPRESSION_METADATA_KEY
from protoagg_dagster.core.compression import SUFFIXES
from protoagg_dagster.core.formats import LogFormat
from protoagg_dagster.core.framing import encode_records
from protoagg_dagster.core.records import LogRecord
from protoagg_dagster.reading.archive_reader import cat_archive, list_dead_letters, verify_archive
from protoagg_dagster.resources import GCSResource
from tests.helpers import (
    DECOMPRESSORS,
    Stack,
    archive,
    check_archive,
    create_topic,
    log_value,
    memory_instance,
    produce,
    run_in_subprocess,
    run_sensor_until_idle,
    topic_of,
    uncompressed,
)

CODECS = ("gzip", "zstd")
LINE = "2026-11-01T08:00:00Z INFO api GET /v1/items/{} 200 12ms user=alice"


def compressed(stack: Stack, name: str, level: int | None = None) -> Stack:
    """The stack writing ``name``-compressed objects with the default names' suffix."""
    fields = stack.gcs.model_dump()
    suffix = SUFFIXES[name]
    return replace(
        stack,
        gcs=GCSResource(
            **{
                **fields,
                "object_template": fields["object_template"] + suffix,
                "dead_letter_template": fields["object_template"] + ".dead.jsonl" + suffix,
                "compression": name,
                "compression_level": level,
            }
        ),
    )


def values(count: int) -> list[bytes]:
    return [log_value(message=LINE.format(i), second=i) for i in range(count)]


@pytest.mark.parametrize("name", CODECS)
def test_a_compressed_archive_round_trips_and_standard_tools_read_it(
    stack: Stack, name: str, tmp_path: Path
) -> None:
    stack = compressed(stack, name)
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    sent = values(250)
    # Two dead letters, in their own compressed object.
    produce(stack.kafka, topic, [*sent[:120], b"not json", b"{}", *sent[120:]])
    with memory_instance() as instance:
        assert run_sensor_until_idle(stack, instance) >= 3

    bucket = stack.gcs.get_bucket()
    blob = bucket.get_blob(stack.gcs.object_template)
    assert blob is not None
    assert blob.metadata[COMPRESSION_METADATA_KEY] == name
    assert blob.content_encoding is None  # GCS would decompress on download
    stored = blob.download_as_bytes()
    frames = uncompressed(blob).read()
    assert len(stored) * 4 < len(frames)

    # Byte-exact: the frames are those of the records sent, in order.
    records, url = archive(stack)
    expected = [json.loads(v) for v in sent]
    assert [(r.log_id, r.message) for r in records] == [
        (e["logId"], e["message"]) for e in expected
    ]
    assert frames == encode_records(
        LogRecord(0, r.log_id, r.seconds, r.nanos, r.message) for r in records
    )
    # Debian's programs (scripts/test installs zstd where it is missing).
    tool = subprocess.run(DECOMPRESSORS[name], input=stored, capture_output=True, check=True)
    assert tool.stdout == frames

    assert verify_archive(url).ok
    assert cat_archive(url, io.StringIO()) == 250
    local = tmp_path / f"archive{SUFFIXES[name]}"
    local.write_bytes(stored)
    assert cat_archive(str(local), io.StringIO()) == 250  # detected by its magic bytes
    letters_url = f"gs://{stack.gcs.bucket}/{stack.gcs.dead_letter_template}"
    letters = bucket.get_blob(stack.gcs.dead_letter_template)
    assert letters is not None and letters.metadata[COMPRESSION_METADATA_KEY] == name
    assert list_dead_letters(letters_url, io.StringIO(), with_values=False) == 2
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert (check.archived, check.dead_letters) == (250, 2)
    # The asset checks as run from the UI: the latest batch's member decompresses on its own.
    with ledger_connection(stack.postgres) as conn:
        [latest] = latest_appended(conn)
    verdicts = evaluate_batch(bucket, latest, [], LogFormat(), compression=name)
    assert all(v.passed for v in verdicts)


@pytest.mark.parametrize("name", CODECS)
def test_a_corrupt_member_is_located_in_the_object(stack: Stack, name: str) -> None:
    stack = compressed(stack, name)
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, values(200))
    with memory_instance() as instance:
        for start, end in ((0, 100), (100, 200)):
            assert archive_kafka_batch.execute_in_process(
                run_config=range_run_config(topic, 0, start, end),
                resources=stack.resources(),
                instance=instance,
            ).success
    bucket = stack.gcs.get_bucket()
    blob = bucket.get_blob(stack.gcs.object_template)
    assert blob is not None
    with ledger_connection(stack.postgres) as conn:
        [latest] = latest_appended(conn)
    assert latest.object_size == blob.size
    member = latest.object_size - latest.appended_bytes
    data = bytearray(blob.download_as_bytes())
    data[member + latest.appended_bytes // 2] ^= 0xFF
    damaged = bucket.blob(stack.gcs.object_template)
    damaged.metadata = blob.metadata
    damaged.upload_from_string(bytes(data))

    report = verify_archive(f"gs://{stack.gcs.bucket}/{stack.gcs.object_template}")
    assert not report.ok
    assert report.error is not None and f"1 at byte {member} of the object" in report.error
    assert report.error.startswith("record ")
    [framing] = [
        v
        for v in evaluate_batch(bucket, latest, [], LogFormat(), compression=name)
        if v.check_name == FRAMING
    ]
    assert not framing.passed


@pytest.mark.parametrize("name", CODECS)
def test_killed_after_compose_a_compressed_archive_is_still_exactly_once(
    stack: Stack, name: str
) -> None:
    stack = compressed(stack, name)
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    first = values(60)
    sent = first + first[10:20] + values(90)[60:]
    produce(stack.kafka, topic, sent)

    crashed = run_in_subprocess(stack, topic, 0, 0, 70, crash_at="after_compose")
    assert crashed.wait(timeout=180) == -signal.SIGKILL
    with memory_instance() as instance:
        run_sensor_until_idle(stack, instance)

    records, _ = archive(stack)
    distinct = list(dict.fromkeys(json.loads(v)["logId"] for v in sent))
    assert [r.log_id for r in records] == distinct
    blob = stack.gcs.get_bucket().get_blob(stack.gcs.object_template)
    assert blob is not None
    tool = subprocess.run(
        DECOMPRESSORS[name], input=blob.download_as_bytes(), capture_output=True, check=True
    )
    assert tool.stdout == uncompressed(blob).read()
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert (check.archived, check.duplicates) == (len(distinct), 10)


def test_changing_the_compression_of_an_existing_object_fails_saying_what_to_do(
    stack: Stack,
) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, values(40))
    with memory_instance() as instance:
        assert archive_kafka_batch.execute_in_process(
            run_config=range_run_config(topic, 0, 0, 20),
            resources=stack.resources(),
            instance=instance,
        ).success
        # Same explicit object name, now with zstd: refused, and the object stays readable.
        zstd = replace(stack, gcs=GCSResource(**{**stack.gcs.model_dump(), "compression": "zstd"}))
        result = archive_kafka_batch.execute_in_process(
            run_config=range_run_config(topic, 0, 20, 40),
            resources=zstd.resources(),
            instance=instance,
            raise_on_error=False,
        )
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures
    assert "point PROTOAGG_GCS_OBJECT" in str(failures[0].event_specific_data)
    records, url = archive(stack)
    assert len(records) == 20
    assert verify_archive(url).ok
