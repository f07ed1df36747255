"""An in-memory ``PieceLedger`` for tests of ``append_batch`` alone: no lock, pieces in dicts.

Without a lock, writers race straight into the compose fence, which is what the proxy tests
want to exercise.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

from protoagg_dagster.core.archive_object import Landed, Piece, PieceRole, Queued


class MemoryLedger:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self.appended: dict[tuple[int, PieceRole], Landed] = {}
        self._queue: dict[str, tuple[str, Queued]] = {}  # temp name → object, upload
        self._landed: dict[tuple[str, int], Landed] = {}  # (temp name, piece) → where it landed

    def enqueue(self, object_name: str, queued: Queued) -> None:
        with self._mutex:
            self._queue[queued.temp_name] = (object_name, queued)

    def dequeue(self, queued: Queued) -> None:
        with self._mutex:
            self._queue.pop(queued.temp_name, None)
            for index in range(len(queued.pieces)):
                self._landed.pop((queued.temp_name, index), None)

    def locked(self, object_name: str) -> AbstractContextManager[None]:
        return nullcontext()

    def waiting(self, object_name: str, like: Queued, limit: int) -> list[Queued]:
        with self._mutex:
            return [
                q
                for name, q in self._queue.values()
                if name == object_name
                and (q.format_name, q.compression) == (like.format_name, like.compression)
                and not any(p.key in self.appended for p in q.pieces)
            ][:limit]

    def landed(self, queued: Queued) -> list[Landed] | None:
        with self._mutex:
            found = [self._landed.get((queued.temp_name, i)) for i in range(len(queued.pieces))]
        return None if None in found else [spot for spot in found if spot is not None]

    def which_appended(self, pieces: Sequence[Piece]) -> set[tuple[int, PieceRole]]:
        with self._mutex:
            return {piece.key for piece in pieces if piece.key in self.appended}

    def record(self, landed: Sequence[tuple[Piece, Landed]]) -> None:
        with self._mutex:
            for piece, spot in landed:
                self.appended.setdefault(piece.key, spot)
                for _, queued in self._queue.values():
                    for index, own in enumerate(queued.pieces):
                        if own.key == piece.key:
                            self._landed.setdefault((queued.temp_name, index), spot)

    def record_legacy(
        self,
        object_name: str,
        role: PieceRole,
        offsets: Mapping[str, int],
        generation: int | None,
    ) -> None:
        """No claims of releases before the marker live in memory."""
