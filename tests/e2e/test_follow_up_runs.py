"""Follow-up runs: the sensor launches a partition's next range while the run before it works.

Through ``dagster-daemon`` with the local run queue (two runs per partition): a backlog of
several batches, uploads slowed by the proxy so each run works for seconds. The next run must be
created before the one it follows has ended, start its work only after that one's work ended
(the partition's lease), and the archive must hold each id once, in offset order.

In process: a follow-up whose predecessor did not archive up to its start (failed, or stopped
short at the byte limit) does nothing and succeeds, and the partition resumes without a gap.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import dagster as dg

from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.ledger import archived_position, ledger_connection
from protoagg_dagster.archive.run_tags import FOLLOWS_TAG, range_run_config, range_tags
from tests.conftest import Services
from tests.helpers import (
    Stack,
    archive_with_daemon,
    archived_records,
    check_archive,
    create_topic,
    log_value,
    produce,
    topic_of,
)
from tests.support.dagster_deployment import DagsterDeployment, run_summaries
from tests.support.gcs_proxy import GcsProxy

MESSAGES = 4000
MAX_BATCH = 1000
UPLOAD_SECONDS = 4.0


def test_the_next_range_starts_up_while_a_run_works_and_takes_over_when_it_ends(
    stack: Stack, services: Services, postgres_dsn: str, tmp_path: Path
) -> None:
    topic = stack.kafka.topic_list()[0]
    create_topic(stack.kafka, topic)
    values = [log_value(message=f"#{i}", second=i) for i in range(MESSAGES)]
    assert produce(stack.kafka, topic, values) == MESSAGES
    proxy = GcsProxy(services.gcs_url)
    url = proxy.start()
    proxy.stall_next(100, UPLOAD_SECONDS, kind="upload")
    env = {
        "PROTOAGG_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
        "PROTOAGG_TOPICS": topic,
        "PROTOAGG_POSTGRES_DSN": postgres_dsn,
        "PROTOAGG_GCS_BUCKET": services.bucket,
        "PROTOAGG_GCS_OBJECT": stack.gcs.object_template,
        "PROTOAGG_MAX_BATCH_MESSAGES": str(MAX_BATCH),
        "STORAGE_EMULATOR_HOST": url,
    }
    deployment = DagsterDeployment("follow", tmp_path / "follow", env)
    try:
        archive_with_daemon(deployment, postgres_dsn, topic, 1, MESSAGES, 600.0)
    finally:
        proxy.close()
    runs = sorted(
        (r for r in run_summaries(deployment) if r.job_name == "archive_kafka_batch"),
        key=lambda r: r.created_time,
    )
    for run in runs:
        print(run.line(runs[0].created_time))
    assert [r for r in runs if r.status != "SUCCESS"] == []
    worked = [r for r in runs if r.materializations]
    assert len(worked) == MESSAGES // MAX_BATCH
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
    with dg.instance_for_test() as instance:
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
        assert archived_position(conn, topic, 0) is None  # no position was made up
    for start, end in ((0, 100), (100, 300)):
        result = archive_kafka_batch.execute_in_process(
            run_config=range_run_config(topic, 0, start, end),
            tags=range_tags(topic, 0, start, end),
            resources=resources,
        )
        assert result.success
    assert [r.message for r in archived_records(stack)] == [f"#{i}" for i in range(300)]
