"""Appending a batch to an archive object in GCS: upload, fenced compose, delete.

The destination's generation fences the compose (``if_generation_match``), and its metadata says
up to which offset each partition is archived, so a writer that lost a race, or a retry after a
crash, finds out from the object itself whether its batch is already there.
"""

from __future__ import annotations

import contextlib
import random
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from google.api_core import exceptions as gexc
from google.cloud import storage

from protoagg_dagster.core.archive_object import (
    TEMP_PREFIX,
    archived_offsets,
    metadata_after_append,
    partition_key,
    temp_object_name,
)
from protoagg_dagster.core.errors import BackendError, ConfigError, FencedAppendError
from protoagg_dagster.core.planning import OffsetRange

CONTENT_TYPE = "application/x-protobuf"


@dataclass(frozen=True)
class AppendResult:
    appended: bool
    generation: int | None
    object_size: int | None
    compose_attempts: int


def append_batch(
    bucket: storage.Bucket,
    object_name: str,
    batch: OffsetRange,
    data: bytes,
    serialize: Callable[[], AbstractContextManager[None]] = nullcontext,
    max_attempts: int = 20,
    format_name: str | None = None,
) -> AppendResult:
    """Append ``data`` (framed records of ``batch``) to ``object_name`` exactly once.

    The upload happens first, outside ``serialize`` (a lock held only around read-and-compose).
    Returns ``appended=False`` when the object's metadata shows the batch is already archived.
    ``format_name`` is recorded in the object's metadata, and an object of another format is
    refused (ConfigError); None (dead letters) records and checks none.
    """
    temp = bucket.blob(temp_object_name(batch, uuid.uuid4().hex))
    try:
        temp.upload_from_string(data, content_type=CONTENT_TYPE, if_generation_match=0)
    except gexc.PreconditionFailed:
        # The name is unique to this attempt: the object exists because our own upload landed
        # and only its response was lost, so the client's retry met it. Check it is whole.
        uploaded = bucket.get_blob(temp.name)
        if uploaded is None or uploaded.size != len(data):
            raise
    except gexc.Forbidden as exc:
        raise ConfigError(
            f"cannot write to gs://{bucket.name} with these credentials (needs "
            f"roles/storage.objectAdmin): {exc.message}"
        ) from exc
    try:
        with serialize():
            return _compose_fenced(bucket, object_name, batch, temp, max_attempts, format_name)
    finally:
        _delete_quietly(temp)


def _compose_fenced(
    bucket: storage.Bucket,
    object_name: str,
    batch: OffsetRange,
    temp: storage.Blob,
    max_attempts: int,
    format_name: str | None,
) -> AppendResult:
    key = partition_key(batch.topic, batch.partition)
    for attempt in range(1, max_attempts + 1):
        current = bucket.get_blob(object_name)
        done = archived_offsets(current.metadata if current else None).get(key)
        if done is not None and done >= batch.end:
            return AppendResult(False, current.generation, current.size, attempt)
        if done is not None and done > batch.start:
            raise BackendError(
                f"gs://{bucket.name}/{object_name} says {key} is archived up to {done}, inside "
                f"{batch}: another writer appended a different range; refusing to append"
            )
        target = bucket.blob(object_name)
        target.metadata = metadata_after_append(
            current.metadata if current else None, batch, format_name
        )
        target.content_type = CONTENT_TYPE
        sources = [current, temp] if current is not None else [temp]
        try:
            target.compose(sources, if_generation_match=current.generation if current else 0)
        except gexc.PreconditionFailed:
            # Another writer (another partition, or a twin of this run) appended first.
            time.sleep(min(2.0, 0.05 * 2**attempt) * random.random())
            continue
        return AppendResult(True, target.generation, target.size, attempt)
    raise FencedAppendError(
        f"gs://{bucket.name}/{object_name}: lost the compose race {max_attempts} times in a row; "
        "too many writers share this object (use {partition} in PROTOAGG_GCS_OBJECT)"
    )


def _delete_quietly(blob: storage.Blob) -> None:
    with contextlib.suppress(gexc.NotFound):
        blob.delete()


def remove_orphaned_temp_objects(
    bucket: storage.Bucket, older_than_seconds: float, topic: str | None = None
) -> list[str]:
    """Delete temporary uploads (of ``topic``, or all) left by runs that died before deleting.

    Only objects older than ``older_than_seconds`` go: a younger one may belong to a run that is
    about to compose it (if it is deleted anyway, that compose fails and the op is retried).
    """
    cutoff = time.time() - older_than_seconds
    removed = []
    prefix = TEMP_PREFIX if topic is None else f"{TEMP_PREFIX}{topic}/"
    for blob in bucket.list_blobs(prefix=prefix):
        if blob.time_created is not None and blob.time_created.timestamp() <= cutoff:
            _delete_quietly(blob)
            removed.append(blob.name)
    return removed
