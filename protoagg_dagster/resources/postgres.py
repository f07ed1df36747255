"""PostgreSQL through psycopg 3.

One connection per use, committed or rolled back as a unit; and the lease an archive run holds on
its partition for its whole life, on a connection of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import psycopg
from pydantic import Field, PrivateAttr

from protoagg_dagster.archive import leases
from protoagg_dagster.archive.ledger import ensure_schema
from protoagg_dagster.archive.run_tags import partition_key, queued_behind, run_partition
from protoagg_dagster.core.errors import BackendError, ConfigError


class PostgresResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The dedupe database."""

    dsn: str = Field(description="libpq connection string or URI of the dedupe database.")
    connect_timeout: int = Field(default=10, description="Seconds to wait for a connection.")

    @contextmanager
    def get_connection(self) -> Iterator[psycopg.Connection]:
        """An autocommit connection whose schema is ready; use ``conn.transaction()`` blocks."""
        with self.connect() as conn:
            ensure_schema(conn)
            yield conn

    def connect(self, **options: Any) -> psycopg.Connection:
        """A bare autocommit connection (libpq ``options`` added), errors told apart."""
        try:
            return psycopg.connect(
                self.dsn, connect_timeout=self.connect_timeout, autocommit=True, **options
            )
        except psycopg.OperationalError as exc:
            reason = _first_line(exc)
            if any(marker in reason for marker in _PERMANENT):
                # Retrying cannot fix a wrong password or database name: fail at once.
                raise ConfigError(f"PostgreSQL refused PROTOAGG_POSTGRES_DSN: {reason}") from exc
            raise BackendError(
                f"cannot connect to PostgreSQL (check PROTOAGG_POSTGRES_DSN): {reason}"
            ) from exc


class PartitionLease(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Held by an archive run from its start to its end: its run's and its partition's leases.

    The sensor fails a STARTED run whose run lease stays free, and launches nothing for a
    partition whose lease is taken (see ``protoagg_dagster.archive.leases``).
    """

    postgres: PostgresResource
    wait_seconds: float = Field(
        default=60.0,
        description="How long a run waits for its partition's lease held by another live run "
        "(another deployment's) before it gives up without doing anything.",
    )
    follow_up_wait_seconds: float = Field(
        default=900.0,
        description="The same for a run queued behind another of its partition (the sensor's "
        "follow-up, a backfill's next range), which takes over when that one ends.",
    )
    _conn: psycopg.Connection | None = PrivateAttr(default=None)
    _partition: str | None = PrivateAttr(default=None)
    _run_id: str = PrivateAttr(default="")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        run = context.dagster_run
        target = run_partition(run) if run is not None else None
        if run is None or target is None:
            return
        self._partition = partition_key(*target)
        self._run_id = run.run_id
        self._conn = self._take(
            self.follow_up_wait_seconds if queued_behind(run) else self.wait_seconds
        )
        if context.log is not None:
            context.log.info(f"holding the leases of this run and of partition {self._partition}")

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._conn is not None:
            self._conn.close()  # closing the session frees the leases
            self._conn = None

    def confirm(self) -> None:
        """Make sure the leases are still ours before touching the ledger or the archive.

        Leases lost while the run lives (PostgreSQL restarted) are taken again if free; if another
        run took the partition meanwhile, that run now works it and this one stops.
        """
        if self._partition is None or (self._conn is not None and leases.still_held(self._conn)):
            return
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._conn = self._take(wait_seconds=0.0)

    def _take(self, wait_seconds: float) -> psycopg.Connection:
        assert self._partition is not None
        # The run id in pg_stat_activity tells an operator which run holds which lease.
        conn = self.postgres.connect(application_name=f"protoagg run {self._run_id}"[:63])
        try:
            leases.hold(conn, leases.run_lease(self._run_id), wait_seconds=0.0)
            leases.hold(conn, leases.partition_lease(self._partition), wait_seconds)
        except leases.LeaseTaken as exc:
            conn.close()
            raise dg.Failure(
                description=f"partition {self._partition} is being archived by another live "
                f"run (its lease stayed taken for {wait_seconds:.0f} s); this run stops without "
                "archiving anything, so that one run at a time works the partition",
                allow_retries=False,
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn


_PERMANENT = (
    "password authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "permission denied",
    "invalid connection option",
    "invalid dsn",
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # libpq prefixes "connection failed: connection to server at ... failed:"; keep the cause.
    return text.splitlines()[0].rsplit("failed: ", 1)[-1] if text else type(exc).__name__
