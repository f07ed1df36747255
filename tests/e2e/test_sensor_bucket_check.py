"""The sensor's first tick reads the bucket's settings and warns about what appends cost;
without credentials for real GCS it says so in one sentence and launches nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from protoagg_dagster.archive.assets import ARCHIVE_ASSET
from protoagg_dagster.resources import GCSResource
from tests.conftest import Services
from tests.helpers import Stack, create_topic, log_value, memory_instance, produce, tick, topic_of
from tests.support.gcs_proxy import BucketPolicy, GcsProxy


def _with_gcs_at(stack: Stack, emulator_host: str) -> Stack:
    # A new resource, not model_copy: Dagster rebuilds resources from their original config.
    gcs = GCSResource(
        bucket=stack.gcs.bucket,
        object_template=stack.gcs.object_template,
        emulator_host=emulator_host,
    )
    return Stack(stack.kafka, stack.postgres, gcs, stack.archiver)


def test_first_tick_warns_about_soft_delete_with_the_estimate(
    stack: Stack, services: Services
) -> None:
    create_topic(stack.kafka, topic_of(stack))
    produce(stack.kafka, topic_of(stack), [log_value() for _ in range(5)])
    proxy = GcsProxy(services.gcs_url)
    with proxy as url, memory_instance() as instance:
        proxy.present_bucket(services.bucket, BucketPolicy(soft_delete_seconds=7 * 86400))
        via_proxy = _with_gcs_at(stack, url)
        first = tick(via_proxy, instance, None)
        second = tick(via_proxy, instance, first.cursor)
    [observation] = [e for e in first.asset_events if e.asset_key == ARCHIVE_ASSET]
    bill = str(observation.metadata["storage_bill"].value)
    assert "each append keeps the previous copy for 7 days" in bill
    assert "GiB-days" in bill and "--clear-soft-delete" in bill
    assert first.run_requests  # the warning does not stop archiving
    [later] = [e for e in second.asset_events if e.asset_key == ARCHIVE_ASSET]
    assert "storage_bill" not in later.metadata  # first tick only


def test_no_credentials_for_real_gcs_is_one_sentence_and_no_runs(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_topic(stack.kafka, topic_of(stack))
    produce(stack.kafka, topic_of(stack), [log_value() for _ in range(5)])
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    real_gcs = _with_gcs_at(stack, "")
    with memory_instance() as instance:
        result = tick(real_gcs, instance, None)
    assert result.run_requests == []
    assert result.skip_reason is not None
    reason = str(result.skip_reason.skip_message)
    assert reason.startswith("no Google Cloud credentials")
    assert "STORAGE_EMULATOR_HOST" in reason and "Application Default Credentials" in reason
