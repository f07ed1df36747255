"""The dedupe window: ``processed_logs``, partitioned by claim day, pruned by dropping partitions.

A row holds one 128-bit dedupe key in the ``log_id uuid`` column: a logId of the ``log`` format is
its own key, any other key (``record`` format) is a 128-bit digest, so every kind costs the same
and rows written before the digests existed stay valid. Records without a key are never claimed
here (the ledger's offsets dedupe them).

A key is claimed in the *current* day's partition with ``INSERT ... ON CONFLICT DO NOTHING``
(concurrent claimers of one key agree on one winner) after checking that no older partition of
the window holds it. Older partitions never receive rows, so that check cannot race. Moving to a
new day takes the control row ``FOR UPDATE`` while each claim holds it ``FOR SHARE``: the switch
waits for claims in flight, claims never wait for each other. Pruning drops whole partitions, so
the per-batch cost stays flat however long the archive has run.

Trade-off: a message redelivered after its key left the window is archived again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.formats import Claimable

SCHEMA = """
CREATE TABLE IF NOT EXISTS processed_logs (
    log_id       uuid NOT NULL,
    day          integer NOT NULL,
    batch_id     bigint NOT NULL,
    kafka_offset bigint NOT NULL,
    PRIMARY KEY (log_id, day)
) PARTITION BY LIST (day);
CREATE TABLE IF NOT EXISTS dedupe_window (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    current_day integer NOT NULL
);
"""


def epoch_day(now: float | None = None) -> int:
    """Days since 1970-01-01 UTC."""
    return int((time.time() if now is None else now) // 86_400)


def partition_name(day: int) -> str:
    return f"processed_logs_d{day}"


def ensure_window(conn: psycopg.Connection, today: int) -> None:
    """Create the tables and the current day's partition (inside the schema transaction)."""
    kind = conn.execute(
        "SELECT relkind FROM pg_class WHERE oid = to_regclass('processed_logs')"
    ).fetchone()
    if kind is not None and kind[0] != "p":
        raise ConfigError(
            "table processed_logs was created by an older protoagg (not partitioned by day): "
            "ALTER TABLE processed_logs RENAME TO processed_logs_legacy, let protoagg create the "
            "new table, then copy the ids you still want deduplicated into it"
        )
    conn.execute(SCHEMA)
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
    if not records:
        return set()
    row = conn.execute("SELECT current_day FROM dedupe_window FOR SHARE").fetchone()
    assert row is not None
    _load_candidates(conn, records)
    # Inserting in log_id order makes concurrent claimers of overlapping ids take their row
    # locks in the same order, so they wait for each other instead of deadlocking.
    rows = conn.execute(
        "INSERT INTO processed_logs (log_id, day, batch_id, kafka_offset) "
        "SELECT c.log_id, %(day)s, %(batch)s, c.kafka_offset FROM claim_candidates c "
        "WHERE NOT EXISTS (SELECT 1 FROM processed_logs p "
        "                  WHERE p.log_id = c.log_id AND p.day < %(day)s) "
        "ORDER BY c.log_id, c.kafka_offset "
        "ON CONFLICT (log_id, day) DO NOTHING RETURNING kafka_offset",
        {"day": int(row[0]), "batch": batch_id},
    ).fetchall()
    return {offset for (offset,) in rows}


def own_claims(conn: psycopg.Connection, batch_id: int, records: Sequence[Claimable]) -> set[int]:
    """Offsets of ``records`` whose key ``batch_id`` claimed (records without a key are skipped).

    Looked up by logId: an index on batch_id would cost every claim an extra index insert.
    """
    if not records:
        return set()
    with conn.transaction():
        _load_candidates(conn, records)
        rows = conn.execute(
            "SELECT c.kafka_offset FROM claim_candidates c JOIN processed_logs p "
            "ON p.log_id = c.log_id AND p.kafka_offset = c.kafka_offset AND p.batch_id = %s",
            (batch_id,),
        ).fetchall()
    return {offset for (offset,) in rows}


def _load_candidates(conn: psycopg.Connection, records: Sequence[Claimable]) -> None:
    """``COPY`` (key, offset) of the records that have a key into a temp table emptied at commit."""
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS claim_candidates (log_id uuid, kafka_offset bigint) "
        "ON COMMIT DELETE ROWS"
    )
    payload = "".join(f"{r.dedupe_key}\t{r.offset}\n" for r in records if r.dedupe_key is not None)
    with conn.cursor().copy("COPY claim_candidates (log_id, kafka_offset) FROM STDIN") as copy:
        copy.write(payload)


@dataclass(frozen=True)
class WindowChange:
    current_day: int
    created: bool
    dropped: tuple[str, ...]


def advance_window(conn: psycopg.Connection, today: int, keep_days: int) -> WindowChange:
    """Make ``today`` the claim day and drop partitions older than ``keep_days`` days."""
    if keep_days < 1:
        raise ValueError("keep_days must be at least 1")
    with conn.transaction():
        row = conn.execute("SELECT current_day FROM dedupe_window FOR UPDATE").fetchone()
        assert row is not None
        current = int(row[0])
        created = False
        if today > current:
            created = _create_partition(conn, today)
            conn.execute("UPDATE dedupe_window SET current_day = %s", (today,))
            current = today
        oldest_kept = current - keep_days + 1
        dropped = []
        for (name,) in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'processed_logs'::regclass ORDER BY c.relname"
        ).fetchall():
            if int(name.removeprefix("processed_logs_d")) < oldest_kept:
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
                dropped.append(name)
    return WindowChange(current, created, tuple(dropped))
