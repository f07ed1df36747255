"""Dagster's storage stays bounded: the retention job deletes old finished runs and nothing else."""

from __future__ import annotations

import dagster as dg
import psycopg

from protoagg_dagster.archive.assets import ARCHIVE_ASSET
from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.run_tags import range_run_config
from protoagg_dagster.definitions import prune_dagster_runs
from protoagg_dagster.restore.job import restore_archive
from tests.helpers import Stack, archived_records, create_topic, log_value, produce, topic_of


def prune(instance: dg.DagsterInstance, keep_days: float) -> int:
    result = prune_dagster_runs.execute_in_process(
        run_config={
            "ops": {"prune_runs": {"config": {"keep_days": keep_days, "keep_failed_days": 30}}}
        },
        instance=instance,
    )
    assert result.success
    return int(result.output_for_node("prune_runs"))


def observations(instance: dg.DagsterInstance, key: dg.AssetKey) -> list[int]:
    """The "seen" numbers of the asset's observations, oldest first."""
    records = instance.fetch_observations(key, limit=100).records
    found = [r.asset_observation for r in records if r.asset_observation is not None]
    return sorted(int(o.metadata["seen"].value) for o in found)  # type: ignore[arg-type]


def ledger_rows(dsn: str, topic: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT batch_id, start_offset, end_offset, state FROM archive_batches "
            "WHERE topic = %s ORDER BY batch_id",
            (topic,),
        ).fetchall()


def test_retention_deletes_old_finished_runs_and_their_events_and_nothing_else(
    stack: Stack, postgres_dsn: str
) -> None:
    topic = topic_of(stack)
    create_topic(stack.kafka, topic)
    produce(stack.kafka, topic, [log_value(message=f"#{i}") for i in range(40)])
    with dg.instance_for_test() as instance:
        archived = [
            archive_kafka_batch.execute_in_process(
                run_config=range_run_config(topic, 0, start, start + 20),
                resources=stack.resources(),
                instance=instance,
            ).run_id
            for start in (0, 20)
        ]
        failed = instance.create_run_for_job(
            archive_kafka_batch,
            run_config=range_run_config(topic, 0, 40, 50),
            status=dg.DagsterRunStatus.FAILURE,
        ).run_id
        working = instance.create_run_for_job(
            archive_kafka_batch,
            run_config=range_run_config(topic, 0, 40, 50),
            status=dg.DagsterRunStatus.STARTED,
        ).run_id
        restore = instance.create_run_for_job(
            restore_archive,
            run_config={"ops": {"restore_records": {"config": {"sources": [], "to_topic": "t"}}}},
            status=dg.DagsterRunStatus.SUCCESS,
        ).run_id
        # The sensor's lag observations belong to no run; another code location's asset too.
        topic_asset = dg.AssetKey(f"kafka_archive_{topic}")
        other = dg.AssetKey("someone_elses")
        for seen in range(3):
            for key in (ARCHIVE_ASSET, topic_asset, other):
                instance.report_runless_asset_event(
                    dg.AssetObservation(key, metadata={"seen": seen})
                )
        ledger = ledger_rows(postgres_dsn, topic)
        assert len(ledger) == 2
        before = {r.run_id for r in instance.get_runs()}

        # Everything is younger than the default two weeks: nothing goes.
        assert prune(instance, keep_days=14) == 0
        assert before <= {r.run_id for r in instance.get_runs()}
        assert observations(instance, ARCHIVE_ASSET) == [0, 1, 2]

        assert prune(instance, keep_days=0) == 3  # the two archive runs, the first prune run
        left = {r.run_id for r in instance.get_runs()}
        assert not set(archived) & left
        assert {failed, working, restore} <= left
        assert all(instance.all_logs(run_id) == [] for run_id in archived)
        # protoagg's old observations go, each asset's newest stays; other assets' stay.
        assert observations(instance, ARCHIVE_ASSET) == [2]
        assert observations(instance, topic_asset) == [2]
        assert observations(instance, other) == [0, 1, 2]
    # The ledger and the archive are the source of truth and stay as they were.
    assert ledger_rows(postgres_dsn, topic) == ledger
    assert [r.message for r in archived_records(stack)] == [f"#{i}" for i in range(40)]
