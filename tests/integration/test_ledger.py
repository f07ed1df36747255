"""Dedupe claims and the batch ledger on a real PostgreSQL."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable

import psycopg
import pytest
from psycopg import sql

from protoagg_dagster.archive.dedupe_window import (
    WindowChange,
    advance_window,
    epoch_day,
    partition_name,
)
from protoagg_dagster.archive.ledger import (
    begin_partition,
    claim_batch,
    finish_batch,
    finish_batches,
    gaps_before,
    ledger_connection,
    read_progress,
)
from protoagg_dagster.core.errors import BackendError
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.core.records import LogRecord
from protoagg_dagster.resources import PostgresResource


def records(ids: list[str], first_offset: int = 0) -> list[LogRecord]:
    return [LogRecord(first_offset + i, log_id, 0, 0, "m") for i, log_id in enumerate(ids)]


def new_ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def run_threads(target: Callable[[int], None], args: Iterable[int]) -> None:
    """Run ``target(arg)`` in a thread per arg; re-raise the first failure."""
    errors: list[BaseException] = []

    def guarded(arg: int) -> None:
        try:
            target(arg)
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=guarded, args=(a,)) for a in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive()
    if errors:
        raise errors[0]


def test_claim_keeps_first_occurrence_and_drops_archived_ids(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    a, b, c = new_ids(3)
    with ledger_connection(pg) as conn:
        first = claim_batch(conn, OffsetRange("t", 0, 0, 3), records([a, b, a]), "o", None)
        assert [r.offset for r in first.kept] == [0, 1]
        assert first.duplicates == 1
        assert first.batch_id is not None
        finish_batch(conn, first.batch_id, None)
        second = claim_batch(conn, OffsetRange("t", 0, 3, 6), records([b, c, a], 3), "o", None)
        assert [r.log_id for r in second.kept] == [c]
        assert second.duplicates == 2


def test_gaps_before_name_each_hole_after_the_previous_appended_batch(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    topic = f"gaps-{uuid.uuid4().hex[:8]}"
    with ledger_connection(pg) as conn:
        claims = [
            claim_batch(conn, OffsetRange(topic, p, a, b), records(new_ids(b - a), a), "o", None)
            for p, a, b in ((0, 0, 10), (1, 0, 5))
        ]
        finish_batches(conn, [(c.batch_id, 1, 10, 10) for c in claims if c.batch_id])
        later = claim_batch(
            conn, OffsetRange(topic, 0, 10, 20), records(new_ids(10), 10), "o", None
        )
        assert later.batch_id is not None
        finish_batches(conn, [(later.batch_id, 2, 10, 20)])
        asked = [
            OffsetRange(topic, 0, 25, 30),  # the last appended batch of 0 ends at 20
            OffsetRange(topic, 1, 5, 9),
            OffsetRange(topic, 0, 20, 30),
            OffsetRange(topic, 2, 0, 3),  # nothing appended before
            OffsetRange(topic, 0, 10, 20),  # follows 0..10
        ]
        assert gaps_before(conn, asked) == [[(20, 25)], [], [], [], []]
        assert gaps_before(conn, []) == []
        assert read_progress(conn, topic)[0].next_offset == 20


def test_rerun_of_an_archived_range_claims_nothing(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    ids = new_ids(4)
    with ledger_connection(pg) as conn:
        claim = claim_batch(conn, OffsetRange("t", 0, 0, 4), records(ids), "o", None)
        assert claim.batch_id is not None
        finish_batch(conn, claim.batch_id, 1)
        again = claim_batch(conn, OffsetRange("t", 0, 0, 4), records(ids), "o", None)
        assert again.nothing_to_do
        assert read_progress(conn, "t")[0].next_offset == 4


def test_unfinished_claim_is_adopted_with_its_own_records(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    ids = new_ids(5)
    with ledger_connection(pg) as conn:
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
    with ledger_connection(pg) as conn:
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
        with ledger_connection(pg) as conn:
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


def test_a_claimer_that_meets_a_key_committed_mid_claim_leaves_it_to_its_winner(
    postgres_dsn: str,
) -> None:
    """The plain insert of the usual claim meets a key committed after its snapshot."""
    pg = PostgresResource(dsn=postgres_dsn)
    shared, only_first, only_second = new_ids(50), new_ids(50), new_ids(50)
    kept: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    with ledger_connection(pg) as first, ledger_connection(pg) as second:
        second_pid = second.info.backend_pid

        def claim_second() -> None:
            ids = only_second + shared
            batch = OffsetRange("t", 1, 0, len(ids))
            try:
                claim = claim_batch(second, batch, records(ids), "o", None)
            except BaseException as exc:
                errors.append(exc)
                raise
            kept[1] = [r.log_id for r in claim.kept]

        with first.transaction():
            ids = shared + only_first
            batch = OffsetRange("t", 0, 0, len(ids))
            kept[0] = [r.log_id for r in claim_batch(first, batch, records(ids), "o", None).kept]
            thread = threading.Thread(target=claim_second)
            thread.start()
            # Commit only once the second claim waits for a shared key the first one holds.
            with psycopg.connect(postgres_dsn, autocommit=True) as observer:
                deadline = time.monotonic() + 30
                while observer.execute(
                    "SELECT wait_event_type IS DISTINCT FROM 'Lock' FROM pg_stat_activity "
                    "WHERE pid = %s",
                    (second_pid,),
                ).fetchone() != (False,):
                    assert time.monotonic() < deadline, "the second claim never waited"
                    time.sleep(0.02)
        thread.join(60)
        assert not thread.is_alive()
    assert errors == []
    assert kept == {0: shared + only_first, 1: only_second}
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM processed_logs").fetchone() == (150,)


def claimed(
    conn: psycopg.Connection, ids: list[str], first_offset: int, partition: int = 0
) -> list[str]:
    """Claim ``ids`` as the next batch of ``partition`` of topic t, finish it, return its keeps."""
    batch = OffsetRange("t", partition, first_offset, first_offset + len(ids))
    claim = claim_batch(conn, batch, records(ids, first_offset), "o", None)
    assert claim.batch_id is not None
    finish_batch(conn, claim.batch_id, None)
    return [r.log_id for r in claim.kept]


def live_spans(conn: psycopg.Connection) -> list[str]:
    return [
        name
        for (name,) in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'processed_logs'::regclass ORDER BY c.relname"
        )
    ]


def test_dedupe_window_remembers_ids_for_keep_days_in_at_most_two_spans(
    postgres_dsn: str,
) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    a, b = new_ids(3), new_ids(3)
    with ledger_connection(pg) as conn:
        today = epoch_day()
        assert claimed(conn, a, 0) == a
        # The span is not keep_days old yet: claims keep going to it.
        assert advance_window(conn, today + 1, keep_days=2) == WindowChange(today, False, ())
        change = advance_window(conn, today + 2, keep_days=2)
        assert change == WindowChange(today + 2, True, ())
        # Ids of the previous span are still found; new ones go to the new span.
        assert claimed(conn, a + b, 3) == b
        assert advance_window(conn, today + 3, keep_days=2).dropped == ()
        change = advance_window(conn, today + 4, keep_days=2)
        assert change == WindowChange(today + 4, True, (partition_name(today),))
        assert live_spans(conn) == [partition_name(today + 2), partition_name(today + 4)]
        # ``a`` left the window (documented trade-off: archived again); ``b`` is still in it.
        assert claimed(conn, a + b, 9) == a


def test_a_window_of_day_partitions_keeps_deduplicating_and_drains(postgres_dsn: str) -> None:
    """A table from the per-day versions: its days are one-day spans, probed until dropped."""
    pg = PostgresResource(dsn=postgres_dsn)
    today = epoch_day()
    per_day = [new_ids(2) for _ in range(3)]
    with ledger_connection(pg) as conn:
        for k, ids in enumerate(per_day):
            # What the per-day advance did every day: a partition per day, claims go to it.
            day = today - 2 + k
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} PARTITION OF processed_logs FOR VALUES IN ({})"
                ).format(sql.Identifier(partition_name(day)), sql.Literal(day))
            )
            conn.execute("UPDATE dedupe_window SET current_day = %s", (day,))
            assert claimed(conn, ids, 2 * k) == ids
        everything = [i for ids in per_day for i in ids]
        assert claimed(conn, everything, 6) == []
        assert advance_window(conn, today + 1, keep_days=3).dropped == ()
        # today-2's last claims may have come on today-1: kept until today-1 + 3.
        change = advance_window(conn, today + 2, keep_days=3)
        assert change == WindowChange(today, False, (partition_name(today - 2),))
        assert claimed(conn, everything, 12) == per_day[0]


def test_advancing_the_window_waits_for_claims_in_flight(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    with ledger_connection(pg) as claimer, ledger_connection(pg) as maintainer:
        with claimer.transaction():
            claimer.execute("SELECT current_day FROM dedupe_window FOR SHARE")
            maintainer.execute("SET lock_timeout = '300ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                advance_window(maintainer, epoch_day() + 3, keep_days=3)
        assert advance_window(maintainer, epoch_day() + 3, keep_days=3).created


def test_many_claimers_of_overlapping_ids_agree_and_the_lowest_offset_wins(
    postgres_dsn: str,
) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    pool = new_ids(3000)
    claimers = 8
    batches = {}
    for p in range(claimers):
        rng = random.Random(p)
        mine = rng.sample(pool, 1500)
        batches[p] = mine + rng.sample(mine, 300)  # repeats inside the batch too
        rng.shuffle(batches[p])
    kept: dict[int, list[LogRecord]] = {}
    barrier = threading.Barrier(claimers)

    def claim(partition: int) -> None:
        mine = batches[partition]
        with ledger_connection(pg) as conn:
            barrier.wait()
            result = claim_batch(
                conn, OffsetRange("t", partition, 0, len(mine)), records(mine), "o", None
            )
        kept[partition] = list(result.kept)

    run_threads(claim, range(claimers))
    winners = [r.log_id for p in range(claimers) for r in kept[p]]
    assert sorted(winners) == sorted({i for mine in batches.values() for i in mine})
    for p, mine in batches.items():
        for r in kept[p]:
            assert r.offset == mine.index(r.log_id)
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM processed_logs").fetchone() == (len(winners),)


def test_claims_racing_a_span_switch_win_each_id_once_and_keep_it(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    today = epoch_day()
    claimers, rounds = 4, 6
    pool = new_ids(4000)
    kept: dict[int, list[str]] = {p: [] for p in range(claimers)}
    # The switch starts while every claimer is half-way; the last round waits until it is done,
    # so rows land on both sides of it and the rounds between race it.
    halfway, switched = threading.Barrier(claimers + 1), threading.Event()

    def claim(partition: int) -> None:
        rng = random.Random(partition)
        with ledger_connection(pg) as conn:
            for n in range(rounds):
                if n == rounds // 2:
                    halfway.wait(60)
                if n == rounds - 1:
                    assert switched.wait(60)
                ids = rng.sample(pool, 400)
                batch = OffsetRange("t", partition, 400 * n, 400 * (n + 1))
                result = claim_batch(conn, batch, records(ids, 400 * n), "o", None)
                assert result.batch_id is not None
                finish_batch(conn, result.batch_id, None)
                kept[partition] += [r.log_id for r in result.kept]

    def switch() -> None:
        halfway.wait(60)
        with ledger_connection(pg) as conn:
            assert advance_window(conn, today + 7, keep_days=7).created
        switched.set()

    run_threads(lambda k: claim(k) if k < claimers else switch(), range(claimers + 1))
    winners = [i for p in range(claimers) for i in kept[p]]
    assert len(winners) == len(set(winners))
    with ledger_connection(pg) as conn:
        spans = dict(
            conn.execute("SELECT day, count(*) FROM processed_logs GROUP BY day").fetchall()
        )
        assert set(spans) == {today, today + 7} and sum(spans.values()) == len(winners)
        # Both spans are probed: nothing claimed on either side of the switch wins again.
        assert claimed(conn, winners, 0, partition=claimers) == []


def test_an_unfinished_claim_is_adopted_after_its_span_was_succeeded(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    ids = new_ids(5)
    with ledger_connection(pg) as conn:
        crashed = claim_batch(conn, OffsetRange("t", 0, 0, 5), records(ids + ids[:1]), "o", None)
        assert advance_window(conn, epoch_day() + 7, keep_days=7).created
        retry = claim_batch(conn, OffsetRange("t", 0, 0, 5), records(ids + ids[:1]), "o", None)
        assert retry.adopted and retry.batch_id == crashed.batch_id
        assert [r.offset for r in retry.kept] == [0, 1, 2, 3, 4]


def test_a_stale_run_of_an_archived_range_is_done_even_while_a_later_batch_is_pending(
    postgres_dsn: str,
) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    with ledger_connection(pg) as conn:
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
    with ledger_connection(pg) as conn:
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
    with ledger_connection(pg) as conn:
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
    with ledger_connection(pg) as conn:
        old = claim_batch(conn, OffsetRange(topic, 0, 0, 2), records(new_ids(2)), base, None)
        assert old.batch_id is not None
        conn.execute("DELETE FROM archive_sequences WHERE base_name = %s", (base,))
        finish_batch(conn, old.batch_id, 1, 90, 90)
        batch = OffsetRange(topic, 0, 2, 4)
        claim = claim_batch(conn, batch, records(new_ids(2), 2), base, None, 20, 100)
    assert claim.object_name == base.replace("log.pb", "log.0001.pb")
