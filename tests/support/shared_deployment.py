"""One ``dagster-daemon`` deployment shared by the end-to-end tests that neither kill it nor need
settings of their own.

Booting a deployment (daemon, code server, first sensor tick) and stopping it again costs each
test seconds of both cores; tests that only need *a* running deployment share this one, booted once
per test module (the ``shared`` fixture of tests/e2e/conftest.py: an idle deployment still costs
seconds of CPU a minute, so it stops when its module ends), and keep their data apart by names,
never by restarts:

* the deployment archives every topic whose name starts with ``shared-<token>-`` (a
  ``PROTOAGG_TOPICS`` pattern: the sensor lists topics at each tick, so a topic a test creates
  later is picked up; the deployment's own token leaves the topics of earlier deployments, which
  a local broker keeps, alone); :meth:`SharedDeployment.new_topic` gives a test its own;
* each topic has its own archive object, ``shared/{topic}/log.pb`` (one object for all of the
  topic's partitions), and its own rows in the ledger (one PostgreSQL database for the deployment,
  keyed by topic);
* GCS is fake-gcs-server behind one :class:`GcsProxy` with GCS's one mutation per second per object
  name; a test programs faults for its own objects only (``object_prefix`` of its topic);
* :meth:`SharedDeployment.runs` and :meth:`SharedDeployment.wait_archived` look at the test's topic
  only.

Settings (:data:`SETTINGS`): runs of exactly ``BATCH`` messages. A run is launched once ``BATCH``
messages wait (or the oldest has waited the default 15 s linger) and reads at most ``BATCH``, so a
backlog produced in one go becomes the same runs whenever the sensor's tick falls.

A test that kills the deployment, or needs another setting (batch sizes, object size limit, delays
in the code), boots its own :class:`DagsterDeployment`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from protoagg_dagster.core.archive_object import TEMP_PREFIX
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.resources.settings import ArchiverSettings
from tests.conftest import Services
from tests.helpers import Stack, archived_to_end
from tests.support.dagster_deployment import DagsterDeployment, RunSummary, run_summaries
from tests.support.gcs_proxy import GcsProxy

BATCH = 1000
SETTINGS = {
    "PROTOAGG_GCS_OBJECT": "shared/{topic}/log.pb",
    "PROTOAGG_BATCH_SIZE": str(BATCH),
    "PROTOAGG_MAX_BATCH_MESSAGES": str(BATCH),
}
ARCHIVE_JOB = "archive_kafka_batch"


@dataclass
class SharedDeployment:
    """The shared deployment, its ledger database and the GCS proxy in front of it."""

    deployment: DagsterDeployment
    proxy: GcsProxy
    services: Services
    dsn: str
    topic_prefix: str  # shared-<token>-

    def new_topic(self) -> str:
        """A topic name of the test's own that the deployment archives once it exists."""
        return f"{self.topic_prefix}{uuid.uuid4().hex[:10]}"

    def object_name(self, topic: str) -> str:
        return SETTINGS["PROTOAGG_GCS_OBJECT"].format(topic=topic)

    def temp_prefix(self, topic: str) -> str:
        """Where the topic's runs upload their pieces before composing them onto the object."""
        return f"{TEMP_PREFIX}{topic}/"

    def stack(self, topic: str) -> Stack:
        """Resources on what the deployment writes for ``topic``, straight to the emulator."""
        return Stack(
            kafka=KafkaResource(bootstrap_servers=self.services.kafka_bootstrap, topics=topic),
            postgres=PostgresResource(dsn=self.dsn),
            gcs=GCSResource(
                bucket=self.services.bucket,
                object_template=self.object_name(topic),
                emulator_host=self.services.gcs_url,
            ),
            archiver=ArchiverSettings(batch_size=BATCH, max_batch_messages=BATCH),
        )

    def runs(self, topic: str) -> list[RunSummary]:
        """The archive runs of ``topic``'s partitions, by start time."""
        prefix = f"{topic}-"
        return [
            run
            for run in run_summaries(self.deployment)
            if run.job_name == ARCHIVE_JOB
            and run.partition is not None
            and run.partition.startswith(prefix)
            and run.partition[len(prefix) :].isdigit()
        ]

    def wait_archived(
        self, topic: str, partitions: int, end: int, deadline_seconds: float, since: float
    ) -> float:
        """Wait until ``topic``'s partitions are archived to ``end`` and each of its runs has
        finished (none queued or working, none failed and due for a retry); return the seconds
        from ``since`` (a ``time.monotonic()``) to archived. Prints the daemon's log on failure."""
        deadline = time.monotonic() + deadline_seconds
        try:
            while not archived_to_end(self.dsn, topic, partitions, end):
                self._check(deadline, "not archived in time")
            elapsed = time.monotonic() - since
            while not self._settled(topic):
                self._check(deadline, "runs did not settle")
        except BaseException:
            print(self.deployment.log_tail())
            raise
        return elapsed

    def _check(self, deadline: float, message: str) -> None:
        assert self.deployment.running(), "the shared dagster-daemon exited"
        assert time.monotonic() < deadline, message
        time.sleep(0.5)

    def _settled(self, topic: str) -> bool:
        runs = self.runs(topic)
        parents = {run.parent_run_id for run in runs}
        return all(run.status in ("SUCCESS", "FAILURE", "CANCELED") for run in runs) and all(
            run.run_id in parents for run in runs if run.status == "FAILURE" and run.will_retry
        )


@contextmanager
def shared_deployment(services: Services, home: Path) -> Iterator[SharedDeployment]:
    """Boot the shared deployment in ``home`` (a database of its own, a proxy); stop it after."""
    token = uuid.uuid4().hex[:8]
    topic_prefix = f"shared-{token}-"
    name = f"t_shared_{token}"
    with psycopg.connect(services.postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = services.postgres_admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    proxy = GcsProxy(services.gcs_url, mutation_interval=1.0)
    env = {
        **SETTINGS,
        "PROTOAGG_TOPICS": f"/{topic_prefix}.*/",
        "PROTOAGG_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
        "PROTOAGG_POSTGRES_DSN": dsn,
        "PROTOAGG_GCS_BUCKET": services.bucket,
        "STORAGE_EMULATOR_HOST": proxy.start(),
    }
    deployment = DagsterDeployment("shared", home, env)
    try:
        deployment.start()
        yield SharedDeployment(deployment, proxy, services, dsn, topic_prefix)
    finally:
        deployment.stop()
        proxy.close()
        with psycopg.connect(services.postgres_admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
