"""The dedupe window: ``processed_logs``, in spans of ``keep_days`` days, pruned by dropping spans.

A row holds one 128-bit dedupe key in the ``log_id uuid`` column: a logId of the ``log`` format is
its own key, any other key (``record`` format) is a 128-bit digest, so every kind costs the same
and rows written before the digests existed stay valid. Records without a key are never claimed
here (the ledger's offsets dedupe them).

The table is partitioned by ``day``, the first day of a *span*: claims go to the newest span
until it is ``keep_days`` old, then a new one starts. A span is dropped once ``keep_days`` days
have passed since the next one started (the last day it could receive claims), so an id stays
at least ``keep_days`` days and at most about twice that, and at most two spans live: the one
claims go to and the one before it. A claim inserts, in (key, offset) order, the first
occurrence of each key an anti-join finds in no live span; the lowest offset of a batch wins. The
older spans never receive rows, so their check cannot race; the current span's can, when a
concurrent claimer commits a key after the claim's snapshot: the plain insert then fails on the
primary key and the claim is made again with ``INSERT ... ON CONFLICT DO NOTHING`` (concurrent
claimers of one key agree on one winner). The plain insert is the common case because
speculative insertion costs every row more than the extra probe (docs/benchmarks.md). Each id
therefore costs one index probe per live span and one unique insert, whatever the window's
length in days: per-day partitions cost one probe per day (measured in docs/benchmarks.md).
Starting a span takes the control row ``FOR UPDATE`` while each claim holds it ``FOR SHARE``: the
switch waits for claims in flight, claims never wait for each other.
Pruning drops whole partitions, so the per-batch cost does not grow with the archive's age, only
(slowly) with the ids in the window, as the btree's depth and cache misses. A stored id takes
68 bytes of heap and 40-54 bytes of index, and the index must fit in shared_buffers
(docs/operations.md).

Candidates travel as two text parameters unnested on the server: as fast as a temp table filled
by ``COPY`` (measured), one round trip less, and no TEMP privilege needed.

Scope (``core.dedupe_scope``): a topic-scoped claim stores each key digested with its topic, a
deployment-scoped one the key itself. ``dedupe_span_scopes`` records which scopes each span
holds keys of; while a span holds keys of the other scope, a claim also probes the key in that
form there, so changing the scope (or upgrading from before scopes) never archives an id twice.

Tables of the day-partitioned versions need no migration: their partitions are spans of one day,
probed like any older span until they are dropped ``keep_days`` days after their successor began.

Trade-off: a message redelivered after its key left the window is archived again.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from protoagg_dagster.core.dedupe_scope import TOPIC, Scope, key_prefix
from protoagg_dagster.core.formats import Claimable
from protoagg_dagster.core.planning import OffsetRange

_PARTITION_PREFIX = "processed_logs_d"
_UNNESTED = (
    "unnest(string_to_array(%(keys)s, ',')::uuid[], string_to_array(%(offsets)s, ',')::bigint[])"
    " AS u (key, kafka_offset)"
)
# A key as a topic-scoped claim stores it: the key digested with its topic (key_prefix). MD5 here
# is no defence, only a spread of 128 bits, computed in C next to the probe it feeds.
_SCOPED = "md5(%(prefix)s || u.key::text)::uuid"


def _candidates_sql(scope: Scope, transition: bool) -> str:
    """The candidates as rows ``c (log_id, kafka_offset[, other])``, sorted.

    ``log_id`` is the key as this scope stores it; ``other`` (during a transition) as the other
    scope stored it, for spans that hold keys claimed in that scope.

    Inserting in log_id order makes concurrent claimers of overlapping ids take their row locks
    in the same order, so they wait for each other instead of deadlocking. Sorting before the
    probes (the outer ORDER BY is then already satisfied) makes consecutive probes descend
    through the same inner index pages, which stay in the CPU's cache.
    """
    mine, other = (_SCOPED, "u.key") if scope == TOPIC else ("u.key", _SCOPED)
    also = f", {other} AS other" if transition else ""
    return f"(SELECT {mine} AS log_id, u.kafka_offset{also} FROM {_UNNESTED} ORDER BY 1, 2) AS c"


def _claim_sql(scope: Scope, transition: bool, contested: bool) -> str:
    """The claim's INSERT.

    Usually (not ``contested``) keys found in no live span are inserted plainly: cheaper than ON
    CONFLICT, whose speculative insertion costs each row an extra index descent, a lock and a
    WAL record (measured in docs/benchmarks.md); a key a concurrent claimer commits meanwhile
    raises a unique violation. Then the claim is made again ``contested``: the older spans never
    receive rows, so their anti-join cannot race; the current span's check is ON CONFLICT,
    where concurrent claimers agree on one winner. DISTINCT ON (or ON CONFLICT) keeps a key's
    lowest offset. During a scope ``transition`` a key is also looked up as the other scope
    stored it, in the spans holding such keys.
    """
    spans = "p.day < %(day)s" if contested else "p.day <= %(day)s"
    also = (
        "AND NOT EXISTS (SELECT 1 FROM processed_logs p "
        "                WHERE p.log_id = c.other AND p.day = ANY(%(other_days)s)) "
        if transition
        else ""
    )
    return (
        "INSERT INTO processed_logs (log_id, day, batch_id, kafka_offset) "
        + ("SELECT " if contested else "SELECT DISTINCT ON (c.log_id) ")
        + "c.log_id, %(day)s, %(batch)s, c.kafka_offset "
        f"FROM {_candidates_sql(scope, transition)} "
        f"WHERE NOT EXISTS (SELECT 1 FROM processed_logs p WHERE p.log_id = c.log_id AND {spans}) "
        f"{also}"
        "ORDER BY c.log_id, c.kafka_offset "
        + ("ON CONFLICT (log_id, day) DO NOTHING " if contested else "")
        + "RETURNING kafka_offset"
    )


def epoch_day(now: float | None = None) -> int:
    """Days since 1970-01-01 UTC."""
    return int((time.time() if now is None else now) // 86_400)


def partition_name(day: int) -> str:
    """The partition of the span starting on ``day``."""
    return f"{_PARTITION_PREFIX}{day}"


def ensure_window(conn: psycopg.Connection, today: int) -> None:
    """Start the window on ``today`` if it has no span yet (inside the schema's transaction)."""
    conn.execute(
        "INSERT INTO dedupe_window (current_day) VALUES (%s) ON CONFLICT DO NOTHING", (today,)
    )
    row = conn.execute("SELECT current_day FROM dedupe_window").fetchone()
    assert row is not None
    _create_partition(conn, int(row[0]))


def _create_partition(conn: psycopg.Connection, day: int) -> bool:
    exists = conn.execute("SELECT to_regclass(%s)", (partition_name(day),)).fetchone()
    if exists is not None and exists[0] is not None:
        return False
    conn.execute(
        sql.SQL("CREATE TABLE {} PARTITION OF processed_logs FOR VALUES IN ({})").format(
            sql.Identifier(partition_name(day)), sql.Literal(day)
        )
    )
    return True


def claim_ids(
    conn: psycopg.Connection,
    batch_id: int,
    records: Sequence[Claimable],
    topic: str,
    scope: Scope = TOPIC,
) -> set[int]:
    """Claim each record's dedupe key for ``batch_id`` (inside the caller's transaction).

    Returns the offsets whose claim won: for each key new to the window in ``scope`` (within
    ``topic``, or anywhere), its first occurrence (repeats inside ``records`` lose to the lowest
    offset in the same statement). Records without a key are skipped: the caller keeps them.
    """
    keyed = [r for r in records if r.dedupe_key is not None]
    if not keyed:
        return set()
    # A claim probing several partitions (a window of day partitions) or a large batch crosses
    # jit_above_cost; compiling costs more than it saves for a statement run once. The anti-join
    # must probe each span's index per candidate: a span holds orders of magnitude more ids than
    # a batch, but the planner, misled by a young span's statistics or the candidates' estimate,
    # may hash or merge the whole span instead (a 275k-id span: 70 ms against 5). One round trip,
    # which also finds the spans holding keys of the other scope and whether the current one is
    # marked as holding this scope's.
    row = conn.execute(
        "SELECT w.current_day, set_config('jit', 'off', true), "
        "set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true), "
        "ARRAY(SELECT s.day FROM dedupe_span_scopes s WHERE s.scope <> %(scope)s), "
        "EXISTS (SELECT 1 FROM dedupe_span_scopes s "
        "        WHERE s.day = w.current_day AND s.scope = %(scope)s) "
        "FROM dedupe_window w FOR SHARE OF w",
        {"scope": scope},
    ).fetchone()
    assert row is not None
    day, other_days, marked = int(row[0]), list(row[4]), bool(row[5])
    if not marked:
        # Once per span and scope: later claims of the other scope know to look here too.
        conn.execute(
            "INSERT INTO dedupe_span_scopes (day, scope) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (day, scope),
        )
    params = {
        "day": day,
        "batch": batch_id,
        "prefix": key_prefix(topic),
        "other_days": other_days,
        **_candidates(keyed),
    }
    transition = bool(other_days)
    try:
        with conn.transaction():
            rows = conn.execute(_claim_sql(scope, transition, contested=False), params).fetchall()
    except psycopg.errors.UniqueViolation:
        # A concurrent claimer committed one of these keys after this statement's snapshot
        # (the only way a key can pass the anti-join and still be taken): claim again, letting
        # ON CONFLICT skip the keys it finds taken.
        rows = conn.execute(_claim_sql(scope, transition, contested=True), params).fetchall()
    return {offset for (offset,) in rows}


def own_claims(
    conn: psycopg.Connection, batch_id: int, records: Sequence[Claimable], topic: str
) -> set[int]:
    """Offsets of ``records`` whose key ``batch_id`` claimed (records without a key are skipped).

    Looked up by key in every live span (the claim may predate the current one), in either
    scope's form (the claim may predate a change of scope or the upgrade that brought scopes):
    an index on batch_id would cost every claim an extra index insert.
    """
    keyed = [r for r in records if r.dedupe_key is not None]
    if not keyed:
        return set()
    rows = conn.execute(
        "SELECT u.kafka_offset "
        f"FROM {_UNNESTED} "
        f"JOIN processed_logs p ON p.log_id IN (u.key, {_SCOPED}) "
        "AND p.kafka_offset = u.kafka_offset AND p.batch_id = %(batch)s",
        {"batch": batch_id, "prefix": key_prefix(topic), **_candidates(keyed)},
    ).fetchall()
    return {offset for (offset,) in rows}


def _candidates(keyed: Sequence[Claimable]) -> dict[str, str]:
    """The records' keys and offsets as the two comma-separated lists a claim unnests.

    One text parameter each: psycopg dumps a list of 10k strings element by element (~35 ms),
    ``",".join`` takes well under one, and the server splits and casts in C.
    """
    return {
        "keys": ",".join(str(r.dedupe_key) for r in keyed),
        "offsets": ",".join(str(r.offset) for r in keyed),
    }


@dataclass(frozen=True)
class WindowChange:
    current_day: int
    created: bool
    dropped: tuple[str, ...]
    # Spans that left the window but hold the ids of claims still pending, with those claims.
    kept: tuple[tuple[str, tuple[OffsetRange, ...]], ...] = ()


def advance_window(conn: psycopg.Connection, today: int, keep_days: int) -> WindowChange:
    """Start a new span once the current one is ``keep_days`` old; drop spans that left the window.

    ``current_day`` of the result is the first day of the span claims go to. A span is dropped
    when ``keep_days`` days have passed since its successor started: until then a claim made
    just before the switch may still be inside the window. A span that may hold the ids of a
    claimed batch not yet appended is kept (``kept``) until that batch is: the run that adopts
    the claim finds its records by those ids, and without them would drop every one.
    """
    if keep_days < 1:
        raise ValueError("keep_days must be at least 1")
    with conn.transaction():
        row = conn.execute("SELECT current_day FROM dedupe_window FOR UPDATE").fetchone()
        assert row is not None
        current = int(row[0])
        created = False
        if today >= current + keep_days:
            created = _create_partition(conn, today)
            conn.execute("UPDATE dedupe_window SET current_day = %s", (today,))
            current = today
        starts = sorted(
            int(name.removeprefix(_PARTITION_PREFIX))
            for (name,) in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'processed_logs'::regclass"
            ).fetchall()
        )
        pending = _pending_claim_days(conn)
        dropped, kept = [], []
        for start, successor in itertools.pairwise(starts):
            if successor <= current and today >= successor + keep_days:
                name = partition_name(start)
                # A claim went to the span current when it was made: one that started on or
                # before its day and whose successor started on or after it.
                needs = tuple(batch for batch, day in pending if start <= day <= successor)
                if needs:
                    kept.append((name, needs))
                    continue
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
                conn.execute("DELETE FROM dedupe_span_scopes WHERE day = %s", (start,))
                dropped.append(name)
    return WindowChange(current, created, tuple(dropped), tuple(kept))


def _pending_claim_days(conn: psycopg.Connection) -> list[tuple[OffsetRange, int]]:
    """Each claimed batch not yet appended, with the epoch day it was claimed on."""
    rows = conn.execute(
        "SELECT topic, partition, start_offset, end_offset, "
        "floor(extract(epoch FROM claimed_at) / 86400)::integer "
        "FROM archive_batches WHERE state = 'claimed'"
    ).fetchall()
    return [(OffsetRange(t, p, a, b), int(day)) for t, p, a, b, day in rows]
