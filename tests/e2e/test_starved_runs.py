"""A run starved of CPU before it takes its lease is not failed as dead; a dead one still is.
Either way no follow-up is launched behind it while its lease stays free."""

from __future__ import annotations

import time

import dagster as dg
import pytest
from dagster._core.events import DagsterEvent, DagsterEventType

from protoagg_dagster.archive import leases
from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.ledger import ledger_connection
from protoagg_dagster.archive.run_tags import config_ranges
from protoagg_dagster.archive.sensor import DEAD_AFTER_SECONDS, SensorCursor
from tests.helpers import Stack, create_topic, log_value, produce, tick, topic_of

FREE_FOR = DEAD_AFTER_SECONDS + 5


def launched(result: dg.SensorResult) -> list[tuple[int, int]]:
    return [
        (r.start, r.end)
        for request in result.run_requests or []
        for r in config_ranges(request.run_config)
    ]


def started(instance: dg.DagsterInstance, request: dg.RunRequest, seconds_ago: float) -> str:
    """A run of ``request`` that reached STARTED ``seconds_ago`` and took no lease since."""
    run = instance.create_run_for_job(
        archive_kafka_batch, run_config=request.run_config, tags=request.tags
    )
    instance.report_dagster_event(
        DagsterEvent(DagsterEventType.RUN_START.value, job_name=run.job_name),
        run.run_id,
        timestamp=time.time() - seconds_ago,
    )
    return run.run_id


@pytest.mark.parametrize("took_its_lease", [False, True])
def test_a_run_whose_lease_stays_free_is_failed_only_if_it_held_it_and_gets_no_follow_up(
    stack: Stack, took_its_lease: bool
) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, [log_value() for _ in range(100)])
    with dg.instance_for_test() as instance:
        first = tick(stack, instance, None)
        [request] = first.run_requests or []
        run_id = started(instance, request, seconds_ago=FREE_FOR)
        if took_its_lease:
            # It held its lease, then its process died (the lease went with the session).
            with ledger_connection(stack.postgres) as conn:
                leases.record_taken(conn, run_id)
        produce(stack.kafka, topic, [log_value() for _ in range(100)])
        # Its lease just seen free: it may be taking it now, or ending its work (a run lets go
        # of its lease a moment before Dagster marks it finished). The next range follows it.
        assert launched(tick(stack, instance, first.cursor)) == [(100, 200)]
        # Free for DEAD_AFTER_SECONDS, as by the ticks since it started: failed if it held its
        # lease; if it never took it (dead while booting, or starved: a starved one must not be
        # failed), only after STARTUP_GRACE_SECONDS. No follow-up either way.
        cursor = SensorCursor.loads(first.cursor)
        cursor.lease_free_since[run_id] = time.time() - FREE_FOR
        assert launched(tick(stack, instance, cursor.dumps())) == []
        run = instance.get_run_by_id(run_id)
        assert run is not None
        assert run.status == (
            dg.DagsterRunStatus.FAILURE if took_its_lease else dg.DagsterRunStatus.STARTED
        )
