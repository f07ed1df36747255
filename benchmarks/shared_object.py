"""msg/s against partition count when every partition appends to one object at GCS's write rate.

Runs ``tests/e2e/test_shared_object_rate.py`` (the tests' shared ``dagster-daemon`` deployment,
runs of 1,000 messages, fake-gcs-server behind the test proxy allowing one mutation per second per
object name) for 1, 8 and 32 partitions of 1,000 messages each, then 1, 8 and 32 writers appending
8 batches each as fast as they can (the sustained case: composes shared by the partitions'
pieces), and prints one table per part, then the rows as one JSON line. The test starts the
services itself (or uses those of PROTOAGG_TEST_PORTS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        env = {**os.environ, "PROTOAGG_BENCH_OUT": str(out)}
        test = "tests/e2e/test_shared_object_rate.py"
        code = subprocess.call(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
            cwd=ROOT,
            env=env,
        )
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    print("| partitions | messages | runs | composes | 429 on compose | seconds | msg/s |")
    print("|---|---|---|---|---|---|---|")
    for r in (r for r in rows if "partitions" in r):
        print(
            f"| {r['partitions']} | {r['messages']} | {r['runs']} | {r['composes']} | "
            f"{r['compose_429']} | {r['seconds']} | {r['messages_per_second']} |"
        )
    print()
    print("| writers | appends | composes | 429 on compose | seconds | appends/s |")
    print("|---|---|---|---|---|---|")
    for r in (r for r in rows if "writers" in r):
        print(
            f"| {r['writers']} | {r['appends']} | {r['composes']} | {r['compose_429']} | "
            f"{r['seconds']} | {r['appends_per_second']} |"
        )
    print(json.dumps({"benchmark": "shared_object", "rows": rows}))
    return code


if __name__ == "__main__":
    sys.exit(main())
