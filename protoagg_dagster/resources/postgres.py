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

from protoagg_dagster import leases
from protoagg_dagster.core.errors import BackendError, ConfigError
from protoagg_dagster.ledger import ensure_schema
from protoagg_dagster.run_tags import partition_key, run_partition


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
    """Held by an archive run from its start to its end: the sign that its worker is alive.

    The sensor fails a STARTED run whose lease stays free (see ``protoagg_dagster.leases``).
    """

    postgres: PostgresResource
    wait_seconds: float = Field(
        default=60.0,
        description="How long a run waits for its partition's lease held by another live run "
        "(another deployment's) before it gives up without doing anything.",
    )
    _conn: psycopg.Connection | None = PrivateAttr(default=None)
    _name: str | None = PrivateAttr(default=None)
    _application: str = PrivateAttr(default="protoagg run")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        run = context.dagster_run
        target = run_partition(run) if run is not None else None
        if target is None:
            return
        self._name = partition_key(*target)
        self._application = f"protoagg run {run.run_id}" if run is not None else "protoagg run"
        self._conn = self._take(self.wait_seconds)
        if context.log is not None:
            context.log.info(f"holding the lease of partition {self._name}")

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._conn is not None:
            self._conn.close()  # closing the session frees the lease
            self._conn = None

    def confirm(self) -> None:
        """Make sure the lease is still ours before touching the ledger or the archive.

        A lease session lost while the run lives (PostgreSQL restarted) is taken again if free;
        if someone else took it meanwhile, another run now works the partition and this one stops.
        """
        if self._name is None or (self._conn is not None and leases.still_held(self._conn)):
            return
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        try:
            self._conn = self._take(wait_seconds=0.0)
        except leases.LeaseTaken as exc:
            raise dg.Failure(
                description=f"lost the lease of partition {self._name} and another run took it; "
                "this run stops so that one run archives the partition",
                allow_retries=False,
            ) from exc

    def _take(self, wait_seconds: float) -> psycopg.Connection:
        assert self._name is not None
        # The run id in pg_stat_activity tells an operator which run holds which lease.
        conn = self.postgres.connect(application_name=self._application[:63])
        try:
            leases.hold(conn, self._name, wait_seconds)
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
