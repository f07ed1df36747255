"""protoagg's PostgreSQL schema: numbered migrations and the version a database has reached.

``upgrade`` applies the missing migrations in one transaction under an advisory lock, so any
number of processes starting at once (runs, the sensor, ``protoagg schema upgrade``,
``protoagg services up``) upgrade a database once and in order; ``version`` is the one cheap
query a connection makes when the schema is already current. A database whose version is newer
than this code knows is refused: an older protoagg must not write to a schema it does not know.
"""

from __future__ import annotations

import psycopg

from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.schema.migrations import LATEST, MIGRATIONS, Migration

__all__ = ["LATEST", "MIGRATIONS", "Migration", "is_current", "upgrade", "version"]

# Any constant works; it only has to be the same for every protoagg process.
SCHEMA_LOCK_ID = 0x70726F746F616767

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS protoagg_schema (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def version(conn: psycopg.Connection) -> int:
    """The newest migration applied to the database (0: none recorded, or no schema at all)."""
    exists = conn.execute("SELECT to_regclass('protoagg_schema') IS NOT NULL").fetchone()
    if exists is None or not exists[0]:
        return 0
    row = conn.execute("SELECT COALESCE(max(version), 0) FROM protoagg_schema").fetchone()
    return int(row[0]) if row else 0


def is_current(conn: psycopg.Connection) -> bool:
    """Whether every migration this code knows is applied (a newer database is refused)."""
    return _checked(version(conn)) == LATEST


def upgrade(conn: psycopg.Connection) -> tuple[Migration, ...]:
    """Apply the migrations the database lacks, in order, in one transaction; return them."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_ID,))
        conn.execute(_VERSION_TABLE)
        reached = _checked(version(conn))
        pending = tuple(m for m in MIGRATIONS if m.version > reached)
        for migration in pending:
            migration.apply(conn)
            conn.execute(
                "INSERT INTO protoagg_schema (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
    return pending


def _checked(reached: int) -> int:
    if reached > LATEST:
        raise ConfigError(
            f"the database's protoagg schema is at version {reached}, newer than this protoagg "
            f"knows (up to {LATEST}): run the protoagg release that upgraded it, or a newer one"
        )
    return reached
