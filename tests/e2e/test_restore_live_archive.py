"""Restore on a live archive: an older member of a sequence gains a batch after a newer one
exists (a rollover while other partitions still append); a rerun restores it, once."""

from __future__ import annotations

from google.cloud import storage

from protoagg_dagster.core.archive_object import FORMAT_METADATA_KEY
from protoagg_dagster.core.formats import RecordFormat
from protoagg_dagster.core.kafka_record import ArchivedKafkaRecord
from tests.e2e.test_record_format import committed, create
from tests.helpers import Stack, run_restore, topic_of


def records(partition: int, offsets: range) -> list[ArchivedKafkaRecord]:
    return [
        ArchivedKafkaRecord(
            "src", partition, o, 1_700_000_000_000 + o, 0, None, b"%d/%d" % (partition, o), ()
        )
        for o in offsets
    ]


def put(bucket: storage.Bucket, name: str, archived: list[ArchivedKafkaRecord]) -> None:
    blob = bucket.blob(name)
    blob.metadata = {FORMAT_METADATA_KEY: "record"}
    blob.upload_from_string(RecordFormat().encode(archived))


def test_a_rerun_restores_what_an_older_member_gained_after_a_rollover_once(
    stack: Stack, unique: str
) -> None:
    bucket = stack.gcs.get_bucket()
    first, second = f"{unique}/log.pb", f"{unique}/log.0001.pb"
    put(bucket, first, records(0, range(0, 10)))
    put(bucket, second, records(0, range(10, 20)))
    target = f"{topic_of(stack)}-restored"
    create(stack, target, partitions=2)
    args = (f"gs://{stack.gcs.bucket}/{first}", "--to-topic", target)
    assert run_restore(*args).returncode == 0
    # Partition 1's batch, claimed into the first member before the rollover, lands now.
    put(bucket, first, records(0, range(0, 10)) + records(1, range(0, 5)))
    again = run_restore(*args)
    assert again.returncode == 0, again.stderr
    values = sorted(row[5] for row in committed(stack, target))
    expected = records(0, range(20)) + records(1, range(5))
    assert values == sorted(r.value for r in expected)
