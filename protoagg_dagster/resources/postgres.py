"""PostgreSQL through psycopg 3: connections to the dedupe database, connection errors told apart.

The archive path prepares its schema itself (``archive.ledger.ledger_connection``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import psycopg
from pydantic import Field

from protoagg_dagster.core.errors import BackendError, ConfigError


class PostgresResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The dedupe database."""

    dsn: str = Field(description="libpq connection string or URI of the dedupe database.")
    connect_timeout: int = Field(default=10, description="Seconds to wait for a connection.")

    @contextmanager
    def get_connection(self) -> Iterator[psycopg.Connection]:
        """An autocommit connection, closed at the end; use ``conn.transaction()`` blocks."""
        with self.connect() as conn:
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
