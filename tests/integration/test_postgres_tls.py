"""PostgreSQL over TLS: ``sslmode=verify-full`` in PROTOAGG_POSTGRES_DSN checks the server.

A PostgreSQL of its own with TLS on (the secured broker's private CA signs its certificate): the
DSN docs/operations.md shows connects, and the same DSN with another CA is refused, which
doctor's "postgres" line reports.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from protoagg_dagster.cli.doctor import _postgres as doctor_postgres
from protoagg_dagster.services.postgres import SUPERUSER, SUPERUSER_PASSWORD, PostgresService
from tests.support.dagster_web import free_port
from tests.support.pki import Pki, make_pki


@pytest.fixture
def tls_postgres(tmp_path: Path) -> Iterator[tuple[PostgresService, Pki]]:
    pki = make_pki(tmp_path / "pki", ["127.0.0.1", "localhost"])
    # server.pem holds the key and the certificate chain; PostgreSQL picks each from it.
    service = PostgresService(tmp_path / "pg", port=free_port(), tls=(pki.server, pki.server))
    service.up()
    yield service, pki
    service.down()


def test_verify_full_connects_over_tls_and_refuses_a_server_of_another_ca(
    tls_postgres: tuple[PostgresService, Pki],
) -> None:
    service, pki = tls_postgres
    base = f"postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{service.port}/postgres"
    with psycopg.connect(f"{base}?sslmode=verify-full&sslrootcert={pki.ca}") as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row == (True,)
    wrong = f"{base}?sslmode=verify-full&sslrootcert={pki.other_ca}"
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(wrong, connect_timeout=5)

    class Deployment:
        postgres_dsn = wrong

    [finding] = list(doctor_postgres(Deployment()))  # type: ignore[arg-type]
    assert finding.status == "FAIL" and "certificate verify failed" in finding.detail
