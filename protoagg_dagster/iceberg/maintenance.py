"""Keep the topic tables clean for years: expire old snapshots, delete unreferenced files.

pyiceberg 0.12's ``expire_snapshots`` only rewrites the metadata; it deletes no file. So after
expiring, every object under the table's location that no retained snapshot and not the
current metadata file references is deleted: data files of replaced days, manifests and
manifest lists of expired snapshots, superseded metadata files, and the leftovers of writes that
never committed (a run killed mid-day, a commit that lost its race). Objects younger than
``orphan_age`` are left alone: they may belong to a write about to commit.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from google.api_core.exceptions import NotFound
from google.cloud import storage
from pyiceberg.table import Table


@dataclass(frozen=True)
class TableCleaned:
    table: str
    snapshots_expired: int
    snapshots_kept: int
    files_deleted: int
    files_kept: int


def referenced_files(table: Table) -> set[str]:
    """Every file a retained snapshot or the current metadata names (``gs://...`` paths)."""
    metadata = table.metadata
    referenced = {table.metadata_location}
    for snapshot in metadata.snapshots:
        referenced.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(table.io):
            referenced.add(manifest.manifest_path)
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=False):
                referenced.add(entry.data_file.file_path)
    for statistics in metadata.statistics:
        referenced.add(statistics.statistics_path)
    return referenced


def clean_table(
    table: Table,
    client: storage.Client,
    keep_snapshots: datetime.timedelta,
    orphan_age: datetime.timedelta,
    now: datetime.datetime | None = None,
) -> TableCleaned:
    """Expire snapshots older than ``keep_snapshots`` (never the current one), then delete files."""
    now = now or datetime.datetime.now(datetime.UTC)
    cutoff_ms = int((now - keep_snapshots).timestamp() * 1000)
    current = table.current_snapshot()
    expired = [
        s.snapshot_id
        for s in table.metadata.snapshots
        if s.timestamp_ms < cutoff_ms and (current is None or s.snapshot_id != current.snapshot_id)
    ]
    if expired:
        table.maintenance.expire_snapshots().by_ids(expired).commit()
        table = table.refresh()
    referenced = referenced_files(table)
    bucket_name, _, prefix = table.location().removeprefix("gs://").partition("/")
    deleted = kept = 0
    for blob in client.bucket(bucket_name).list_blobs(prefix=prefix.rstrip("/") + "/"):
        path = f"gs://{bucket_name}/{blob.name}"
        young = blob.time_created is None or blob.time_created > now - orphan_age
        if path in referenced or young:
            kept += 1
            continue
        try:
            blob.delete()
        except NotFound:
            continue  # another maintenance run deleted it first
        deleted += 1
    return TableCleaned(
        ".".join(table.name()), len(expired), len(table.metadata.snapshots), deleted, kept
    )
