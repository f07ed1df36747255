"""Peak memory of one archive run: by batch size, and against a small vs a large archive object.

    .venv/bin/python benchmarks/memory.py [--smoke] [--sizes 10000,100000,1000000] \
        [--archive-records 1200000] [--flat-batch 100000] [--repeats 2] \
        [--bootstrap ...] [--dsn ...] [--admin-dsn ...] [--gcs ...]

Each run is one ``archive_kafka_batch`` over ``[0, size)`` of a topic holding seed-shaped
messages (``run_once.make_values``), executed in a fresh child process
(``python -m tests.e2e.run_range SPEC``: ``execute_in_process`` in a test instance), with its own
archive object and, with ``--admin-dsn``, its own fresh database. The child's peak resident set
(``VmHWM`` of ``/proc/self/status``, read by the child once its run returned) is its
high-water mark.

1. **by batch size**: a 100-message run (the import + Dagster baseline), then each size; reported
   with the growth over the baseline per message.
2. **flat in archive size**: the same ``--flat-batch`` run appended to an empty object and to an
   object that already holds ``--archive-records`` records (uploaded beforehand, with offsets
   metadata of another partition): the run must not read the archive, so both peaks must match.

``max_batch_bytes`` is raised so the largest size is read whole. Runs alternate between the two
cases of step 2; each case is repeated (``--repeats``, median), the largest size once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run_once import (  # noqa: E402
    _rounded,
    add_service_args,
    code_version,
    create_topic,
    database,
    make_values,
    produce,
    require_service_args,
)
from protoagg_dagster.archive.store import CONTENT_TYPE  # noqa: E402
from protoagg_dagster.core.framing import encode_records  # noqa: E402
from protoagg_dagster.core.records import LogRecord  # noqa: E402
from protoagg_dagster.resources import GCSResource, KafkaResource  # noqa: E402

BASELINE = 100


# The child runs tests/e2e/run_range.py's main, then reports its own high-water mark. VmHWM is
# that of the process image after exec; ru_maxrss (getrusage, wait4) is not usable here: Linux
# keeps the pre-exec peak in it, i.e. the forking parent's RSS (this process, holding the
# messages it produced).
CHILD = (
    "import json, sys\n"
    "from tests.e2e.run_range import main\n"
    "code = main()\n"
    "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
    "print(json.dumps({k: int(status[k].split()[0]) for k in ('VmHWM', 'VmRSS')}))\n"
    "sys.exit(code)\n"
)


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one archive in a child process; its peak RSS (MiB), wall seconds and CPU seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(spec)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            check=False,
        )
        wall = time.perf_counter() - started
        if child.returncode != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"run {spec['ranges']} failed ({child.returncode}):\n{tail}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    memory = json.loads(child.stdout.decode().strip().splitlines()[-1])
    return {
        "peak_rss_mib": memory["VmHWM"] / 1024,
        "final_rss_mib": memory["VmRSS"] / 1024,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime,
    }


def spec_for(
    args: argparse.Namespace, dsn: str, topic: str, size: int, object_name: str
) -> dict[str, Any]:
    return {
        "resources": {
            "kafka": {"bootstrap_servers": args.bootstrap, "topics": topic},
            "postgres": {"dsn": dsn},
            "lease": {"postgres": {"dsn": dsn}},
            "gcs": {
                "bucket": args.bucket,
                "object_template": object_name,
                "emulator_host": args.gcs,
            },
            "archiver": {
                "max_batch_messages": max(size, 500),
                "max_batch_bytes": 1 << 31,
            },
        },
        "ranges": [[topic, 0, 0, size]],
        "crash_at": None,
    }


def one_run(args: argparse.Namespace, topic: str, size: int, object_name: str) -> dict[str, Any]:
    with database(args.dsn, args.admin_dsn) as dsn:
        return run_child(spec_for(args, dsn, topic, size, object_name))


def upload_archive(gcs: GCSResource, name: str, records: int) -> int:
    """An archive object of ``records`` seed-like records, recorded as another partition's."""
    base = 1_793_000_000
    data = encode_records(
        LogRecord(i, str(uuid.uuid4()), base + i // 100, (i % 1000) * 1_000_000, f"old #{i}")
        for i in range(records)
    )
    blob = gcs.get_bucket().blob(name)
    blob.upload_from_string(data, content_type=CONTENT_TYPE)
    return len(data)


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="sizes 5k/20k, 100k-record archive")
    parser.add_argument("--sizes", default=None, help="batch sizes, comma separated")
    parser.add_argument("--archive-records", type=int, default=None, help="default 1,200,000")
    parser.add_argument("--flat-batch", type=int, default=None, help="default 100,000")
    parser.add_argument("--repeats", type=int, default=None, help="default 2 (smoke: 1)")
    parser.add_argument("--seed", type=int, default=3)
    add_service_args(parser)
    args = parser.parse_args()
    require_service_args(parser, args, ("bootstrap", "dsn", "gcs"))
    sizes = [
        int(x)
        for x in (args.sizes or ("5000,20000" if args.smoke else "10000,100000,1000000")).split(",")
    ]
    archive_records = args.archive_records or (100_000 if args.smoke else 1_200_000)
    flat_batch = args.flat_batch or (20_000 if args.smoke else 100_000)
    args.repeats = args.repeats or (1 if args.smoke else 2)
    started = time.perf_counter()
    token = uuid.uuid4().hex[:10]
    topic = f"bench-memory-{token}"
    n = max([*sizes, flat_batch])

    values, _ = make_values(n, 0.05, args.seed)
    kafka = KafkaResource(bootstrap_servers=args.bootstrap, topics=topic)
    create_topic(kafka, topic)
    produce(kafka, topic, values)
    avg_bytes = sum(map(len, values)) / n
    del values
    gcs = GCSResource(bucket=args.bucket, emulator_host=args.gcs)

    # 1. by batch size
    by_size: dict[str, Any] = {}
    for size in [BASELINE, *sizes]:
        repeats = 1 if size >= 1_000_000 else args.repeats
        runs = [
            one_run(args, topic, size, f"bench/{token}/size-{size}-{i}.pb") for i in range(repeats)
        ]
        by_size[str(size)] = {
            "runs": runs,
            "peak_rss_mib": median_of(runs, "peak_rss_mib"),
            "wall_s": median_of(runs, "wall_s"),
        }
        print(
            f"  {size:>9,} messages: peak {by_size[str(size)]['peak_rss_mib']:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    base_rss = by_size[str(BASELINE)]["peak_rss_mib"]
    for size in sizes:
        entry = by_size[str(size)]
        entry["growth_mib"] = entry["peak_rss_mib"] - base_rss
        entry["bytes_per_message"] = entry["growth_mib"] * 1024 * 1024 / size

    # 2. flat in archive size
    big_name = f"bench/{token}/big-archive.pb"
    upload_s = time.perf_counter()
    big_bytes = upload_archive(gcs, big_name, archive_records)
    upload_s = time.perf_counter() - upload_s
    flat: dict[str, list[dict[str, Any]]] = {"empty": [], "large": []}
    for i in range(args.repeats):
        # each large-archive run appends to its own copy of the big object
        copy_name = f"bench/{token}/big-archive-{i}.pb"
        bucket = gcs.get_bucket()
        source = bucket.blob(big_name)
        bucket.copy_blob(source, bucket, copy_name)
        flat["empty"].append(one_run(args, topic, flat_batch, f"bench/{token}/flat-empty-{i}.pb"))
        flat["large"].append(one_run(args, topic, flat_batch, copy_name))
    empty_rss = median_of(flat["empty"], "peak_rss_mib")
    large_rss = median_of(flat["large"], "peak_rss_mib")
    with contextlib.suppress(Exception):
        gcs.get_bucket().blob(big_name).delete()

    report: dict[str, Any] = {
        "benchmark": "memory",
        "smoke": args.smoke,
        "code": code_version(),
        "avg_value_bytes": avg_bytes,
        "baseline_messages": BASELINE,
        "baseline_peak_rss_mib": base_rss,
        "by_size": by_size,
        "flat": {
            "batch": flat_batch,
            "archive_records": archive_records,
            "archive_bytes": big_bytes,
            "upload_s": upload_s,
            "empty_peak_rss_mib": empty_rss,
            "large_peak_rss_mib": large_rss,
            "large_minus_empty_mib": large_rss - empty_rss,
            "empty_wall_s": median_of(flat["empty"], "wall_s"),
            "large_wall_s": median_of(flat["large"], "wall_s"),
            "runs": flat,
        },
        "duration_s": time.perf_counter() - started,
    }
    print()
    print(
        f"peak RSS of one archive_kafka_batch run (fresh child process, execute_in_process); "
        f"avg {avg_bytes:.0f} B/value; code {report['code']}"
    )
    print(f"  {'batch':>10}{'runs':>6}{'peak MiB':>10}{'over base':>11}{'B/msg':>8}{'wall s':>8}")
    for size in [BASELINE, *sizes]:
        e = by_size[str(size)]
        growth = f"{e['growth_mib']:11.0f}" if "growth_mib" in e else f"{'(base)':>11}"
        per = f"{e['bytes_per_message']:8.0f}" if "bytes_per_message" in e else f"{'':>8}"
        print(
            f"  {size:>10,}{len(e['runs']):>6}{e['peak_rss_mib']:10.0f}{growth}{per}"
            f"{e['wall_s']:8.1f}"
        )
    f = report["flat"]
    print()
    print(
        f"  same {flat_batch:,}-message batch, appended to an empty object vs one already holding "
        f"{archive_records:,} records ({big_bytes / 1e6:.0f} MB), median of {args.repeats}:"
    )
    print(f"  {'archive':>10}{'peak MiB':>10}{'wall s':>8}")
    print(f"  {'empty':>10}{empty_rss:10.0f}{f['empty_wall_s']:8.1f}")
    print(f"  {'large':>10}{large_rss:10.0f}{f['large_wall_s']:8.1f}")
    print(f"  difference {large_rss - empty_rss:+.0f} MiB")
    print(f"  duration {report['duration_s']:.0f} s")
    print()
    print(json.dumps(_rounded(report), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
