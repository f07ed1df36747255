"""The Iceberg catalog: pyiceberg's SQL catalog in protoagg's PostgreSQL, or a REST catalog.

The SQL catalog keeps its two tables in the schema ``protoagg_iceberg`` of the dedupe database,
so a machine that archives needs nothing new; table files go to ``gs://BUCKET/PREFIX/``. A REST
catalog (BigLake metastore, Polaris, Lakekeeper) is used instead when ``rest_uri`` is set.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

import dagster as dg
import psycopg
from pydantic import Field

from protoagg_dagster.core.errors import ConfigError

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog

CATALOG_SCHEMA = "protoagg_iceberg"
CATALOG_NAME = "protoagg"
# Serialises creating the catalog's schema and tables (SqlCatalog creates them on first use).
_CATALOG_LOCK_ID = 0x70726F746F696365
# The emulator takes any token; pyarrow's GCS client wants an expiry with it.
_EMULATOR_TOKEN_SECONDS = 10 * 365 * 86_400
# pyarrow's GCS output streams upload in parts of this size: small parts crawl (notes: 64 MiB in
# 64 KiB writes took 14 s on the emulator, in 8 MiB writes 1.2 s).
_UPLOAD_BUFFER = 16 * 1024 * 1024


class IcebergResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Where the topic tables live and how to reach their files."""

    postgres_dsn: str = Field(description="URI of the dedupe database (the SQL catalog's home).")
    bucket: str = Field(default="logs", description="Bucket of the archive and the tables.")
    warehouse_prefix: str = Field(
        default="iceberg", description="Tables are written under gs://BUCKET/PREFIX/."
    )
    namespace: str = Field(default="protoagg", description="Iceberg namespace of the tables.")
    rest_uri: str = Field(
        default="", description="A REST catalog's endpoint; empty: the SQL catalog in PostgreSQL."
    )
    catalog_properties: str = Field(
        default="",
        description="More catalog properties, KEY=VALUE comma separated (a REST token, headers).",
    )
    emulator_host: str = Field(
        default="", description="GCS emulator endpoint; empty: real GCS, default credentials."
    )

    @property
    def warehouse(self) -> str:
        return f"gs://{self.bucket}/{self.warehouse_prefix.strip('/')}"

    def file_io_properties(self) -> dict[str, str]:
        """pyarrow GCS file IO properties: the emulator's endpoint and a token it accepts."""
        properties = {"buffer-size": str(_UPLOAD_BUFFER)}
        if self.emulator_host:
            expires = int((time.time() + _EMULATOR_TOKEN_SECONDS) * 1000)
            properties |= {
                "gcs.service.host": self.emulator_host,
                "gcs.oauth2.token": "emulator",
                "gcs.oauth2.token-expires-at": str(expires),
            }
        return properties

    def get_catalog(self) -> Catalog:
        # pyiceberg (and pyarrow) load here, not at import: every archive run process imports
        # the definitions, and they cost it more than a second of start-up.
        from pyiceberg.catalog.rest import RestCatalog
        from pyiceberg.catalog.sql import SqlCatalog

        """A catalog client; creates the SQL catalog's schema and tables on first use."""
        properties = {"warehouse": self.warehouse, **self.file_io_properties()}
        properties |= _parse_properties(self.catalog_properties)
        if self.rest_uri:
            return RestCatalog(CATALOG_NAME, uri=self.rest_uri, **properties)
        with psycopg.connect(self.postgres_dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (_CATALOG_LOCK_ID,))
            try:
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {CATALOG_SCHEMA}")
                return SqlCatalog(CATALOG_NAME, uri=sqlalchemy_uri(self.postgres_dsn), **properties)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_CATALOG_LOCK_ID,))


def sqlalchemy_uri(dsn: str) -> str:
    """The DSN as SQLAlchemy's psycopg 3 URI, its search path the catalog's schema."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            "the Iceberg SQL catalog needs PROTOAGG_POSTGRES_DSN as a URI "
            f"(postgresql://USER:PASSWORD@HOST:PORT/DB), got {parts.scheme or 'key=value'} form"
        )
    search_path = "options=" + quote(f"-csearch_path={CATALOG_SCHEMA}")
    query = f"{parts.query}&{search_path}" if parts.query else search_path
    return urlunsplit(("postgresql+psycopg", parts.netloc, parts.path, query, parts.fragment))


def _parse_properties(text: str) -> dict[str, str]:
    properties: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ConfigError(
                f"PROTOAGG_ICEBERG_CATALOG_PROPERTIES: {item!r} is not KEY=VALUE (comma separated)"
            )
        properties[key.strip()] = value.strip()
    return properties
