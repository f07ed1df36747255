"""Session fixtures: the real local services (started here if the test script did not) and
per-test isolation (a fresh PostgreSQL database, topic and object name per test).

An integration test never skips: if a service cannot be started or reached, the test errors.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from protoagg_dagster.services.postgres import SUPERUSER, SUPERUSER_PASSWORD
from protoagg_dagster.services.stack import Ports, exports_of, local_stack
from tests.support.secured_kafka import SecuredKafka, start_secured_kafka

ROOT = Path(__file__).resolve().parents[1]

# The files that take minutes (deployments of their own, kills, broker restarts), the longest
# first, from the whole suite's JUnit times (docs/design.md, "The tests"). pytest-xdist hands
# the workers whole files in collection order (scripts/test turns off its reordering, which
# sends the files with the most tests first): started first, none of them is left to run alone
# at the end while the other workers idle.
LONG_FILES = (
    "test_dead_deployment.py",
    "test_secured_kafka.py",
    "test_shared_object_rate.py",
    "test_outages.py",
    "test_restore.py",
    "test_object_rollover.py",
    "test_ui.py",
    "test_follow_up_runs.py",
    "test_two_deployments.py",
    "test_grouped_runs.py",
    "test_crashes.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The LONG_FILES first, in that order, then the other end-to-end files, then the rest, each
    group as collected; a file's tests stay together."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}

    def key(item: pytest.Item) -> tuple[int, int]:
        # tests/e2e before tests/integration: the same file name exists in both.
        return (rank.get(item.path.name, len(rank)), "e2e" not in item.path.parts)

    items.sort(key=key)


def _test_ports() -> Ports:
    """Test ports differ from the defaults so a developer's running stack is left alone.

    ``PROTOAGG_TEST_PORTS=KAFKA,CONTROLLER,POSTGRES,GCS`` moves them (scripts/test passes the same
    to ``services up``), so two checkouts can run their suites side by side.
    """
    raw = os.environ.get("PROTOAGG_TEST_PORTS", "19094,19095,15432,14443")
    kafka, controller, postgres, gcs = (int(part) for part in raw.split(","))
    return Ports(kafka=kafka, kafka_controller=controller, postgres=postgres, gcs=gcs)


TEST_PORTS = _test_ports()


@dataclass(frozen=True)
class Services:
    kafka_bootstrap: str
    postgres_admin_dsn: str
    gcs_url: str
    bucket: str = "logs"


@pytest.fixture(scope="session")
def services() -> Services:
    state_dir = Path(os.environ.get("PROTOAGG_TEST_STATE_DIR", ROOT / ".protoagg" / "test"))
    stack = local_stack(state_dir, TEST_PORTS)
    state_dir.mkdir(parents=True, exist_ok=True)
    # pytest-xdist's workers each ask; one starts what is not running, the others wait for it.
    with open(state_dir / "services.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for service in stack:
            service.up()  # idempotent: a no-op when scripts/test already started it
    env = exports_of(stack)
    os.environ.update(env)
    return Services(
        kafka_bootstrap=env["PROTOAGG_KAFKA_BOOTSTRAP"],
        postgres_admin_dsn=(
            f"postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{TEST_PORTS.postgres}/postgres"
        ),
        gcs_url=env["STORAGE_EMULATOR_HOST"],
    )


def _worker() -> int:
    """This pytest-xdist worker's number (scripts/test runs three); 0 without xdist."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def _secure_ports() -> tuple[int, int, int, int]:
    """``PROTOAGG_TEST_SECURE_PORTS=SASL_SSL,MTLS,ADMIN,CONTROLLER``: the secured broker's.

    Each xdist worker that needs one starts its own, ten ports further per worker.
    """
    raw = os.environ.get("PROTOAGG_TEST_SECURE_PORTS", "19096,19097,19098,19099")
    sasl, mtls, admin, controller = (int(part) + 10 * _worker() for part in raw.split(","))
    return sasl, mtls, admin, controller


def restart_ports() -> tuple[int, int, int]:
    """``PROTOAGG_TEST_RESTART_PORTS=KAFKA,CONTROLLER,POSTGRES``: of the services a test stops and
    starts again (tests/e2e/test_outages.py), ten ports further per xdist worker.

    Fixed, below the ephemeral range (32768-60999 here): while such a service is down, a port
    from ``bind(0)`` could be handed to any process (another worker's code server took one), and
    the service could not come back on it.
    """
    raw = os.environ.get("PROTOAGG_TEST_RESTART_PORTS", "19100,19101,19102")
    kafka, controller, postgres = (int(part) + 10 * _worker() for part in raw.split(","))
    return kafka, controller, postgres


@pytest.fixture(scope="session")
def secured_kafka(services: Services) -> Iterator[SecuredKafka]:
    """A second broker with TLS, logins and ACLs (tests/support/secured_kafka.py), started once
    by the first test that asks; stopped at the end of the session."""
    state_dir = Path(os.environ.get("PROTOAGG_TEST_STATE_DIR", ROOT / ".protoagg" / "test"))
    secured = start_secured_kafka((state_dir / f"secured-{_worker()}").resolve(), _secure_ports())
    yield secured
    secured.service.down()


@pytest.fixture
def postgres_dsn(services: Services) -> Iterator[str]:
    """A fresh, empty database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(services.postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield services.postgres_admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(services.postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def unique() -> str:
    """A short token for names (topics, objects) that must not collide between tests."""
    return uuid.uuid4().hex[:10]
