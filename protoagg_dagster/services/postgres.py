"""A private PostgreSQL 15 cluster under the state directory, from Debian's server binaries.

The server refuses to run as root, so when we are root (as CI is) the cluster is owned by and run as
the unprivileged ``postgres`` user.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import psycopg
from psycopg import sql

from protoagg_dagster.core.errors import ServiceError
from protoagg_dagster.services.process import (
    Endpoint,
    ManagedProcess,
    poll_until,
    require_free_port,
)

POSTGRES_BIN = Path(os.environ.get("PROTOAGG_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "postgres"  # noqa: S105 - a throwaway local dev cluster on loopback
APP_USER = "protoagg"
APP_PASSWORD = "protoagg"  # noqa: S105 - a throwaway local dev cluster on loopback
APP_DATABASE = "protoagg"
UNPRIVILEGED_USER = "postgres"
# Sized for the dedupe window (docs/operations.md, "PostgreSQL for the dedupe window"): each id
# the window stores needs ~50 bytes of index in shared_buffers for its probes to stay in memory,
# so 1GB serves ~20M stored ids; raise it (PROTOAGG_POSTGRES_SHARED_BUFFERS) for bigger windows.
# Random keys make every claim dirty index pages all over the index, and the first change of a
# page after a checkpoint writes the whole page to the WAL: checkpoints spaced further apart
# write each page once per 15 minutes instead of once per 5.
# huge_pages=try (PostgreSQL's default, stated here because the dedupe window depends on it): the
# buffers are mapped in 2 MiB pages when the kernel has enough reserved (vm.nr_hugepages), which
# makes a probe of a large window's index ~2x cheaper (docs/benchmarks.md); without a
# reservation the server starts with ordinary pages. benchmarks/run reserves them when root.
SETTINGS = {
    "shared_buffers": os.environ.get("PROTOAGG_POSTGRES_SHARED_BUFFERS", "1GB"),
    "huge_pages": "try",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
}


@dataclass(frozen=True)
class PostgresService:
    state_dir: Path
    port: int = 5432
    host: str = "127.0.0.1"
    # (certificate chain, private key), PEM: the server also accepts TLS (sslmode=verify-full).
    tls: tuple[Path, Path] | None = None
    name: ClassVar[str] = "postgres"

    @property
    def home(self) -> Path:
        return self.state_dir / "postgres"

    @functools.cached_property
    def cluster_dir(self) -> Path:
        """Where the cluster's files live.

        The state directory, unless we are root and the unprivileged server user cannot reach
        it (e.g. under /root); then a private directory under /tmp named after the state
        directory.
        """
        if _server_user() is None or _reachable_by(UNPRIVILEGED_USER, self.state_dir):
            return self.home
        digest = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"protoagg-postgres-{digest}"

    @property
    def data_dir(self) -> Path:
        return self.cluster_dir / "data"

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess(self.name, self.home)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port)

    @property
    def dsn(self) -> str:
        return f"postgresql://{APP_USER}:{APP_PASSWORD}@{self.host}:{self.port}/{APP_DATABASE}"

    def is_running(self) -> bool:
        return self.process.pid() is not None

    def up(self, timeout: float = 60.0) -> None:
        if self.is_running() and self._accepts_connections():
            return
        binary = POSTGRES_BIN / "postgres"
        if not binary.exists():
            raise ServiceError(
                f"PostgreSQL server binaries were not found in {POSTGRES_BIN}: install Debian's "
                "postgresql-15 package (apt-get install postgresql-15) or set "
                "PROTOAGG_POSTGRES_BIN to the directory holding `postgres` and `initdb`."
            )
        require_free_port(self.endpoint, "PostgreSQL", "--postgres-port")
        user = _server_user()
        self.home.mkdir(parents=True, exist_ok=True)
        self.cluster_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(user)
        tls = self._install_tls()
        if user is not None:
            _chown_tree(self.cluster_dir, user)
        self.process.spawn(
            [
                str(binary),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-c",
                f"listen_addresses={self.host}",
                "-c",
                f"unix_socket_directories={self.cluster_dir}",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
                *(arg for name, value in SETTINGS.items() for arg in ("-c", f"{name}={value}")),
                *(arg for name, value in tls.items() for arg in ("-c", f"{name}={value}")),
            ],
            user=user,
        )
        if not poll_until(self._accepts_connections, timeout, interval=0.3):
            raise ServiceError(
                f"PostgreSQL did not accept connections on {self.endpoint} within {timeout:.0f} s; "
                f"see {self.process.log_file}:\n{self.process.log_tail()}"
            )
        self._ensure_app_database()

    def down(self) -> bool:
        # SIGINT is PostgreSQL's "fast" shutdown: SIGTERM would wait for every client to leave.
        return self.process.stop(signal.SIGINT)

    def describe(self) -> str:
        pid = self.process.pid()
        if pid is None:
            return f"{self.name}: stopped"
        return (
            f"{self.name}: running (pid {pid}) at {self.endpoint}, database {APP_DATABASE}, "
            f"log {self.process.log_file}"
        )

    def exports(self) -> dict[str, str]:
        return {"PROTOAGG_POSTGRES_DSN": self.dsn}

    def _install_tls(self) -> dict[str, str]:
        """Copy the TLS files into the cluster: the server reads its key only if it owns it."""
        if self.tls is None:
            return {}
        cert, key = self.cluster_dir / "server.crt", self.cluster_dir / "server.key"
        shutil.copyfile(self.tls[0], cert)
        shutil.copyfile(self.tls[1], key)
        key.chmod(0o600)
        return {"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)}

    def _initdb(self, user: str | None) -> None:
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        pwfile = self.cluster_dir / "superuser.pw"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        if user is not None:
            _chown_tree(self.cluster_dir, user)
        command = [
            str(POSTGRES_BIN / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
        ]
        if user is not None:
            command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *command]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ServiceError(f"initdb failed for {self.data_dir}:\n{result.stderr.strip()}")

    def _accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self._superuser_dsn(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _superuser_dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@{self.host}:{self.port}/{database}"

    def _ensure_app_database(self) -> None:
        with psycopg.connect(self._superuser_dsn(), autocommit=True) as conn:
            role = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_USER,))
            if role.fetchone() is None:
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(APP_USER), sql.Literal(APP_PASSWORD)
                    )
                )
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (APP_DATABASE,)
            ).fetchone()
            if not exists:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(APP_DATABASE), sql.Identifier(APP_USER)
                    )
                )


def _server_user() -> str | None:
    """The user to run the server as: ourselves, or ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError as exc:
        raise ServiceError(
            "PostgreSQL refuses to run as root and there is no `postgres` user to run it as: "
            "install Debian's postgresql-15 package (it creates the user) or run as a normal user."
        ) from exc
    return UNPRIVILEGED_USER


def _chown_tree(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _reachable_by(user: str, path: Path) -> bool:
    """Whether ``user`` can enter ``path`` (every directory above it needs the x bit for them)."""
    path.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "test", "-x", str(path)],
        check=False,
    )
    return probe.returncode == 0
