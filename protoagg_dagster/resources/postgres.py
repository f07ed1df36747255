"""PostgreSQL through psycopg 3: one connection per use, committed or rolled back as a unit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
from pydantic import Field

from protoagg_dagster.core.errors import BackendError, ConfigError
from protoagg_dagster.ledger import ensure_schema


class PostgresResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The dedupe database."""

    dsn: str = Field(description="libpq connection string or URI of the dedupe database.")
    connect_timeout: int = Field(default=10, description="Seconds to wait for a connection.")

    @contextmanager
    def get_connection(self) -> Iterator[psycopg.Connection]:
        """An autocommit connection whose schema is ready; use ``conn.transaction()`` blocks."""
        try:
            conn = psycopg.connect(self.dsn, connect_timeout=self.connect_timeout, autocommit=True)
        except psycopg.OperationalError as exc:
            reason = _first_line(exc)
            if any(marker in reason for marker in _PERMANENT):
                # Retrying cannot fix a wrong password or database name: fail at once.
                raise ConfigError(f"PostgreSQL refused PROTOAGG_POSTGRES_DSN: {reason}") from exc
            raise BackendError(
                f"cannot connect to PostgreSQL (check PROTOAGG_POSTGRES_DSN): {reason}"
            ) from exc
        with conn:
            ensure_schema(conn)
            yield conn


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
