"""A claim stuck longer than the dedupe window: its ids stay until its batch is appended."""

from __future__ import annotations

import dagster as dg
from psycopg import sql

from protoagg_dagster.archive.dedupe_window import epoch_day, partition_name
from protoagg_dagster.archive.ledger import claim_batch, finish_batch, ledger_connection
from protoagg_dagster.archive.upkeep import maintain_archive
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.resources import GCSResource
from tests.helpers import Stack
from tests.integration.test_ledger import new_ids, records

KEEP_DAYS = 7


def maintain(stack: Stack, unique: str) -> tuple[list[str], list[str]]:
    """One run of the hourly maintenance job: its log, and the spans left afterwards."""
    gcs = GCSResource(
        bucket=f"stuck-{unique}", emulator_host=stack.gcs.emulator_host, create_bucket=True
    )
    gcs.writable_bucket()  # creates it
    with dg.instance_for_test() as instance:
        result = maintain_archive.execute_in_process(
            run_config={"ops": {"advance_dedupe_window": {"config": {"keep_days": KEEP_DAYS}}}},
            resources={"gcs": gcs, "postgres": stack.postgres},
            instance=instance,
        )
        assert result.success
        logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    with ledger_connection(stack.postgres) as conn:
        spans = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'processed_logs'::regclass ORDER BY c.relname"
        ).fetchall()
    return logs, [name for (name,) in spans]


def test_a_claim_stuck_for_two_windows_keeps_its_ids_and_its_adopter_appends_every_record(
    stack: Stack, unique: str
) -> None:
    today, ids = epoch_day(), new_ids(20)
    stuck = OffsetRange("t", 0, 0, 20)
    old, middle = today - 2 * KEEP_DAYS, today - KEEP_DAYS
    with ledger_connection(stack.postgres) as conn:
        # Two windows ago a run claimed 20 ids into the span of that day and never appended
        # them (its runs kept failing); a span began after it, and another is due today.
        claim = claim_batch(conn, stuck, records(ids), "o", "run-1")
        assert claim.batch_id is not None
        for day in (old, middle):
            conn.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF processed_logs FOR VALUES IN ({})").format(
                    sql.Identifier(partition_name(day)), sql.Literal(day)
                )
            )
        conn.execute("UPDATE processed_logs SET day = %s", (old,))
        conn.execute(
            "UPDATE archive_batches SET claimed_at = now() - make_interval(days => %s)",
            (2 * KEEP_DAYS,),
        )
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(partition_name(today))))
        conn.execute("UPDATE dedupe_window SET current_day = %s", (middle,))

    logs, spans = maintain(stack, unique)
    assert partition_name(old) in spans
    assert any(
        f"{partition_name(old)} left the window but is kept" in m and str(stuck) in m for m in logs
    ), logs

    with ledger_connection(stack.postgres) as conn:
        adopted = claim_batch(conn, stuck, records(ids), "o", "run-2")
        assert adopted.adopted
        assert [r.log_id for r in adopted.kept] == ids
        assert adopted.batch_id is not None
        finish_batch(conn, adopted.batch_id, None)

    _, spans = maintain(stack, unique)
    assert partition_name(old) not in spans
