"""docker-compose.yml and the Dockerfile agree with the code.

No Docker engine runs the compose file in CI, so this test is what keeps it correct: service
names, images, published ports, the environment of the Dagster services (only the settings the
code reads, pointed at the other containers) and the files the containers mount or load.
"""

from __future__ import annotations

import shlex
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from protoagg_dagster.archive.run_tags import BACKFILL_PARTITION_TAG, PARTITION_TAG
from protoagg_dagster.core import settings
from protoagg_dagster.services import postgres as postgres_service
from protoagg_dagster.services.stack import Ports

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

DAGSTER_SERVICES = ("dagster-webserver", "dagster-daemon")
SERVICES = ("kafka", "postgres", "gcs", *DAGSTER_SERVICES)
WEBSERVER_PORT = 3000
PORTS = Ports()

# The settings that the Dagster services must point at the other containers.
REQUIRED_SETTINGS = (
    settings.KAFKA_BOOTSTRAP,
    settings.TOPICS,
    settings.POSTGRES_DSN,
    settings.GCS_BUCKET,
    settings.GCS_OBJECT,
    settings.STORAGE_EMULATOR_HOST,
)
ALLOWED_ENV = {setting.env for setting in settings.ALL_SETTINGS} | {"DAGSTER_HOME"}


# -- reading the compose file ------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as handle:
        loaded = yaml.safe_load(handle)
    assert isinstance(loaded, dict), "docker-compose.yml is not a mapping"
    return loaded


def service(name: str) -> dict[str, Any]:
    services = compose().get("services") or {}
    assert name in services, f"docker-compose.yml has no service {name!r}"
    config = services[name]
    assert isinstance(config, dict), f"service {name!r} is not a mapping"
    return config


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def environment(name: str) -> dict[str, str]:
    """The service's environment, from either the mapping or the list form."""
    raw = service(name).get("environment") or {}
    if isinstance(raw, dict):
        return {key: _scalar(value) for key, value in raw.items()}
    pairs = (item.split("=", 1) for item in raw)
    return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}


def command(name: str) -> list[str]:
    raw = service(name).get("command")
    assert raw, f"service {name!r} has no command"
    return shlex.split(raw) if isinstance(raw, str) else [str(arg) for arg in raw]


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} is missing from {args}"
    index = args.index(name)
    assert index + 1 < len(args), f"{name} has no value in {args}"
    return args[index + 1]


def published(name: str) -> dict[int, int]:
    """Host port -> container port for every port the service publishes."""
    mappings: dict[int, int] = {}
    for entry in service(name).get("ports") or []:
        if isinstance(entry, dict):
            if "published" in entry:
                mappings[int(entry["published"])] = int(entry["target"])
            continue
        parts = str(entry).split("/", 1)[0].rsplit(":", 2)
        if len(parts) >= 2:  # a bare container port publishes on a random host port
            mappings[int(parts[-2])] = int(parts[-1])
    return mappings


def mounts(name: str) -> dict[str, str]:
    """Container path -> source (a named volume or a host path) for every mount."""
    result: dict[str, str] = {}
    for entry in service(name).get("volumes") or []:
        if isinstance(entry, dict):
            result[str(entry["target"])] = str(entry.get("source", ""))
            continue
        parts = str(entry).split(":")
        if len(parts) >= 2:
            result[parts[1]] = parts[0]
    return result


def host_path(source: str) -> Path:
    assert source.startswith(("./", "../", "/")), f"{source!r} is not a host path"
    return (COMPOSE_FILE.parent / source).resolve()


def endpoints(listeners: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` -> {NAME: (host, port)}."""
    result: dict[str, tuple[str, int]] = {}
    for item in settings.split_list(listeners):
        listener, _, address = item.partition("://")
        host, _, port = address.rpartition(":")
        result[listener] = (host, int(port))
    return result


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# -- the services ------------------------------------------------------------------------------


def test_all_services_exist() -> None:
    services = compose().get("services") or {}
    missing = set(SERVICES) - set(services)
    assert not missing, f"docker-compose.yml lacks services {sorted(missing)}"


def test_kafka_is_a_single_kraft_node_without_zookeeper() -> None:
    kafka = service("kafka")
    assert str(kafka.get("image", "")).startswith("apache/kafka:")
    env = environment("kafka")
    assert set(settings.split_list(env.get("KAFKA_PROCESS_ROLES", ""))) == {
        "broker",
        "controller",
    }
    node_id = env.get("KAFKA_NODE_ID", "")
    assert node_id, "KAFKA_NODE_ID is not set"
    controllers = env.get("KAFKA_CONTROLLER_LISTENER_NAMES", "")
    assert controllers, "KAFKA_CONTROLLER_LISTENER_NAMES is not set"
    controller_ports = {
        port
        for listener, (_, port) in endpoints(env.get("KAFKA_LISTENERS", "")).items()
        if listener in settings.split_list(controllers)
    }
    voters = settings.split_list(env.get("KAFKA_CONTROLLER_QUORUM_VOTERS", ""))
    assert voters, "KAFKA_CONTROLLER_QUORUM_VOTERS is not set"
    for voter in voters:
        voter_id, _, address = voter.partition("@")
        assert voter_id == node_id, f"quorum voter {voter} is not this node ({node_id})"
        assert host_port(address) == ("kafka", *controller_ports), (
            f"quorum voter {voter} is not the controller listener {controller_ports}"
        )
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env.get(key) == "1", f"{key} must be 1 on a single node"
    assert env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE") == "true"
    everything = yaml.safe_dump(compose()).lower()
    assert "zookeeper" not in everything, "KRaft mode: nothing may refer to ZooKeeper"


def test_images() -> None:
    assert str(service("postgres").get("image", "")).startswith("postgres:15")
    assert str(service("gcs").get("image", "")).startswith("fsouza/fake-gcs-server")
    for name in DAGSTER_SERVICES:
        build = service(name).get("build")
        context = build.get("context", ".") if isinstance(build, dict) else build
        assert context == ".", f"{name} must be built from the project root"


@pytest.mark.parametrize("name", ["kafka", "postgres"])
def test_dependencies_with_health_conditions_have_health_checks(name: str) -> None:
    assert service(name).get("healthcheck", {}).get("test"), f"{name} has no health check"
    for dagster in DAGSTER_SERVICES:
        depends_on = service(dagster).get("depends_on")
        assert isinstance(depends_on, dict), f"{dagster} must use depends_on conditions"
        assert depends_on.get(name, {}).get("condition") == "service_healthy", (
            f"{dagster} must wait for {name} to be healthy"
        )


def test_dagster_services_depend_on_every_backend() -> None:
    for dagster in DAGSTER_SERVICES:
        depends_on = service(dagster).get("depends_on") or {}
        for name in ("kafka", "postgres", "gcs"):
            assert name in depends_on, f"{dagster} does not depend on {name}"
            condition = depends_on[name].get("condition")
            if condition == "service_healthy":
                assert service(name).get("healthcheck"), (
                    f"{dagster} waits for {name} to be healthy, but it has no health check"
                )


# -- ports -------------------------------------------------------------------------------------


def test_kafka_publishes_its_external_listener_on_the_default_port() -> None:
    env = environment("kafka")
    advertised = endpoints(env["KAFKA_ADVERTISED_LISTENERS"])
    bound = endpoints(env["KAFKA_LISTENERS"])
    # The host-side default bootstrap address of the CLI is advertised and published.
    default = host_port(settings.KAFKA_BOOTSTRAP.default)
    assert default[1] == PORTS.kafka
    listener = next((name for name, address in advertised.items() if address == default), None)
    assert listener is not None, (
        f"Kafka does not advertise the default bootstrap {settings.KAFKA_BOOTSTRAP.default}"
    )
    assert published("kafka").get(PORTS.kafka) == bound[listener][1], (
        f"host port {PORTS.kafka} does not reach Kafka's {listener} listener"
    )


def test_postgres_is_published_on_the_default_port() -> None:
    default = urlsplit(settings.POSTGRES_DSN.default)
    assert default.port == PORTS.postgres
    assert PORTS.postgres in published("postgres"), f"host port {PORTS.postgres} not published"
    # PostgreSQL listens on 5432 in the container; the in-network DSN uses it too.
    dsn = urlsplit(environment(DAGSTER_SERVICES[0])[settings.POSTGRES_DSN.env])
    assert published("postgres")[PORTS.postgres] == dsn.port


def test_gcs_is_published_on_the_default_port() -> None:
    port = int(flag(command("gcs"), "-port"))
    assert published("gcs").get(PORTS.gcs) == port, (
        f"host port {PORTS.gcs} does not reach the emulator's -port {port}"
    )


def test_webserver_is_published_on_its_port() -> None:
    port = int(flag(command("dagster-webserver"), "-p"))
    assert published("dagster-webserver").get(WEBSERVER_PORT) == port


# -- the Dagster services' environment ---------------------------------------------------------


@pytest.mark.parametrize("name", DAGSTER_SERVICES)
def test_dagster_environment_uses_only_the_settings_vocabulary(name: str) -> None:
    env = environment(name)
    unknown = set(env) - ALLOWED_ENV
    assert not unknown, f"{name} sets variables the code never reads: {sorted(unknown)}"
    missing = {setting.env for setting in REQUIRED_SETTINGS} - set(env)
    assert not missing, f"{name} does not set {sorted(missing)}"
    assert env.get("DAGSTER_HOME"), f"{name} does not set DAGSTER_HOME"
    for setting in REQUIRED_SETTINGS:
        assert env[setting.env].strip(), f"{name} sets {setting.env} to nothing"


def test_dagster_services_share_one_configuration() -> None:
    webserver, daemon = (environment(name) for name in DAGSTER_SERVICES)
    assert webserver == daemon
    home = webserver["DAGSTER_HOME"]
    sources = {mounts(name).get(home) for name in DAGSTER_SERVICES}
    assert len(sources) == 1, f"DAGSTER_HOME {home} is not the same volume in both: {sources}"
    (volume,) = sources
    assert volume in (compose().get("volumes") or {}), (
        f"DAGSTER_HOME {home} must be a named volume shared by the Dagster services"
    )


def test_postgres_dsn_matches_the_postgres_service() -> None:
    env = environment("postgres")
    expected = (
        postgres_service.APP_USER,
        postgres_service.APP_PASSWORD,
        postgres_service.APP_DATABASE,
    )
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]) == expected
    for name in DAGSTER_SERVICES:
        dsn = urlsplit(environment(name)[settings.POSTGRES_DSN.env])
        assert dsn.scheme in ("postgresql", "postgres")
        assert (dsn.username, dsn.password, dsn.path.lstrip("/")) == (
            env["POSTGRES_USER"],
            env["POSTGRES_PASSWORD"],
            env["POSTGRES_DB"],
        )
        assert dsn.hostname == "postgres", f"{name} must reach the postgres service"


def test_storage_emulator_host_points_at_the_gcs_service() -> None:
    args = command("gcs")
    for name in DAGSTER_SERVICES:
        url = urlsplit(environment(name)[settings.STORAGE_EMULATOR_HOST.env])
        assert url.hostname == "gcs", f"{name} must reach the gcs service"
        assert url.port == int(flag(args, "-port"))
        assert url.scheme == flag(args, "-scheme")
        # The emulator hands out URLs built from -external-url (resumable uploads, mediaLink);
        # the Dagster containers must be able to follow them.
        assert flag(args, "-external-url").rstrip("/") == f"{url.scheme}://{url.netloc}"
        assert flag(args, "-public-host") == url.netloc


def test_kafka_bootstrap_is_an_advertised_listener() -> None:
    env = environment("kafka")
    advertised = endpoints(env["KAFKA_ADVERTISED_LISTENERS"])
    bound = endpoints(env["KAFKA_LISTENERS"])
    controllers = settings.split_list(env["KAFKA_CONTROLLER_LISTENER_NAMES"])
    for name in DAGSTER_SERVICES:
        servers = settings.split_list(environment(name)[settings.KAFKA_BOOTSTRAP.env])
        assert servers, f"{name} has no Kafka bootstrap server"
        for server in servers:
            address = host_port(server)
            listener = next((key for key, value in advertised.items() if value == address), None)
            assert listener is not None, f"Kafka does not advertise {server} ({advertised})"
            assert listener not in controllers
            assert listener in bound and bound[listener][1] == address[1], (
                f"Kafka advertises {server} but does not listen on port {address[1]}"
            )
            assert address[0] == "kafka", f"{name} must reach the kafka service"


def test_gcs_preloads_the_default_bucket() -> None:
    args = command("gcs")
    data = flag(args, "-data")
    source = mounts("gcs").get(data)
    assert source, f"nothing is mounted at the emulator's -data {data}"
    seed = host_path(source)
    assert seed.is_dir(), f"{seed} does not exist"
    buckets = {path.name for path in seed.iterdir() if path.is_dir()}
    assert settings.GCS_BUCKET.default in buckets
    for name in DAGSTER_SERVICES:
        assert environment(name)[settings.GCS_BUCKET.env] in buckets
    for bucket in buckets:  # git keeps no empty directory
        assert any(path.is_file() for path in (seed / bucket).iterdir()), (
            f"{seed / bucket} is empty, so a checkout would not have it"
        )
    assert flag(args, "-backend") == "filesystem"
    assert flag(args, "-filesystem-root") in mounts("gcs"), "the emulator's storage is not kept"


# -- files the containers use ------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    assert DOCKERFILE.is_file(), "Dockerfile is missing"
    joined = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    instructions = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_installs_the_project_next_to_the_workspace() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert any(key == "RUN" and "pip install ." in rest for key, rest in instructions)
    copies = [rest.split() for key, rest in instructions if key == "COPY"]
    assert any("workspace.yaml" in args[:-1] for args in copies), "workspace.yaml is not copied"
    assert any("pyproject.toml" in args[:-1] for args in copies), "pyproject.toml is not copied"
    workdirs = [rest for key, rest in instructions if key == "WORKDIR"]
    assert workdirs, "the Dockerfile sets no WORKDIR"
    home = environment(DAGSTER_SERVICES[0])["DAGSTER_HOME"]
    assert any(key == "ENV" and f"DAGSTER_HOME={home}" in rest for key, rest in instructions)


@pytest.mark.parametrize("name", DAGSTER_SERVICES)
def test_dagster_commands_load_the_workspace(name: str) -> None:
    args = command(name)
    assert args[0] == name
    workspace = flag(args, "-w")
    assert (ROOT / workspace).is_file(), f"{name} loads {workspace}, which does not exist"
    with (ROOT / workspace).open(encoding="utf-8") as handle:
        loaded = yaml.safe_load(handle)
    modules = [entry["python_module"]["module_name"] for entry in loaded["load_from"]]
    assert "protoagg_dagster.definitions" in modules


@pytest.mark.parametrize("name", DAGSTER_SERVICES)
def test_dagster_instance_queues_runs_and_a_backfill_one_run_per_partition(name: str) -> None:
    home = environment(name)["DAGSTER_HOME"]
    source = mounts(name).get(f"{home}/dagster.yaml")
    assert source, f"{name} mounts no dagster.yaml into DAGSTER_HOME {home}"
    with host_path(source).open(encoding="utf-8") as handle:
        instance = yaml.safe_load(handle)
    coordinator = instance["run_coordinator"]
    assert coordinator["class"] == "QueuedRunCoordinator"
    limits = {limit["key"]: limit for limit in coordinator["config"]["tag_concurrency_limits"]}
    # A sensor run archives many partitions: the leases, not a tag limit, keep one worker each.
    assert PARTITION_TAG not in limits
    assert limits[BACKFILL_PARTITION_TAG]["limit"] == 1
    assert limits[BACKFILL_PARTITION_TAG]["value"]["applyLimitPerUniqueValue"] is True
    # Each run waits for the queue's next look: Dagster's default 5 s is 2.5 s of latency.
    assert coordinator["config"]["dequeue_interval_seconds"] == 1
