"""An in-memory ``PieceLedger`` for tests of ``append_batch`` alone: no lock, pieces in a set.

Without a lock, writers race straight into the compose fence, which is what the proxy tests
want to exercise.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext

from protoagg_dagster.core.archive_object import Piece


class MemoryLedger:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self.appended: dict[tuple[int, str], tuple[int | None, int | None]] = {}

    def locked(self, object_name: str) -> AbstractContextManager[None]:
        return nullcontext()

    def is_appended(self, piece: Piece) -> bool:
        with self._mutex:
            return (piece.batch_id, piece.role) in self.appended

    def record(self, piece: Piece, generation: int | None, object_size: int | None) -> None:
        with self._mutex:
            self.appended.setdefault((piece.batch_id, piece.role), (generation, object_size))
