"""The resource through which an archive run holds its run's lease and its partitions' leases."""

from __future__ import annotations

import time

import dagster as dg
import psycopg
from pydantic import Field, PrivateAttr

from protoagg_dagster.archive import leases
from protoagg_dagster.archive.ledger import ensure_schema
from protoagg_dagster.archive.run_tags import partition_key, queued_behind, run_ranges
from protoagg_dagster.resources.postgres import PostgresResource

# A partition's lease is probed by the sensor for the length of one transaction: a run taking
# it at that moment waits this long at least, instead of skipping a partition nobody works.
_PROBE_GRACE_SECONDS = 0.5


class PartitionLease(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Held by an archive run from its start to its end: its run's and its partitions' leases.

    A partition whose lease another live run holds (another deployment's) is left out: the run
    archives the others, and the sensor launches that partition's range again once it is free.
    The sensor fails a STARTED run whose run lease stays free (see
    ``protoagg_dagster.archive.leases``).
    """

    postgres: PostgresResource
    wait_seconds: float = Field(
        default=5.0,
        description="How long a run waits, for all its partitions together, for leases held by "
        "other live runs (another deployment's) before it leaves those partitions out.",
    )
    follow_up_wait_seconds: float = Field(
        default=900.0,
        description="The same for a run queued behind others of its partitions (the sensor's "
        "follow-up, a backfill's next range), which takes over when those end.",
    )
    _conn: psycopg.Connection | None = PrivateAttr(default=None)
    _held: set[str] = PrivateAttr(default_factory=set)
    _run_id: str = PrivateAttr(default="")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        run = context.dagster_run
        ranges = run_ranges(run) if run is not None else []
        if run is None or not ranges:
            return
        self._run_id = run.run_id
        wanted = sorted({partition_key(r.topic, r.partition) for r in ranges})
        wait = self.follow_up_wait_seconds if queued_behind(run) else self.wait_seconds
        self._conn = self._connect()
        self._held = self._take(self._conn, wanted, wait)
        if context.log is not None:
            missing = sorted(set(wanted) - self._held)
            context.log.info(
                f"holding the leases of this run and of {len(self._held)} partitions"
                + (
                    f"; left out, their leases held by other live runs: {', '.join(missing)}"
                    if missing
                    else ""
                )
            )

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._conn is not None:
            self._conn.close()  # closing the session frees the leases
            self._conn = None

    def holds(self, topic: str, partition: int) -> bool:
        """Whether this run holds the partition's lease (as of its last ``confirm``)."""
        return partition_key(topic, partition) in self._held

    def confirm(self) -> None:
        """Make sure the leases are still ours before touching the ledger or the archive.

        Leases lost while the run lives (PostgreSQL restarted) are taken again if free; a
        partition another run took meanwhile is that run's now, and ``holds`` says so.
        """
        if self._conn is None or leases.still_held(self._conn):
            return
        self._conn.close()
        self._conn = None
        self._conn = self._connect()
        self._held = self._take(self._conn, sorted(self._held), wait_seconds=0.0)

    def _connect(self) -> psycopg.Connection:
        # The run id in pg_stat_activity tells an operator which run holds which lease.
        conn = self.postgres.connect(application_name=f"protoagg run {self._run_id}"[:63])
        try:
            leases.hold(conn, leases.run_lease(self._run_id), wait_seconds=0.0)
            ensure_schema(conn)  # the run's first connection may meet a database never used
            leases.record_taken(conn, self._run_id)
        except BaseException:
            conn.close()
            raise
        return conn

    def _take(self, conn: psycopg.Connection, wanted: list[str], wait_seconds: float) -> set[str]:
        """The partitions of ``wanted`` whose leases were taken within ``wait_seconds`` in all.

        The free ones at once, then the others one after the other: a follow-up's leases are all
        held by the run before it, which lets go of them together, so after the first wait the
        rest come at once.
        """
        deadline = time.monotonic() + wait_seconds
        names = {leases.partition_lease(key): key for key in wanted}
        taken = {names[name] for name in leases.hold_free(conn, list(names))}
        for key in wanted:
            if key in taken:
                continue
            wait = max(deadline - time.monotonic(), _PROBE_GRACE_SECONDS)
            try:
                leases.hold(conn, leases.partition_lease(key), wait)
            except leases.LeaseTaken:
                continue
            taken.add(key)
        return taken
