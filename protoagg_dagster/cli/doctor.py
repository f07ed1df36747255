"""``protoagg doctor``: check a deployment end to end, one line per check, each with its fix.

Checks Kafka (reachable and logged in, topics present, the principal's ACLs on them),
PostgreSQL (reachable, schema, rights), GCS (credentials, the IAM permissions archiving needs,
bucket present and writable by a probe upload and delete, bucket settings that make appends
expensive or impossible), the object templates, and the Dagster instance's run queue (two runs
per partition, looked at every second). Every check runs even when an earlier one fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
import yaml
from google.api_core import exceptions as gexc
from kafka.errors import KafkaError

from protoagg_dagster import schema
from protoagg_dagster.archive.run_tags import BACKFILL_PARTITION_TAG
from protoagg_dagster.archive.usage import operations_bill
from protoagg_dagster.core.archive_object import TEMPLATE_FIELDS, validate_template
from protoagg_dagster.core.errors import AccessRefused, ProtoaggError
from protoagg_dagster.core.kafka_client import ARCHIVE_TOPIC_OPERATIONS
from protoagg_dagster.core.storage_bill import (
    bill_findings,
    expected_appends_per_day,
    operations_finding,
)
from protoagg_dagster.resources import GCSResource, KafkaResource
from protoagg_dagster.resources.postgres import _first_line

Status = Literal["OK", "WARN", "FAIL"]
UNKNOWN_TOPIC, TOPIC_AUTHORIZATION_FAILED = 3, 29  # Kafka's error codes
# What archiving does to the bucket (docs/operations.md, "Least privilege"): read its settings;
# list, read, create, compose (create + get) and replace or delete objects.
ARCHIVE_GCS_PERMISSIONS = (
    "storage.buckets.get",
    "storage.objects.list",
    "storage.objects.get",
    "storage.objects.create",
    "storage.objects.delete",
)
TABLES = ("archive_batches", "archive_positions", "processed_logs")
PROBE_PREFIX = "_protoagg/doctor/"


@dataclass(frozen=True)
class Finding:
    status: Status
    check: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4} {self.check}: {self.detail}" + (
            f" — fix: {self.fix}" if self.fix else ""
        )


@dataclass(frozen=True)
class Deployment:
    """What doctor checks, from the same settings the Dagster definitions use."""

    kafka: KafkaResource
    postgres_dsn: str
    gcs: GCSResource
    linger_seconds: float
    dagster_yaml: Path | None


def diagnose(deployment: Deployment) -> list[Finding]:
    checks: list[Callable[[Deployment], Iterator[Finding]]] = [
        _kafka,
        _postgres,
        _templates,
        _bucket,
        _run_queue,
    ]
    return [finding for check in checks for finding in check(deployment)]


def _kafka(d: Deployment) -> Iterator[Finding]:
    where = d.kafka.bootstrap_servers
    try:
        admin = d.kafka.get_admin()
    except ProtoaggError as exc:
        # A refusal names its setting; only "unreachable" needs the general advice.
        fix = (
            "" if isinstance(exc, AccessRefused) else "check PROTOAGG_KAFKA_BOOTSTRAP and security"
        )
        yield Finding("FAIL", "kafka", str(exc), fix)
        return
    try:
        topics = d.kafka.topic_list()
        described = {t["name"]: t for t in admin.describe_topics(topics)} if topics else {}
    except (KafkaError, ProtoaggError) as exc:
        yield Finding("FAIL", "kafka", f"{where} does not answer: {exc}", "check the brokers")
        return
    finally:
        admin.close()
    principal = d.kafka.client_settings().principal()
    yield Finding("OK", "kafka", f"{where} answers {principal}")
    for topic in topics:
        yield _topic_access(topic, described.get(topic, {}), where, principal)


def _topic_access(topic: str, described: dict[str, Any], where: str, principal: str) -> Finding:
    """The topic exists and ``principal`` holds the ACLs archiving needs on it."""
    code = described.get("error_code", UNKNOWN_TOPIC)
    if code == TOPIC_AUTHORIZATION_FAILED:
        return Finding(
            "FAIL",
            "kafka acl",
            f"{principal} may not DESCRIBE topic {topic!r} on {where}",
            f"grant {principal} {' and '.join(ARCHIVE_TOPIC_OPERATIONS)} on Topic {topic!r} "
            "(docs/operations.md, Least privilege)",
        )
    if code != 0:
        return Finding(
            "FAIL",
            "kafka topic",
            f"{topic!r} does not exist on {where}",
            "create it, or fix PROTOAGG_TOPICS",
        )
    # Kafka says which operations the principal may perform (KIP-430); nothing when no
    # authorizer is configured (every operation is allowed) or from brokers before 2.3.
    allowed = described.get("authorized_operations") or []
    missing = [op for op in ARCHIVE_TOPIC_OPERATIONS if allowed and op not in allowed]
    if missing:
        return Finding(
            "FAIL",
            "kafka acl",
            f"{principal} may not {' or '.join(missing)} topic {topic!r}",
            f"grant {principal} {' and '.join(missing)} on Topic {topic!r} "
            "(docs/operations.md, Least privilege)",
        )
    held = f"; {principal} may {' and '.join(ARCHIVE_TOPIC_OPERATIONS)} it" if allowed else ""
    return Finding("OK", "kafka topic", f"{topic!r} present{held}")


def _postgres(d: Deployment) -> Iterator[Finding]:
    try:
        conn = psycopg.connect(d.postgres_dsn, connect_timeout=10, autocommit=True)
    except psycopg.OperationalError as exc:
        yield Finding(
            "FAIL",
            "postgres",
            f"cannot connect: {_first_line(exc)}",
            "check PROTOAGG_POSTGRES_DSN (host, port, user, password, database)",
        )
        return
    with conn:
        yield Finding("OK", "postgres", "connected")
        missing = [
            t for t in TABLES if conn.execute("SELECT to_regclass(%s)", (t,)).fetchone() == (None,)
        ]
        can_create = conn.execute(
            "SELECT has_schema_privilege(current_schema(), 'CREATE')"
        ).fetchone() == (True,)
        if missing and can_create:
            yield Finding(
                "OK", "postgres schema", f"not created yet ({', '.join(missing)}): the first run "
                "creates it (this user may CREATE)"
            )  # fmt: skip
        elif missing:
            yield Finding(
                "FAIL",
                "postgres schema",
                f"tables {', '.join(missing)} are missing and this user may not create them",
                "GRANT CREATE ON SCHEMA public TO the protoagg user, or create the schema as its "
                "owner once",
            )
        lacking = [
            t
            for t in TABLES
            if t not in missing
            and conn.execute(
                "SELECT has_table_privilege(%s, 'SELECT,INSERT,UPDATE,DELETE')", (t,)
            ).fetchone()
            != (True,)
        ]
        if lacking:
            yield Finding(
                "FAIL",
                "postgres rights",
                "missing " + ", ".join(f"SELECT/INSERT/UPDATE/DELETE on {t}" for t in lacking),
                "GRANT them to the protoagg user",
            )
        elif not missing:
            yield _schema_version(conn)
        if not missing and not lacking:
            yield from _operations(conn)


def _operations(conn: psycopg.Connection) -> Iterator[Finding]:
    bill = operations_bill(conn)
    finding = operations_finding(bill)
    if finding is None:
        yield Finding("OK", "gcs bill", bill.line())
    else:
        yield Finding(finding.level, "gcs bill", finding.detail, finding.fix)


def _schema_version(conn: psycopg.Connection) -> Finding:
    reached = schema.version(conn)
    if reached < schema.LATEST:
        return Finding(
            "WARN",
            "postgres schema",
            f"version {reached}, this protoagg's is {schema.LATEST}: the first run upgrades it",
            "run `protoagg schema upgrade` before starting the new release's runs",
        )
    if reached > schema.LATEST:
        return Finding(
            "FAIL",
            "postgres schema",
            f"version {reached} is newer than this protoagg knows ({schema.LATEST})",
            "run the protoagg release that upgraded the database, or a newer one",
        )
    return Finding("OK", "postgres schema", f"version {reached}, tables present, rights sufficient")


def _templates(d: Deployment) -> Iterator[Finding]:
    for setting, template in (
        ("PROTOAGG_GCS_OBJECT", d.gcs.object_template),
        ("PROTOAGG_GCS_DEAD_LETTERS", d.gcs.dead_letter_template),
    ):
        try:
            validate_template(template, setting)
        except ProtoaggError as exc:
            yield Finding("FAIL", "template", str(exc), f"use only {sorted(TEMPLATE_FIELDS)}")
        else:
            yield Finding("OK", "template", f"{setting}={template}")


def _bucket(d: Deployment) -> Iterator[Finding]:
    url = f"gs://{d.gcs.bucket}"
    try:
        d.gcs.get_client()
    except ProtoaggError as exc:
        yield Finding("FAIL", "gcs credentials", str(exc))
        return
    try:
        settings = d.gcs.bucket_settings()
    except gexc.Forbidden as exc:
        yield Finding("FAIL", "gcs bucket", f"no permission on {url}: {exc.message}", _ROLES)
        return
    except (ProtoaggError, gexc.GoogleAPIError) as exc:
        fix = f"create {url} or fix PROTOAGG_GCS_BUCKET" if "does not exist" in str(exc) else ""
        yield Finding("FAIL", "gcs bucket", str(exc), fix)
        return
    yield from _permissions(d, url)
    yield from _probe(d, url)
    archive = None
    if not any(f"{{{field}}}" in d.gcs.object_template for field in TEMPLATE_FIELDS):
        archive = d.gcs.object_settings(d.gcs.object_template)
    if archive is not None and archive.compression != d.gcs.compression:
        yield Finding(
            "FAIL",
            "compression",
            f"{url}/{archive.name} is compressed with {archive.compression!r} and "
            f"PROTOAGG_COMPRESSION is {d.gcs.compression!r}: its next append would be refused",
            "keep the object's compression, or point PROTOAGG_GCS_OBJECT at a new object name",
        )
    partitions = _partition_count(d.kafka)
    findings = bill_findings(
        settings, archive, expected_appends_per_day(partitions, d.linger_seconds)
    )
    for finding in findings:
        yield Finding(finding.level, "gcs " + finding.setting, finding.detail, finding.fix)
    if not findings:
        yield Finding(
            "OK",
            "gcs bucket settings",
            f"no soft delete, no versioning, {settings.storage_class}, no retention policy",
        )


def _permissions(d: Deployment, url: str) -> Iterator[Finding]:
    """The IAM permissions archiving needs on the bucket, as GCS's testIamPermissions tells."""
    if d.gcs.emulator_host:
        return  # the emulator has no IAM: every caller may do everything
    bucket = d.gcs.get_client().bucket(d.gcs.bucket)
    try:
        granted = set(bucket.test_iam_permissions(list(ARCHIVE_GCS_PERMISSIONS)))
    except gexc.GoogleAPIError as exc:
        yield Finding("WARN", "gcs permissions", f"cannot test them on {url}: {exc}")
        return
    missing = [p for p in ARCHIVE_GCS_PERMISSIONS if p not in granted]
    if missing:
        yield Finding("FAIL", "gcs permissions", f"missing on {url}: {', '.join(missing)}", _ROLES)
    else:
        yield Finding("OK", "gcs permissions", f"{', '.join(ARCHIVE_GCS_PERMISSIONS)} on {url}")


def _probe(d: Deployment, url: str) -> Iterator[Finding]:
    blob = d.gcs.get_client().bucket(d.gcs.bucket).blob(f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    try:
        blob.upload_from_string(b"protoagg doctor probe", if_generation_match=0)
        # With a generation the delete is retried on 429: GCS allows about one write a second
        # per object name, and this is the second in a row.
        blob.delete(if_generation_match=blob.generation)
    except gexc.Forbidden as exc:
        yield Finding("FAIL", "gcs write", f"cannot write to {url}: {exc.message}", _ROLES)
    except gexc.GoogleAPIError as exc:
        yield Finding("FAIL", "gcs write", f"probe upload/delete in {url} failed: {exc}")
    else:
        yield Finding("OK", "gcs write", f"{url} present; probe object uploaded and deleted")


_ROLES = (
    "grant the service account roles/storage.objectUser on the bucket (create, read, compose "
    "and delete objects), plus storage.buckets.get (e.g. roles/storage.legacyBucketReader) for "
    "the settings checks"
)


def _partition_count(kafka: KafkaResource) -> int:
    try:
        return sum(len(kafka.offset_bounds(topic)) for topic in kafka.topic_list())
    except ProtoaggError:
        return 1


def _run_queue(d: Deployment) -> Iterator[Finding]:
    check = "dagster run queue"
    if d.dagster_yaml is None:
        yield Finding(
            "WARN", check, "DAGSTER_HOME is not set: cannot read the instance's dagster.yaml",
            "set DAGSTER_HOME (or pass --dagster-yaml) to check the run-queue limit",
        )  # fmt: skip
        return
    try:
        config: Any = yaml.safe_load(d.dagster_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        yield Finding("FAIL", check, f"cannot read {d.dagster_yaml}: {exc}")
        return
    coordinator = config.get("run_coordinator") or {}
    yield _partition_limit(d.dagster_yaml, coordinator)
    if coordinator.get("class") == "QueuedRunCoordinator":
        yield _dequeue_interval(d.dagster_yaml, coordinator.get("config") or {})


def _partition_limit(path: Path, coordinator: dict[str, Any]) -> Finding:
    """The queue's limits: one worker per partition rests on the leases, not on the queue.

    A sensor run archives many partitions, so no tag limit per partition can apply to it: the
    sensor keeps at most a run and its follow-up per partition in flight, and the partitions'
    leases let one run at a time work each. Only a backfill, which queues many runs of one
    partition at once, needs the queue to start them one at a time, in order.
    """
    check = "dagster run queue"
    if coordinator.get("class") != "QueuedRunCoordinator":
        return Finding(
            "WARN",
            check,
            f"{path} has no QueuedRunCoordinator: every run starts at once, however many, and "
            "a backfill's runs of one partition start together and wait for each other's lease",
            "copy run_coordinator from deploy/dagster.production.yaml",
        )
    limits = (coordinator.get("config") or {}).get("tag_concurrency_limits") or []
    per_backfill = [
        limit.get("limit")
        for limit in limits
        if isinstance(limit, dict)
        and limit.get("key") == BACKFILL_PARTITION_TAG
        and isinstance(limit.get("value"), dict)
        and limit["value"].get("applyLimitPerUniqueValue") is True
    ]
    if per_backfill != [1]:
        return Finding(
            "WARN",
            check,
            f"{path} has no limit of 1 per {BACKFILL_PARTITION_TAG} value: a backfill's runs of "
            "one partition can start together and wait for each other's lease (slower, still "
            "correct)",
            "copy run_coordinator from deploy/dagster.production.yaml",
        )
    return Finding(
        "OK",
        check,
        f"queued runs, a backfill's runs of one partition one at a time ({path}); the sensor "
        "and the partitions' leases keep one worker per partition",
    )


# Dagster's QueuedRunCoordinator looks at its queue this often when the setting is absent.
DAGSTER_DEQUEUE_INTERVAL_DEFAULT = 5


def _dequeue_interval(path: Path, config: dict[str, Any]) -> Finding:
    """Every queued run waits for the run queue's next look: half the interval on average."""
    check = "dagster run queue interval"
    interval = config.get("dequeue_interval_seconds", DAGSTER_DEQUEUE_INTERVAL_DEFAULT)
    if not isinstance(interval, int):
        return Finding("OK", check, f"dequeue_interval_seconds set from the environment ({path})")
    if interval == 1:
        return Finding("OK", check, f"the run queue is looked at every second ({path})")
    fix = "set run_coordinator.config.dequeue_interval_seconds: 1, as in deploy/dagster.*.yaml"
    if interval <= 0:
        return Finding(
            "WARN",
            check,
            f"{path} sets dequeue_interval_seconds: {interval}: the daemon queries the run "
            "queue without pause, a CPU core's worth of queries against the run storage",
            fix,
        )
    absent = "" if "dequeue_interval_seconds" in config else " (Dagster's default)"
    return Finding(
        "WARN",
        check,
        f"{path} has the run queue looked at every {interval} s{absent}: each run waits "
        f"{interval / 2:g} s on average before it starts, on top of the sensor's tick",
        fix,
    )
