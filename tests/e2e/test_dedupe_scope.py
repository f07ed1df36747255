"""What a repeated logId is a duplicate of: by default the same id from its own topic only."""

from __future__ import annotations

import uuid
from dataclasses import replace

import dagster as dg

from protoagg_dagster.resources import GCSResource
from tests.helpers import (
    Stack,
    archive,
    check_archive,
    create_topic,
    log_value,
    produce,
    run_sensor_until_idle,
    with_topics,
)


def with_object(stack: Stack, template: str) -> Stack:
    gcs = stack.gcs.model_dump()
    return replace(stack, gcs=GCSResource(**{**gcs, "object_template": template}))


def test_a_second_topic_with_the_same_log_ids_is_archived_whole_by_default(
    stack: Stack, unique: str
) -> None:
    first, second = f"first-{unique}", f"second-{unique}"
    produce_both(stack, first, second)
    # ProtoLog frames carry no topic: each topic gets its own object (README, PROTOAGG_GCS_OBJECT).
    stack = with_object(with_topics(stack, f"{first},{second}"), "{topic}/log.pb")
    meanings = archive_all(stack)
    for topic in (first, second):
        check = check_archive(with_object(stack, f"{topic}/log.pb"))
        assert check.ok, check.summary()
        assert (check.archived, check.duplicates) == (300, 20)  # each topic's own repeats
    assert any(f"from topic {second} within" in meaning for meaning in meanings), meanings


def test_the_deployment_scope_drops_ids_archived_from_any_topic(stack: Stack, unique: str) -> None:
    first, second = f"first-{unique}", f"second-{unique}"
    produce_both(stack, first, second)
    stack = with_topics(stack, f"{first},{second}", dedupe_scope="deployment")
    meanings = archive_all(stack)
    check = check_archive(stack)
    assert check.ok, check.summary()
    records, _ = archive(stack)
    assert len(records) == len({r.log_id for r in records}) == 300
    assert any("from any topic of this deployment" in meaning for meaning in meanings), meanings


def produce_both(stack: Stack, first: str, second: str) -> None:
    """The same 300 logIds into both topics, each repeating 20 of them inside itself."""
    ids = [str(uuid.uuid4()) for _ in range(300)]
    for topic in (first, second):
        create_topic(stack.kafka, topic)
        produce(stack.kafka, topic, [log_value(i) for i in [*ids, *ids[:20]]])


def archive_all(stack: Stack) -> set[str]:
    """Run the sensor until idle; what the batches' metadata says a duplicate meant."""
    stack = with_topics(stack, stack.kafka.topics, max_batch_messages=1000)
    with dg.instance_for_test() as instance:
        run_sensor_until_idle(stack, instance)
        # The whole archive's asset and each topic entry's (a run may hold both topics).
        records = [
            record
            for key in instance.get_asset_keys()
            if key.path[0].startswith("kafka_archive")
            for record in instance.fetch_materializations(key, limit=100).records
        ]
    return {
        str(r.asset_materialization.metadata["duplicate_means"].value)  # type: ignore[union-attr]
        for r in records
        if r.asset_materialization is not None
    }
