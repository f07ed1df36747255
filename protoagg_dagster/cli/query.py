"""``protoagg query SQL``: DuckDB over the topic tables, each a view named after its topic.

Each view reads the table's current metadata with DuckDB's Iceberg extension (installed as a
package, pinned with DuckDB: nothing is downloaded at run time). ``--from``/``--to`` restrict
every view to a time window, which DuckDB prunes to the files of those days.

A person waits for this command, so it imports neither Dagster nor pyiceberg for the default
SQL catalog (seconds of imports): the tables' metadata locations are read from the catalog's
table in PostgreSQL (``iceberg_tables``, the layout pyiceberg's and Java's JDBC catalogs share).
"""

from __future__ import annotations

import datetime
import importlib.resources
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit

import duckdb
import psycopg

from protoagg_dagster.core import settings
from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.formats import text_or_base64

# Loaded in this order: iceberg needs avro (manifests) and httpfs (gs:// reads).
_EXTENSIONS = ("httpfs", "avro", "iceberg")
# Where the SQL catalog keeps its tables (resources.iceberg.CATALOG_SCHEMA, CATALOG_NAME).
_CATALOG_TABLES = "protoagg_iceberg.iceberg_tables"
_CATALOG_NAME = "protoagg"


@dataclass(frozen=True)
class TopicTables:
    """Where the topic tables are: the settings ``protoagg query`` reads."""

    postgres_dsn: str
    namespace: str = "protoagg"
    emulator_host: str = ""
    rest_uri: str = ""
    catalog_properties: str = ""
    bucket: str = "logs"
    warehouse_prefix: str = "iceberg"

    @classmethod
    def from_settings(cls) -> TopicTables:
        return cls(
            postgres_dsn=settings.POSTGRES_DSN.read(),
            namespace=settings.ICEBERG_NAMESPACE.read(),
            emulator_host=settings.STORAGE_EMULATOR_HOST.read(),
            rest_uri=settings.ICEBERG_REST_URI.read(),
            catalog_properties=settings.ICEBERG_CATALOG_PROPERTIES.read(),
            bucket=settings.GCS_BUCKET.read(),
            warehouse_prefix=settings.ICEBERG_PREFIX.read(),
        )

    def metadata_locations(self) -> dict[str, str]:
        """Table name → its current metadata file."""
        if self.rest_uri:
            from protoagg_dagster.resources.iceberg import IcebergResource

            catalog = IcebergResource(
                postgres_dsn=self.postgres_dsn,
                bucket=self.bucket,
                warehouse_prefix=self.warehouse_prefix,
                namespace=self.namespace,
                rest_uri=self.rest_uri,
                catalog_properties=self.catalog_properties,
                emulator_host=self.emulator_host,
            ).get_catalog()
            return {
                identifier[-1]: catalog.load_table(identifier).metadata_location
                for identifier in catalog.list_tables(self.namespace)
            }
        try:
            with psycopg.connect(self.postgres_dsn) as conn:
                rows = conn.execute(
                    f"SELECT table_name, metadata_location FROM {_CATALOG_TABLES} "
                    "WHERE catalog_name = %s AND table_namespace = %s "
                    "AND metadata_location IS NOT NULL ORDER BY table_name",
                    (_CATALOG_NAME, self.namespace),
                ).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
        except psycopg.OperationalError as exc:
            raise ConfigError(f"cannot reach the catalog (PROTOAGG_POSTGRES_DSN): {exc}") from exc
        return dict(rows)


def parse_bound(text: str, end: bool) -> datetime.datetime:
    """A ``--from``/``--to`` value: a date (a ``--to`` date includes that day) or a time."""
    try:
        if len(text) == 10:
            day = datetime.date.fromisoformat(text)
            start = datetime.datetime.combine(day, datetime.time(), datetime.UTC)
            return start + datetime.timedelta(days=1) if end else start
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{text!r} is not a date (YYYY-MM-DD) or a time (e.g. 2026-11-01T08:00:00Z)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def connect(tables: TopicTables) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the packaged extensions loaded and GCS reachable."""
    # DuckDB checks an extension's signature by hashing the whole file at every LOAD: 1.6 s for
    # these three (84 MB) on this machine, half the time a lookup may take. The files come from
    # the pinned wheels pip installed, as DuckDB's own native code does, so the check adds no
    # trust the wheel does not already need; only these three paths are loaded.
    db = duckdb.connect(config={"allow_unsigned_extensions": "true"})
    for name in _EXTENSIONS:
        package = importlib.resources.files(f"duckdb_extension_{name}")
        path = package / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
        db.execute(f"LOAD '{path}'")
    if tables.emulator_host:
        endpoint = urlsplit(tables.emulator_host)
        db.execute(
            "CREATE SECRET (TYPE gcs, KEY_ID 'emulator', SECRET 'emulator', "
            f"ENDPOINT '{endpoint.netloc}', URL_STYLE 'path', "
            f"USE_SSL {'true' if endpoint.scheme == 'https' else 'false'})"
        )
    else:
        # DuckDB's own credential chain for GCS needs an extension it would download; an
        # OAuth token of the Application Default Credentials reads the bucket as protoagg does.
        token = _gcs_token().replace("'", "''")  # CREATE SECRET takes no parameters
        db.execute(f"CREATE SECRET (TYPE gcs, BEARER_TOKEN '{token}')")
    return db


def _gcs_token() -> str:
    import google.auth
    import google.auth.exceptions
    from google.auth.transport.requests import Request

    try:
        credentials, _ = google.auth.default(
            scopes=["https://www.googleapis.com/auth/devstorage.read_only"]
        )
        credentials.refresh(Request())  # type: ignore[no-untyped-call]
    except google.auth.exceptions.GoogleAuthError as exc:
        raise ConfigError(
            f"no Google Cloud credentials to read the tables ({exc}): set STORAGE_EMULATOR_HOST "
            "for the emulator, or give protoagg Application Default Credentials"
        ) from exc
    return str(credentials.token)


def create_views(
    db: duckdb.DuckDBPyConnection,
    tables: TopicTables,
    start: datetime.datetime | None,
    end: datetime.datetime | None,
) -> list[str]:
    """One view per table of the namespace, named after its topic; return the names."""
    names = []
    for name, metadata_location in tables.metadata_locations().items():
        where = []
        if start is not None:
            where.append(f"\"timestamp\" >= '{start.isoformat()}'::TIMESTAMPTZ")
        if end is not None:
            where.append(f"\"timestamp\" < '{end.isoformat()}'::TIMESTAMPTZ")
        # A view's definition takes no parameters: the location is quoted as a literal.
        location = metadata_location.replace("'", "''")
        view = name.replace('"', '""')
        db.execute(
            f"CREATE VIEW \"{view}\" AS SELECT * FROM iceberg_scan('{location}')"
            + (" WHERE " + " AND ".join(where) if where else "")
        )
        names.append(name)
    return names


def run_query(
    sql: str,
    out: TextIO,
    start: datetime.datetime | None = None,
    end: datetime.datetime | None = None,
    as_json: bool = False,
    tables: TopicTables | None = None,
) -> int:
    """Run ``sql`` over the topic views and print the result; return the number of rows."""
    tables = tables or TopicTables.from_settings()
    db = connect(tables)
    try:
        views = create_views(db, tables, start, end)
    except duckdb.Error as exc:
        raise ConfigError(f"cannot open the topic tables: {exc}") from exc
    try:
        result = db.execute(sql)
    except duckdb.Error as exc:
        raise ConfigError(f"{exc} (tables: {', '.join(views) or 'none yet'})") from exc
    columns = [d[0] for d in result.description or ()]
    rows = result.fetchall()
    if as_json:
        for row in rows:
            out.write(json.dumps(dict(zip(columns, map(_json_value, row), strict=True))) + "\n")
    else:
        write_aligned(out, columns, [[_text(v) for v in row] for row in rows])
    return len(rows)


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return text_or_base64(value)
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def _text(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return value
    return json.dumps(_json_value(value), ensure_ascii=False, default=str)


def write_aligned(out: TextIO, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Columns padded to their widest value, a rule under the header."""
    rows = list(rows)
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    lines = [columns, ["-" * w for w in widths], *rows]
    for line in lines:
        out.write("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n")
