"""A database and archive left by the oldest supported release upgrade and archive on exactly once.

The oldest supported release is the one of 2026-11-28 (commit dd6467e): no schema version, no
marker on the object; the object's metadata mapped each partition to the offset after its last
batch, and a claim was confirmed in the ledger after its compose. Its DDL is copied here as it
was, so the test keeps proving the upgrade whatever the migrations become.
"""

from __future__ import annotations

import io
import json
import uuid

import dagster as dg
import psycopg

from protoagg_dagster import schema
from protoagg_dagster.archive.dedupe_window import epoch_day
from protoagg_dagster.archive.ledger import ledger_connection
from protoagg_dagster.core.dead_letters import encode_envelopes, iter_dead_letters
from protoagg_dagster.core.formats import LogFormat
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.kafka.reader import read_range
from tests.helpers import (
    Stack,
    check_archive,
    create_topic,
    log_value,
    produce,
    run_sensor_until_idle,
    topic_of,
)

# `git show dd6467e:protoagg_dagster/ledger.py` and `.../dedupe_window.py`: SCHEMA of each.
OLDEST_RELEASE_DDL = """
CREATE TABLE IF NOT EXISTS archive_batches (
    batch_id     bigserial PRIMARY KEY,
    topic        text NOT NULL,
    partition    integer NOT NULL,
    start_offset bigint NOT NULL,
    end_offset   bigint NOT NULL,
    object_name  text NOT NULL,
    state        text NOT NULL CHECK (state IN ('claimed', 'appended')),
    records      integer NOT NULL,
    claimed      integer NOT NULL,
    run_id       text,
    generation   bigint,
    appended_bytes bigint,
    object_size  bigint,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    appended_at  timestamptz
);
CREATE INDEX IF NOT EXISTS archive_batches_partition
    ON archive_batches (topic, partition, start_offset);
CREATE UNIQUE INDEX IF NOT EXISTS archive_batches_one_claimed
    ON archive_batches (topic, partition) WHERE state = 'claimed';
CREATE TABLE IF NOT EXISTS archive_positions (
    topic       text NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE IF NOT EXISTS processed_logs (
    log_id       uuid NOT NULL,
    day          integer NOT NULL,
    batch_id     bigint NOT NULL,
    kafka_offset bigint NOT NULL,
    PRIMARY KEY (log_id, day)
) PARTITION BY LIST (day);
CREATE TABLE IF NOT EXISTS dedupe_window (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    current_day integer NOT NULL
);
"""
OFFSETS_KEY = "protoagg-offsets"  # that release's per-partition map on each object


def test_a_database_of_the_oldest_release_upgrades_and_archives_on_without_loss_or_doubles(
    stack: Stack, postgres_dsn: str
) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic, partitions=2)
    values = [log_value(str(uuid.uuid4()), second=i) for i in range(30)]
    values[15] = b"not json"  # a dead letter inside the pending batch
    produce(stack.kafka, topic, values, partition=0)
    produce(stack.kafka, topic, [log_value() for _ in range(10)], partition=1)
    consumer = stack.kafka.get_consumer()
    try:
        p0 = read_range(consumer, OffsetRange(topic, 0, 0, 20), 2**30).messages
        p1 = read_range(consumer, OffsetRange(topic, 1, 0, 5), 2**30).messages
    finally:
        consumer.close()
    log = LogFormat()
    records0, dead0 = log.parse(p0, stack.archiver.max_message_bytes)
    records1, _ = log.parse(p1, stack.archiver.max_message_bytes)
    assert [d.message.offset for d in dead0] == [15]

    # What the old release left: partition 0's [0, 10) archived and confirmed; [10, 20) claimed,
    # its dead letter and records composed (the maps say 20), the run killed before confirming;
    # partition 1's [0, 5) claimed and nothing composed.
    bucket = stack.gcs.get_bucket()
    archive = bucket.blob(stack.gcs.object_template)
    archive.metadata = {OFFSETS_KEY: json.dumps({f"{topic}/0": 20})}
    archive.upload_from_string(log.encode(records0), content_type="application/x-protobuf")
    dead_name = f"dead-letters/{topic}/0.jsonl"
    dead = bucket.blob(dead_name)
    dead.metadata = {OFFSETS_KEY: json.dumps({f"{topic}/0": 20})}
    dead.upload_from_string(encode_envelopes(dead0), content_type="application/x-protobuf")
    today = epoch_day()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(OLDEST_RELEASE_DDL)  # type: ignore[arg-type]
        conn.execute("INSERT INTO dedupe_window (current_day) VALUES (%s)", (today,))
        conn.execute(
            f"CREATE TABLE processed_logs_d{today} PARTITION OF processed_logs "
            f"FOR VALUES IN ({today})"  # type: ignore[arg-type]
        )
        batches = [
            (0, 0, 10, "appended", records0[:10]),
            (0, 10, 20, "claimed", records0[10:]),
            (1, 0, 5, "claimed", records1),
        ]
        for batch_id, (partition, start, end, state, claimed) in enumerate(batches, start=1):
            conn.execute(
                "INSERT INTO archive_batches (batch_id, topic, partition, start_offset, "
                "end_offset, object_name, state, records, claimed) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (batch_id, topic, partition, start, end, stack.gcs.object_template, state,
                 end - start, len(claimed)),
            )  # fmt: skip
            for record in claimed:
                conn.execute(
                    "INSERT INTO processed_logs (log_id, day, batch_id, kafka_offset) "
                    "VALUES (%s, %s, %s, %s)",
                    (record.log_id, today, batch_id, record.offset),
                )
        conn.execute(
            "INSERT INTO archive_positions (topic, partition, next_offset) "
            "VALUES (%s, 0, 10), (%s, 1, 0)",
            (topic, topic),
        )
        conn.execute("SELECT setval('archive_batches_batch_id_seq', 3)")

    with dg.instance_for_test() as instance:
        run_sensor_until_idle(stack, instance)

    check = check_archive(stack)
    assert check.ok, check.summary()
    assert (check.offsets, check.archived, check.dead_letters) == (40, 39, 1)
    lines = io.BytesIO(bucket.blob(dead_name).download_as_bytes())
    assert [d.message.offset for d in iter_dead_letters(lines)] == [15]
    with ledger_connection(stack.postgres) as conn:
        assert schema.version(conn) == schema.LATEST
        pending = conn.execute("SELECT count(*) FROM archive_batches WHERE state = 'claimed'")
        assert pending.fetchone() == (0,)
