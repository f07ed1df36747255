"""The deployment configs load through Dagster's own config schemas, and Helm's values render the
same instance as deploy/dagster.k8s.yaml."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
ENV = {
    "DAGSTER_PG_HOST": "pg",
    "DAGSTER_PG_USER": "dagster",
    "DAGSTER_PG_PASSWORD": "secret",
    "DAGSTER_PG_DB": "dagster",
    "DAGSTER_K8S_JOB_NAMESPACE": "protoagg",
}


def _load_instance(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    shutil.copy(DEPLOY / name, tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    return dict(config)


def _k8s_launcher() -> Any:
    with warnings.catch_warnings():
        # dagster-k8s 0.29.27 beside dagster 1.13.28: see pyproject.toml, extra `k8s`.
        warnings.simplefilter("ignore", UserWarning)
        from dagster_k8s import K8sRunLauncher
    return K8sRunLauncher


@pytest.mark.parametrize(
    "name", ["dagster.k8s.yaml", "dagster.production.yaml", "dagster.local.yaml"]
)
def test_instance_configs_pass_dagsters_schema(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _load_instance(tmp_path, name, monkeypatch)
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["run_retries"]["enabled"] is True
    assert config["run_monitoring"]["enabled"] is True


def test_the_k8s_launchers_config_passes_its_own_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _load_instance(tmp_path, "dagster.k8s.yaml", monkeypatch)
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    result = process_config(_k8s_launcher().config_type(), launcher["config"])
    assert result.success, result.errors
    assert result.value["job_namespace"] == "protoagg"
    assert result.value["env_secrets"] == ["protoagg-secrets"]


def test_a_wrong_launcher_setting_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _load_instance(tmp_path, "dagster.k8s.yaml", monkeypatch)
    bad = {**config["run_launcher"]["config"], "env_secret": ["typo"]}
    assert not process_config(_k8s_launcher().config_type(), bad).success


def _render_helm(values: dict[str, Any]) -> dict[str, Any]:
    """The parts of the chart's instance ConfigMap that protoagg sets, as its templates map them
    (helm/dagster/templates/helpers/instance/_run-launcher.tpl and _run-coordinator.tpl)."""
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    run_k8s = k8s["runK8sConfig"]
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    return {
        "run_launcher": {
            "module": "dagster_k8s",
            "class": "K8sRunLauncher",
            "config": {
                "load_incluster_config": k8s["loadInclusterConfig"],
                "job_namespace": "protoagg",  # the release's namespace
                "image_pull_policy": k8s["imagePullPolicy"],
                "dagster_home": values.get("global", {}).get(
                    "dagsterHome", "/opt/dagster/dagster_home"
                ),
                # "<release>-dagster-instance" for a release named protoagg.
                "instance_config_map": "protoagg-dagster-instance",
                "postgres_password_secret": values["global"]["postgresqlSecretName"],
                "env_config_maps": [item["name"] for item in k8s["envConfigMaps"]],
                "env_secrets": [item["name"] for item in k8s["envSecrets"]],
                "labels": k8s["labels"],
                "run_k8s_config": {
                    "container_config": run_k8s["containerConfig"],
                    "job_spec_config": run_k8s["jobSpecConfig"],
                },
            },
        },
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {
                "max_concurrent_runs": queued["maxConcurrentRuns"],
                "tag_concurrency_limits": queued["tagConcurrencyLimits"],
                "dequeue_interval_seconds": queued["dequeueIntervalSeconds"],
            },
        },
        "run_monitoring": {
            "enabled": monitoring["enabled"],
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "cancel_timeout_seconds": monitoring["cancelTimeoutSeconds"],
            "max_runtime_seconds": monitoring["maxRuntimeSeconds"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
        },
        "run_retries": {
            "enabled": values["dagsterDaemon"]["runRetries"]["enabled"],
            "max_retries": values["dagsterDaemon"]["runRetries"]["maxRetries"],
        },
    }


def test_helm_values_render_the_k8s_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    rendered = _render_helm(values)
    instance = _load_instance(tmp_path, "dagster.k8s.yaml", monkeypatch)
    launcher = process_config(_k8s_launcher().config_type(), rendered["run_launcher"]["config"])
    assert launcher.success, launcher.errors
    expected = dict(instance["run_launcher"]["config"])
    # Helm adds the chart's own service account; the file names one for deployments without it.
    expected.pop("service_account_name")
    # The chart fills in the release's namespace where the file reads it from the environment.
    expected["job_namespace"] = ENV["DAGSTER_K8S_JOB_NAMESPACE"]
    assert rendered["run_launcher"]["config"] == expected
    for key in ("run_coordinator", "run_monitoring", "run_retries"):
        assert rendered[key] == instance[key], key
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", "protoagg_dagster.definitions"]
    assert values["postgresql"]["enabled"] is False
