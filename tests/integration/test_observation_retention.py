"""The sensor's old lag observations are deleted on both of Dagster's SQL storages.

PostgreSQL's is the storage block of deploy/dagster.production.yaml, on the test server.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from urllib.parse import urlsplit

import dagster as dg
import pytest
import yaml

from protoagg_dagster.archive.assets import ARCHIVE_ASSET
from protoagg_dagster.archive.run_retention import prune_observations
from tests.conftest import ROOT


@pytest.fixture(params=["sqlite", "postgres"])
def instance(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dg.DagsterInstance]:
    overrides = None
    if request.param == "postgres":
        dsn = urlsplit(request.getfixturevalue("postgres_dsn"))
        production = yaml.safe_load((ROOT / "deploy" / "dagster.production.yaml").read_text())
        storage = production["storage"]
        storage["postgres"]["postgres_db"]["port"] = dsn.port  # the file says 5432
        for name, value in {
            "DAGSTER_PG_HOST": dsn.hostname,
            "DAGSTER_PG_USER": dsn.username,
            "DAGSTER_PG_PASSWORD": dsn.password,
            "DAGSTER_PG_DB": dsn.path.lstrip("/"),
        }.items():
            monkeypatch.setenv(name, str(value))
        overrides = {"storage": storage}
    with dg.instance_for_test(overrides=overrides) as instance:
        yield instance


def seen(instance: dg.DagsterInstance, key: dg.AssetKey) -> list[int]:
    records = instance.fetch_observations(key, limit=100).records
    found = [r.asset_observation for r in records if r.asset_observation is not None]
    return sorted(int(o.metadata["seen"].value) for o in found)  # type: ignore[arg-type]


def test_old_observations_of_protoagg_assets_go_and_the_newest_stays(
    instance: dg.DagsterInstance,
) -> None:
    topic_asset, other = dg.AssetKey("kafka_archive_logs"), dg.AssetKey("someone_elses")
    for number in range(5):
        for key in (ARCHIVE_ASSET, topic_asset, other):
            instance.report_runless_asset_event(dg.AssetObservation(key, metadata={"seen": number}))
    now = datetime.datetime.now(datetime.UTC)
    assert prune_observations(instance, now - datetime.timedelta(minutes=5), 100) == 0
    assert seen(instance, ARCHIVE_ASSET) == [0, 1, 2, 3, 4]
    # A pass deletes at most its budget; the next one goes on.
    assert prune_observations(instance, now + datetime.timedelta(seconds=5), 3) == 3
    assert seen(instance, ARCHIVE_ASSET) == [2, 3, 4]  # the oldest first: 0 and 1 went
    assert prune_observations(instance, now + datetime.timedelta(seconds=5), 100) == 5
    assert seen(instance, ARCHIVE_ASSET) == [4]
    assert seen(instance, topic_asset) == [4]
    assert seen(instance, other) == [0, 1, 2, 3, 4]
    assert prune_observations(instance, now + datetime.timedelta(seconds=5), 100) == 0
