"""Appending a batch to an archive object in GCS: upload, fenced and paced compose, delete.

The destination's generation fences the compose (``if_generation_match``). Which pieces an
object holds is the ledger's to say (``AppendLedger``), with the object's one-piece marker
covering a compose whose record was lost, so a writer that lost a race, or a retry after a crash,
finds out whether its piece is already there whatever the number of partitions.

GCS allows about one mutation per second per object name (429 beyond it): the lock holder waits
until a second has passed since the destination's last update before composing, and the client
retries a 429 with backoff (compose carries a generation, so its retry is safe).
"""

from __future__ import annotations

import contextlib
import datetime
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from google.api_core import exceptions as gexc
from google.cloud import storage

from protoagg_dagster.core.archive_object import (
    TEMP_PREFIX,
    Piece,
    last_append,
    metadata_after_append,
    temp_object_name,
)
from protoagg_dagster.core.errors import ConfigError, FencedAppendError
from protoagg_dagster.core.planning import OffsetRange

CONTENT_TYPE = "application/x-protobuf"
MUTATION_INTERVAL_SECONDS = 1.0  # GCS: about one write per second per object name


class PieceLedger(Protocol):
    """The object lock and the record of appended pieces (``ledger.AppendLedger``)."""

    def locked(self, object_name: str) -> contextlib.AbstractContextManager[None]: ...

    def is_appended(self, piece: Piece) -> bool: ...

    def record(self, piece: Piece, generation: int | None, object_size: int | None) -> None: ...


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
    piece: Piece,
    data: bytes,
    ledger: PieceLedger,
    max_attempts: int = 20,
    sleep: Callable[[float], None] = time.sleep,
    format_name: str | None = None,
    compression: str = "none",
) -> AppendResult:
    """Append ``data`` (``piece`` of ``batch``) to ``object_name`` exactly once.

    The upload happens first, outside the object's lock (held only around read-and-compose).
    Returns ``appended=False`` when the ledger or the object's marker shows it already there.
    ``format_name`` is recorded in the object's metadata, and an object of another format is
    refused (ConfigError); None (dead letters) records and checks none. ``compression`` is the
    codec ``data`` is compressed with, recorded and checked the same way.
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
            f"roles/storage.objectUser): {exc.message}"
        ) from exc
    try:
        with ledger.locked(object_name):
            return _compose_fenced(
                bucket,
                object_name,
                piece,
                temp,
                ledger,
                max_attempts,
                sleep,
                format_name,
                compression,
            )
    finally:
        _delete_quietly(temp)


def _compose_fenced(
    bucket: storage.Bucket,
    object_name: str,
    piece: Piece,
    temp: storage.Blob,
    ledger: PieceLedger,
    max_attempts: int,
    sleep: Callable[[float], None],
    format_name: str | None,
    compression: str,
) -> AppendResult:
    for attempt in range(1, max_attempts + 1):
        current = bucket.get_blob(object_name)
        if current is not None:
            previous = last_append(current.metadata)
            if previous is not None and not ledger.is_appended(previous):
                # Composed by a writer that died (or lost the response) before recording it.
                ledger.record(previous, current.generation, current.size)
        if ledger.is_appended(piece):
            return AppendResult(
                False,
                current.generation if current else None,
                current.size if current else None,
                attempt,
            )
        if current is not None and (current.temporary_hold or current.event_based_hold):
            raise ConfigError(
                f"gs://{bucket.name}/{object_name} is under a hold, so appending to it (compose "
                "replaces the object) is refused: release the hold or change PROTOAGG_GCS_OBJECT"
            )
        if current is not None:
            sleep(_pause_before_compose(current.updated))
        target = bucket.blob(object_name)
        target.metadata = metadata_after_append(
            current.metadata if current else None, piece, format_name, compression
        )
        target.content_type = CONTENT_TYPE
        sources = [current, temp] if current is not None else [temp]
        try:
            target.compose(sources, if_generation_match=current.generation if current else 0)
        except gexc.Forbidden as exc:
            raise ConfigError(
                f"GCS refused to append to gs://{bucket.name}/{object_name}: {exc.message} "
                "(a retention policy or hold forbids replacing the object; archive into a bucket "
                "without one, see `protoagg doctor`)"
            ) from exc
        except gexc.PreconditionFailed:
            # Another writer (another partition, or a twin of this run) appended first.
            sleep(min(2.0, 0.05 * 2**attempt) * random.random())
            continue
        ledger.record(piece, target.generation, target.size)
        return AppendResult(True, target.generation, target.size, attempt)
    raise FencedAppendError(
        f"gs://{bucket.name}/{object_name}: lost the compose race {max_attempts} times in a row; "
        "too many writers share this object (use {partition} in PROTOAGG_GCS_OBJECT)"
    )


def _pause_before_compose(updated: datetime.datetime | None) -> float:
    """Seconds to wait so the compose comes a full interval after the object's last update.

    ``updated`` is GCS's clock; a skewed local clock only makes the wait shorter or longer by
    the skew, capped at one interval, and a 429 is still retried by the client.
    """
    if updated is None:
        return 0.0
    since = (datetime.datetime.now(datetime.UTC) - updated).total_seconds()
    return min(max(MUTATION_INTERVAL_SECONDS - since, 0.0), MUTATION_INTERVAL_SECONDS)


def _delete_quietly(blob: storage.Blob) -> None:
    # Forbidden: a retention policy keeps the piece; the append has already said so, and the
    # cleanup pass removes it once the policy allows.
    with contextlib.suppress(gexc.NotFound, gexc.Forbidden):
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
