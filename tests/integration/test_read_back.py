"""The checks' read-back of many pieces at once, on the real emulator.

A run's pieces bound for one object lie side by side; ``stored_all`` reads them back in windows
and must give each piece the verdict ``stored_equals`` gives it alone.
"""

from __future__ import annotations

from unittest import mock

from google.cloud import storage

from protoagg_dagster.archive import checks
from protoagg_dagster.archive.checks import stored_all, stored_equals
from protoagg_dagster.archive.ledger import AppendedBatch
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.resources.gcs import GCSResource
from tests.conftest import Services


def test_pieces_read_back_together_get_the_verdicts_each_gets_alone(
    services: Services, unique: str
) -> None:
    bucket = GCSResource(bucket=services.bucket, emulator_host=services.gcs_url).get_bucket()
    pieces = [bytes([i]) * (50 + i) for i in range(40)]
    other = b"another writer's bytes between ours"
    stored = b"head" + b"".join(pieces[:30]) + other + b"".join(pieces[30:])
    name = f"read-back-{unique}.pb"
    bucket.blob(name).upload_from_string(stored)
    batches = []
    at = 4
    for i, data in enumerate(pieces):
        at += len(other) if i == 30 else 0
        at += len(data)
        batches.append(AppendedBatch(i, OffsetRange("t", i, 0, 1), name, len(data), at))
    # What the run believes it wrote: piece 7 differs from what is stored, piece 39 is longer.
    written = [(b, d) for b, d in zip(batches, pieces, strict=True)]
    written[7] = (batches[7], b"\x00" + pieces[7][1:])
    written[39] = (batches[39], pieces[39] + b"!")
    empty = AppendedBatch(99, OffsetRange("t", 99, 0, 1), name, 0, None)
    written.append((empty, b""))
    with mock.patch.object(checks, "READ_BACK_BYTES", 1_000):
        reads = []
        original = storage.Blob.download_as_bytes

        def counted(blob: storage.Blob, *args: object, **kwargs: object) -> bytes:
            reads.append(kwargs)
            return bytes(original(blob, *args, **kwargs))

        with mock.patch.object(storage.Blob, "download_as_bytes", counted):
            together = stored_all(bucket, written)
        alone = {b.batch_id: stored_equals(bucket, b, d) for b, d in written}
    assert together == alone
    assert [bid for bid, (ok, _) in together.items() if not ok] == [7, 39]
    # 2,600 bytes of pieces (and the other writer's 35) in windows of at most 1,000 bytes.
    assert 3 <= len(reads) <= 4
