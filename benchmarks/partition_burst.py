"""A burst over many quiet partitions, as a new user meets it, through ``dagster-daemon``.

    PYTHONPATH=. .venv/bin/python benchmarks/partition_burst.py [--partitions 256]
        [--per-partition 40] [--deadline 900]
        [--bootstrap HOST:PORT] [--gcs http://HOST:PORT] [--admin-dsn postgresql://...]

One topic of ``--partitions`` partitions, ``--per-partition`` seed-shaped messages in each
(``benchmarks/run_once.make_values``), produced before the clock starts. A fresh Dagster
deployment (``tests/support/dagster_deployment.DagsterDeployment``: its own DAGSTER_HOME with
SQLite storage and the run queue of ``deploy/dagster.local.yaml``) archives it with the default
settings into a fresh PostgreSQL database and a fresh object name.

Reported: the archive runs launched, seconds from the daemon's start until every partition is
archived (the ledger's positions at the end offsets, nothing claimed), and the growth of
Dagster's own storage (DAGSTER_HOME: run, event-log and schedule databases, and the runs'
compute logs; not our daemon.log) once every run has finished, over a fresh DAGSTER_HOME's,
per archived message. Run it
from the tree whose code is measured (the issue-23 before/after pair runs it from each commit).

The table, then one JSON line ``{"benchmark": "partition_burst", ...}`` (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.e2e_dagster import (  # noqa: E402
    DEFAULTS,
    add_service_args,
    archived_to,
    create_topic,
    deployment_env,
    end_offsets,
    fresh_database,
    produce,
    services_from,
)
from benchmarks.run_once import code_version, make_values  # noqa: E402
from tests.support.dagster_deployment import (  # noqa: E402
    INSTANCE_YAML,
    DagsterDeployment,
    run_summaries,
    settled,
)


def storage_bytes(home: Path) -> dict[str, int]:
    """Bytes under DAGSTER_HOME: the storages, and the runs' compute logs."""
    sizes = {"storage": 0, "compute_logs": 0}
    for path in home.rglob("*"):
        if not path.is_file() or path.name == "daemon.log":
            continue
        kind = "compute_logs" if "logs" in path.relative_to(home).parts[:1] else "storage"
        sizes[kind] += path.stat().st_size
    return sizes


def empty_home_bytes(home: Path) -> int:
    """What a fresh DAGSTER_HOME with its storages created holds, before any run."""
    home.mkdir(parents=True)
    shutil.copyfile(INSTANCE_YAML, home / "dagster.yaml")
    with DagsterDeployment("empty", home, {}).instance():
        pass
    sizes = storage_bytes(home)
    return sizes["storage"] + sizes["compute_logs"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", type=int, default=256)
    parser.add_argument("--per-partition", type=int, default=40)
    parser.add_argument("--deadline", type=float, default=900.0)
    add_service_args(parser)
    args = parser.parse_args()
    svc = services_from(parser, args)
    n = args.partitions * args.per_partition
    topic = f"bench-burst-{uuid.uuid4().hex[:8]}"
    kafka = svc.kafka(topic)
    create_topic(kafka, topic, args.partitions)
    values, distinct = make_values(n, 0.0, 23)
    produce(kafka, topic, values, args.partitions)
    ends = end_offsets(kafka, topic)
    assert sum(ends.values()) == n, ends
    home = ROOT / ".protoagg" / "bench-burst" / topic
    result: dict[str, Any] = {
        "benchmark": "partition_burst",
        "code": code_version(),
        "partitions": args.partitions,
        "messages": n,
        "settings": DEFAULTS,
    }
    with fresh_database(svc) as dsn:
        env = deployment_env(svc, topic, dsn, f"bench-burst/{topic}/log.pb", {})
        deployment = DagsterDeployment("burst", home, env)
        started = time.monotonic()
        archived_s = None
        try:
            deployment.start()
            deadline = started + args.deadline
            while time.monotonic() < deadline:
                if archived_to(dsn, topic, ends):
                    archived_s = time.monotonic() - started
                    break
                if not deployment.running():
                    raise RuntimeError(f"dagster-daemon exited\n{deployment.log_tail()}")
                time.sleep(0.25)
            while archived_s is not None and time.monotonic() < deadline + 120:
                if settled(deployment):
                    break
                time.sleep(0.5)
        finally:
            deployment.stop()
        runs = [r for r in run_summaries(deployment) if r.job_name == "archive_kafka_batch"]
        sizes = storage_bytes(home)
    empty = empty_home_bytes(home.with_name(home.name + "-empty"))
    total = sizes["storage"] + sizes["compute_logs"] - empty
    result.update(
        {
            "archived_s": archived_s,
            "runs": len(runs),
            "runs_succeeded": sum(r.status == "SUCCESS" for r in runs),
            "distinct_messages": distinct,
            "dagster_storage_bytes": sizes["storage"],
            "dagster_compute_log_bytes": sizes["compute_logs"],
            "dagster_empty_home_bytes": empty,
            "dagster_bytes_per_message": total / n,
        }
    )
    print(f"{args.partitions} partitions x {args.per_partition} messages ({n:,}):")
    print(f"  runs                       {len(runs)} ({result['runs_succeeded']} succeeded)")
    print(
        "  seconds to archived        "
        + (f"{archived_s:.1f}" if archived_s is not None else "NOT within the deadline")
    )
    print(f"  Dagster storage            {sizes['storage'] / 1e6:.2f} MB")
    print(f"  Dagster compute logs       {sizes['compute_logs'] / 1e6:.2f} MB")
    print(f"  an empty DAGSTER_HOME      {empty / 1e6:.2f} MB (not counted below)")
    print(f"  growth per archived message {total / n:,.0f} B")
    print(json.dumps(result))
    return 0 if archived_s is not None else 1


if __name__ == "__main__":
    sys.exit(main())
