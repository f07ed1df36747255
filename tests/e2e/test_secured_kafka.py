"""Through the secured broker as a user would run protoagg: ``dagster dev`` archiving with each
reader, every CLI command, and a wrong password that fails once, in words, and stays unwritten.

The secret tests grep everything a deployment keeps (SQLite run, event and schedule storage,
compute logs, run config, the daemon's log) for the passwords: the settings reach Dagster as
``EnvVar`` names only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import WILL_RETRY_TAG

from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.run_tags import range_run_config
from tests.conftest import ROOT, Services
from tests.helpers import archived_to_end, log_value
from tests.support.dagster_deployment import DAGSTER, DagsterDeployment, run_summaries, settled
from tests.support.dagster_web import free_port
from tests.support.secured_kafka import PASSWORD, SecuredKafka

EXAMPLES = ROOT / "examples" / "messages.jsonl"
WRONG_PASSWORD = "wrong-Kafka-pw-31"


def _wait(
    what: str, condition: Callable[[], bool], seconds: float, alive: Callable[[], None]
) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        alive()
        assert time.monotonic() < deadline, f"{what}: not within {seconds:.0f} s"
        time.sleep(0.5)


def _protoagg(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "protoagg_dagster.cli.main", *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
            return True
    except OSError:
        return False


def _files_holding(root: Path, secrets: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s!r}" for s in secrets if s.encode() in data]
    return found


def _env(
    secured: dict[str, str], services: Services, dsn: str, topic: str, unique: str, client: str
) -> dict[str, str]:
    return {
        **secured,
        "PROTOAGG_KAFKA_CLIENT": client,
        "PROTOAGG_TOPICS": topic,
        "PROTOAGG_POSTGRES_DSN": dsn,
        "PROTOAGG_GCS_BUCKET": services.bucket,
        "PROTOAGG_GCS_OBJECT": f"{unique}/log.pb",
        "STORAGE_EMULATOR_HOST": services.gcs_url,
        "PROTOAGG_LINGER_SECONDS": "1",
    }


@pytest.mark.parametrize(("client", "login"), [("kafka-python", "scram"), ("confluent", "mtls")])
def test_archive_and_every_command_work_through_the_secured_broker(
    secured_kafka: SecuredKafka,
    services: Services,
    postgres_dsn: str,
    unique: str,
    tmp_path: Path,
    client: str,
    login: str,
) -> None:
    topic = f"sec-{unique}"
    secured = secured_kafka.scram_env() if login == "scram" else secured_kafka.mtls_env()
    env = _env(secured, services, postgres_dsn, topic, unique, client)
    produced = _protoagg(env, "produce", str(EXAMPLES), "--topic", topic, "--partitions", "1")
    assert produced.returncode == 0, produced.stderr
    assert "sent 312 messages" in produced.stdout
    port = free_port()
    deployment = DagsterDeployment("secured", tmp_path / "home", env, dev_port=port)

    def alive() -> None:
        assert deployment.running(), deployment.log_tail()

    try:
        deployment.start()
        _wait("archived", lambda: archived_to_end(postgres_dsn, topic, 1, 312), 240, alive)
        _wait("the webserver answers", lambda: _answers(port), 120, alive)
        backfill = _protoagg(
            env, "backfill", "--topic", topic, "--from-offset", "0", "--to-offset", "312",
            "--dagster", f"127.0.0.1:{port}", "--no-wait",
        )  # fmt: skip
        assert backfill.returncode == 0, backfill.stdout + backfill.stderr
        assert "already archived" in backfill.stdout
        _wait("runs settled", lambda: settled(deployment), 120, alive)
    finally:
        deployment.stop()
    runs = [r for r in run_summaries(deployment) if r.job_name == "archive_kafka_batch"]
    assert runs and all(r.status == "SUCCESS" for r in runs), [r.errors for r in runs]

    url = f"gs://{services.bucket}/{unique}/log.pb"
    verified = _protoagg(env, "verify", url, "--against-kafka")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    restored = _protoagg(env, "restore", url, "--to-topic", f"{topic}-again", "--create-topic")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "restored 300 records" in restored.stdout
    doctor = _protoagg(env, "doctor")
    kafka_lines = [line for line in doctor.stdout.splitlines() if " kafka" in line]
    assert kafka_lines and all(line.startswith("OK") for line in kafka_lines), doctor.stdout

    secrets = [PASSWORD, secured_kafka.pki.client_key_password]
    assert _files_holding(tmp_path / "home", secrets) == []


def test_a_wrong_password_fails_the_run_once_in_words_and_the_sensor_in_one_line(
    secured_kafka: SecuredKafka,
    services: Services,
    postgres_dsn: str,
    unique: str,
    tmp_path: Path,
) -> None:
    topic = f"sec-{unique}"
    secured_kafka.create_topic(topic)
    writer = secured_kafka.resource(secured_kafka.scram_env(), topics=topic)
    producer = writer.get_producer()
    for _ in range(20):
        producer.send(topic, value=log_value(), partition=0)
    producer.close()
    wrong = secured_kafka.scram_env(password=WRONG_PASSWORD)
    env = _env(wrong, services, postgres_dsn, topic, unique, "kafka-python")
    deployment = DagsterDeployment("wrong", tmp_path / "home", env)

    def alive() -> None:
        assert deployment.running(), deployment.log_tail()

    def refusals_logged() -> int:
        text = deployment.log_path.read_text(errors="replace")
        return text.count("Kafka authentication failed")

    try:
        deployment.start()
        _wait("the sensor's first refusal", lambda: refusals_logged() >= 1, 180, alive)
        launched = subprocess.run(
            [str(DAGSTER), "job", "launch", "-w", str(ROOT / "workspace.yaml"),
             "-j", "archive_kafka_batch", "--config-json",
             json.dumps(range_run_config(topic, 0, 0, 20))],
            cwd=ROOT, env={**env, "DAGSTER_HOME": str(deployment.home), "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert launched.returncode == 0, launched.stdout + launched.stderr

        def failed_and_judged() -> bool:
            """The run failed and run retries decided (the will_retry tag) whether to retry."""
            # Only the archive job's: an hourly upkeep schedule may fire (and succeed, with no
            # such tag) while the test waits, as it did in a clean run at 16:15 UTC.
            with deployment.instance() as instance:
                runs = instance.get_runs(dg.RunsFilter(job_name=archive_kafka_batch.name))
            return bool(runs) and all(WILL_RETRY_TAG in r.tags for r in runs)

        _wait("the launched run failed", failed_and_judged, 180, alive)
        log = deployment.log_path.read_text(errors="replace")
    finally:
        deployment.stop()
    # No run retry was launched. Only the archive job's runs: the hourly upkeep (:17) and
    # retention (:47) schedules fire while the test runs in two of its sixty minutes.
    [run] = [r for r in run_summaries(deployment) if r.job_name == archive_kafka_batch.name]
    assert run.status == "FAILURE"
    assert run.step_retries == []  # nor a step retry
    assert run.will_retry is False
    with deployment.instance() as instance:
        failures = [
            entry.dagster_event.step_failure_data.error.message
            for entry in instance.all_logs(run.run_id)
            if entry.dagster_event is not None and entry.dagster_event.is_step_failure
        ]
    # What the run shows: the refusal's one sentence (its causes stay chained below it).
    assert len(failures) == 1 and "Kafka authentication failed at" in failures[0], failures
    assert run.work_start is not None and run.end_time is not None
    assert run.end_time - run.work_start < 10
    # The sensor: one line per refused tick, no traceback, and the ticks after wait.
    sensor_lines = [line for line in log.splitlines() if "Kafka authentication failed" in line]
    print("\n".join(sensor_lines))
    assert "Traceback" not in log
    assert all("PROTOAGG_KAFKA_SASL_PASSWORD" in line for line in sensor_lines)

    assert _files_holding(tmp_path / "home", [WRONG_PASSWORD, PASSWORD]) == []
