"""The schema's numbered migrations on a real PostgreSQL: once, in order, under one lock."""

from __future__ import annotations

import threading

import psycopg
import pytest

from protoagg_dagster import schema
from protoagg_dagster.archive.ledger import ensure_schema
from protoagg_dagster.cli.main import upgrade_schema
from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.schema import Migration


def test_a_new_database_gets_every_migration_once_and_then_none(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert schema.version(conn) == 0
        assert [m.version for m in ensure_schema(conn)] == [m.version for m in schema.MIGRATIONS]
        assert ensure_schema(conn) == ()
        assert schema.is_current(conn)
        window = conn.execute("SELECT current_day FROM dedupe_window").fetchone()
        assert window is not None


def test_concurrent_starts_upgrade_once(postgres_dsn: str) -> None:
    applied: list[tuple[Migration, ...]] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            barrier.wait()
            applied.append(ensure_schema(conn))

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(len(a) for a in applied) == [0] * 5 + [len(schema.MIGRATIONS)]
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute("SELECT version FROM protoagg_schema ORDER BY version").fetchall()
    assert [v for (v,) in rows] == [m.version for m in schema.MIGRATIONS]


def test_a_database_upgraded_by_a_newer_release_is_refused(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        ensure_schema(conn)
        conn.execute(
            "INSERT INTO protoagg_schema (version, name) VALUES (%s, 'from the future')",
            (schema.LATEST + 1,),
        )
        with pytest.raises(ConfigError, match=f"version {schema.LATEST + 1}, newer"):
            ensure_schema(conn)


def test_a_window_older_than_the_oldest_release_is_refused_with_the_steps(
    postgres_dsn: str,
) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE processed_logs (log_id uuid PRIMARY KEY)")
        with pytest.raises(ConfigError, match="RENAME TO processed_logs_legacy"):
            ensure_schema(conn)
        assert schema.version(conn) == 0  # nothing half-applied


def test_the_schema_command_upgrades_and_reports(postgres_dsn: str) -> None:
    assert upgrade_schema(postgres_dsn, only_status=True) == (
        f"schema: version 0 (behind: {schema.LATEST} is current)"
    )
    report = upgrade_schema(postgres_dsn)
    assert report.startswith(f"schema: version {schema.LATEST} (current)")
    assert f"applied {schema.LATEST}: " in report
