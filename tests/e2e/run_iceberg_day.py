"""Write one day of a topic table in this process: ``python -m tests.e2e.run_iceberg_day SPEC``.

SPEC_JSON: {"gcs": {...}, "postgres": {...}, "iceberg": {...}, "topic", "format", "day",
"crash_before_commit": bool}. With the crash flag the process SIGKILLs itself once its data
files are written, before the commit: no handler or cleanup runs, as when a machine dies.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from protoagg_dagster.archive.ledger import ledger_connection
from protoagg_dagster.iceberg import writer
from protoagg_dagster.iceberg.day_index import ensure_index_schema, index_batches
from protoagg_dagster.resources import GCSResource, PostgresResource
from protoagg_dagster.resources.iceberg import IcebergResource


def _die(*args: Any, **kwargs: Any) -> Any:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    spec = json.loads(sys.argv[1])
    if spec.get("crash_before_commit"):
        writer.replace_day = _die  # type: ignore[assignment]
    gcs, iceberg = GCSResource(**spec["gcs"]), IcebergResource(**spec["iceberg"])
    with ledger_connection(PostgresResource(**spec["postgres"])) as conn:
        ensure_index_schema(conn)
        index_batches(conn, gcs.get_bucket(), {spec["topic"]: spec["format"]}, 10_000)
        written = writer.write_day(
            conn,
            gcs.get_bucket(),
            iceberg.get_catalog(),
            iceberg.namespace,
            spec["topic"],
            spec["format"],
            spec["day"],
        )
    print(json.dumps({"rows": written.rows, "committed": written.committed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
