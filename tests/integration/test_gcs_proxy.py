"""GcsProxy, on the real emulator: GCS preconditions enforced, faults injected, appends fenced.

fake-gcs-server (v1.54) ignores ``ifGenerationMatch`` on compose, delete and resumable uploads; the
first test documents that snag on the raw emulator, the others run through
:class:`tests.support.gcs_proxy.GcsProxy`, which enforces them like real GCS.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from google.api_core import exceptions as gexc
from google.cloud import storage

from protoagg_dagster.archive.store import AppendResult, append_batch
from protoagg_dagster.core.archive_object import TEMP_PREFIX, Piece, last_compose
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.resources.gcs import GCSResource
from tests.conftest import Services
from tests.support.gcs_proxy import GcsProxy
from tests.support.memory_ledger import MemoryLedger


def _bucket(services: Services, url: str) -> storage.Bucket:
    """A bucket handle with its own client (so threads never share a session)."""
    return GCSResource(bucket=services.bucket, emulator_host=url).get_bucket()


@pytest.fixture
def proxy(services: Services) -> Iterator[GcsProxy]:
    proxy = GcsProxy(services.gcs_url)
    proxy.start()
    yield proxy
    proxy.close()


@pytest.fixture
def bucket(services: Services, proxy: GcsProxy) -> storage.Bucket:
    return _bucket(services, proxy.url)


@pytest.fixture
def raw_bucket(services: Services) -> storage.Bucket:
    return _bucket(services, services.gcs_url)


def _append(
    ledger: MemoryLedger, bucket: storage.Bucket, name: str, batch: OffsetRange, data: bytes
) -> AppendResult:
    """``append_batch`` of one range; the range stands for its ledger batch."""
    piece = Piece(batch.partition * 1_000_000 + batch.start + 1, "records", len(data))
    return append_batch(bucket, name, batch, piece, data, ledger)


def _put(bucket: storage.Bucket, name: str, data: bytes) -> storage.Blob:
    blob = bucket.blob(name)
    blob.upload_from_string(data, if_generation_match=0)
    return blob


def _content(bucket: storage.Bucket, name: str) -> bytes:
    blob = bucket.get_blob(name)
    assert blob is not None, name
    return bytes(blob.download_as_bytes())


def _temp_objects(bucket: storage.Bucket, topic: str) -> list[str]:
    return [blob.name for blob in bucket.list_blobs(prefix=f"{TEMP_PREFIX}{topic}/")]


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# -- preconditions ---------------------------------------------------------------------------------


def test_stale_compose_is_refused_by_the_proxy_but_not_by_the_raw_emulator(
    unique: str, proxy: GcsProxy, bucket: storage.Bucket, raw_bucket: storage.Bucket
) -> None:
    name = f"{unique}/dest"
    a = _put(raw_bucket, f"{unique}/a", b"a")
    b = _put(raw_bucket, f"{unique}/b", b"b")
    dest = raw_bucket.blob(name)
    dest.compose([a], if_generation_match=0)
    stale = dest.generation
    dest.compose([dest, b], if_generation_match=stale)
    assert dest.generation != stale

    # The snag: the emulator composes although the generation is stale (real GCS: 412).
    raw_bucket.blob(name).compose([raw_bucket.blob(name), b], if_generation_match=stale)
    assert _content(raw_bucket, name) == b"abb"
    current = raw_bucket.get_blob(name).generation

    # Through the proxy: a stale generation, "must not exist" and a stale source precondition
    # are all refused, and the object is left alone.
    target, dest_src, b_src = bucket.blob(name), bucket.blob(name), bucket.blob(f"{unique}/b")
    with pytest.raises(gexc.PreconditionFailed):
        target.compose([dest_src, b_src], if_generation_match=stale)
    with pytest.raises(gexc.PreconditionFailed):
        target.compose([b_src], if_generation_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        target.compose([dest_src, b_src], if_source_generation_match=[current, b.generation + 1])
    assert _content(bucket, name) == b"abb"
    assert proxy.count(kind="compose", status=412, refused=True) == 3
    # The current generation passes.
    target.compose([dest_src, bucket.blob(f"{unique}/a")], if_generation_match=current)
    assert _content(bucket, name) == b"abba"


def test_stale_delete_is_refused_by_the_proxy_but_not_by_the_raw_emulator(
    unique: str, bucket: storage.Bucket, raw_bucket: storage.Bucket
) -> None:
    raw = _put(raw_bucket, f"{unique}/raw", b"x")
    raw.delete(if_generation_match=raw.generation + 1)  # the emulator deletes anyway
    assert raw_bucket.get_blob(f"{unique}/raw") is None

    kept = _put(bucket, f"{unique}/kept", b"x")
    with pytest.raises(gexc.PreconditionFailed):
        kept.delete(if_generation_match=kept.generation + 1)
    assert bucket.get_blob(f"{unique}/kept") is not None
    kept.delete(if_generation_match=kept.generation)
    assert bucket.get_blob(f"{unique}/kept") is None


def test_resumable_upload_is_fenced_at_initiation_and_at_the_final_chunk(
    unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    data = os.urandom(9 * 1024 * 1024)  # above 8 MiB: upload_from_string goes resumable
    _put(bucket, f"{unique}/exists", b"x")
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob(f"{unique}/exists").upload_from_string(data, if_generation_match=0)
    assert proxy.count(kind="resumable-init", status=412) == 1

    # Another writer creates the object while our chunked upload is under way.
    blob = bucket.blob(f"{unique}/raced", chunk_size=4 * 1024 * 1024)
    hold = proxy.hold(kind="resumable-put", object_name=f"{unique}/raced")
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(blob.upload_from_string, data, if_generation_match=0)
        assert hold.wait_arrived()
        _put(bucket, f"{unique}/raced", b"other writer")
        hold.release()
        with pytest.raises(gexc.PreconditionFailed):
            upload.result(timeout=60)
    assert _content(bucket, f"{unique}/raced") == b"other writer"
    assert proxy.count(kind="resumable-put", status=412, refused=True) == 1


def test_concurrent_composes_with_the_same_generation_exactly_one_wins(
    services: Services, unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    writers = 8
    base = _put(bucket, f"{unique}/dest", b"base:")
    for i in range(writers):
        _put(bucket, f"{unique}/piece{i}", f"<{i}>".encode())
    buckets = [_bucket(services, proxy.url) for _ in range(writers)]
    start = threading.Barrier(writers)

    def compose(i: int) -> int | None:
        b = buckets[i]
        start.wait()
        try:
            b.blob(f"{unique}/dest").compose(
                [b.blob(f"{unique}/dest"), b.blob(f"{unique}/piece{i}")],
                if_generation_match=base.generation,
            )
        except gexc.PreconditionFailed:
            return None
        return i

    with ThreadPoolExecutor(writers) as pool:
        winners = [i for i in pool.map(compose, range(writers)) if i is not None]
    assert len(winners) == 1
    assert _content(bucket, f"{unique}/dest") == f"base:<{winners[0]}>".encode()
    assert proxy.count(kind="compose", status=200) == 1
    assert proxy.count(kind="compose", status=412) == writers - 1


# -- append_batch through the proxy ----------------------------------------------------------------


def test_append_batch_appends_through_the_proxy(
    unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    ledger = MemoryLedger()
    topic, name = f"t-{unique}", f"{unique}/log.pb"
    first = _append(ledger, bucket, name, OffsetRange(topic, 0, 0, 5), b"one|")
    second = _append(ledger, bucket, name, OffsetRange(topic, 0, 5, 9), b"two|")
    again = _append(ledger, bucket, name, OffsetRange(topic, 0, 5, 9), b"two|")
    assert (first.appended, second.appended, again.appended) == (True, True, False)
    assert _content(bucket, name) == b"one|two|"
    assert last_compose(bucket.get_blob(name).metadata) == [Piece(6, "records", 4)]
    assert len(ledger.appended) == 2
    assert proxy.count(kind="compose", status=200) == 2
    assert proxy.count(status=412) == 0
    assert _temp_objects(bucket, topic) == []


def test_stalled_writer_is_fenced_and_appends_after_the_other_writer(
    services: Services, unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    """Writer A reads the object, stalls in its compose; B composes its piece and A's; A's
    compose gets 412 and A finds its piece landed."""
    ledger = MemoryLedger()
    topic, name = f"t-{unique}", f"{unique}/log.pb"
    _append(ledger, bucket, name, OffsetRange(topic, 0, 0, 5), b"p0:0-5|")
    hold = proxy.hold(kind="compose", object_name=name)
    stalled = _bucket(services, proxy.url)
    with ThreadPoolExecutor(1) as pool:
        a = pool.submit(_append, ledger, stalled, name, OffsetRange(topic, 0, 5, 8), b"p0:5-8|")
        assert hold.wait_arrived()  # A has read the generation and sent its compose
        b = _append(ledger, bucket, name, OffsetRange(topic, 1, 0, 3), b"p1:0-3|")
        hold.release()
        a_result = a.result(timeout=60)
    assert b.appended and b.compose_attempts == 1
    assert a_result.appended and a_result.compose_attempts == 2  # the fenced retry ran
    assert proxy.count(kind="compose", status=412, refused=True) == 1
    assert _content(bucket, name) == b"p0:0-5|p1:0-3|p0:5-8|"
    assert last_compose(bucket.get_blob(name).metadata) == [
        Piece(1_000_001, "records", 7),
        Piece(6, "records", 7),
    ]
    assert proxy.count(kind="compose", status=200) == 2
    assert len(ledger.appended) == 3
    assert _temp_objects(bucket, topic) == []


@pytest.mark.parametrize("enforce", [True, False], ids=["proxy-enforces", "emulator-semantics"])
def test_lost_compose_response_is_retried_by_the_client(
    services: Services, unique: str, enforce: bool
) -> None:
    """The compose happens but its response is lost (503): the client retries the same compose.

    With preconditions enforced the retry gets 412 and append_batch finds its piece named by the
    object's marker (appended once, by this call). With the emulator's semantics the retry
    composes again: the batch is in the object twice. Only the generation fence makes this
    retry safe.
    """
    ledger = MemoryLedger()
    topic, name = f"t-{unique}", f"{unique}/log.pb"
    proxy = GcsProxy(services.gcs_url, enforce_preconditions=enforce)
    with proxy as url:
        bucket = _bucket(services, url)
        _append(ledger, bucket, name, OffsetRange(topic, 0, 0, 5), b"one|")
        proxy.fail_next(1, 503, kind="compose", object_name=name, after=True)
        result = _append(ledger, bucket, name, OffsetRange(topic, 0, 5, 9), b"two|")
        content = _content(bucket, name)
    if enforce:
        assert (result.appended, result.compose_attempts) == (True, 2)
        assert proxy.count(kind="compose", status=412, refused=True) == 1
        assert content == b"one|two|"
    else:
        assert (result.appended, result.compose_attempts) == (True, 1)
        assert content == b"one|two|two|"  # the double append real GCS would have refused
    assert proxy.count(kind="compose", status=503, fault="fail") == 1


# -- fault injection -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 429])
def test_transient_errors_on_upload_and_compose_are_absorbed_by_client_retries(
    unique: str, proxy: GcsProxy, bucket: storage.Bucket, status: int
) -> None:
    ledger = MemoryLedger()
    topic, name = f"t-{unique}", f"{unique}/log.pb"
    proxy.fail_next(2, status, kind="upload")
    proxy.fail_next(2, status, kind="compose")
    result = _append(ledger, bucket, name, OffsetRange(topic, 0, 0, 5), b"one|")
    assert result.appended and result.compose_attempts == 1  # the client retried, not our loop
    assert _content(bucket, name) == b"one|"
    assert proxy.count(kind="upload", status=status, fault="fail") == 2
    assert proxy.count(kind="upload", status=200) == 1
    assert proxy.count(kind="compose", status=status, fault="fail") == 2
    assert proxy.count(kind="compose", status=200) == 1


def test_compose_without_a_precondition_is_not_retried_on_503(
    unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    a = _put(bucket, f"{unique}/a", b"a")
    proxy.fail_next(1, 503, kind="compose")
    with pytest.raises(gexc.ServiceUnavailable):
        bucket.blob(f"{unique}/dest").compose([a])
    assert proxy.count(kind="compose") == 1


def test_lost_upload_response_is_recognised_and_the_append_completes(
    unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    """The temp upload lands but its response is lost; the client's retry meets its own object.

    upload_from_string(if_generation_match=0) retries the 503 and gets 412: append_batch sees
    that the uniquely named temporary object is whole and carries on.
    """
    ledger = MemoryLedger()
    topic, name = f"t-{unique}", f"{unique}/log.pb"
    proxy.fail_next(1, 503, kind="upload", after=True)
    result = _append(ledger, bucket, name, OffsetRange(topic, 0, 0, 5), b"one|")
    assert result.appended
    assert bucket.blob(name).download_as_bytes() == b"one|"
    assert _temp_objects(bucket, topic) == []
    assert proxy.count(kind="upload", status=503, fault="fail") == 1
    assert proxy.count(kind="upload", status=412) == 1


def test_a_stall_beyond_the_client_timeout_surfaces_as_a_timeout(
    unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    name = f"{unique}/obj"
    _put(bucket, name, b"x")
    proxy.stall_next(1, 5.0, kind="get", object_name=name)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.Timeout):
        bucket.get_blob(name, timeout=0.5, retry=None)
    assert time.monotonic() - started < 4.0
    # With the default retry, one stalled attempt is absorbed: the retry answers.
    proxy.stall_next(1, 5.0, kind="get", object_name=name)
    assert bucket.get_blob(name, timeout=0.5) is not None


def test_a_compose_that_arrives_after_the_client_gave_up_is_fenced(
    unique: str, proxy: GcsProxy, bucket: storage.Bucket
) -> None:
    """The first compose is delayed in the network past the client timeout; the client retries
    (conditional retry: a generation is set), the retry lands, and the late original arrives
    with a now-stale generation: refused, so the piece is appended once.
    """
    dest = _put(bucket, f"{unique}/dest", b"base:")
    piece = _put(bucket, f"{unique}/piece", b"piece")
    proxy.stall_next(1, 5.0, kind="compose")
    target = bucket.blob(f"{unique}/dest")
    target.compose([dest, piece], if_generation_match=dest.generation, timeout=0.5)
    assert _wait_for(lambda: proxy.count(kind="compose", fault="stall") == 1, timeout=10)
    assert proxy.count(kind="compose", status=412, fault="stall", refused=True) == 1
    assert proxy.count(kind="compose", status=200) == 1
    assert _content(bucket, f"{unique}/dest") == b"base:piece"
