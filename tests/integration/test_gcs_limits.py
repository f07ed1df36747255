"""GcsProxy's real-GCS limits and bucket policies, on the real emulator.

fake-gcs-server accepts any number of compose sources, any metadata size and any write rate, and
has no soft delete, retention or holds; the proxy makes them behave as Cloud Storage documents.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from google.api_core import exceptions as gexc
from google.cloud import storage

from protoagg_dagster.archive.ledger import ledger_connection
from protoagg_dagster.resources.gcs import GCSResource
from tests.conftest import Services
from tests.support.gcs_proxy import BucketPolicy, GcsProxy


@pytest.fixture
def proxy(services: Services) -> Iterator[GcsProxy]:
    proxy = GcsProxy(services.gcs_url, mutation_interval=1.0)
    proxy.start()
    yield proxy
    proxy.close()


@pytest.fixture
def bucket(services: Services, proxy: GcsProxy) -> storage.Bucket:
    return GCSResource(bucket=services.bucket, emulator_host=proxy.url).get_bucket()


def _put(bucket: storage.Bucket, name: str, data: bytes = b"x") -> storage.Blob:
    blob = bucket.blob(name)
    blob.upload_from_string(data, retry=None)
    return blob


def test_a_second_mutation_of_one_object_within_the_interval_gets_429(
    unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    name = f"{unique}/hot"
    _put(bucket, name)
    with pytest.raises(gexc.TooManyRequests) as raised:
        _put(bucket, name)
    assert "rate limit" in raised.value.message
    _put(bucket, f"{unique}/other")  # the limit is per object name
    time.sleep(1.05)  # the proxy's interval is wall-clock: this is the thing under test
    _put(bucket, name)
    assert proxy.count(kind="upload", status=429, object_name=name) == 1
    assert proxy.count(kind="upload", status=200) == 3


def test_the_client_absorbs_a_429_with_backoff(
    unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    name = f"{unique}/hot"
    _put(bucket, name)
    bucket.blob(name).upload_from_string(b"again")  # default retry: 429 is retried
    assert bucket.blob(name).download_as_bytes() == b"again"
    assert proxy.count(kind="upload", status=429) >= 1


def test_compose_takes_at_most_32_sources(unique: str, bucket: storage.Bucket) -> None:
    pieces = [_put(bucket, f"{unique}/p{i}", bytes([65 + i % 26])) for i in range(33)]
    with pytest.raises(gexc.BadRequest) as raised:
        bucket.blob(f"{unique}/too-many").compose(pieces, retry=None)
    assert "exceeds the maximum (32)" in raised.value.message
    bucket.blob(f"{unique}/most").compose(pieces[:32], retry=None)
    assert bucket.get_blob(f"{unique}/most").size == 32


def test_custom_metadata_is_limited_to_8_kib(
    unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    # The emulator keeps metadata in a file's extended attributes, which hold about 4 KiB on
    # this file system: a small map shows the accepted side.
    fits = bucket.blob(f"{unique}/fits")
    fits.metadata = {"k": "v" * 1024}
    fits.upload_from_string(b"x", retry=None)
    too_big = bucket.blob(f"{unique}/big")
    too_big.metadata = {"k": "v" * (8 * 1024)}
    with pytest.raises(gexc.BadRequest):
        too_big.upload_from_string(b"x", retry=None)
    target = bucket.blob(f"{unique}/composed")
    target.metadata = {"k": "v" * (8 * 1024)}
    with pytest.raises(gexc.BadRequest):
        target.compose([fits], retry=None)
    assert proxy.count(status=400, refused=True) == 2


def test_bucket_and_object_policies_are_presented(
    services: Services, unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    blob = _put(bucket, f"{unique}/obj")
    proxy.present_bucket(
        services.bucket,
        BucketPolicy(
            soft_delete_seconds=7 * 86400,
            versioning=True,
            storage_class="NEARLINE",
            retention_seconds=3600,
            retention_locked=True,
            object_storage_class="NEARLINE",
        ),
    )
    bucket.reload()
    assert bucket.soft_delete_policy.retention_duration_seconds == 7 * 86400
    assert bucket.versioning_enabled is True
    assert bucket.storage_class == "NEARLINE"
    assert (bucket.retention_period, bucket.retention_policy_locked) == (3600, True)
    assert bucket.get_blob(blob.name).storage_class == "NEARLINE"


def test_retention_policy_refuses_replacing_and_deleting_but_not_creating(
    services: Services, unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    existing = _put(bucket, f"{unique}/existing")
    proxy.present_bucket(services.bucket, BucketPolicy(retention_seconds=3600))
    piece = _put(bucket, f"{unique}/new-piece")  # creating a new name is allowed
    with pytest.raises(gexc.Forbidden) as raised:
        bucket.blob(existing.name).compose([existing, piece], retry=None)
    assert "retention" in raised.value.message
    with pytest.raises(gexc.Forbidden):
        piece.delete(retry=None)


def test_a_held_object_cannot_be_composed_onto(
    services: Services, unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    held = _put(bucket, f"{unique}/held")
    piece = _put(bucket, f"{unique}/piece")
    proxy.place_hold(services.bucket, held.name)
    assert bucket.get_blob(held.name).temporary_hold is True
    with pytest.raises(gexc.Forbidden) as raised:
        bucket.blob(held.name).compose([held, piece], retry=None)
    assert "hold" in raised.value.message


def test_appending_onto_a_held_or_retained_object_fails_at_once_with_a_clear_error(
    services: Services, unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    from protoagg_dagster.archive.store import append_batch
    from protoagg_dagster.core.archive_object import Piece
    from protoagg_dagster.core.errors import ConfigError
    from protoagg_dagster.core.planning import OffsetRange
    from tests.support.memory_ledger import MemoryLedger

    ledger = MemoryLedger()
    held, retained = f"{unique}/held.pb", f"{unique}/retained.pb"
    first, second = OffsetRange("t", 0, 0, 1), OffsetRange("t", 0, 1, 2)
    append_batch(bucket, held, first, Piece(1, "records", 1), b"a", ledger)
    append_batch(bucket, retained, first, Piece(2, "records", 1), b"a", ledger)
    proxy.place_hold(services.bucket, held)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="under a hold"):
        append_batch(bucket, held, second, Piece(3, "records", 1), b"b", ledger)
    proxy.present_bucket(services.bucket, BucketPolicy(retention_seconds=3600))
    with pytest.raises(ConfigError, match="retention policy or hold"):
        append_batch(bucket, retained, second, Piece(4, "records", 1), b"b", ledger)
    assert time.monotonic() - started < 10  # no retries with backoff
    assert proxy.count(kind="compose", status=403) == 1


def test_two_thousand_partitions_append_to_one_object_within_the_metadata_limit(
    services: Services, unique: str, proxy: GcsProxy, bucket: storage.Bucket, postgres_dsn: str
) -> None:
    """The object's bookkeeping is one marker; the partitions' offsets live in the ledger.

    2,000 partitions go up 64 a run, as the sensor groups them (one upload and one compose per
    run): the marker stays one entry whatever the number of appends and of partitions.
    """
    from protoagg_dagster.archive.ledger import AppendLedger, archived_partitions, claim_batch
    from protoagg_dagster.archive.store import PieceData, append_pieces
    from protoagg_dagster.core.archive_object import Piece
    from protoagg_dagster.core.planning import OffsetRange
    from protoagg_dagster.resources import PostgresResource

    proxy.mutation_interval = None  # the rate is not under test here: 32 appends at speed
    name, partitions, per_run = f"{unique}/log.pb", 2000, 64
    sizes: list[int] = []  # the object's custom metadata after each append, in bytes
    with ledger_connection(PostgresResource(dsn=postgres_dsn)) as conn:
        ledger = AppendLedger(conn, services.bucket)
        for first in range(0, partitions, per_run):
            pieces = []
            for partition in range(first, min(first + per_run, partitions)):
                batch = OffsetRange(f"topic-with-a-long-name-{unique}", partition, 0, 1_000_000)
                claim = claim_batch(conn, batch, [], name, run_id=None)
                assert claim.batch_id is not None
                data = f"{partition};".encode()
                pieces.append(PieceData(batch, Piece(claim.batch_id, "records", len(data)), data))
            results = append_pieces(bucket, name, pieces, ledger, sleep=lambda _: None)
            assert all(result.appended for result in results)
            metadata = bucket.get_blob(name).metadata
            sizes.append(sum(len(k) + len(v) for k, v in metadata.items()))
        offsets = archived_partitions(conn, [name])
    blob = bucket.get_blob(name)
    assert blob.download_as_bytes() == b"".join(f"{p};".encode() for p in range(partitions))
    assert len(offsets) == partitions and set(offsets.values()) == {1_000_000}
    # The marker names the last compose's pieces: bounded by a run, not by the appends before
    # (it grows only as the pieces' batch ids gain digits).
    assert max(sizes) < 8 * 1024 and sizes[-2] - sizes[1] <= 2 * per_run, sizes
    assert proxy.count(kind="compose", status=200) <= 2 * partitions // per_run + 2
    assert proxy.count(status=400) == 0


def test_writers_of_one_object_share_composes_of_at_most_32_sources(
    services: Services, unique: str, proxy: GcsProxy, postgres_dsn: str
) -> None:
    """40 partitions append at once, each on its own connection, at GCS's write rate.

    Each writer queues its upload; whoever holds the object's lock composes every queued piece
    (31 and the destination at most). So the 40 pieces need a handful of composes, not 40
    seconds of them, and each lands once with the ledger locating it in the object.
    """
    from protoagg_dagster.resources import PostgresResource
    from tests.helpers import append_from_threads

    name, writers = f"{unique}/log.pb", 40
    postgres = PostgresResource(dsn=postgres_dsn)
    gcs = GCSResource(bucket=services.bucket, emulator_host=proxy.url)
    results = append_from_threads(gcs, postgres, name, writers, pieces=1)
    content = GCSResource(bucket=services.bucket, emulator_host=services.gcs_url).get_bucket()
    data = content.blob(name).download_as_bytes()
    assert sorted(data.decode().strip("<>").split("><")) == sorted(f"{p}.0" for p in range(writers))
    for piece, result in results.values():
        assert result.appended and result.object_size is not None
        assert data[result.object_size - len(piece) : result.object_size] == piece
    composes = proxy.count(kind="compose", status=200, object_name=name)
    assert 2 <= composes <= writers // 4, composes  # 40 pieces need two composes at the least
    assert proxy.count(status=400) == 0  # never more than 32 sources
    with ledger_connection(postgres) as conn:
        left = conn.execute(
            "SELECT count(*) FROM append_queue WHERE object_name = %s", (name,)
        ).fetchone()
    assert left == (0,)


def test_a_run_of_hundreds_of_ranges_appends_to_one_object_in_one_compose(
    services: Services, unique: str, proxy: GcsProxy, bucket: storage.Bucket, postgres_dsn: str
) -> None:
    """GCS takes one write a second per object: one compose for a run's ranges to an object.

    They go up in as few uploads as their marker allows, all queued before the first compose,
    which takes as many as its marker can name (3 KiB: here all 120), where each upload went
    alone before.
    """
    from protoagg_dagster.archive.ledger import AppendLedger, claim_batch
    from protoagg_dagster.archive.store import PieceData, append_pieces
    from protoagg_dagster.core.archive_object import Piece, last_compose
    from protoagg_dagster.core.planning import OffsetRange
    from protoagg_dagster.resources import PostgresResource

    name, partitions = f"{unique}/log.pb", 120
    with ledger_connection(PostgresResource(dsn=postgres_dsn)) as conn:
        ledger = AppendLedger(conn, services.bucket)
        pieces = []
        for partition in range(partitions):
            batch = OffsetRange(f"grouped-{unique}", partition, 0, 10)
            claim = claim_batch(conn, batch, [], name, run_id=None)
            assert claim.batch_id is not None
            data = f"{partition};".encode()
            pieces.append(PieceData(batch, Piece(claim.batch_id, "records", len(data)), data))
        results = append_pieces(bucket, name, pieces, ledger)
    assert all(result.appended for result in results)
    blob = bucket.get_blob(name)
    assert blob.download_as_bytes() == b"".join(f"{p};".encode() for p in range(partitions))
    assert last_compose(blob.metadata) == [p.piece for p in pieces]
    # Two uploads (each at most half a marker), one compose.
    assert proxy.count(kind="upload", status=200) == 2
    assert proxy.count(kind="compose", status=200, object_name=name) == 1
