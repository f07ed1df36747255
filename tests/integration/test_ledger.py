"""Dedupe claims and the batch ledger on a real PostgreSQL."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest

from protoagg_dagster.core.errors import BackendError
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.records import LogRecord
from protoagg_dagster.dedupe_window import advance_window, epoch_day, partition_name
from protoagg_dagster.ledger import begin_partition, claim_batch, finish_batch, read_progress
from protoagg_dagster.resources import PostgresResource


def records(ids: list[str], first_offset: int = 0) -> list[LogRecord]:
    return [LogRecord(first_offset + i, log_id, 0, 0, "m") for i, log_id in enumerate(ids)]


def new_ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def test_claim_keeps_first_occurrence_and_drops_archived_ids(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    a, b, c = new_ids(3)
    with pg.get_connection() as conn:
        first = claim_batch(conn, OffsetRange("t", 0, 0, 3), records([a, b, a]), "o", None)
        assert [r.offset for r in first.kept] == [0, 1]
        assert first.duplicates == 1
        assert first.batch_id is not None
        finish_batch(conn, first.batch_id, None)
        second = claim_batch(conn, OffsetRange("t", 0, 3, 6), records([b, c, a], 3), "o", None)
        assert [r.log_id for r in second.kept] == [c]
        assert second.duplicates == 2


def test_rerun_of_an_archived_range_claims_nothing(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    ids = new_ids(4)
    with pg.get_connection() as conn:
        claim = claim_batch(conn, OffsetRange("t", 0, 0, 4), records(ids), "o", None)
        assert claim.batch_id is not None
        finish_batch(conn, claim.batch_id, 1)
        again = claim_batch(conn, OffsetRange("t", 0, 0, 4), records(ids), "o", None)
        assert again.nothing_to_do
        assert read_progress(conn, "t")[0].next_offset == 4


def test_unfinished_claim_is_adopted_with_its_own_records(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    ids = new_ids(5)
    with pg.get_connection() as conn:
        crashed = claim_batch(conn, OffsetRange("t", 0, 0, 5), records(ids), "o", "run-1")
        # The run died before appending: its claims must not hide its own records.
        retry = claim_batch(conn, OffsetRange("t", 0, 0, 5), records(ids), "other", "run-2")
        assert retry.adopted
        assert retry.batch_id == crashed.batch_id
        assert retry.object_name == "o"
        assert [r.log_id for r in retry.kept] == ids
        assert read_progress(conn, "t")[0].pending == OffsetRange("t", 0, 0, 5)


def test_a_range_beyond_the_archived_position_is_refused(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    with pg.get_connection() as conn:
        claim = claim_batch(conn, OffsetRange("t", 0, 0, 2), records(new_ids(2)), "o", None)
        assert claim.batch_id is not None
        finish_batch(conn, claim.batch_id, None)
        with pytest.raises(BackendError, match="gap"):
            claim_batch(conn, OffsetRange("t", 0, 5, 7), records(new_ids(2), 5), "o", None)


def test_concurrent_claims_of_overlapping_ids_on_two_partitions_win_once(
    postgres_dsn: str,
) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    shared = new_ids(2000)
    kept: dict[int, set[str]] = {}
    barrier = threading.Barrier(2)

    def claim(partition: int) -> None:
        mine = shared[partition::2] + shared  # some ids only here, all ids in both
        with pg.get_connection() as conn:
            barrier.wait()
            result = claim_batch(
                conn, OffsetRange("t", partition, 0, len(mine)), records(mine), "o", None
            )
        kept[partition] = {r.log_id for r in result.kept}

    threads = [threading.Thread(target=claim, args=(p,)) for p in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert kept[0].isdisjoint(kept[1])
    assert kept[0] | kept[1] == set(shared)


def test_dedupe_window_remembers_ids_until_their_day_is_dropped(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    ids = new_ids(3)
    with pg.get_connection() as conn:
        today = epoch_day()
        first = claim_batch(conn, OffsetRange("t", 0, 0, 3), records(ids), "o", None)
        assert first.batch_id is not None
        finish_batch(conn, first.batch_id, None)
        change = advance_window(conn, today + 1, keep_days=2)
        assert change.created and change.current_day == today + 1 and change.dropped == ()
        # Still inside the window: the older day's partition is checked.
        second = claim_batch(conn, OffsetRange("t", 0, 3, 6), records(ids, 3), "o", None)
        assert second.kept == ()
        assert second.batch_id is not None
        finish_batch(conn, second.batch_id, None)
        change = advance_window(conn, today + 2, keep_days=2)
        assert change.dropped == (partition_name(today),)
        # Out of the window: documented trade-off, the id is archived again.
        third = claim_batch(conn, OffsetRange("t", 0, 6, 9), records(ids, 6), "o", None)
        assert [r.log_id for r in third.kept] == ids


def test_advancing_the_window_waits_for_claims_in_flight(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    with pg.get_connection() as claimer, pg.get_connection() as maintainer:
        with claimer.transaction():
            claimer.execute("SELECT current_day FROM dedupe_window FOR SHARE")
            maintainer.execute("SET lock_timeout = '300ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                advance_window(maintainer, epoch_day() + 1, keep_days=3)
        assert advance_window(maintainer, epoch_day() + 1, keep_days=3).created


def test_a_stale_run_of_an_archived_range_is_done_even_while_a_later_batch_is_pending(
    postgres_dsn: str,
) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    with pg.get_connection() as conn:
        first = claim_batch(conn, OffsetRange("t", 0, 0, 5), records(new_ids(5)), "o", None)
        assert first.batch_id is not None
        finish_batch(conn, first.batch_id, None)
        claim_batch(conn, OffsetRange("t", 0, 5, 10), records(new_ids(5), 5), "o", None)
        stale = claim_batch(conn, OffsetRange("t", 0, 0, 5), records(new_ids(5)), "o", None)
    assert stale.nothing_to_do


def test_a_range_run_before_its_predecessor_is_refused_once_the_start_is_known(
    postgres_dsn: str,
) -> None:
    # A backfill registers where the partition starts; a later range whose run goes first must not
    # become the archive's start and silently skip the range before it.
    pg = PostgresResource(dsn=postgres_dsn)
    with pg.get_connection() as conn:
        begin_partition(conn, "t", 0, 0)
        with pytest.raises(BackendError, match="would leave a gap"):
            claim_batch(conn, OffsetRange("t", 0, 4, 8), records(new_ids(4), 4), "o", None)
        first = claim_batch(conn, OffsetRange("t", 0, 0, 4), records(new_ids(4)), "o", None)
        assert first.batch_id is not None and len(first.kept) == 4
        begin_partition(conn, "t", 0, 100)  # known already: unchanged
        assert read_progress(conn, "t")[0].next_offset == 0


def test_claims_roll_over_to_the_next_object_and_a_retry_keeps_its_object(
    postgres_dsn: str,
) -> None:
    """Two partitions share ``base``; at 100 bytes an object, every second 40-byte batch rolls."""
    pg = PostgresResource(dsn=postgres_dsn)
    base, topic = f"{uuid.uuid4().hex}/log.pb", f"t-{uuid.uuid4().hex}"
    objects = []
    with pg.get_connection() as conn:
        for n in range(3):
            for partition in (0, 1):
                batch = OffsetRange(topic, partition, 2 * n, 2 * n + 2)
                claim = claim_batch(conn, batch, records(new_ids(2), 2 * n), base, None, 40, 100)
                assert claim.batch_id is not None
                if (n, partition) == (2, 1):
                    # Its run dies; the retry adopts the claim made before the sequence moved on.
                    other = OffsetRange(topic, 0, 6, 8)
                    moved = claim_batch(conn, other, records(new_ids(2), 6), base, None, 40, 100)
                    again = claim_batch(conn, batch, records(new_ids(2), 4), base, None, 40, 100)
                    assert again.adopted and again.object_name == claim.object_name
                    assert moved.object_name != claim.object_name
                finish_batch(conn, claim.batch_id, None)
                objects.append(claim.object_name)
    stem = base.removesuffix(".pb")
    assert objects == [
        base,
        base,
        f"{stem}.0001.pb",
        f"{stem}.0001.pb",
        f"{stem}.0002.pb",
        f"{stem}.0002.pb",
    ]


def test_an_object_from_before_sequences_continues_from_the_size_the_ledger_knows(
    postgres_dsn: str,
) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    base, topic = f"{uuid.uuid4().hex}/log.pb", f"t-{uuid.uuid4().hex}"
    with pg.get_connection() as conn:
        old = claim_batch(conn, OffsetRange(topic, 0, 0, 2), records(new_ids(2)), base, None)
        assert old.batch_id is not None
        conn.execute("DELETE FROM archive_sequences WHERE base_name = %s", (base,))
        finish_batch(conn, old.batch_id, 1, 90, 90)
        batch = OffsetRange(topic, 0, 2, 4)
        claim = claim_batch(conn, batch, records(new_ids(2), 2), base, None, 20, 100)
    assert claim.object_name == base.replace("log.pb", "log.0001.pb")
