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

from protoagg_dagster.core.formats import Claimable

_PARTITION_PREFIX = "processed_logs_d"
# The rows of ``_candidates(...)``'s two parameters.
_CANDIDATES = (
    "unnest(string_to_array(%(keys)s, ',')::uuid[], string_to_array(%(offsets)s, ',')::bigint[])"
    " AS c (log_id, kafka_offset)"
)


# Inserting in log_id order makes concurrent claimers of overlapping ids take their row locks in
# the same order, so they wait for each other instead of deadlocking. Sorting before the probes
# (the outer ORDER BY is then already satisfied) makes consecutive probes descend through the same
# inner index pages, which stay in the CPU's cache. DISTINCT ON keeps a key's lowest offset.
_SORTED = f"(SELECT * FROM {_CANDIDATES} ORDER BY c.log_id, c.kafka_offset) AS c"
# The usual claim: keys found in no live span, inserted plainly. Cheaper than ON CONFLICT, whose
# speculative insertion costs each row an extra index descent, a lock and a WAL record (measured
# in docs/benchmarks.md); a key a concurrent claimer commits meanwhile raises a unique violation.
_CLAIM_NEW = (
    "INSERT INTO processed_logs (log_id, day, batch_id, kafka_offset) "
    "SELECT DISTINCT ON (c.log_id) c.log_id, %(day)s, %(batch)s, c.kafka_offset "
    f"FROM {_SORTED} "
    "WHERE NOT EXISTS (SELECT 1 FROM processed_logs p "
    "                  WHERE p.log_id = c.log_id AND p.day <= %(day)s) "
    "ORDER BY c.log_id, c.kafka_offset "
    "RETURNING kafka_offset"
)
# The claim when that happened: the older spans never receive rows, so their anti-join cannot
# race; the current span's check is ON CONFLICT, where concurrent claimers agree on one winner.
_CLAIM_CONTESTED = (
    "INSERT INTO processed_logs (log_id, day, batch_id, kafka_offset) "
    "SELECT c.log_id, %(day)s, %(batch)s, c.kafka_offset "
    f"FROM {_SORTED} "
    "WHERE NOT EXISTS (SELECT 1 FROM processed_logs p "
    "                  WHERE p.log_id = c.log_id AND p.day < %(day)s) "
    "ORDER BY c.log_id, c.kafka_offset "
    "ON CONFLICT (log_id, day) DO NOTHING RETURNING kafka_offset"
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


def claim_ids(conn: psycopg.Connection, batch_id: int, records: Sequence[Claimable]) -> set[int]:
    """Claim each record's dedupe key for ``batch_id`` (inside the caller's transaction).

    Returns the offsets whose claim won: for each key new to the window, its first occurrence
    (repeats inside ``records`` lose to the lowest offset in the same statement). Records without
    a key are skipped: the caller keeps them.
    """
    keyed = [r for r in records if r.dedupe_key is not None]
    if not keyed:
        return set()
    # A claim probing several partitions (a window of day partitions) or a large batch crosses
    # jit_above_cost; compiling costs more than it saves for a statement run once. The anti-join
    # must probe each span's index per candidate: a span holds orders of magnitude more ids than
    # a batch, but the planner, misled by a young span's statistics or the candidates' estimate,
    # may hash or merge the whole span instead (a 275k-id span: 70 ms against 5). One round trip.
    row = conn.execute(
        "SELECT current_day, set_config('jit', 'off', true), "
        "set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true) "
        "FROM dedupe_window FOR SHARE"
    ).fetchone()
    assert row is not None
    params = {"day": int(row[0]), "batch": batch_id, **_candidates(keyed)}
    try:
        with conn.transaction():
            rows = conn.execute(_CLAIM_NEW, params).fetchall()
    except psycopg.errors.UniqueViolation:
        # A concurrent claimer committed one of these keys after this statement's snapshot
        # (the only way a key can pass the anti-join and still be taken): claim again, letting
        # ON CONFLICT skip the keys it finds taken.
        rows = conn.execute(_CLAIM_CONTESTED, params).fetchall()
    return {offset for (offset,) in rows}


def own_claims(conn: psycopg.Connection, batch_id: int, records: Sequence[Claimable]) -> set[int]:
    """Offsets of ``records`` whose key ``batch_id`` claimed (records without a key are skipped).

    Looked up by logId in every live span (the claim may predate the current one): an index on
    batch_id would cost every claim an extra index insert.
    """
    keyed = [r for r in records if r.dedupe_key is not None]
    if not keyed:
        return set()
    rows = conn.execute(
        "SELECT c.kafka_offset "
        f"FROM {_CANDIDATES} "
        "JOIN processed_logs p ON p.log_id = c.log_id AND p.kafka_offset = c.kafka_offset "
        "AND p.batch_id = %(batch)s",
        {"batch": batch_id, **_candidates(keyed)},
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


def advance_window(conn: psycopg.Connection, today: int, keep_days: int) -> WindowChange:
    """Start a new span once the current one is ``keep_days`` old; drop spans that left the window.

    ``current_day`` of the result is the first day of the span claims go to. A span is dropped
    when ``keep_days`` days have passed since its successor started: until then a claim made
    just before the switch may still be inside the window.
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
        dropped = []
        for start, successor in itertools.pairwise(starts):
            if successor <= current and today >= successor + keep_days:
                name = partition_name(start)
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
                dropped.append(name)
    return WindowChange(current, created, tuple(dropped))
