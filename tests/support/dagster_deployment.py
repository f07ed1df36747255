"""A real Dagster deployment for the tests: its own DAGSTER_HOME, a code server and a
``dagster-daemon`` process.

:class:`DagsterDeployment` copies ``deploy/dagster.local.yaml`` (the production queue: two runs
per ``protoagg/partition`` value, one working and its follow-up starting up) into a fresh
DAGSTER_HOME, starts the code location's gRPC server (``dagster api grpc``, as production runs
it) and ``dagster-daemon run`` on a workspace pointing at it, all in one new process group with
the run processes the code server spawns, and stops the whole group: SIGTERM, then SIGKILL after
a deadline. Their output goes to ``<home>/daemon.log``. With ``dev_port``, ``dagster dev`` is the
group instead (webserver, daemon, its code server and run workers).

:func:`run_summaries` reads what a deployment did from its SQLite run storage: each run's range,
status, start/end times, step retries and errors, and the batch numbers its materialization
recorded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import dagster as dg
from dagster._core.events import DagsterEventType
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.dagster_run import FINISHED_STATUSES
from dagster._core.storage.tags import (
    PARENT_RUN_ID_TAG,
    RETRY_NUMBER_TAG,
    RUN_KEY_TAG,
    WILL_RETRY_TAG,
)

from protoagg_dagster.archive.assets import ARCHIVE_ASSET
from protoagg_dagster.archive.run_tags import PARTITION_TAG, RANGE_TAG, partition_key, run_ranges
from protoagg_dagster.core.planning import OffsetRange
from tests.conftest import ROOT
from tests.support.dagster_web import DEFINITIONS, LOCATION, grpc_workspace, start_code_server
from tests.support.process_groups import group_members, signal_group

INSTANCE_YAML = ROOT / "deploy" / "dagster.local.yaml"
WORKSPACE_YAML = ROOT / "workspace.yaml"
DAEMON = ROOT / ".venv" / "bin" / "dagster-daemon"
DAGSTER = ROOT / ".venv" / "bin" / "dagster"
# Variables a developer's shell might set that must not leak into a test deployment.
_DROPPED_ENV = ("DAGSTER_HOME",)


@dataclass
class DagsterDeployment:
    """One independent Dagster deployment: a DAGSTER_HOME and the daemon serving it."""

    name: str
    home: Path
    env: Mapping[str, str]
    # Another code location, e.g. tests.support.slow_code (a python module name).
    module: str | None = None
    # ``dagster dev`` on this port (webserver, daemon, code server and run workers in one
    # process group) instead of ``dagster-daemon run`` alone.
    dev_port: int | None = None
    process: subprocess.Popen[bytes] | None = None  # the daemon (or dagster dev)
    _group: int = 0  # the process group every process of the deployment is in
    _instance: dg.DagsterInstance | None = None
    _log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.home / "daemon.log"

    def start(self) -> None:
        """Start (or, after a kill, restart) the deployment on its DAGSTER_HOME."""
        self.home.mkdir(parents=True, exist_ok=True)
        if not (self.home / "dagster.yaml").exists():
            shutil.copyfile(INSTANCE_YAML, self.home / "dagster.yaml")
            with self.instance():
                pass  # create the SQLite storages here, not in a race with the daemon
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
        env.update(self.env)
        env["DAGSTER_HOME"] = str(self.home)
        self._log = self.log_path.open("ab")
        module = self.module or DEFINITIONS
        if self.dev_port is not None:
            workspace = WORKSPACE_YAML
            if self.module is not None:
                workspace = self.home / "workspace.yaml"
                workspace.write_text(
                    "load_from:\n  - python_module:\n"
                    f"      module_name: {module}\n"
                    f"      working_directory: {ROOT}\n"
                    f"      location_name: {LOCATION}\n"
                )
            command = [str(DAGSTER), "dev", "-h", "127.0.0.1", "-p", str(self.dev_port)]
            self.process = self._spawn([*command, "-w", str(workspace)], env, group=0)
            self._group = self.process.pid
            return
        server, port = start_code_server(module, env, self._log, self.log_path, group=0)
        self._group = server.pid
        workspace = grpc_workspace(self.home / "workspace.yaml", port)
        self.process = self._spawn(
            [str(DAEMON), "run", "-w", str(workspace)], env, group=self._group
        )

    def _spawn(
        self, command: list[str], env: dict[str, str], group: int
    ) -> subprocess.Popen[bytes]:
        """A process of the deployment's group (``group`` 0: a new group it leads)."""
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            process_group=group,
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_seconds: float = 30.0) -> None:
        """SIGTERM the daemon's process group; SIGKILL what is left after ``grace_seconds``."""
        if self.process is None:
            return
        group = self._group
        signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and (self.process.poll() is None or group_members(group)):
            time.sleep(0.2)
        if self.process.poll() is None or group_members(group):
            signal_group(group, signal.SIGKILL)
            self.process.wait(timeout=30)
            kill_deadline = time.monotonic() + 30
            while group_members(group) and time.monotonic() < kill_deadline:
                time.sleep(0.2)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> list[int]:
        """SIGKILL the whole process group at once, as a node loss or OOM kill does; returns the
        pids it held. Run records stay as the dead processes left them."""
        assert self.process is not None
        group = self._group
        members = group_members(group)
        signal_group(group, signal.SIGKILL)
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while group_members(group) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_members(group), f"{self.name}: processes survived SIGKILL"
        if self._log is not None:
            self._log.close()
            self._log = None
        return members

    @contextmanager
    def instance(self) -> Iterator[dg.DagsterInstance]:
        """The deployment's instance (its SQLite storages), opened in this process once and kept:
        opening one costs a tenth of a second of CPU (its storages check their schema), a query
        a few milliseconds, and the tests poll it several times a second. Every query opens its
        own SQLite connection, so each sees what the deployment has written by then."""
        if self._instance is None:
            self._instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(self.home)))
        yield self._instance

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return f"[{self.name}] no daemon log"
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"----- {self.name}: last {len(text)} lines of {self.log_path}\n" + "\n".join(text)


@dataclass
class RunSummary:
    """What one run of a deployment did."""

    deployment: str
    run_id: str
    job_name: str
    partition: str | None
    range_key: str | None
    status: str
    created_time: float
    run_key: str | None
    start_time: float | None
    end_time: float | None
    launched_time: float | None
    retry_number: int
    parent_run_id: str | None
    will_retry: bool
    errors: list[str] = field(default_factory=list)
    step_retries: list[str] = field(default_factory=list)
    # From the first op's start to the last op's end: the run holds its partition's lease then.
    work_start: float | None = None
    work_end: float | None = None
    materializations: list[dict[str, Any]] = field(default_factory=list)
    # The ranges of its run config (an archive run's; empty for other jobs).
    ranges: list[OffsetRange] = field(default_factory=list)

    @property
    def partitions(self) -> set[str]:
        """``topic-partition`` of each of its ranges."""
        return {partition_key(r.topic, r.partition) for r in self.ranges}

    def overlaps(self, other: RunSummary) -> bool:
        """Both executed at once (between their RUN_START and RUN_SUCCESS/FAILURE)."""
        return _overlap(self.start_time, self.end_time, other.start_time, other.end_time)

    def active_together(self, other: RunSummary) -> bool:
        """Both counted against the run queue's limits at once: dequeued (RUN_STARTING: its
        process is being launched) and not yet finished."""
        return _overlap(self.launched_time, self.end_time, other.launched_time, other.end_time)

    def works_together(self, other: RunSummary) -> bool:
        """Both were inside their ops at once (a follow-up starts up while a run works, then
        waits for the partition's lease, so only this must never happen within a partition)."""
        return _overlap(self.work_start, self.work_end, other.work_start, other.work_end)

    def line(self, origin: float) -> str:
        def rel(t: float | None) -> str:
            return "-" if t is None else f"{t - origin:7.1f}"

        batch = ", ".join(
            f"{m.get('ranges_appended')} ranges: appended {m.get('records_appended')}"
            f" dup {m.get('duplicates_dropped')}"
            + (
                f" ({m['ranges_without_work']} without work)"
                if m.get("ranges_without_work")
                else ""
            )
            for m in self.materializations
        )
        text = (
            f"{self.deployment} {self.run_id[:8]} {self.range_key} {self.status:<8} "
            f"created {rel(self.created_time)} launched {rel(self.launched_time)} "
            f"ran {rel(self.start_time)} → {rel(self.end_time)}"
            + (
                " (run key ...-" + self.run_key.rsplit("-", 1)[1] + ")"
                if self.run_key and "retry" in self.run_key.rsplit("-", 1)[1]
                else ""
            )
            + (
                f" retry#{self.retry_number} of {self.parent_run_id[:8]}"
                if self.parent_run_id
                else ""
            )
            + (f" [{batch}]" if batch else "")
        )
        for retry in self.step_retries:
            text += f"\n      step retry: {retry}"
        for error in self.errors:
            text += f"\n      error: {error}"
        return text


def _overlap(a0: float | None, a1: float | None, b0: float | None, b1: float | None) -> bool:
    if a0 is None or a1 is None or b0 is None or b1 is None:
        return False
    return a0 < b1 and b0 < a1


def _error_text(entry: Any) -> str:
    event = entry.dagster_event
    data = getattr(event, "event_specific_data", None)
    error = getattr(data, "error", None)
    step = f"{event.step_key}: " if event is not None and event.step_key else ""
    if error is not None:
        message = error.message.strip().splitlines()
        cause = error.cause
        while cause is not None:  # the user code's exception is the innermost cause
            message = cause.message.strip().splitlines()
            cause = cause.cause
        return step + (message[-1] if message else error.cls_name or "?")
    return step + (entry.message or event.message or "?").strip().splitlines()[0]


def run_summaries(deployment: DagsterDeployment) -> list[RunSummary]:
    summaries = []
    with deployment.instance() as instance:
        for record in instance.get_run_records():
            run = record.dagster_run
            summary = RunSummary(
                deployment=deployment.name,
                run_id=run.run_id,
                job_name=run.job_name,
                partition=run.tags.get(PARTITION_TAG),
                range_key=run.tags.get(RANGE_TAG),
                status=run.status.value,
                created_time=record.create_timestamp.timestamp(),
                run_key=run.tags.get(RUN_KEY_TAG),
                start_time=record.start_time,
                end_time=record.end_time,
                launched_time=None,
                retry_number=int(run.tags.get(RETRY_NUMBER_TAG, "0")),
                parent_run_id=run.tags.get(PARENT_RUN_ID_TAG),
                will_retry=run.tags.get(WILL_RETRY_TAG) == "true",
                ranges=run_ranges(run),
            )
            for entry in instance.all_logs(
                run.run_id,
                of_type={
                    DagsterEventType.STEP_FAILURE,
                    DagsterEventType.RUN_FAILURE,
                    DagsterEventType.STEP_UP_FOR_RETRY,
                    DagsterEventType.ASSET_MATERIALIZATION,
                    DagsterEventType.RUN_STARTING,
                    DagsterEventType.STEP_START,
                    DagsterEventType.STEP_SUCCESS,
                },
            ):
                event = entry.dagster_event
                assert event is not None
                if event.event_type in (
                    DagsterEventType.STEP_SUCCESS,
                    DagsterEventType.STEP_FAILURE,
                ):
                    summary.work_end = entry.timestamp
                if event.event_type == DagsterEventType.RUN_STARTING:
                    summary.launched_time = entry.timestamp
                elif event.event_type == DagsterEventType.STEP_START:
                    if summary.work_start is None:
                        summary.work_start = entry.timestamp
                    summary.work_end = None
                elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                    materialization = event.step_materialization_data.materialization
                    # The topic entry's asset repeats the whole archive's numbers.
                    if materialization.asset_key == ARCHIVE_ASSET:
                        metadata = materialization.metadata
                        summary.materializations.append({k: v.value for k, v in metadata.items()})
                elif event.event_type == DagsterEventType.STEP_UP_FOR_RETRY:
                    summary.step_retries.append(_error_text(entry))
                elif event.event_type != DagsterEventType.STEP_SUCCESS:
                    summary.errors.append(_error_text(entry))
            summaries.append(summary)
    return sorted(summaries, key=lambda s: (s.start_time or float("inf"), s.run_id))


def settled(deployment: DagsterDeployment) -> bool:
    """Every run finished (none queued, starting or running); each failed run due for a retry
    has it, or Dagster's retry daemon has read its failure and will not retry it.

    The second case is Dagster's race, not protoagg's: a failure is stored before the run's status
    and ``dagster/will_retry`` tag, and a daemon pass that reads the event in between sees a run
    not yet failed and drops the retry for good. The sensor then launches the range again.
    """
    with deployment.instance() as instance:
        runs = instance.get_runs()
        if any(run.status not in FINISHED_STATUSES for run in runs):
            return False
        parents = {run.tags.get(PARENT_RUN_ID_TAG) for run in runs}
        waiting = {
            run.run_id
            for run in runs
            if run.status == dg.DagsterRunStatus.FAILURE
            and run.tags.get(WILL_RETRY_TAG) == "true"
            and run.run_id not in parents
        }
        return not waiting or not _failures_unread(instance, waiting)


def _failures_unread(instance: dg.DagsterInstance, run_ids: set[str]) -> bool:
    """Whether the retry daemon has yet to read the failure of one of ``run_ids``."""
    key = f"EVENT_LOG_CONSUMER_CURSOR-{DagsterEventType.RUN_FAILURE.value}"
    cursor = instance.daemon_cursor_storage.get_cursor_values({key}).get(key)
    if cursor is None:
        return True  # the daemon has not read any failure yet
    unread = instance.event_log_storage.get_logs_for_all_runs_by_log_id(
        after_cursor=int(cursor), dagster_event_type={DagsterEventType.RUN_FAILURE}
    )
    return any(entry.run_id in run_ids for entry in unread.values())
