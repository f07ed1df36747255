"""``protoagg verify --against-kafka`` says exactly what it needs instead of checking nothing."""

from __future__ import annotations

import pytest

from protoagg_dagster.cli.main import main
from protoagg_dagster.core.formats import LogFormat
from protoagg_dagster.core.records import LogRecord
from protoagg_dagster.resources import GCSResource
from tests.conftest import Services


@pytest.mark.parametrize(
    ("dsn", "says"),
    [
        (None, "records no batch of it"),  # a database that did not archive the object
        ("postgresql://protoagg:protoagg@127.0.0.1:1/protoagg", "cannot be reached"),
    ],
)
def test_verify_against_kafka_names_the_ledger_it_needs(
    services: Services,
    postgres_dsn: str,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    dsn: str | None,
    says: str,
) -> None:
    gcs = GCSResource(bucket=services.bucket, emulator_host=services.gcs_url)
    name = f"{unique}/log.pb"
    frames = LogFormat().encode([LogRecord(0, "6f1c1f7e-3a54-4b0c-9a8e-2f0b8f0c9d11", 0, 0, "m")])
    gcs.get_bucket().blob(name).upload_from_string(frames)
    monkeypatch.setenv("PROTOAGG_POSTGRES_DSN", dsn or postgres_dsn)
    url = f"gs://{services.bucket}/{name}"
    assert main(["verify", url, "--against-kafka"]) == 2
    err = capsys.readouterr().err
    assert "set PROTOAGG_POSTGRES_DSN to the database of the deployment that archived it" in err
    assert says in err
