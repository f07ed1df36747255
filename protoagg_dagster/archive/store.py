"""Appending batches to an archive object in GCS: upload, queued and paced compose, delete.

A run uploads the pieces of all its batches bound for one object as one temporary object (one
class A operation, whatever the number of partitions). GCS allows about one mutation per second
per object name (429 beyond it), so writers of one object share composes too: each uploads,
queues its upload in the ledger and waits for the object's lock; the holder composes every
queued upload it can (up to 31 and the destination, MARKER_BYTES of marker) in one compose, a
full second after the destination's last update, and records every piece. A writer whose upload
another holder composed finds it done when its turn comes.

The destination's generation fences the compose (``if_generation_match``). Which pieces an object
holds is the ledger's to say, with the object's marker (the last compose's pieces) covering a
compose whose records were lost, so a writer that lost a race, or a retry after a crash, finds out
whether its piece is already there whatever the number of partitions.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from google.api_core import exceptions as gexc
from google.cloud import storage

from protoagg_dagster.core.archive_object import (
    MARKER_BYTES,
    MAX_PIECES_PER_COMPOSE,
    TEMP_PREFIX,
    UPLOAD_MARKER_BYTES,
    Landed,
    Piece,
    PieceRole,
    Queued,
    archive_compression,
    last_compose,
    legacy_offsets,
    marker_bytes,
    metadata_after_compose,
    piece_ends,
    sequence_number,
    sequence_prefix,
    temp_object_name,
)
from protoagg_dagster.core.compression import NONE, decompressed
from protoagg_dagster.core.errors import BackendError, ConfigError, FencedAppendError
from protoagg_dagster.core.planning import OffsetRange

CONTENT_TYPE = "application/x-protobuf"
MUTATION_INTERVAL_SECONDS = 1.0  # GCS: about one write per second per object name


class PieceLedger(Protocol):
    """The object lock, the queue of uploaded pieces and the record of appended ones.

    ``ledger.AppendLedger`` is the PostgreSQL one. ``enqueue`` and ``dequeue`` take effect at
    once; the rest happen inside ``locked``.
    """

    def enqueue(self, object_name: str, queued: Queued) -> None: ...

    def dequeue(self, queued: Queued) -> None: ...

    def locked(self, object_name: str) -> contextlib.AbstractContextManager[None]: ...

    def waiting(self, object_name: str, like: Queued, limit: int) -> list[Queued]:
        """Queued uploads of the object not yet composed, oldest first, of ``limit`` pieces.

        Only those of ``like``'s format and compression: the ones that may share its compose.
        """
        ...

    def landed(self, queued: Queued) -> list[Landed] | None:
        """Where each piece of this upload landed, if a compose (anyone's) recorded them."""
        ...

    def which_appended(self, pieces: Sequence[Piece]) -> set[tuple[int, PieceRole]]:
        """The keys of those of ``pieces`` recorded as appended."""
        ...

    def record(self, landed: Sequence[tuple[Piece, Landed]]) -> None:
        """The pieces are on the object; every queued upload of them is marked landed."""
        ...

    def record_legacy(
        self,
        object_name: str,
        role: PieceRole,
        offsets: Mapping[str, int],
        generation: int | None,
    ) -> None:
        """Record the pending claims a release before the marker appended to the object.

        ``offsets`` is the object's ``legacy_offsets`` map: a claim of ``role`` on this object
        whose partition it covers to the claim's end is there.
        """
        ...


@dataclass(frozen=True)
class AppendResult:
    """``appended``: this call's bytes are the ones on the object (False: an earlier attempt's).

    ``object_size``: the object's size up to the end of this piece (later pieces of the same
    compose follow it).
    """

    appended: bool
    generation: int | None
    object_size: int | None
    compose_attempts: int


@dataclass(frozen=True)
class PieceData:
    """One piece to append: its batch's range, the piece and its bytes."""

    batch: OffsetRange
    piece: Piece
    data: bytes


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
    compression: str = NONE,
) -> AppendResult:
    """Append ``data`` (``piece`` of ``batch``) to ``object_name`` exactly once."""
    [result] = append_pieces(
        bucket,
        object_name,
        [PieceData(batch, piece, data)],
        ledger,
        max_attempts,
        sleep,
        format_name,
        compression,
    )
    return result


def append_pieces(
    bucket: storage.Bucket,
    object_name: str,
    pieces: Sequence[PieceData],
    ledger: PieceLedger,
    max_attempts: int = 20,
    sleep: Callable[[float], None] = time.sleep,
    format_name: str | None = None,
    compression: str = NONE,
) -> list[AppendResult]:
    """Append each of ``pieces`` to ``object_name`` exactly once; one result per piece.

    The pieces go up as one upload (up to UPLOAD_MARKER_BYTES of marker), outside the object's lock
    (held only around read-and-compose), and are composed together: one upload and one compose
    for a run's ranges bound for one object. A result has ``appended=False`` when the ledger or
    the object's marker shows the piece there already (an earlier attempt appended it); should
    an earlier attempt have appended only some of them, the rest go up again without those.
    ``format_name`` is recorded in the object's metadata, and an object of another format is
    refused (ConfigError); None (dead letters) records and checks none. ``compression`` is the
    codec the data is compressed with, recorded and checked the same way.
    """
    results: dict[tuple[int, PieceRole], AppendResult] = {}
    pending = list(pieces)
    while pending:
        # Every upload queued before the first compose, so that compose takes as many of them
        # as its marker can name: one compose a second is all GCS allows an object.
        uploads: list[tuple[Queued, storage.Blob]] = []
        try:
            for bundle in _bundles(pending):
                name = temp_object_name(bundle[0].batch, uuid.uuid4().hex)
                temp = _upload(bucket, name, b"".join(part.data for part in bundle))
                own = Queued(
                    tuple(part.piece for part in bundle), temp.name, format_name, compression
                )
                ledger.enqueue(object_name, own)
                uploads.append((own, temp))
            for own, _ in uploads:
                results.update(
                    _compose_until_decided(bucket, object_name, own, ledger, max_attempts, sleep)
                )
        finally:
            for own, temp in uploads:
                ledger.dequeue(own)
                _delete_quietly(temp)
        pending = [part for part in pending if part.piece.key not in results]
    return [results[part.piece.key] for part in pieces]


def _bundles(pending: Sequence[PieceData]) -> list[list[PieceData]]:
    """``pending`` in order, in uploads whose marker fits UPLOAD_MARKER_BYTES."""
    bundles: list[list[PieceData]] = []
    marked = 0
    for part in pending:
        size = len(part.piece.marker()) + 1
        if bundles and marked + size <= UPLOAD_MARKER_BYTES + 1:
            bundles[-1].append(part)
            marked += size
        else:
            bundles.append([part])
            marked = size
    return bundles


def _upload(bucket: storage.Bucket, name: str, data: bytes) -> storage.Blob:
    temp = bucket.blob(name)
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
    return temp


Decided = dict[tuple[int, PieceRole], AppendResult]


def _compose_until_decided(
    bucket: storage.Bucket,
    object_name: str,
    own: Queued,
    ledger: PieceLedger,
    max_attempts: int,
    sleep: Callable[[float], None],
) -> Decided:
    """Results for every piece of ``own``, or for those an earlier attempt appended already."""
    for attempt in range(1, max_attempts + 1):
        with ledger.locked(object_name):
            outcome = _compose_queued(bucket, object_name, own, ledger, sleep)
        if outcome is not None:
            return {
                key: AppendResult(r.appended, r.generation, r.object_size, attempt)
                for key, r in outcome.items()
            }
        # Another writer (another partition, or a twin of this run) appended first.
        sleep(min(2.0, 0.05 * 2**attempt) * random.random())
    raise FencedAppendError(
        f"gs://{bucket.name}/{object_name}: lost the compose race {max_attempts} times in a "
        "row; too many writers share this object (use {partition} in PROTOAGG_GCS_OBJECT)"
    )


def _compose_queued(
    bucket: storage.Bucket,
    object_name: str,
    own: Queued,
    ledger: PieceLedger,
    sleep: Callable[[float], None],
) -> Decided | None:
    """Holding the object's lock: find ``own`` done, or compose it with other queued uploads.

    None: the compose lost the generation race (or a queued upload had vanished); try again.
    """
    current = bucket.get_blob(object_name)
    if current is not None:
        _record_last_compose(current, object_name, own.pieces[0].role, ledger)
    landed = ledger.landed(own)
    if landed is not None:
        return {
            piece.key: AppendResult(True, spot.generation, spot.end, 0)
            for piece, spot in zip(own.pieces, landed, strict=True)
        }
    done = ledger.which_appended(own.pieces)
    earlier = [piece for piece in own.pieces if piece.key in done]
    if earlier:
        # Appended by an earlier attempt: not again. The caller uploads the rest anew.
        generation = current.generation if current else None
        size = current.size if current else None
        return {piece.key: AppendResult(False, generation, size, 0) for piece in earlier}
    if current is not None and (current.temporary_hold or current.event_based_hold):
        raise ConfigError(
            f"gs://{bucket.name}/{object_name} is under a hold, so appending to it (compose "
            "replaces the object) is refused: release the hold or change PROTOAGG_GCS_OBJECT"
        )
    if current is not None:
        sleep(_pause_before_compose(current.updated))
    # Queued after the pause, so uploads made meanwhile ride along.
    group = _group_with(own, ledger, object_name)
    pieces = [piece for queued in group for piece in queued.pieces]
    target = bucket.blob(object_name)
    target.metadata = metadata_after_compose(
        current.metadata if current else None, pieces, own.format_name, own.compression
    )
    target.content_type = CONTENT_TYPE
    sources = ([current] if current is not None else []) + [bucket.blob(q.temp_name) for q in group]
    try:
        target.compose(sources, if_generation_match=current.generation if current else 0)
    except gexc.Forbidden as exc:
        raise ConfigError(
            f"GCS refused to append to gs://{bucket.name}/{object_name}: {exc.message} "
            "(a retention policy or hold forbids replacing the object; archive into a bucket "
            "without one, see `protoagg doctor`)"
        ) from exc
    except gexc.PreconditionFailed:
        return None
    except gexc.NotFound:
        if bucket.get_blob(own.temp_name) is None:
            raise BackendError(
                f"the upload {own.temp_name} of {len(own.pieces)} pieces vanished before its "
                "compose"
            ) from None
        # Another writer's upload is gone (its run gave up, or the cleanup removed it): leave it
        # out; its batches are still claimed, and its next attempt uploads them again.
        for queued in group[1:]:
            if bucket.get_blob(queued.temp_name) is None:
                ledger.dequeue(queued)
        return None
    assert target.size is not None
    ledger.record(
        [
            (piece, Landed(target.generation, end))
            for piece, end in zip(pieces, piece_ends(target.size, pieces), strict=True)
        ]
    )
    ends = piece_ends(target.size, pieces)[: len(own.pieces)]
    return {
        piece.key: AppendResult(True, target.generation, end, 0)
        for piece, end in zip(own.pieces, ends, strict=True)
    }


def _record_last_compose(
    current: storage.Blob, object_name: str, role: PieceRole, ledger: PieceLedger
) -> None:
    """Record the pieces of a compose that landed but whose writer died before recording them.

    An object last written by a release before the marker says so by its offsets map instead,
    which this compose is about to drop: its claims are recorded from the map first.
    """
    pieces = last_compose(current.metadata)
    if not pieces:
        offsets = legacy_offsets(current.metadata)
        if offsets:
            ledger.record_legacy(object_name, role, offsets, current.generation)
        return
    if current.size is None:
        return
    done = ledger.which_appended(pieces)
    ledger.record(
        [
            (piece, Landed(current.generation, end))
            for piece, end in zip(pieces, piece_ends(current.size, pieces), strict=True)
            if piece.key not in done
        ]
    )


# Queue rows read to fill a compose: more than a full marker's pieces (about 12 bytes at the
# least), so uploads the marker cannot take along do not hide those it can.
_WAITING_ROWS = 4 * MARKER_BYTES // 12


def _group_with(own: Queued, ledger: PieceLedger, object_name: str) -> list[Queued]:
    """``own`` and the oldest other queued uploads whose pieces are not yet appended.

    At most MAX_PIECES_PER_COMPOSE uploads and MARKER_BYTES of marker (it names every piece),
    each piece once.
    """
    group, keys = [own], {piece.key for piece in own.pieces}
    marked = marker_bytes(own.pieces)
    for queued in ledger.waiting(object_name, own, _WAITING_ROWS):
        if len(group) == MAX_PIECES_PER_COMPOSE:
            break
        mine = {piece.key for piece in queued.pieces}
        theirs = marker_bytes(queued.pieces) + 1
        if mine & keys or marked + theirs > MARKER_BYTES:
            continue
        appended = ledger.which_appended(queued.pieces)
        if appended:
            if len(appended) == len(queued.pieces):
                # A stale upload of pieces appended since (its writer died before dequeuing).
                ledger.dequeue(queued)
            continue
        group.append(queued)
        keys |= mine
        marked += theirs
    return group


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


def sequence_blobs(bucket: storage.Bucket, base: str) -> list[storage.Blob]:
    """The existing objects of ``base``'s numbered sequence, in order (``sequence_member``)."""
    numbered = [
        (number, blob)
        for blob in bucket.list_blobs(prefix=sequence_prefix(base))
        if (number := sequence_number(base, blob.name))
    ]
    first = bucket.get_blob(base)
    return ([first] if first is not None else []) + [blob for _, blob in sorted(numbered)]


def open_sequence(bucket: storage.Bucket, base: str) -> tuple[BinaryIO, list[storage.Blob]]:
    """One uncompressed stream of ``base``'s whole sequence, and its objects.

    Each object is read through the compression its own metadata records.
    """
    blobs = sequence_blobs(bucket, base)
    if not blobs:
        raise BackendError(f"gs://{bucket.name}/{base} does not exist")
    return io.BufferedReader(SequenceStream(blobs), buffer_size=1024 * 1024), blobs


class SequenceStream(io.RawIOBase):
    """The objects of a sequence read one after the other, each in 8 MiB chunks, decompressed."""

    def __init__(self, blobs: list[storage.Blob]) -> None:
        super().__init__()
        self._pending = list(reversed(blobs))
        self._current: BinaryIO | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self._current is None:
                if not self._pending:
                    return 0
                blob = self._pending.pop()
                self._current = decompressed(
                    blob.open("rb", chunk_size=8 * 1024 * 1024), archive_compression(blob.metadata)
                )
            data = self._current.read(len(buffer))
            if data:
                buffer[: len(data)] = data
                return len(data)
            self._current.close()
            self._current = None

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
        super().close()


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
