"""Asset checks run with each batch, and catch a corrupted archive when re-checked from the UI."""

from __future__ import annotations

import dagster as dg

from protoagg_dagster.archive.assets import ARCHIVE_ASSET, archive_asset, topic_asset_specs
from protoagg_dagster.archive.checks import (
    FRAMING,
    NO_GAPS,
    RUN_CHECK,
    UNIQUE_IDS,
    VERDICTS,
    build_archive_checks,
    evaluate_batch,
)
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
            # One evaluation a run, on the archive's asset, with each verdict's count.
            [run_check] = evaluations
            assert (run_check.asset_key, run_check.check_name, run_check.passed) == (
                ARCHIVE_ASSET,
                RUN_CHECK,
                True,
            )
            counts = {k: v.value for k, v in run_check.metadata.items()}
            assert counts["ranges_by_topic"] == {topic: 1}
            assert counts["ranges_checked"] == 1
            assert [counts[f"failed_{name}"] for name in VERDICTS] == [0, 0, 0]
    bucket = stack.gcs.get_bucket()
    blob = bucket.get_blob(stack.gcs.object_template)
    assert blob is not None
    data = bytearray(blob.download_as_bytes())
    data[-30:-26] = b"\xff\xff\xff\x0f"  # a garbage length prefix inside the last batch
    bucket.blob(stack.gcs.object_template).upload_from_string(bytes(data))
    with ledger_connection(stack.postgres) as conn:
        [latest] = latest_appended(conn)
    verdicts = {e.check_name: e.passed for e in evaluate_batch(bucket, latest, [], LogFormat())}
    assert verdicts == {FRAMING: False, UNIQUE_IDS: True, NO_GAPS: True}
    # The checks as the UI executes them: the run check on the archive's asset and the three
    # verdicts on the topic entry's, over each partition's latest batch.
    rules = stack.archiver.topic_formats(topic).rules
    recheck = dg.define_asset_job("recheck", selection=dg.AssetSelection.all_asset_checks())
    defs = dg.Definitions(
        assets=[archive_asset, *topic_asset_specs(rules)],
        asset_checks=[build_archive_checks(rules)],
        jobs=[recheck],
        resources=stack.resources(),
    )
    with memory_instance() as instance:
        result = defs.resolve_job_def("recheck").execute_in_process(instance=instance)
    found = {(e.asset_key, e.check_name): e for e in result.get_asset_check_evaluations()}
    [topic_key] = [spec.key for spec in topic_asset_specs(rules)]
    assert {key: e.passed for key, e in found.items()} == {
        (ARCHIVE_ASSET, RUN_CHECK): False,
        (topic_key, FRAMING): False,
        (topic_key, UNIQUE_IDS): True,
        (topic_key, NO_GAPS): True,
    }
    run_check = found[(ARCHIVE_ASSET, RUN_CHECK)]
    whole = {k: v.value for k, v in run_check.metadata.items()}
    assert (whole["failed"], whole["first_failure"], whole[f"failed_{FRAMING}"]) == (1, FRAMING, 1)
    assert run_check.description == f"failed: {FRAMING} (1 ranges)"
