"""Leases: how anyone tells a live archive run from one whose worker is gone.

A run holds PostgreSQL *session-level* advisory locks for as long as it lives, on a connection
of its own: its run lease (``run <run id>``), and the lease of each partition it archives
(``partition <topic>-<partition>``), which keeps two runs of any deployments from working one
partition at once. PostgreSQL drops the locks with the session, so a run killed with its whole
deployment (SIGKILL, OOM, node loss) loses them within seconds (the session's TCP keepalives bound
it when a host vanishes without closing its sockets), while a run that is merely slow keeps them,
however long it takes. Dagster's run storage cannot tell the two apart: a dead run stays
STARTED there.

Whoever probes a lease takes it for the length of one transaction; a run starting at that moment
waits for it (``pg_advisory_lock``), never fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import psycopg

from protoagg_dagster.core.errors import BackendError

# Distinguishes lease keys from the object locks (ledger.object_lock), which hash bucket/object.
_PREFIX = "protoagg lease "

# Server-side keepalives of the lease session: a worker host that vanishes without closing its
# sockets (power loss, network partition) frees its leases after about 10 + 3 × 5 s.
_KEEPALIVES = (
    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"
)


class LeaseTaken(BackendError):
    """Another live process holds the lease."""


def partition_lease(key: str) -> str:
    """The lease of a partition, by its ``topic-partition`` key."""
    return f"partition {key}"


def run_lease(run_id: str) -> str:
    return f"run {run_id}"


def hold(conn: psycopg.Connection, name: str, wait_seconds: float) -> None:
    """Take the lease ``name`` on ``conn`` (an autocommit connection kept open while working).

    Waits up to ``wait_seconds`` for a holder to let go, then raises ``LeaseTaken``.
    """
    conn.execute(_KEEPALIVES)
    # At least a millisecond: a lock_timeout of 0 would mean waiting forever.
    conn.execute(f"SET lock_timeout = {max(int(wait_seconds * 1000), 1)}")
    try:
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s || %s, 0))", (_PREFIX, name))
    except psycopg.errors.LockNotAvailable as exc:
        raise LeaseTaken(f"lease {name!r} stayed taken for {wait_seconds:.0f} s") from exc
    finally:
        conn.execute("SET lock_timeout = 0")


def hold_free(conn: psycopg.Connection, names: Sequence[str]) -> set[str]:
    """Take at once those of the leases ``names`` nobody holds; the names taken.

    One statement for all: a run of a thousand partitions takes their leases in one round trip,
    and waits (``hold``) only for the few another run still holds.
    """
    conn.execute(_KEEPALIVES)
    rows = conn.execute(
        "SELECT name FROM unnest(%s::text[]) AS name "
        "WHERE pg_try_advisory_lock(hashtextextended(%s || name, 0))",
        (list(names), _PREFIX),
    ).fetchall()
    return {row[0] for row in rows}


def still_held(conn: psycopg.Connection) -> bool:
    """Whether the lease session is still alive (a session lock lives exactly as long)."""
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


# Leases probed per transaction: each probe takes a lock for the transaction's length, and
# PostgreSQL's shared lock table holds about max_locks_per_transaction x max_connections (6,400
# with the defaults) for all sessions together.
PROBE_CHUNK = 1000


def held(conn: psycopg.Connection, names: Iterable[str]) -> set[str]:
    """Which of the leases ``names`` some live session holds right now."""
    wanted = sorted(set(names))
    found: set[str] = set()
    for first in range(0, len(wanted), PROBE_CHUNK):
        with conn.transaction():
            rows = conn.execute(
                "SELECT name FROM unnest(%s::text[]) AS name "
                "WHERE NOT pg_try_advisory_xact_lock(hashtextextended(%s || name, 0))",
                (wanted[first : first + PROBE_CHUNK], _PREFIX),
            ).fetchall()
        found |= {row[0] for row in rows}
    return found


def record_taken(conn: psycopg.Connection, run_id: str) -> None:
    """Note that the run has held its lease: from now on a free lease means it is gone."""
    conn.execute("INSERT INTO run_leases (run_id) VALUES (%s) ON CONFLICT DO NOTHING", (run_id,))


def ever_taken(conn: psycopg.Connection, run_ids: Iterable[str]) -> set[str]:
    """Which of the runs have held their lease at some moment (``record_taken``)."""
    wanted = sorted(set(run_ids))
    if not wanted:
        return set()
    rows = conn.execute(
        "SELECT run_id FROM run_leases WHERE run_id = ANY(%s)", (wanted,)
    ).fetchall()
    return {row[0] for row in rows}


def forget_taken(conn: psycopg.Connection, older_than_seconds: float) -> int:
    """Drop the notes of runs that took their lease long ago (they have ended since)."""
    cursor = conn.execute(
        "DELETE FROM run_leases WHERE taken_at < now() - make_interval(secs => %s)",
        (older_than_seconds,),
    )
    return cursor.rowcount
