"""The resource through which an archive run holds its run's and its partition's leases."""

from __future__ import annotations

import dagster as dg
import psycopg
from pydantic import Field, PrivateAttr

from protoagg_dagster.archive import leases
from protoagg_dagster.archive.ledger import ensure_schema
from protoagg_dagster.archive.run_tags import partition_key, queued_behind, run_partition
from protoagg_dagster.resources.postgres import PostgresResource


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
            ensure_schema(conn)  # the run's first connection may meet a database never used
            leases.record_taken(conn, self._run_id)
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
