import importlib

import dagster as dg
import pytest

from protoagg_dagster.core import settings
from protoagg_dagster.core.errors import ConfigError


def load_definitions() -> dg.Definitions:
    import protoagg_dagster.definitions as module

    return importlib.reload(module).defs


def test_definitions_load_and_every_job_sensor_and_schedule_resolves() -> None:
    defs = load_definitions()
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    assert {job.name for job in repo.get_all_jobs()} >= {
        "archive_kafka_batch",
        "maintain_archive",
        "prune_dagster_runs",
        "restore_archive",
        "iceberg_tables",
        "maintain_iceberg",
    }
    assert sorted(s.name for s in repo.sensor_defs) == [
        "iceberg_days_sensor",
        "kafka_offsets_sensor",
    ]
    assert sorted(s.name for s in repo.schedule_defs) == [
        "archive_maintenance",
        "dagster_run_retention",
        "iceberg_maintenance",
    ]
    retention = next(s for s in repo.schedule_defs if s.name == "dagster_run_retention")
    assert retention.default_status == dg.DefaultScheduleStatus.RUNNING
    assert set(repo.get_top_level_resources()) == {
        "io_manager",
        "kafka",
        "postgres",
        "gcs",
        "archiver",
        "lease",
        "iceberg",
    }


def test_secrets_are_wired_as_env_vars_not_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.POSTGRES_DSN.env, "postgresql://u:s3cret@db/x")
    monkeypatch.setenv(settings.KAFKA_SASL_PASSWORD.env, "hunter2")
    defs = load_definitions()
    dg.Definitions.validate_loadable(defs)
    resources = defs.resources or {}
    assert isinstance(resources["postgres"].dsn, dg.EnvVar)
    assert isinstance(resources["kafka"].sasl_password, dg.EnvVar)


def test_a_non_numeric_batch_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.BATCH_SIZE.env, "lots")
    with pytest.raises(ConfigError, match="PROTOAGG_BATCH_SIZE"):
        load_definitions()


def test_start_from_must_be_a_known_word_or_a_time() -> None:
    from protoagg_dagster.resources.settings import ArchiverSettings

    assert ArchiverSettings(start_from="latest").start_choice() == "latest"
    assert ArchiverSettings(start_from="1970-01-01T00:00:01.5Z").start_choice() == 1500
    with pytest.raises(ConfigError, match="PROTOAGG_START_FROM"):
        ArchiverSettings(start_from="yesterday").start_choice()


def test_each_topic_entry_is_its_own_asset_with_its_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(settings.TOPICS.env, "logs,orders.v1:record,/audit-.*/:record")
    monkeypatch.setenv(settings.GCS_OBJECT.env, "{topic}/{partition}.pb")
    defs = load_definitions()
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {"kafka_archive", "kafka_archive_logs"} <= keys
    assert any(k.startswith("kafka_archive_orders_v1_") for k in keys)
    assert any(k.startswith("kafka_archive_re_audit___") for k in keys)
    # A table per named topic, downstream of its archive; none for a pattern.
    assert "iceberg/logs" in keys
    (orders,) = [k for k in keys if k.startswith("iceberg/orders_v1_")]
    assert {
        k.to_user_string() for k in graph.get(dg.AssetKey.from_user_string(orders)).parent_keys
    } == {next(k for k in keys if k.startswith("kafka_archive_orders_v1_"))}
    assert not any(k.startswith("iceberg/") and "audit" in k for k in keys)
    checked = {key.asset_key.to_user_string() for key in graph.asset_check_keys}
    assert checked == keys


def test_a_template_that_would_mix_formats_in_one_object_fails_at_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(settings.TOPICS.env, "logs,orders:record")
    monkeypatch.delenv(settings.GCS_OBJECT.env, raising=False)
    with pytest.raises(ConfigError, match=r"'log.pb' would put topics archived as log and record"):
        load_definitions()
    monkeypatch.setenv(settings.GCS_OBJECT.env, "{topic}/{date}.pb")
    load_definitions()


def test_an_invalid_topic_entry_fails_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.TOPICS.env, "logs,/(unclosed/:record")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        load_definitions()


def test_compression_gives_the_default_names_their_suffix_and_explicit_ones_stay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(settings.COMPRESSION.env, "zstd")
    monkeypatch.setenv(settings.COMPRESSION_LEVEL.env, "5")
    monkeypatch.delenv(settings.GCS_OBJECT.env, raising=False)
    monkeypatch.setenv(settings.GCS_DEAD_LETTERS.env, "letters/{topic}.jsonl")
    gcs = (load_definitions().resources or {})["gcs"]
    assert (gcs.compression, gcs.compression_level) == ("zstd", 5)
    assert gcs.object_template == "log.pb.zst"
    assert isinstance(gcs.dead_letter_template, dg.EnvVar)  # as written


def test_an_unknown_compression_fails_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.COMPRESSION.env, "lz4")
    with pytest.raises(ConfigError, match="PROTOAGG_COMPRESSION"):
        load_definitions()


def test_dagsters_loader_finds_exactly_one_definitions() -> None:
    # workspace.yaml loads the module by name: Dagster refuses one with two Definitions at
    # module scope, which an import of `defs` alone does not show.
    from dagster._core.workspace.autodiscovery import loadable_targets_from_python_module

    targets = loadable_targets_from_python_module("protoagg_dagster.definitions", None)
    assert [target.attribute for target in targets] == ["defs"]
