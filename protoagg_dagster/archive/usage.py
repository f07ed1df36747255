"""What the archive costs GCS at the current rate, read from the ledger: bytes and operations."""

from __future__ import annotations

import psycopg

from protoagg_dagster.core.storage_bill import DAY_SECONDS, OperationsBill

# The newest appended batches that the rate is taken from: a bounded read of the primary key
# however long the ledger has grown.
RECENT_BATCHES = 50_000

_RATE = """
SELECT count(DISTINCT (run_id, object_name)),
       count(DISTINCT (object_name, generation)),
       count(*) FILTER (WHERE dead_letters_appended),
       extract(epoch FROM now() - min(appended_at))
FROM (SELECT run_id, object_name, generation, dead_letters_appended, appended_at
      FROM archive_batches ORDER BY batch_id DESC LIMIT %(recent)s) recent
WHERE appended_at > now() - make_interval(secs => %(window)s)
"""

# Each object's size after its last append; one pass over the appended batches.
_STORED = """
SELECT coalesce(sum(object_size), 0) FROM (
    SELECT DISTINCT ON (object_name) object_size FROM archive_batches
    WHERE state = 'appended' AND object_size IS NOT NULL
    ORDER BY object_name, batch_id DESC
) latest
"""


def operations_bill(conn: psycopg.Connection, window_seconds: int = DAY_SECONDS) -> OperationsBill:
    """The archive's stored bytes and its uploads and composes a day over the last window.

    A run uploads once per object it appends to (one piece for all its ranges there), and each
    landed piece is composed; a batch with dead letters adds an upload and a compose of the
    dead-letter object. Fewer than ``window_seconds`` of history are scaled up to a day.
    """
    rate = conn.execute(_RATE, {"recent": RECENT_BATCHES, "window": window_seconds}).fetchone()
    stored = conn.execute(_STORED).fetchone()
    stored_bytes = int(stored[0]) if stored else 0
    if rate is None or rate[3] is None:
        return OperationsBill(stored_bytes, 0.0, 0.0)
    uploads, composes, dead_letters, seen = rate
    per_day = DAY_SECONDS / max(float(seen), 60.0)
    return OperationsBill(
        stored_bytes,
        uploads_per_day=(uploads + dead_letters) * per_day,
        composes_per_day=(composes + dead_letters) * per_day,
    )
