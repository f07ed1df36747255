"""The dedupe scope on a real PostgreSQL: a change of scope (or the upgrade that brought scopes)
neither doubles an id claimed before it nor strands a claim pending across it."""

from __future__ import annotations

import psycopg

from protoagg_dagster.archive.dedupe_window import advance_window, epoch_day
from protoagg_dagster.archive.ledger import claim_batch, finish_batch, ledger_connection
from protoagg_dagster.core.dedupe_scope import DEPLOYMENT, TOPIC, Scope
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.resources import PostgresResource
from tests.integration.test_ledger import new_ids, records


def kept(conn: psycopg.Connection, batch: OffsetRange, ids: list[str], scope: Scope) -> list[str]:
    claim = claim_batch(conn, batch, records(ids, batch.start), "o", None, scope=scope)
    assert claim.batch_id is not None
    finish_batch(conn, claim.batch_id, None)
    return [r.log_id for r in claim.kept]


def scopes(conn: psycopg.Connection) -> list[tuple[int, str]]:
    return conn.execute("SELECT day, scope FROM dedupe_span_scopes ORDER BY day, scope").fetchall()


def test_ids_claimed_for_the_deployment_stay_duplicates_in_their_topic_until_they_leave(
    postgres_dsn: str,
) -> None:
    ids, today = new_ids(50), epoch_day()
    with ledger_connection(PostgresResource(dsn=postgres_dsn)) as conn:
        assert kept(conn, OffsetRange("t", 0, 0, 50), ids, DEPLOYMENT) == ids
        # Switched to topic scope: the same ids again in the same topic are not archived twice.
        assert kept(conn, OffsetRange("t", 1, 0, 50), ids, TOPIC) == []
        assert scopes(conn) == [(today, DEPLOYMENT), (today, TOPIC)]
        advance_window(conn, today + 7, keep_days=7)
        advance_window(conn, today + 14, keep_days=7)
        # The deployment-scoped span left the window: the transition is over.
        assert scopes(conn) == []
        assert kept(conn, OffsetRange("t", 2, 0, 50), ids, TOPIC) == ids
        assert kept(conn, OffsetRange("u", 0, 0, 50), ids, TOPIC) == ids
        assert scopes(conn) == [(today + 14, TOPIC)]


def test_ids_claimed_per_topic_stay_duplicates_in_that_topic_after_a_switch_to_deployment(
    postgres_dsn: str,
) -> None:
    ids = new_ids(20)
    with ledger_connection(PostgresResource(dsn=postgres_dsn)) as conn:
        assert kept(conn, OffsetRange("t", 0, 0, 20), ids, TOPIC) == ids
        assert kept(conn, OffsetRange("u", 0, 0, 20), ids, TOPIC) == ids
        assert kept(conn, OffsetRange("t", 1, 0, 20), ids, DEPLOYMENT) == []
        assert kept(conn, OffsetRange("v", 0, 0, 20), ids[:10], DEPLOYMENT) == ids[:10]
        assert kept(conn, OffsetRange("w", 0, 0, 20), ids, DEPLOYMENT) == ids[10:]


def test_a_claim_pending_across_a_change_of_scope_is_adopted_with_its_own_records(
    postgres_dsn: str,
) -> None:
    ids = new_ids(10)
    batch = OffsetRange("t", 0, 0, 10)
    with ledger_connection(PostgresResource(dsn=postgres_dsn)) as conn:
        crashed = claim_batch(conn, batch, records(ids), "o", "run-1", scope=DEPLOYMENT)
        retry = claim_batch(conn, batch, records(ids), "o", "run-2", scope=TOPIC)
        assert retry.adopted and retry.batch_id == crashed.batch_id
        assert [r.log_id for r in retry.kept] == ids
