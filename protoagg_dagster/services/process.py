"""Background processes with PID files and logs under a state directory, and readiness polling."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from protoagg_dagster.core.errors import ServiceError


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    def answers(self, timeout: float = 0.5) -> bool:
        """Whether something accepts TCP connections here."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                return True
        except OSError:
            return False


@dataclass(frozen=True)
class ManagedProcess:
    """One background process: ``<state>/<name>.pid`` and ``<state>/<name>.log``."""

    name: str
    state_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The PID of the running process, or None (a stale PID file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            self.pid_file.unlink(missing_ok=True)
            return None
        except PermissionError:
            return pid
        if _is_zombie(pid):
            self.pid_file.unlink(missing_ok=True)
            return None
        return pid

    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
    ) -> int:
        """Start ``argv`` detached from our session, appending its output to the log file."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        command = list(argv)
        if user is not None:
            # setpriv execs in place (runuser would fork), so the PID file names the server itself.
            command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *command]
        with self.log_file.open("ab") as log:
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> bool:
        """Send ``sig`` to the process group, SIGKILL after ``timeout``; False if nothing ran."""
        pid = self.pid()
        if pid is None:
            return False
        _signal_group(pid, sig)
        if not poll_until(lambda: not _alive(pid), timeout):
            _signal_group(pid, signal.SIGKILL)
            poll_until(lambda: not _alive(pid), 5.0)
        self.pid_file.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if _is_zombie(pid):
        # Reap it if it is our child, so it disappears from the table.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def poll_until(condition: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Call ``condition`` until it is true or ``timeout`` seconds pass; return the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def require_executable(name: str, advice: str) -> str:
    """The full path of ``name`` on PATH, or a ServiceError saying what to install."""
    path = shutil.which(name)
    if path is None:
        raise ServiceError(f"`{name}` was not found on PATH: {advice}")
    return path


def require_free_port(endpoint: Endpoint, service: str, setting: str) -> None:
    if endpoint.answers():
        raise ServiceError(
            f"{service} cannot start: port {endpoint.port} on {endpoint.host} is already in use "
            f"by another program; stop it or choose another port with {setting}."
        )
