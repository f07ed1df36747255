"""A single-node Apache Kafka (KRaft mode) on 127.0.0.1, run from Maven Central jars.

Layout (everything under ``<state_dir>/kafka``)::

    server.properties   broker+controller config, rewritten on every start
    log4j2.properties   logging to stdout, i.e. to kafka.log
    data/               log.dirs; data/meta.properties marks formatted storage
    kafka.pid kafka.log the ManagedProcess files

The jars are resolved once by Maven into its usual cache (``~/.m2``); the resulting classpath is
kept in ``~/.cache/protoagg/kafka-<version>/classpath.txt`` (``$XDG_CACHE_HOME`` respected), so a
later start does not call Maven at all.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from protoagg_dagster.core.errors import ServiceError
from protoagg_dagster.services.process import (
    Endpoint,
    ManagedProcess,
    poll_until,
    require_executable,
    require_free_port,
)

KAFKA_VERSION = "4.1.1"
# Kafka 4.x logs through SLF4J 1.7 and ships Log4j 2 (api+core) as runtime dependencies, but the
# SLF4J->Log4j 2 binding is only in the binary distribution, not in the POMs: add it ourselves,
# at the Log4j version of kafka_2.13's POM (check it when changing KAFKA_VERSION).
LOG4J_VERSION = "2.24.3"
JVM_HEAP = ("-Xms256m", "-Xmx512m")
NODE_ID = 1
CLIENT_ID = "protoagg-services"
_START_MARKER = "--- protoagg: starting Kafka"

_JAVA_ADVICE = (
    "install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless) to run Kafka."
)
_MVN_ADVICE = (
    "install Apache Maven 3.8+ (Debian: apt-get install maven); it fetches the Kafka jars once."
)

_POM = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by protoagg: resolves the runtime classpath of a Kafka {version} broker. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>protoagg.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
      <scope>runtime</scope>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """# Written by protoagg on every start; everything goes to stdout, i.e. to kafka.log.
status = warn
name = protoagg-kafka
# Kafka's own shutdown hook logs the controlled shutdown; Log4j's hook would cut it short.
shutdownHook = disable
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
# The full config dumps at start-up and per-request chatter drown the useful lines.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.channel.name = kafka.network.RequestChannel$
logger.channel.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
logger.appinfo.name = org.apache.kafka.common.utils.AppInfoParser
logger.appinfo.level = WARN
"""


@dataclass(frozen=True)
class KafkaService:
    """One broker+controller node listening on ``host:port`` (PLAINTEXT) and ``controller_port``."""

    state_dir: Path
    port: int = 9094
    controller_port: int = 9095
    host: str = "127.0.0.1"
    name: ClassVar[str] = "kafka"

    # -- paths -------------------------------------------------------------------------------

    @property
    def home(self) -> Path:
        return Path(self.state_dir) / self.name

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def config_file(self) -> Path:
        return self.home / "server.properties"

    @property
    def log4j_file(self) -> Path:
        return self.home / "log4j2.properties"

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(self.name, self.home)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port)

    @property
    def bootstrap(self) -> str:
        return str(self.endpoint)

    # -- public interface ----------------------------------------------------------------------

    def up(self, timeout: float = 180.0) -> None:
        """Start the broker unless it already runs and answers; return once a client can use it."""
        deadline = time.monotonic() + timeout
        self.home.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.home / ".lock"):
            pid = self.process.pid()
            if pid is None:
                if self.port == self.controller_port:
                    raise ServiceError(
                        f"Kafka cannot start: its client port and controller port are both "
                        f"{self.port}; give the controller another port (controller_port)."
                    )
                require_free_port(self.endpoint, "Kafka", "PROTOAGG_KAFKA_BOOTSTRAP")
                require_free_port(
                    Endpoint(self.host, self.controller_port),
                    "Kafka's controller",
                    "the Kafka service's controller_port",
                )
                java = _java()
                classpath = kafka_classpath()
                self._write_config()
                self._rotate_log()
                if not (self.data_dir / "meta.properties").exists():
                    self._format(java, classpath)
                argv = self._broker_argv(java, classpath)
                with self.process.log_file.open("a") as log:
                    log.write(f"{_START_MARKER} {KAFKA_VERSION} at {self.endpoint}\n")
                pid = self.process.spawn(argv, cwd=self.home)
            elif self._answers():
                return
            self._wait_ready(pid, deadline)

    def down(self) -> bool:
        """Stop the broker (SIGKILL after 60 s); False if it was not running."""
        return self.process.stop(timeout=60.0)

    def is_running(self) -> bool:
        return self.process.pid() is not None

    def describe(self) -> str:
        pid = self.process.pid()
        if pid is None:
            return f"{self.name}: stopped"
        return f"{self.name}: running (pid {pid}) at {self.endpoint}, log {self.process.log_file}"

    def exports(self) -> dict[str, str]:
        return {"PROTOAGG_KAFKA_BOOTSTRAP": self.bootstrap}

    # -- start-up ------------------------------------------------------------------------------

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        controller = f"{self.host}:{self.controller_port}"
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            "controller.quorum.voters": f"{NODE_ID}@{controller}",
            "listeners": f"PLAINTEXT://{self.endpoint},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{self.endpoint}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            # One node: every replication factor and ISR is 1, internal topics are small.
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            "group.initial.rebalance.delay.ms": "0",
            # Keep records whatever their timestamps (tests use old ones), bounded by size instead.
            "log.retention.ms": "-1",
            "log.retention.bytes": str(1 << 30),
            "log.segment.bytes": str(128 << 20),
            # A small machine: fewer threads and a small compaction buffer (default 128 MiB).
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(16 << 20),
            # An idle cleaner looks for work every second, not every 15 s: a compacted topic's
            # closed segment is compacted at once (tests/e2e/test_kafka_gaps.py waits for it).
            "log.cleaner.backoff.ms": "1000",
        }
        text = "# Written by protoagg on every start of the local Kafka.\n" + "".join(
            f"{key}={value}\n" for key, value in settings.items()
        )
        self.config_file.write_text(text)
        self.log4j_file.write_text(_LOG4J2)

    def _rotate_log(self, limit: int = 20 << 20) -> None:
        """Keep one previous log: a long-lived dev broker would otherwise grow kafka.log forever."""
        log = self.process.log_file
        with contextlib.suppress(FileNotFoundError):
            if log.stat().st_size > limit:
                log.replace(log.with_name(log.name + ".1"))

    def _jvm_options(self) -> list[str]:
        return [
            *JVM_HEAP,
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_file}",
            f"-Dkafka.logs.dir={self.home}",
        ]

    def _broker_argv(self, java: str, classpath: str) -> list[str]:
        return [java, *self._jvm_options(), "-cp", classpath, "kafka.Kafka", str(self.config_file)]

    def _format(self, java: str, classpath: str) -> None:
        """Format the KRaft storage once: writes data/meta.properties and bootstrap.checkpoint."""
        argv = [
            java,
            "-Xmx256m",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_file}",
            "-cp",
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            _new_cluster_id(),
            "--config",
            str(self.config_file),
            "--ignore-formatted",
        ]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=120, check=False, cwd=self.home
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(
                f"Formatting Kafka's storage in {self.data_dir} took over 120 s; check the "
                "machine's load and retry `protoagg services up`."
            ) from exc
        with self.process.log_file.open("a") as log:
            log.write(f"--- kafka storage format ({' '.join(argv[-7:])})\n")
            log.write(done.stdout + done.stderr)
        if done.returncode != 0 or not (self.data_dir / "meta.properties").exists():
            tail = _tail(done.stdout + done.stderr)
            raise ServiceError(
                f"Formatting Kafka's storage in {self.data_dir} failed (exit {done.returncode}); "
                f"delete that directory and retry. Output:\n{tail}"
            )

    def _wait_ready(self, pid: int, deadline: float) -> None:
        died = False

        def ready() -> bool:
            nonlocal died
            if self.process.pid() != pid:
                died = True
                return True
            return self._answers()

        remaining = max(deadline - time.monotonic(), 0.0)
        ok = poll_until(ready, remaining, interval=0.5)
        if ok and not died:
            return
        if died:
            reason = "exited during start-up"
        else:
            reason = (
                f"did not answer a Kafka client at {self.endpoint} within the timeout "
                f"(give `up` a longer timeout on a slow machine)"
            )
            # Leave nothing half-started behind: a later `up` starts afresh.
            self.process.stop(timeout=30.0)
        log = self._start_log() or "(nothing logged yet)"
        raise ServiceError(
            f"Kafka {reason}; read {self.process.log_file} for the cause. Log:\n{log}"
        )

    def _start_log(self, lines: int = 25) -> str:
        """The log of the last start, from its first ERROR line if any, at most ``lines`` lines."""
        text = self.process.log_tail(100_000).splitlines()
        starts = [i for i, line in enumerate(text) if line.startswith(_START_MARKER)]
        text = text[starts[-1] + 1 :] if starts else text
        errors = [i for i, line in enumerate(text) if " ERROR " in line]
        text = text[errors[0] :] if errors else text[-lines:]
        return "\n".join(text[:lines])

    def _answers(self) -> bool:
        """Whether kafka-python gets cluster metadata listing this broker and the topic list."""
        if not self.endpoint.answers():
            return False
        try:
            from kafka import KafkaAdminClient
        except ImportError as exc:  # pragma: no cover - kafka-python is a project dependency
            raise ServiceError(
                "kafka-python is not installed in this environment; install protoagg's "
                "dependencies (pip install -e .) to check the local Kafka."
            ) from exc
        with _quiet("kafka"):
            admin = None
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap,
                    client_id=CLIENT_ID,
                    request_timeout_ms=5000,
                    bootstrap_timeout_ms=5000,
                    reconnect_backoff_max_ms=1000,
                )
                cluster = admin.describe_cluster()
                admin.list_topics()
            except Exception:
                return False
            finally:
                if admin is not None:
                    with contextlib.suppress(Exception):
                        admin.close()
        brokers = cluster.get("brokers") if isinstance(cluster, dict) else None
        return bool(brokers)


# -- jars ------------------------------------------------------------------------------------------


def cache_dir(version: str | None = None) -> Path:
    version = version or KAFKA_VERSION
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "protoagg" / f"kafka-{version}"


def kafka_classpath(version: str | None = None) -> str:
    """The broker's runtime classpath; resolved by Maven on first use, then read from the cache."""
    version = version or KAFKA_VERSION
    cache = cache_dir(version)
    cached = _read_classpath(cache / "classpath.txt")
    if cached is not None:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / ".lock"):
        cached = _read_classpath(cache / "classpath.txt")
        if cached is not None:
            return cached
        mvn = require_executable("mvn", _MVN_ADVICE)
        (cache / "pom.xml").write_text(_POM.format(version=version, log4j=LOG4J_VERSION))
        partial = cache / "classpath.txt.part"
        partial.unlink(missing_ok=True)
        mvn_log = cache / "mvn.log"
        argv = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(cache / "pom.xml"),
            "dependency:build-classpath",
            f"-Dmdep.outputFile={partial}",
            "-Dmdep.includeScope=runtime",
        ]
        try:
            with mvn_log.open("w") as log:
                done = subprocess.run(
                    argv, stdout=log, stderr=subprocess.STDOUT, timeout=900, check=False, cwd=cache
                )
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(
                f"Maven took over 15 minutes to fetch the Kafka {version} jars; check access to "
                f"the Maven repository and retry (log: {mvn_log})."
            ) from exc
        if done.returncode != 0:
            tail = _tail(mvn_log.read_text(errors="replace"))
            raise ServiceError(
                f"Maven could not fetch the Kafka {version} jars (exit {done.returncode}); check "
                f"access to the Maven repository and read {mvn_log}."
                + (f" Last lines:\n{tail}" if tail else "")
            )
        classpath = _read_classpath(partial)
        if classpath is None:
            raise ServiceError(
                f"Maven ran but produced no usable Kafka classpath in {partial}; delete {cache} "
                f"and retry (log: {mvn_log})."
            )
        partial.replace(cache / "classpath.txt")
        return classpath


def _read_classpath(path: Path) -> str | None:
    """The classpath in ``path`` if every jar in it still exists (``~/.m2`` may have been wiped)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    jars = [entry for entry in text.split(os.pathsep) if entry]
    if not any(Path(jar).name.startswith("kafka_2.13-") for jar in jars):
        return None
    if not all(Path(jar).is_file() for jar in jars):
        return None
    return os.pathsep.join(jars)


# -- helpers ---------------------------------------------------------------------------------------


def _java() -> str:
    """The ``java`` to run Kafka with ($JAVA_HOME first), checked to be version 17 or newer."""
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home, "bin", "java") if java_home else None
    if candidate is not None and os.access(candidate, os.X_OK):
        java = str(candidate)
    else:
        java = require_executable("java", _JAVA_ADVICE)
    try:
        done = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(f"`{java} -version` failed: {_JAVA_ADVICE}") from exc
    match = re.search(r'version "(\d+)(?:\.(\d+))?', done.stderr + done.stdout)
    if match is None:
        raise ServiceError(f"Could not tell the version of {java}: {_JAVA_ADVICE}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_…" style
        major = int(match.group(2))
    if major < 17:
        raise ServiceError(
            f"{java} is Java {major} but Kafka {KAFKA_VERSION} needs 17+: {_JAVA_ADVICE}"
        )
    return java


def _new_cluster_id() -> str:
    """A random cluster id in Kafka's format (URL-safe base64 of a UUID, no padding)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent `up` calls (parallel tests) do not race."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a library's connection-refused noise while we poll for readiness."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(previous)


__all__ = ["KAFKA_VERSION", "KafkaService", "cache_dir", "kafka_classpath"]
