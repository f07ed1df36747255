"""Follow-up runs: the sensor launches a partition's next range while the run before it works.

Through the module's shared ``dagster-daemon`` (tests/support/shared_deployment.py) with the
local run queue (two runs per partition): a backlog of several batches, the topic's uploads slowed
by the proxy so each run works for seconds. The next run must be created before the one it
follows has ended, start its work only after that one's work ended (the partition's lease), and
the archive must hold each id once, in offset order.

In process: a follow-up whose predecessor did not archive up to its start (failed, or stopped
short at the byte limit) does nothing and succeeds, and the partition resumes without a gap.
"""

from __future__ import annotations

import itertools
import time

from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.ledger import archived_positions, ledger_connection
from protoagg_dagster.archive.run_tags import FOLLOWS_TAG, range_run_config, range_tags
from protoagg_dagster.core.planning import OffsetRange
from tests.helpers import (
    Stack,
    archived_records,
    check_archive,
    create_topic,
    log_value,
    memory_instance,
    produce,
    topic_of,
)
from tests.support.shared_deployment import BATCH, SharedDeployment

MESSAGES = 4000  # four runs of the shared deployment's 1,000 messages
UPLOAD_SECONDS = 4.0


def test_the_next_range_starts_up_while_a_run_works_and_takes_over_when_it_ends(
    shared: SharedDeployment,
) -> None:
    topic = shared.new_topic()
    stack = shared.stack(topic)
    # Before the first message: every upload of the topic's runs takes seconds.
    shared.proxy.stall_next(
        100, UPLOAD_SECONDS, kind="upload", object_prefix=shared.temp_prefix(topic)
    )
    started = time.monotonic()
    create_topic(stack.kafka, topic)
    values = [log_value(message=f"#{i}", second=i) for i in range(MESSAGES)]
    assert produce(stack.kafka, topic, values) == MESSAGES
    shared.wait_archived(topic, 1, MESSAGES, 600.0, started)
    runs = sorted(shared.runs(topic), key=lambda r: r.created_time)
    for run in runs:
        print(run.line(runs[0].created_time))
    assert [r for r in runs if r.status != "SUCCESS"] == []
    worked = [r for r in runs if r.materializations]
    assert len(worked) == MESSAGES // BATCH
    # Each later range was created while the run before it was still working...
    early = [b for a, b in itertools.pairwise(worked) if a.work_end and b.created_time < a.work_end]
    assert early, "no run was launched while the one before it worked"
    # ...and began its own work only after that run's work ended.
    assert all(not a.works_together(b) for i, a in enumerate(runs) for b in runs[i + 1 :]), (
        "two runs of one partition worked at once"
    )
    check = check_archive(stack)
    assert check.ok, check.summary()
    assert [r.message for r in archived_records(stack)] == [f"#{i}" for i in range(MESSAGES)]


def test_a_follow_up_of_a_range_not_archived_does_nothing_and_leaves_no_gap(
    stack: Stack,
) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, [log_value(message=f"#{i}") for i in range(300)])
    resources = stack.resources()
    with memory_instance() as instance:
        follow_up = archive_kafka_batch.execute_in_process(
            run_config=range_run_config(topic, 0, 100, 200),
            tags=range_tags(topic, 0, 100, 200, follows=True),
            resources=resources,
            instance=instance,
        )
        logs = [e.message for e in instance.all_logs(follow_up.run_id) if e.message]
    assert follow_up.success
    assert follow_up.dagster_run.tags[FOLLOWS_TAG] == "true"
    assert any("follows a run that did not archive up to 100" in m for m in logs), logs
    with ledger_connection(stack.postgres) as conn:
        # No position was made up.
        assert archived_positions(conn, [OffsetRange(topic, 0, 0, 1)]) == {}
    for start, end in ((0, 100), (100, 300)):
        result = archive_kafka_batch.execute_in_process(
            run_config=range_run_config(topic, 0, start, end),
            tags=range_tags(topic, 0, start, end),
            resources=resources,
        )
        assert result.success
    assert [r.message for r in archived_records(stack)] == [f"#{i}" for i in range(300)]
