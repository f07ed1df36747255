"""The PostgreSQL side of exactly-once: dedupe claims, the batch ledger and archived positions.

Tables:

- ``processed_logs``: one row per archived dedupe key (a logId, or a 128-bit digest of another
  key) and the batch that claimed it, in spans of keep_days days (see ``dedupe_window``).
- ``archive_batches``: one row per claimed offset range; ``state`` is ``claimed`` until the append
  to GCS is confirmed, then ``appended``. At most one ``claimed`` row per partition.
- ``archive_positions``: per partition, the first offset not yet archived.
- ``archive_sequences``: per object name (template result), the member of its numbered
  sequence new batches go to and the bytes claimed for that member so far.
- ``append_queue``: uploaded pieces waiting for a compose of their object (``archive_store``),
  one row per upload, removed by its writer once it knows where the piece landed.

Their DDL is the numbered migrations of ``protoagg_dagster.schema``.

A claimed batch whose run died is *adopted* by the next run of that partition: its claims are its
own, so the same records are appended (or found already appended, via the object's metadata).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from protoagg_dagster import schema
from protoagg_dagster.archive.dedupe_window import claim_ids, ensure_window, epoch_day, own_claims
from protoagg_dagster.core.archive_object import (
    DEFAULT_MAX_OBJECT_BYTES,
    Landed,
    Piece,
    PieceRole,
    Queued,
    legacy_covers,
    role_of,
    rolls_over,
    sequence_member,
    upload_of_row,
)
from protoagg_dagster.core.dedupe_scope import TOPIC, Scope
from protoagg_dagster.core.errors import BackendError
from protoagg_dagster.core.formats import Claimable
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.resources.postgres import PostgresResource
from protoagg_dagster.schema import Migration


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a batch: which records are new and must be appended."""

    batch_id: int | None
    batch: OffsetRange
    object_name: str
    kept: tuple[Any, ...]
    duplicates: int
    adopted: bool

    @property
    def nothing_to_do(self) -> bool:
        return self.batch_id is None


@dataclass(frozen=True)
class PartitionProgress:
    next_offset: int | None
    pending: OffsetRange | None


@contextmanager
def ledger_connection(postgres: PostgresResource) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the dedupe database whose schema is ready."""
    with postgres.get_connection() as conn:
        ensure_schema(conn)
        yield conn


def ensure_schema(conn: psycopg.Connection) -> tuple[Migration, ...]:
    """Bring the database to this code's schema version; return the migrations it applied.

    One cheap query when the schema is current. Otherwise the upgrade (``protoagg_dagster.schema``)
    runs under its advisory lock, and the dedupe window gets its current span, in one transaction:
    concurrent callers wait for the first and find nothing left to do. DDL never runs on a
    current schema: ``ALTER TABLE`` and ``CREATE INDEX`` lock ``archive_batches`` even when there
    is nothing to do, and appenders updating it inside their object lock deadlocked with a run
    that was merely connecting.
    """
    if schema.is_current(conn):
        return ()
    with conn.transaction():
        applied = schema.upgrade(conn)
        ensure_window(conn, epoch_day())
    return applied


def read_progress(conn: psycopg.Connection, topic: str) -> dict[int, PartitionProgress]:
    """Archived position and pending (claimed, unconfirmed) range of each known partition."""
    positions: dict[int, int] = dict(
        conn.execute(
            "SELECT partition, next_offset FROM archive_positions WHERE topic = %s", (topic,)
        ).fetchall()
    )
    pending = {
        row[0]: OffsetRange(topic, row[0], row[1], row[2])
        for row in conn.execute(
            "SELECT partition, start_offset, end_offset FROM archive_batches "
            "WHERE topic = %s AND state = 'claimed'",
            (topic,),
        )
    }
    return {
        partition: PartitionProgress(positions.get(partition), pending.get(partition))
        for partition in positions.keys() | pending.keys()
    }


def begin_partition(conn: psycopg.Connection, topic: str, partition: int, start: int) -> None:
    """Make ``start`` the partition's first offset to archive, unless it has one already.

    The first claim of a partition does this for its own start. A backfill does it before its
    runs are queued: should a later range run first (its predecessor's run died and was retried
    behind it), it is refused as a gap instead of silently starting the archive after the range
    that has not run yet.
    """
    conn.execute(
        "INSERT INTO archive_positions (topic, partition, next_offset) VALUES (%s, %s, %s) "
        "ON CONFLICT DO NOTHING",
        (topic, partition, start),
    )


def claim_batch(
    conn: psycopg.Connection,
    batch: OffsetRange,
    records: Sequence[Claimable],
    object_name: str,
    run_id: str | None,
    estimated_bytes: int = 0,
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    scope: Scope = TOPIC,
) -> Claim:
    """Claim the new dedupe keys of ``records`` (offsets of ``batch``) in one transaction.

    Inside the caller's transaction it is a savepoint: the dedupe step commits a run's claims
    many at a time, and a claim that fails is rolled back alone.

    Returns the records to append, in offset order: each record without a dedupe key, and the
    first occurrence of each key that no other batch has claimed. If the partition has a claimed
    batch starting at ``batch.start``, that batch is adopted instead and its own claims are
    returned. Offsets already archived are trimmed; a batch that starts beyond the archived
    position is refused (it would leave a gap).

    ``object_name`` is the first object of a numbered sequence (``sequence_member``): a new
    batch goes to its current member, or starts the next one when ``estimated_bytes`` would
    take the member past ``max_object_bytes``. The claim keeps the member, so a retry appends
    to the same object. ``scope`` says what a key is a duplicate of (``core.dedupe_scope``).
    """
    with conn.transaction():
        begin_partition(conn, batch.topic, batch.partition, batch.start)
        # The row lock serialises claimers of one partition; other partitions are not blocked.
        row = conn.execute(
            "SELECT next_offset FROM archive_positions WHERE topic = %s AND partition = %s "
            "FOR UPDATE",
            (batch.topic, batch.partition),
        ).fetchone()
        assert row is not None
        next_offset: int = row[0]
        pending = conn.execute(
            "SELECT batch_id, start_offset, end_offset, object_name FROM archive_batches "
            "WHERE topic = %s AND partition = %s AND state = 'claimed'",
            (batch.topic, batch.partition),
        ).fetchone()
        # A stale run (its range archived meanwhile) is done even if a later batch is pending.
        if batch.end <= next_offset:
            return Claim(None, batch, object_name, (), 0, adopted=False)
        if pending is not None:
            return _adopt(conn, batch, records, pending)
        if batch.start > next_offset:
            raise BackendError(
                f"{batch} would leave a gap: {batch.topic}[{batch.partition}] is archived up to "
                f"offset {next_offset}; archive {next_offset}..{batch.start} first"
            )
        effective = OffsetRange(
            batch.topic, batch.partition, max(batch.start, next_offset), batch.end
        )
        candidates = [r for r in records if r.offset >= effective.start]
        batch_id = _insert_batch(conn, effective, object_name, len(records), run_id)
        claimed_offsets = claim_ids(conn, batch_id, candidates, batch.topic, scope)
        # Last, so the sequence's row lock, which every partition of the object waits for, is
        # held for one statement and the commit rather than for all the id claims.
        object_name = _reserve_in_sequence(conn, object_name, estimated_bytes, max_object_bytes)
        conn.execute(
            "UPDATE archive_batches SET claimed = %s, object_name = %s WHERE batch_id = %s",
            (len(claimed_offsets), object_name, batch_id),
        )
    kept = tuple(r for r in candidates if r.dedupe_key is None or r.offset in claimed_offsets)
    return Claim(batch_id, effective, object_name, kept, len(candidates) - len(kept), adopted=False)


def _adopt(
    conn: psycopg.Connection,
    batch: OffsetRange,
    records: Sequence[Claimable],
    pending: tuple[int, int, int, str],
) -> Claim:
    batch_id, start, end, object_name = pending
    if start != batch.start or end > batch.end:
        raise BackendError(
            f"{batch.topic}[{batch.partition}] has an unfinished batch {start}..{end} (id "
            f"{batch_id}); it must be finished first by a run for offsets {start}..{end}"
        )
    adopted = OffsetRange(batch.topic, batch.partition, start, end)
    in_range = [r for r in records if r.offset < end]
    own = own_claims(conn, batch_id, in_range, batch.topic)
    kept = tuple(r for r in in_range if r.dedupe_key is None or r.offset in own)
    return Claim(batch_id, adopted, object_name, kept, len(in_range) - len(kept), adopted=True)


def dead_letter_member(
    conn: psycopg.Connection, batch_id: int, base: str, size: int, max_object_bytes: int
) -> str:
    """The member of the dead-letter sequence ``base`` the batch's dead letters go to.

    Chosen once, at the first append attempt, and kept on the batch: a retry must meet the
    object an earlier attempt may have composed onto, or it would append them again.
    """
    with conn.transaction():
        row = conn.execute(
            "SELECT dead_letter_object FROM archive_batches WHERE batch_id = %s FOR UPDATE",
            (batch_id,),
        ).fetchone()
        if row is not None and row[0] is not None:
            return str(row[0])
        name = _reserve_in_sequence(conn, base, size, max_object_bytes)
        conn.execute(
            "UPDATE archive_batches SET dead_letter_object = %s WHERE batch_id = %s",
            (name, batch_id),
        )
    return name


def _reserve_in_sequence(
    conn: psycopg.Connection, base: str, estimated_bytes: int, max_object_bytes: int
) -> str:
    """The member of ``base``'s sequence a new batch of ``estimated_bytes`` goes to."""
    select = "SELECT member, member_bytes FROM archive_sequences WHERE base_name = %s FOR UPDATE"
    # The row lock orders the claims of every partition writing to this object.
    row = conn.execute(select, (base,)).fetchone()
    if row is None:
        # An object written before sequences existed starts with the size the ledger knows.
        conn.execute(
            "INSERT INTO archive_sequences (base_name, member, member_bytes) "
            "SELECT %s, 0, COALESCE(max(object_size), 0) FROM archive_batches "
            "WHERE object_name = %s AND state = 'appended' ON CONFLICT DO NOTHING",
            (base, base),
        )
        row = conn.execute(select, (base,)).fetchone()
    assert row is not None
    member, member_bytes = int(row[0]), int(row[1])
    if rolls_over(member_bytes, estimated_bytes, max_object_bytes):
        member, member_bytes = member + 1, 0
    conn.execute(
        "UPDATE archive_sequences SET member = %s, member_bytes = %s WHERE base_name = %s",
        (member, member_bytes + estimated_bytes, base),
    )
    return sequence_member(base, member)


def _insert_batch(
    conn: psycopg.Connection, batch: OffsetRange, object_name: str, records: int, run_id: str | None
) -> int:
    row = conn.execute(
        "INSERT INTO archive_batches (topic, partition, start_offset, end_offset, object_name, "
        "state, records, claimed, run_id) VALUES (%s, %s, %s, %s, %s, 'claimed', %s, 0, %s) "
        "RETURNING batch_id",
        (batch.topic, batch.partition, batch.start, batch.end, object_name, records, run_id),
    ).fetchone()
    assert row is not None
    return int(row[0])


def finish_batch(
    conn: psycopg.Connection,
    batch_id: int,
    generation: int | None,
    appended_bytes: int = 0,
    object_size: int | None = None,
) -> None:
    """Mark a claimed batch appended and advance its partition's position; idempotent.

    ``appended_bytes`` and ``object_size`` locate the batch's frames in the object (the bytes
    ``[object_size - appended_bytes, object_size)``) for later integrity checks.
    """
    conn.execute(_FINISH, (generation, appended_bytes, object_size, batch_id))


def finish_batches(
    conn: psycopg.Connection, rows: Sequence[tuple[int, int | None, int, int | None]]
) -> None:
    """``finish_batch`` of each ``(batch_id, generation, appended_bytes, object_size)``.

    In one transaction and one round trip (psycopg pipelines ``executemany``).
    """
    with conn.transaction(), conn.cursor() as cursor:
        cursor.executemany(_FINISH, [(g, size, end, batch_id) for batch_id, g, size, end in rows])


# The batch appended and its partition's position past it, in one statement; nothing when the
# batch is no longer claimed (finished already).
_FINISH = (
    "WITH done AS (UPDATE archive_batches SET state = 'appended', appended_at = now(), "
    "generation = %s, appended_bytes = %s, object_size = %s "
    "WHERE batch_id = %s AND state = 'claimed' RETURNING topic, partition, end_offset) "
    "UPDATE archive_positions p SET next_offset = GREATEST(p.next_offset, done.end_offset) "
    "FROM done WHERE p.topic = done.topic AND p.partition = done.partition"
)


@contextmanager
def object_lock(conn: psycopg.Connection, bucket: str, object_name: str) -> Iterator[None]:
    """Serialise appenders of one archive object across every process sharing this database.

    GCS's generation precondition is the real fence; this lock keeps writers from racing into
    it (and keeps emulators that ignore compose preconditions safe). It is a transaction-level
    advisory lock, so a writer that dies releases it with its connection.
    """
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{bucket}/{object_name}",)
        )
        yield


class AppendLedger:
    """``archive_store.PieceLedger`` in PostgreSQL: object lock, upload queue, appended pieces.

    Pieces are recorded inside the object's lock, in the lock's transaction, right after their
    compose: so every piece composed onto an object is recorded, except at most those of the
    last compose, which the object's marker names and the next lock holder records.
    """

    def __init__(self, conn: psycopg.Connection, bucket: str) -> None:
        self.conn = conn
        self.bucket = bucket

    def enqueue(self, object_name: str, queued: Queued) -> None:
        """One row per piece of the upload, in one transaction (``Queued.row_names``)."""
        with self.conn.transaction(), self.conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO append_queue (temp_name, bucket, object_name, batch_id, role, "
                "size, format, compression) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        row,
                        self.bucket,
                        object_name,
                        piece.batch_id,
                        piece.role,
                        piece.size,
                        queued.format_name,
                        queued.compression,
                    )
                    for row, piece in zip(queued.row_names(), queued.pieces, strict=True)
                ],
            )

    def dequeue(self, queued: Queued) -> None:
        self.conn.execute(
            "DELETE FROM append_queue WHERE temp_name = ANY(%s)", (queued.row_names(),)
        )

    def locked(self, object_name: str) -> AbstractContextManager[None]:
        return object_lock(self.conn, self.bucket, object_name)

    def waiting(self, object_name: str, like: Queued, limit: int) -> list[Queued]:
        rows = self.conn.execute(
            "SELECT batch_id, role, size, temp_name FROM append_queue WHERE bucket = %s "
            "AND object_name = %s AND NOT landed AND format IS NOT DISTINCT FROM %s "
            "AND compression = %s ORDER BY queued LIMIT %s",
            (self.bucket, object_name, like.format_name, like.compression, limit),
        ).fetchall()
        uploads: dict[str, dict[int, Piece]] = {}
        counts: dict[str, int] = {}
        for batch_id, role, size, row in rows:
            upload, index, count = upload_of_row(row)
            uploads.setdefault(upload, {})[index] = Piece(batch_id, role_of(role), size)
            counts[upload] = count
        # An upload whose rows the limit cut off is left for a later compose.
        return [
            Queued(
                tuple(pieces[i] for i in range(counts[upload])),
                upload,
                like.format_name,
                like.compression,
            )
            for upload, pieces in uploads.items()
            if len(pieces) == counts[upload]
        ]

    def landed(self, queued: Queued) -> list[Landed] | None:
        names = queued.row_names()
        rows = dict(
            (row[0], Landed(row[1], row[2]))
            for row in self.conn.execute(
                "SELECT temp_name, generation, piece_end FROM append_queue "
                "WHERE temp_name = ANY(%s) AND landed",
                (names,),
            )
        )
        # One compose lands every piece of an upload: all of them are recorded, or none.
        return [rows[name] for name in names] if len(rows) == len(names) else None

    def which_appended(self, pieces: Sequence[Piece]) -> set[tuple[int, PieceRole]]:
        ids = [piece.batch_id for piece in pieces]
        rows = self.conn.execute(
            "SELECT batch_id, state = 'appended', dead_letters_appended FROM archive_batches "
            "WHERE batch_id = ANY(%s)",
            (ids,),
        ).fetchall()
        records = {batch_id for batch_id, records, _ in rows if records}
        letters = {batch_id for batch_id, _, dead in rows if dead}
        return {
            piece.key
            for piece in pieces
            if piece.batch_id in (letters if piece.role == "dead_letters" else records)
        }

    def record(self, landed: Sequence[tuple[Piece, Landed]]) -> None:
        # One round trip for all the pieces of a compose (psycopg pipelines executemany).
        with self.conn.cursor() as cursor:
            letters = [p.batch_id for p, _ in landed if p.role == "dead_letters"]
            if letters:
                cursor.execute(
                    "UPDATE archive_batches SET dead_letters_appended = true "
                    "WHERE batch_id = ANY(%s)",
                    (letters,),
                )
            records = [(p, at) for p, at in landed if p.role != "dead_letters"]
            if records:
                cursor.executemany(
                    _FINISH, [(at.generation, p.size, at.end, p.batch_id) for p, at in records]
                )
            if landed:
                cursor.executemany(
                    "UPDATE append_queue SET landed = true, generation = %s, piece_end = %s "
                    "WHERE batch_id = %s AND role = %s AND NOT landed",
                    [(at.generation, at.end, p.batch_id, p.role) for p, at in landed],
                )

    def record_legacy(
        self,
        object_name: str,
        role: PieceRole,
        offsets: Mapping[str, int],
        generation: int | None,
    ) -> None:
        if role == "dead_letters":
            # The dead-letter object's name is not in the ledger; its offsets map names the
            # partitions whose dead letters it holds.
            rows = self.conn.execute(
                "SELECT batch_id, topic, partition, start_offset, end_offset FROM archive_batches "
                "WHERE state = 'claimed' AND NOT dead_letters_appended"
            ).fetchall()
        else:
            rows = self.conn.execute(
                "SELECT batch_id, topic, partition, start_offset, end_offset FROM archive_batches "
                "WHERE state = 'claimed' AND object_name = %s",
                (object_name,),
            ).fetchall()
        for batch_id, *batch in rows:
            if not legacy_covers(offsets, OffsetRange(*batch)):
                continue
            if role == "dead_letters":
                self.conn.execute(
                    "UPDATE archive_batches SET dead_letters_appended = true WHERE batch_id = %s",
                    (batch_id,),
                )
            else:
                # Where its frames end is unknown (later batches may follow on the object).
                finish_batch(self.conn, batch_id, generation)


def archived_partitions(conn: psycopg.Connection, object_names: Sequence[str]) -> dict[str, int]:
    """``topic/partition`` → offset after the last batch appended to any of ``object_names``."""
    rows = conn.execute(
        "SELECT topic, partition, max(end_offset) FROM archive_batches "
        "WHERE object_name = ANY(%s) AND state = 'appended' GROUP BY topic, partition",
        (list(object_names),),
    ).fetchall()
    return {f"{topic}/{partition}": int(end) for topic, partition, end in rows}


@dataclass(frozen=True)
class AppendedBatch:
    batch_id: int
    batch: OffsetRange
    object_name: str
    appended_bytes: int
    object_size: int | None


def latest_appended(conn: psycopg.Connection) -> list[AppendedBatch]:
    """The most recent appended batch of each partition."""
    rows = conn.execute(
        "SELECT DISTINCT ON (topic, partition) batch_id, topic, partition, start_offset, "
        "end_offset, object_name, COALESCE(appended_bytes, 0), object_size FROM archive_batches "
        "WHERE state = 'appended' ORDER BY topic, partition, end_offset DESC"
    ).fetchall()
    return [
        AppendedBatch(row[0], OffsetRange(row[1], row[2], row[3], row[4]), row[5], row[6], row[7])
        for row in rows
    ]


def offset_gaps(conn: psycopg.Connection, topic: str, partition: int) -> list[tuple[int, int]]:
    """Holes ``(previous end, next start)`` between consecutive appended batches of a partition."""
    rows = conn.execute(
        "SELECT previous_end, start_offset FROM ("
        "  SELECT start_offset, lag(end_offset) OVER (ORDER BY start_offset) AS previous_end"
        "  FROM archive_batches WHERE topic = %s AND partition = %s AND state = 'appended'"
        ") batches WHERE previous_end IS NOT NULL AND previous_end <> start_offset",
        (topic, partition),
    ).fetchall()
    return [(int(a), int(b)) for a, b in rows]


def gaps_before(
    conn: psycopg.Connection, batches: Sequence[OffsetRange]
) -> list[list[tuple[int, int]]]:
    """For each batch, the hole between its partition's previous appended batch and it, if any."""
    if not batches:
        return []
    rows = conn.execute(
        "SELECT (SELECT a.end_offset FROM archive_batches a WHERE a.topic = b.topic "
        "AND a.partition = b.partition AND a.state = 'appended' AND a.start_offset < b.start "
        "ORDER BY a.start_offset DESC LIMIT 1) "
        "FROM unnest(%s::text[], %s::int[], %s::bigint[]) WITH ORDINALITY "
        "AS b(topic, partition, start, n) ORDER BY b.n",
        (
            [b.topic for b in batches],
            [b.partition for b in batches],
            [b.start for b in batches],
        ),
    ).fetchall()
    return [
        [] if end is None or end == batch.start else [(int(end), batch.start)]
        for (end,), batch in zip(rows, batches, strict=True)
    ]


def stale_claims(conn: psycopg.Connection, claimed_before: float) -> list[OffsetRange]:
    """Claimed batches still unfinished that were claimed before the given epoch time."""
    rows = conn.execute(
        "SELECT topic, partition, start_offset, end_offset FROM archive_batches "
        "WHERE state = 'claimed' AND claimed_at < to_timestamp(%s)",
        (claimed_before,),
    ).fetchall()
    return [OffsetRange(*row) for row in rows]


def forget_queued_uploads(conn: psycopg.Connection, queued_before: float) -> int:
    """Drop queue entries of uploads older than the given epoch time (their writers died)."""
    cursor = conn.execute(
        "DELETE FROM append_queue WHERE queued_at < to_timestamp(%s)", (queued_before,)
    )
    return cursor.rowcount


def archived_positions(
    conn: psycopg.Connection, ranges: Sequence[OffsetRange]
) -> dict[tuple[str, int], int]:
    """The first offset not yet archived of each partition of ``ranges`` ever archived."""
    rows = conn.execute(
        "SELECT p.topic, p.partition, p.next_offset FROM archive_positions p "
        "JOIN unnest(%s::text[], %s::int[]) AS r(topic, partition) "
        "ON p.topic = r.topic AND p.partition = r.partition",
        ([r.topic for r in ranges], [r.partition for r in ranges]),
    ).fetchall()
    return {(topic, int(partition)): int(offset) for topic, partition, offset in rows}
