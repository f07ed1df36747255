"""Partition leases on a real PostgreSQL: held while a session lives, free when its process dies."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psycopg
import pytest

from protoagg_dagster.archive import leases
from protoagg_dagster.resources import PostgresResource


def test_a_held_lease_is_seen_and_probing_does_not_take_it(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    with pg.connect() as holder, pg.connect() as prober:
        assert leases.held(prober, ["t-0", "t-1"]) == set()
        leases.hold(holder, "t-0", wait_seconds=1)
        assert leases.held(prober, ["t-0", "t-1"]) == {"t-0"}
        # The probe took the free lease t-1 for its transaction only, and t-0 not at all.
        assert leases.held(prober, ["t-0", "t-1"]) == {"t-0"}
        assert leases.still_held(holder)
    with pg.connect() as prober:
        assert leases.held(prober, ["t-0"]) == set()


def test_a_second_holder_waits_then_gives_up(postgres_dsn: str) -> None:
    pg = PostgresResource(dsn=postgres_dsn)
    with pg.connect() as first, pg.connect() as second:
        leases.hold(first, "t-0", wait_seconds=1)
        started = time.monotonic()
        with pytest.raises(leases.LeaseTaken, match="'t-0' stayed taken"):
            leases.hold(second, "t-0", wait_seconds=0.5)
        assert time.monotonic() - started >= 0.5
        # The failed wait left the session usable, without a lock timeout of its own.
        assert second.execute("SHOW lock_timeout").fetchone() == ("0",)
        first.close()
        leases.hold(second, "t-0", wait_seconds=5)
        assert leases.still_held(second)


def test_the_lease_of_a_killed_process_is_free_at_once(postgres_dsn: str) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, psycopg\n"
            "from protoagg_dagster.archive import leases\n"
            "conn = psycopg.connect(sys.argv[1], autocommit=True)\n"
            "leases.hold(conn, 't-0', 5)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
            postgres_dsn,
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"held\n"
        with psycopg.connect(postgres_dsn, autocommit=True) as prober:
            assert leases.held(prober, ["t-0"]) == {"t-0"}
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=10)
            deadline = time.monotonic() + 10
            while leases.held(prober, ["t-0"]) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert leases.held(prober, ["t-0"]) == set()
    finally:
        holder.kill()


def test_fifty_thousand_partitions_leases_are_probed_within_the_lock_table(
    postgres_dsn: str,
) -> None:
    # One transaction probing them all would need 50,000 slots of PostgreSQL's shared lock table
    # (64 x max_connections and some slack; about 6,400 with the default 100 connections):
    # "out of shared memory".
    names = [leases.partition_lease(f"t-{p}") for p in range(50_000)]
    pg = PostgresResource(dsn=postgres_dsn)
    with pg.connect() as holder, pg.connect() as prober:
        leases.hold(holder, names[47_777], wait_seconds=1)
        assert leases.held(prober, names) == {names[47_777]}
