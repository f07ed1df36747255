"""The numbered migrations of protoagg's PostgreSQL schema, oldest first.

Migration 1 is the schema of the oldest release an upgrade supports (2026-11-28: ledger,
positions, a day-partitioned dedupe window). Databases made before the version table existed ran
whatever DDL their release had, so migrations 1 to 4 are written to find their objects present
and do nothing then; every later migration runs exactly once, recorded in ``protoagg_schema``.
A migration never rewrites ``processed_logs`` rows: at hundreds of millions of ids that would
hold every claim for minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from protoagg_dagster.core.errors import ConfigError


@dataclass(frozen=True)
class Migration:
    """One step of the schema: ``apply`` runs inside the upgrade's transaction."""

    version: int
    name: str
    apply: Callable[[psycopg.Connection], None]


def _sql(statements: str) -> Callable[[psycopg.Connection], None]:
    def apply(conn: psycopg.Connection) -> None:
        conn.execute(statements)

    return apply


def _refuse_unpartitioned_window(conn: psycopg.Connection) -> None:
    # Versions before the release of 2026-11-28 kept one unpartitioned table; converting it
    # would rewrite every id under a lock, so the operator does it, told how.
    kind = conn.execute(
        "SELECT relkind FROM pg_class WHERE oid = to_regclass('processed_logs')"
    ).fetchone()
    if kind is not None and kind[0] != "p":
        raise ConfigError(
            "table processed_logs was created by a protoagg older than the oldest release "
            "an upgrade supports (not partitioned by day): ALTER TABLE processed_logs RENAME TO "
            "processed_logs_legacy, run `protoagg schema upgrade`, then copy the ids you still "
            "want deduplicated into processed_logs"
        )


def _ledger(conn: psycopg.Connection) -> None:
    _refuse_unpartitioned_window(conn)
    _sql(_LEDGER)(conn)


_LEDGER = """
CREATE TABLE IF NOT EXISTS archive_batches (
    batch_id     bigserial PRIMARY KEY,
    topic        text NOT NULL,
    partition    integer NOT NULL,
    start_offset bigint NOT NULL,
    end_offset   bigint NOT NULL,
    object_name  text NOT NULL,
    state        text NOT NULL CHECK (state IN ('claimed', 'appended')),
    records      integer NOT NULL,
    claimed      integer NOT NULL,
    run_id       text,
    generation   bigint,
    appended_bytes bigint,
    object_size  bigint,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    appended_at  timestamptz
);
CREATE INDEX IF NOT EXISTS archive_batches_partition
    ON archive_batches (topic, partition, start_offset);
CREATE UNIQUE INDEX IF NOT EXISTS archive_batches_one_claimed
    ON archive_batches (topic, partition) WHERE state = 'claimed';
CREATE TABLE IF NOT EXISTS archive_positions (
    topic       text NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);
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

_DEAD_LETTERS_AND_OBJECTS = """
ALTER TABLE archive_batches
    ADD COLUMN IF NOT EXISTS dead_letters_appended boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS archive_batches_object
    ON archive_batches (object_name, topic, partition) WHERE state = 'appended';
"""

_APPEND_QUEUE = """
CREATE TABLE IF NOT EXISTS append_queue (
    temp_name   text PRIMARY KEY,
    queued      bigserial,
    bucket      text NOT NULL,
    object_name text NOT NULL,
    batch_id    bigint NOT NULL,
    role        text NOT NULL,
    size        bigint NOT NULL,
    format      text,
    compression text NOT NULL,
    generation  bigint,
    piece_end   bigint,
    landed      boolean NOT NULL DEFAULT false,
    queued_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS append_queue_waiting
    ON append_queue (bucket, object_name, queued) WHERE NOT landed;
CREATE INDEX IF NOT EXISTS append_queue_piece ON append_queue (batch_id, role);
"""

_SEQUENCES = """
CREATE TABLE IF NOT EXISTS archive_sequences (
    base_name   text PRIMARY KEY,
    member      integer NOT NULL,
    member_bytes bigint NOT NULL
);
"""


_RUN_LEASES = """
CREATE TABLE run_leases (
    run_id   text PRIMARY KEY,
    taken_at timestamptz NOT NULL DEFAULT now()
);
"""


def _span_scopes(conn: psycopg.Connection) -> None:
    # Every key claimed so far was claimed for the whole deployment: the spans holding any are
    # marked so, and topic-scoped claims look there too until those spans leave the window.
    conn.execute(
        "CREATE TABLE dedupe_span_scopes ("
        "    day   integer NOT NULL,"
        "    scope text NOT NULL CHECK (scope IN ('topic', 'deployment')),"
        "    PRIMARY KEY (day, scope))"
    )
    spans = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'processed_logs'::regclass"
    ).fetchall()
    for (name,) in spans:
        holds = conn.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(name))
        ).fetchone()
        if holds is not None and holds[0]:
            conn.execute(
                "INSERT INTO dedupe_span_scopes (day, scope) VALUES (%s, 'deployment')",
                (int(name.removeprefix("processed_logs_d")),),
            )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "ledger, positions and the day-partitioned dedupe window", _ledger),
    Migration(
        2,
        "dead letters recorded per batch; appended batches found by object",
        _sql(_DEAD_LETTERS_AND_OBJECTS),
    ),
    Migration(
        3, "the append queue (one compose carries many partitions' pieces)", _sql(_APPEND_QUEUE)
    ),
    Migration(4, "numbered object sequences (PROTOAGG_MAX_OBJECT_BYTES)", _sql(_SEQUENCES)),
    Migration(5, "dedupe scope per span (PROTOAGG_DEDUPE_SCOPE)", _span_scopes),
    Migration(6, "runs that have held their lease (liveness)", _sql(_RUN_LEASES)),
    Migration(
        7,
        "the dead-letter object of each batch (dead letters roll over like the archive)",
        _sql("ALTER TABLE archive_batches ADD COLUMN dead_letter_object text"),
    ),
)
LATEST = MIGRATIONS[-1].version
