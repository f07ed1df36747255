"""Asset checks run with each batch, and catch a corrupted archive when re-checked."""

from __future__ import annotations

from protoagg_dagster.archive.assets import ARCHIVE_ASSET
from protoagg_dagster.archive.checks import FRAMING, NO_GAPS, UNIQUE_IDS, evaluate_batch
from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.ledger import latest_appended, ledger_connection
from protoagg_dagster.archive.run_tags import range_run_config
from protoagg_dagster.core.formats import LogFormat
from tests.helpers import (
    Stack,
    create_topic,
    log_value,
    memory_instance,
    produce,
    topic_of,
    with_topics,
)


def test_each_batch_reports_passing_checks_and_a_corruption_is_caught(stack: Stack) -> None:
    topic = topic_of(stack)
    # The topic has its own asset too: a run still evaluates each check once, on the archive's.
    stack = with_topics(stack, topic)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, [log_value() for _ in range(40)])
    with memory_instance() as instance:
        for start, end in ((0, 20), (20, 40)):
            result = archive_kafka_batch.execute_in_process(
                run_config=range_run_config(topic, 0, start, end),
                resources=stack.resources(),
                instance=instance,
            )
            evaluations = [
                e.asset_check_evaluation_data
                for e in result.all_events
                if e.event_type_value == "ASSET_CHECK_EVALUATION"
            ]
            archive = ARCHIVE_ASSET.to_user_string()
            assert sorted(
                (e.asset_key.to_user_string(), e.check_name, e.passed) for e in evaluations
            ) == sorted((archive, name, True) for name in (FRAMING, UNIQUE_IDS, NO_GAPS))
            assert all(e.metadata["ranges_by_topic"].value == {topic: 1} for e in evaluations), (
                evaluations
            )
    bucket = stack.gcs.get_bucket()
    blob = bucket.get_blob(stack.gcs.object_template)
    assert blob is not None
    data = bytearray(blob.download_as_bytes())
    data[-30:-26] = b"\xff\xff\xff\x0f"  # a garbage length prefix inside the last batch
    bucket.blob(stack.gcs.object_template).upload_from_string(bytes(data))
    with ledger_connection(stack.postgres) as conn:
        [latest] = latest_appended(conn)
    verdicts = {e.check_name: e.passed for e in evaluate_batch(bucket, latest, [], LogFormat())}
    assert verdicts[FRAMING] is False
