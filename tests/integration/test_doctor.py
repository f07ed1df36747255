"""``protoagg doctor`` on a good set-up and on each broken one: every FAIL line, with its fix."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from protoagg_dagster.archive.ledger import ledger_connection
from protoagg_dagster.archive.usage import operations_bill
from protoagg_dagster.cli.doctor import Deployment, Finding, diagnose
from protoagg_dagster.core.archive_object import LAST_APPEND_KEY
from protoagg_dagster.core.storage_bill import OperationsBill
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from tests.conftest import ROOT, Services
from tests.helpers import create_topic
from tests.support.gcs_proxy import BucketPolicy, GcsProxy

LOCAL_YAML = ROOT / "deploy" / "dagster.local.yaml"


@pytest.fixture
def good(services: Services, postgres_dsn: str, unique: str) -> Deployment:
    kafka = KafkaResource(bootstrap_servers=services.kafka_bootstrap, topics=f"doc-{unique}")
    create_topic(kafka, f"doc-{unique}", partitions=2)
    with ledger_connection(PostgresResource(dsn=postgres_dsn)):
        pass  # creates the schema, as the first run would
    return Deployment(
        kafka=kafka,
        postgres_dsn=postgres_dsn,
        gcs=GCSResource(
            bucket=services.bucket,
            object_template=f"{unique}/log.pb",
            emulator_host=services.gcs_url,
        ),
        linger_seconds=15,
        dagster_yaml=LOCAL_YAML,
    )


@pytest.fixture
def proxy(services: Services) -> Iterator[GcsProxy]:
    proxy = GcsProxy(services.gcs_url, mutation_interval=1.0)
    with proxy:
        yield proxy


def _by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def _failures(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.status == "FAIL"]


def test_a_good_setup_is_all_ok(good: Deployment) -> None:
    findings = diagnose(good)
    assert [f.line() for f in findings if f.status != "OK"] == []
    assert {
        "kafka",
        "kafka topic",
        "postgres",
        "postgres schema",
        "template",
        "gcs write",
        "gcs bucket settings",
        "dagster run queue",
        "dagster run queue interval",
    } <= set(_by_check(findings))


def test_kafka_unreachable_fails(good: Deployment) -> None:
    broken = replace(good, kafka=KafkaResource(bootstrap_servers="127.0.0.1:1", topics="x"))
    [failure] = _failures(diagnose(broken))
    assert failure.check == "kafka" and "127.0.0.1:1" in failure.detail
    assert "PROTOAGG_KAFKA_BOOTSTRAP" in failure.fix


def test_a_missing_topic_fails_naming_it(good: Deployment, unique: str) -> None:
    topics = f"{good.kafka.topics},absent-{unique}"
    broken = replace(good, kafka=good.kafka.model_copy(update={"topics": topics}))
    [failure] = _failures(diagnose(broken))
    assert failure.check == "kafka topic" and f"absent-{unique}" in failure.detail


def test_postgres_unreachable_fails(good: Deployment) -> None:
    broken = replace(good, postgres_dsn="postgresql://nobody:x@127.0.0.1:1/none")
    [failure] = _failures(diagnose(broken))
    assert failure.check == "postgres" and "PROTOAGG_POSTGRES_DSN" in failure.fix


def test_a_user_without_rights_fails(good: Deployment, services: Services, unique: str) -> None:
    role = f"weak_{unique}"
    with psycopg.connect(services.postgres_admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'weak'").format(sql.Identifier(role)))
    dsn = good.postgres_dsn.replace(
        good.postgres_dsn.split("//", 1)[1].split("@", 1)[0], f"{role}:weak"
    )
    try:
        failures = _failures(diagnose(replace(good, postgres_dsn=dsn)))
    finally:
        with psycopg.connect(good.postgres_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with psycopg.connect(services.postgres_admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    [failure] = failures
    assert failure.check == "postgres rights"
    assert "SELECT/INSERT/UPDATE/DELETE on archive_batches" in failure.detail


def test_a_missing_bucket_fails_naming_the_bucket(good: Deployment, unique: str) -> None:
    broken = replace(good, gcs=good.gcs.model_copy(update={"bucket": f"absent-{unique}"}))
    [failure] = _failures(diagnose(broken))
    assert failure.check == "gcs bucket"
    assert f"absent-{unique}" in failure.detail and "PROTOAGG_GCS_BUCKET" in failure.fix


def test_a_bad_template_fails(good: Deployment) -> None:
    broken = replace(good, gcs=good.gcs.model_copy(update={"object_template": "{shard}.pb"}))
    [failure] = _failures(diagnose(broken))
    assert failure.check == "template" and "PROTOAGG_GCS_OBJECT" in failure.detail


def test_an_archive_of_another_compression_fails_saying_what_to_do(good: Deployment) -> None:
    existing = good.gcs.get_bucket().blob(good.gcs.object_template)
    existing.metadata = {LAST_APPEND_KEY: "1:records:4"}  # written uncompressed
    existing.upload_from_string(b"\x00\x00\x00\x00")
    zstd = replace(good, gcs=good.gcs.model_copy(update={"compression": "zstd"}))
    [failure] = _failures(diagnose(zstd))
    assert failure.check == "compression" and "'none'" in failure.detail
    assert "PROTOAGG_GCS_OBJECT" in failure.fix
    assert _failures(diagnose(good)) == []


def test_soft_delete_warns_with_the_estimate(
    good: Deployment, services: Services, proxy: GcsProxy
) -> None:
    proxy.present_bucket(services.bucket, BucketPolicy(soft_delete_seconds=7 * 86400))
    via_proxy = replace(good, gcs=good.gcs.model_copy(update={"emulator_host": proxy.url}))
    findings = diagnose(via_proxy)
    assert _failures(findings) == []
    warning = _by_check(findings)["gcs soft delete"]
    assert warning.status == "WARN"
    assert "each append keeps the previous copy for 7 days" in warning.detail
    assert "GiB-days" in warning.detail and "--clear-soft-delete" in warning.fix
    assert _by_check(findings)["gcs write"].status == "OK"  # the probe passed the rate limit


def test_a_retention_policy_fails(good: Deployment, services: Services, proxy: GcsProxy) -> None:
    proxy.present_bucket(services.bucket, BucketPolicy(retention_seconds=86400))
    via_proxy = replace(good, gcs=good.gcs.model_copy(update={"emulator_host": proxy.url}))
    failures = _failures(diagnose(via_proxy))
    assert [f.check for f in failures] == ["gcs write", "gcs retention policy"]  # probe undeletable
    assert "every append fails" in failures[1].detail


def test_the_run_queue_limit_is_checked(good: Deployment, tmp_path: Path) -> None:
    assert _by_check(diagnose(good))["dagster run queue"].status == "OK"  # deploy's limits
    plain = tmp_path / "dagster.yaml"
    plain.write_text("telemetry:\n  enabled: false\n")
    missing = _by_check(diagnose(replace(good, dagster_yaml=plain)))["dagster run queue"]
    assert missing.status == "WARN" and "QueuedRunCoordinator" in missing.detail
    two = tmp_path / "two.yaml"
    two.write_text(LOCAL_YAML.read_text().replace("limit: 1", "limit: 2"))
    backfill = _by_check(diagnose(replace(good, dagster_yaml=two)))["dagster run queue"]
    assert backfill.status == "WARN" and "protoagg/backfill-partition" in backfill.detail
    unset = _by_check(diagnose(replace(good, dagster_yaml=None)))["dagster run queue"]
    assert unset.status == "WARN" and "DAGSTER_HOME" in unset.detail


def test_a_slow_or_spinning_run_queue_is_a_warning(good: Deployment, tmp_path: Path) -> None:
    check = "dagster run queue interval"
    assert _by_check(diagnose(good))[check].status == "OK"  # deploy's 1 s
    cases = {
        "absent": ("    dequeue_interval_seconds: 1\n", "", "every 5 s (Dagster's default)"),
        "slow": ("dequeue_interval_seconds: 1", "dequeue_interval_seconds: 4", "2 s on average"),
        "spinning": ("dequeue_interval_seconds: 1", "dequeue_interval_seconds: 0", "without pause"),
    }
    for name, (setting, changed, said) in cases.items():
        assert setting in LOCAL_YAML.read_text()
        path = tmp_path / f"{name}.yaml"
        path.write_text(LOCAL_YAML.read_text().replace(setting, changed))
        finding = _by_check(diagnose(replace(good, dagster_yaml=path)))[check]
        assert finding.status == "WARN" and said in finding.detail, (name, finding.line())
        assert "dequeue_interval_seconds: 1" in finding.fix


def test_no_credentials_for_real_gcs_is_one_sentence_naming_both_ways_out(
    good: Deployment, tmp_path: Path
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "DAGSTER_HOME")
    }
    env.update(
        HOME=str(tmp_path),
        CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
        NO_GCE_CHECK="true",  # do not wait for a metadata server that is not there
        PROTOAGG_KAFKA_BOOTSTRAP=good.kafka.bootstrap_servers,
        PROTOAGG_TOPICS=good.kafka.topics,
        PROTOAGG_POSTGRES_DSN=good.postgres_dsn,
    )
    done = subprocess.run(
        [sys.executable, "-m", "protoagg_dagster.cli.main", "doctor", "--dagster-yaml", LOCAL_YAML],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    [line] = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert line.startswith("FAIL gcs credentials: no Google Cloud credentials")
    assert "STORAGE_EMULATOR_HOST" in line and "Application Default Credentials" in line


def _appended(
    conn: psycopg.Connection, run: str, obj: str, generation: int, size: int, dead: bool = False
) -> None:
    conn.execute(
        "INSERT INTO archive_batches (topic, partition, start_offset, end_offset, object_name, "
        "state, records, claimed, run_id, generation, object_size, appended_at, "
        "dead_letters_appended) VALUES ('t', 0, 0, 1, %s, 'appended', 1, 1, %s, %s, %s, "
        "now() - interval '1 hour', %s)",
        (obj, run, generation, size, dead),
    )


def test_the_bill_counts_operations_and_warns_when_they_cost_more_than_storage(
    good: Deployment,
) -> None:
    with psycopg.connect(good.postgres_dsn, autocommit=True) as conn:
        # Run r1 appended two partitions' ranges to a.pb in one piece and compose (generation 1)
        # and one range to b.pb with dead letters; run r2 one range to a.pb (generation 2).
        _appended(conn, "r1", "a.pb", 1, 100)
        _appended(conn, "r1", "a.pb", 1, 100)
        _appended(conn, "r1", "b.pb", 7, 50, dead=True)
        _appended(conn, "r2", "a.pb", 2, 300)
    bill = operations_bill_of(good)
    # 3 uploads + 1 dead-letter upload, 3 composes + 1 dead-letter compose in the last hour
    # (measured over at least the hour since the oldest), 350 bytes stored.
    assert bill.stored_bytes == 350
    assert bill.uploads_per_day == pytest.approx(4 * 24, rel=0.01)
    assert bill.composes_per_day == pytest.approx(4 * 24, rel=0.01)
    finding = _by_check(diagnose(good))["gcs bill"]
    # 350 bytes cost nothing to store; ~5,760 operations a month cost ~3 cents.
    assert finding.status == "WARN"
    assert "operations cost more than storage" in finding.detail


def test_a_fresh_ledger_bills_nothing(good: Deployment) -> None:
    finding = _by_check(diagnose(good))["gcs bill"]
    assert finding.status == "OK"
    assert "0 class A operations a month" in finding.detail


def operations_bill_of(d: Deployment) -> OperationsBill:
    with psycopg.connect(d.postgres_dsn, autocommit=True) as conn:
        return operations_bill(conn)
