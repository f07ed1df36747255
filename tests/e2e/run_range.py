"""Run one archive_kafka_batch in this process: ``python -m tests.e2e.run_range SPEC_JSON``.

Tests start several of these at once to get truly concurrent runs (Dagster's in-process execution
is not thread-safe). SPEC_JSON: {"resources": {...resource fields...}, "ranges": [[topic, p, a, b],
...], "crash_at": optional crash point}. At a crash point the process SIGKILLs itself: no exception
handler, retry or cleanup runs, as when a machine dies.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import dagster as dg

from protoagg_dagster.archive import ops
from protoagg_dagster.archive import store as archive_store
from protoagg_dagster.archive.job import archive_kafka_batch
from protoagg_dagster.archive.partition_lease import PartitionLease
from protoagg_dagster.archive.run_tags import ranges_run_config
from protoagg_dagster.core.planning import OffsetRange
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource
from protoagg_dagster.resources.settings import ArchiverSettings

KINDS = {
    "kafka": KafkaResource,
    "postgres": PostgresResource,
    "gcs": GCSResource,
    "archiver": ArchiverSettings,
    "lease": PartitionLease,
}


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _after(module: ModuleType, name: str) -> None:
    original = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        _die()
        return result

    setattr(module, name, wrapper)


def _before(module: ModuleType, name: str) -> None:
    getattr(module, name)  # a crash point on a name the module lacks would never fire
    setattr(module, name, lambda *args, **kwargs: _die())


CRASH_POINTS: dict[str, Callable[[], None]] = {
    "after_consume": lambda: _after(ops, "read_together"),
    # Claims are committed many to a transaction: after the dedupe step, all of them are.
    "after_claim": lambda: _after(ops, "dedupe"),
    "after_upload": lambda: _before(archive_store, "_compose_queued"),
    "after_compose": lambda: _before(archive_store, "_delete_quietly"),
    "before_commit": lambda: _before(ops, "finish_batches"),
    "after_commit": lambda: _after(ops, "finish_batches"),
}


def main() -> int:
    spec = json.loads(sys.argv[1])
    if spec.get("crash_at"):
        CRASH_POINTS[spec["crash_at"]]()
    resources = {name: KINDS[name](**fields) for name, fields in spec["resources"].items()}
    ranges = [OffsetRange(*r) for r in spec["ranges"]]
    # In memory, as tests.helpers.memory_instance: no SQLite files to build in every process.
    with dg.DagsterInstance.ephemeral() as instance:
        result = archive_kafka_batch.execute_in_process(
            run_config=ranges_run_config(ranges),
            resources=resources,
            instance=instance,
            raise_on_error=False,
        )
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
