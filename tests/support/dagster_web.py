"""A real Dagster deployment with its UI: ``dagster-webserver`` and ``dagster-daemon`` on loopback.

:class:`DagsterWeb` writes ``deploy/dagster.local.yaml`` into a fresh DAGSTER_HOME, starts the
code location's gRPC server (:func:`start_code_server`), then the webserver on a free port of
127.0.0.1 and the daemon on a workspace pointing at that server, each in a new session (the run
processes the code server spawns share its group), and stops every group: SIGTERM, then SIGKILL
after a deadline. Their output goes to ``<home>/code.log``, ``<home>/webserver.log`` and
``<home>/daemon.log``.

The webserver's GraphQL API (:meth:`DagsterWeb.graphql`) is what the tests synchronise on: the
code location's load status and each run's status.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import dagster as dg
from dagster._core.instance.ref import InstanceRef

from tests.conftest import ROOT
from tests.support.process_groups import group_members, signal_group

INSTANCE_YAML = ROOT / "deploy" / "dagster.local.yaml"
BIN = ROOT / ".venv" / "bin"
DEFINITIONS = "protoagg_dagster.definitions"  # workspace.yaml's code location
LOCATION = "protoagg"
# Variables of a developer's shell that must not leak into the test deployment.
_DROPPED_ENV = ("DAGSTER_HOME",)

LOCATION_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""

RUNS_QUERY = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter) {
    __typename
    ... on Runs { results { runId status jobName tags { key value } } }
    ... on PythonError { message }
  }
}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    what: str,
    condition: Callable[[], bool],
    deadline_s: float,
    check: Callable[[], None] | None = None,
    poll_s: float = 0.5,
) -> float:
    """Poll ``condition`` until it holds and return the seconds it took; ``check`` raises early
    when waiting is hopeless (a process died)."""
    started = time.monotonic()
    while not condition():
        if check is not None:
            check()
        if time.monotonic() - started > deadline_s:
            raise AssertionError(f"timed out after {deadline_s:.0f} s waiting until {what}")
        time.sleep(poll_s)
    return time.monotonic() - started


@dataclass
class DagsterWeb:
    """One deployment: a DAGSTER_HOME, its webserver on ``127.0.0.1:port`` and its daemon."""

    home: Path
    env: Mapping[str, str]
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def log_path(self, name: str) -> Path:
        return self.home / f"{name}.log"

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text(INSTANCE_YAML.read_text())
        # Create the SQLite storages here: the webserver, the daemon and their code servers
        # creating them at once can stamp two alembic heads and fail to load the location.
        with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(self.home))):
            pass
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
        env.update(self.env)
        env["DAGSTER_HOME"] = str(self.home)
        log = self.log_path("code").open("wb")
        self._logs.append(log)
        code, port = start_code_server(DEFINITIONS, env, log, self.log_path("code"), group=0)
        self.processes["code"] = code
        workspace = str(grpc_workspace(self.home / "workspace.yaml", port))
        commands = {
            "webserver": [
                str(BIN / "dagster-webserver"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-w",
                workspace,
            ],
            "daemon": [str(BIN / "dagster-daemon"), "run", "-w", workspace],
        }
        for name, command in commands.items():
            log = self.log_path(name).open("wb")
            self._logs.append(log)
            self.processes[name] = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(
                    f"dagster {name} exited with {process.returncode}\n{self.log_tail(name)}"
                )

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.load(response)
        if answer.get("errors"):
            raise AssertionError(f"GraphQL errors: {answer['errors']}")
        data: dict[str, Any] = answer["data"]
        return data

    def location(self) -> dict[str, Any] | None:
        """The protoagg code location's workspace entry, or None while the webserver is down."""
        try:
            data = self.graphql(LOCATION_QUERY)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None
        workspace = data["workspaceOrError"]
        if workspace["__typename"] != "Workspace":
            raise AssertionError(f"workspace failed to load: {workspace}")
        for entry in workspace["locationEntries"]:
            if entry["name"] == LOCATION:
                return dict(entry)
        return None

    def wait_loaded(self, deadline_s: float = 90.0) -> float:
        """Wait until the code location is loaded; raise with its error if it failed."""

        def loaded() -> bool:
            entry = self.location()
            if entry is None or entry["loadStatus"] != "LOADED":
                return False
            result = entry["locationOrLoadError"]
            if result is None or result["__typename"] != "RepositoryLocation":
                raise AssertionError(f"code location {LOCATION} failed to load: {result}")
            return True

        return wait_until(
            f"code location {LOCATION} is loaded", loaded, deadline_s, self.check_alive
        )

    def runs(self, job_name: str | None = None) -> list[dict[str, Any]]:
        run_filter = {"pipelineName": job_name} if job_name else {}
        data = self.graphql(RUNS_QUERY, {"filter": run_filter})["runsOrError"]
        if data["__typename"] != "Runs":
            raise AssertionError(f"runs query failed: {data}")
        return list(data["results"])

    def stop(self, grace_seconds: float = 20.0) -> None:
        """SIGTERM each process group; SIGKILL what is left after ``grace_seconds``."""
        groups = [process.pid for process in self.processes.values()]
        for group in groups:
            signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and any(group_members(group) for group in groups):
            time.sleep(0.2)
        for group in groups:
            if group_members(group):
                signal_group(group, signal.SIGKILL)
        for process in self.processes.values():
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def log_tail(self, name: str, lines: int = 60) -> str:
        path = self.log_path(name)
        if not path.exists():
            return f"no {name} log"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"----- last {len(text)} lines of {path}\n" + "\n".join(text)


def start_code_server(
    module: str, env: Mapping[str, str], log: IO[bytes], log_path: Path, group: int
) -> tuple[subprocess.Popen[bytes], int]:
    """Serve ``module``'s code location from a process of its own (``dagster api grpc`` on a free
    port, in process group ``group``; 0: a new one it leads), as Helm's user deployments do in
    production; return it and its port once it answers.

    A daemon or webserver given a ``python_module`` starts a code server itself, and the daemon
    replaces it every minute (its workspace reload), each new one importing the definitions
    again: about 3 s of CPU a minute of a deployment's life, more than its idle sensor ticks."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "dagster"), "api", "grpc", "-m", module, "-d", str(ROOT), "-h", "127.0.0.1",
         "-p", str(port), "--location-name", LOCATION],
        cwd=ROOT, env=dict(env), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        process_group=group,
    )  # fmt: skip

    def alive() -> None:
        if process.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise AssertionError(f"the code server exited ({process.returncode}):\n{tail}")

    def listening() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(f"the code server of {module} answers", listening, 120, alive, poll_s=0.2)
    return process, port


def grpc_workspace(path: Path, port: int) -> Path:
    """A workspace file at ``path`` naming the code server on ``port``."""
    path.write_text(
        "load_from:\n  - grpc_server:\n"
        f"      host: 127.0.0.1\n      port: {port}\n      location_name: {LOCATION}\n"
    )
    return path
