"""The reference tool ("Proto Aggregator", Go) built from its source and measured on our services.

    PYTHONPATH=. .venv/bin/python benchmarks/reference_tool.py [--smoke]
        [--reference-src DIR] [--messages N] [--settings 200000:1s,50000:1s] [--partitions 1,4]
        [--bootstrap HOST:PORT] [--gcs http://HOST:PORT] [--admin-dsn postgresql://...]

The reference's code is not part of this repository: ``--reference-src`` (default
$PROTOAGG_REFERENCE_SRC) names a directory holding it, reconstructed and patched as
``benchmarks/reference_tool.md`` describes. Without one this prints how to provide it and a JSON
line with ``"skipped"``, so ``benchmarks/run`` still succeeds. The binary is built once per source
(``GOTOOLCHAIN=local go mod tidy && go build`` on a copy of the directory, Go and gcc needed,
cgo on) and cached by the sources' hash under ~/.cache/protoagg-reference.

Each measurement, for one ``BATCH_SIZE:TIMEOUT`` setting and a partition count P, as documented: the
hard-wired topic ``logs`` deleted (point this at bench services only) and recreated with P
partitions; N seed-shaped messages (``benchmarks/run_once.make_values``) produced round robin and
read back once by the kafka-python raw ceiling (``benchmarks/e2e_dagster.py`` helpers, same
invocation); a fresh bucket holding an empty ``log.pb`` (the tool composes onto it and fails when it
is missing); a fresh database; a fresh consumer group (the tool subscribes to every partition of
``logs``). The clock runs from the process start until ``processed_logs`` holds every distinct logId
(the tool commits that transaction after its upload + compose, so the archive is complete then),
minus the tool's own 10 s start-up sleep; the process is then SIGKILLed, and ``log.pb`` is
downloaded and decoded: every distinct logId must be there exactly once.

Full size: 1,000,000 messages, ``200000:1s`` (its best setting) on 1 and 4 partitions. On 4 the
tool's one-entry-per-message offset commit stalls it for minutes per 200k batch (bug 5 in
reference_tool.md); ``--deadline`` bounds each measurement, which is then reported incomplete.
``--smoke``: 20,000 messages, ``200000:1s``, 1 partition.
The table, then one JSON line ``{"benchmark": "reference_tool", ...}`` (the last line of stdout).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import psycopg  # noqa: E402
from kafka.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError  # noqa: E402

from benchmarks.e2e_dagster import (  # noqa: E402
    Services,
    Topic,
    add_service_args,
    create_topic,
    end_offsets,
    fmt,
    produce,
    services_from,
)
from benchmarks.run_once import _rounded, database, make_values, processed_rows, raw_consume  # noqa: E402
from protoagg_dagster.core.framing import iter_records  # noqa: E402
from protoagg_dagster.resources import GCSResource  # noqa: E402

SOURCE_ENV = "PROTOAGG_REFERENCE_SRC"
CACHE = Path.home() / ".cache" / "protoagg-reference"
# Hard-wired in the tool: its topic, its archive object, and the sleep before it connects.
TOPIC = "logs"
OBJECT = "log.pb"
START_SLEEP_S = 10.0
BEST = "200000:1s"
SOURCE_FILES = ("*.go", "go.mod", "go.sum")
HOW_TO = (
    f"reference tool skipped: pass --reference-src DIR or set {SOURCE_ENV} to its Go source "
    "(reconstructed as benchmarks/reference_tool.md describes)"
)


@dataclass(frozen=True)
class Setting:
    """The tool's two knobs: distinct logIds per batch, and the idle time that ends a batch."""

    batch_size: int
    timeout: str

    @property
    def label(self) -> str:
        return f"{self.batch_size}/{self.timeout}"


def parse_settings(text: str) -> list[Setting]:
    """``200000:1s,50000:1s`` -> settings."""
    settings = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        size, _, timeout = item.partition(":")
        settings.append(Setting(int(size), timeout or "15s"))
    return settings


def reference_source(explicit: str | None) -> Path | None:
    value = explicit or os.environ.get(SOURCE_ENV)
    return Path(value).expanduser().resolve() if value else None


# --------------------------------------------------------------------------------------------
# build


def source_digest(src: Path) -> str:
    """Hash of the files the build reads, names included, so any edit rebuilds."""
    files = sorted({p for pattern in SOURCE_FILES for p in src.glob(pattern)})
    if not any(p.suffix == ".go" for p in files):
        raise SystemExit(f"{src}: no Go source here ({HOW_TO})")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build(src: Path, log: Callable[[str], None]) -> Path:
    """The tool's binary for ``src``, built on a copy (``go mod tidy`` rewrites go.mod/go.sum)."""
    home = CACHE / source_digest(src)
    binary = home / "aggregator"
    if binary.exists():
        log(f"reference binary (cached): {binary}")
        return binary
    work = home / "src"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for pattern in SOURCE_FILES:
        for path in src.glob(pattern):
            shutil.copy2(path, work / path.name)
    env = {**os.environ, "GOTOOLCHAIN": "local", "CGO_ENABLED": "1"}
    started = time.perf_counter()
    for command in (
        ["go", "mod", "tidy"],
        ["go", "build", "-o", str(home / "aggregator.tmp"), "."],
    ):
        try:
            done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        except FileNotFoundError as exc:
            raise SystemExit(f"building the reference tool needs Go on PATH: {exc}") from exc
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed in {work}:\n{done.stderr[-4000:]}")
    os.replace(home / "aggregator.tmp", binary)
    log(f"reference binary built in {time.perf_counter() - started:.0f} s: {binary}")
    return binary


# --------------------------------------------------------------------------------------------
# one measurement


def fresh_logs_topic(
    svc: Services, values: list[bytes], distinct: int, partitions: int, log: Callable[[str], None]
) -> Topic:
    """Recreate ``logs`` with ``partitions``, produce ``values``, take the raw ceiling."""
    kafka = svc.kafka(TOPIC)
    admin = kafka.get_admin()
    try:
        with contextlib.suppress(UnknownTopicOrPartitionError):
            admin.delete_topics([TOPIC])
    finally:
        admin.close()
    deadline = time.monotonic() + 60
    while True:  # the deletion completes asynchronously: creating too early is refused
        try:
            create_topic(kafka, TOPIC, partitions)
            break
        except TopicAlreadyExistsError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    while len(kafka.offset_bounds(TOPIC)) != partitions and time.monotonic() < deadline:
        time.sleep(0.2)
    produce_s = produce(kafka, TOPIC, values, partitions)
    ends = end_offsets(kafka, TOPIC)
    if sum(ends.values()) != len(values):
        raise RuntimeError(f"{TOPIC}: end offsets {ends} do not add up to {len(values)}")
    raw_s, _ = raw_consume(kafka, TOPIC, ends)
    topic = Topic(
        TOPIC, partitions, len(values), distinct, sum(map(len, values)), ends, produce_s, raw_s
    )
    log(
        f"topic {TOPIC}: {len(values):,} messages on {partitions} partition(s); raw consume "
        f"{raw_s:.2f} s ({topic.raw_msgs_per_s:,.0f} msg/s)"
    )
    return topic


def tool_env(svc: Services, dsn: str, bucket: str, group: str, setting: Setting) -> dict[str, str]:
    db = psycopg.conninfo.conninfo_to_dict(dsn)
    endpoint = f"{svc.gcs.rstrip('/')}/storage/v1/"
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "KAFKA_HOST": svc.bootstrap,
        "KAFKA_CONSUMER_GROUP": group,
        "DB_HOST": str(db.get("host", "127.0.0.1")),
        "DB_PORT": str(db.get("port", "5432")),
        "DB_USER": str(db.get("user", "postgres")),
        "DB_PASSWORD": str(db.get("password", "")),
        "DB_NAME": str(db["dbname"]),
        "GCS_ENDPOINT": endpoint,
        "STORAGE_EMULATOR_HOST": endpoint,
        "STORAGE_BUCKET": bucket,
        "BATCH_SIZE": str(setting.batch_size),
        "TIMEOUT": setting.timeout,
    }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a live process, from /proc (Linux only)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_archive(data: bytes, ids: set[str]) -> dict[str, Any]:
    """Decode ``log.pb``: every expected logId exactly once, nothing else."""
    counts = Counter(record.log_id for record in iter_records(io.BytesIO(data)))
    missing = len(ids - counts.keys())
    unexpected = len(counts.keys() - ids)
    duplicates = sum(c - 1 for c in counts.values())
    return {
        "records": sum(counts.values()),
        "bytes": len(data),
        "missing": missing,
        "unexpected": unexpected,
        "duplicates": duplicates,
        "ok": missing == 0 and unexpected == 0 and duplicates == 0,
    }


def measure(
    svc: Services,
    binary: Path,
    values: list[bytes],
    partitions: int,
    setting: Setting,
    deadline_s: float,
    log_dir: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Archive ``values`` on a fresh ``logs`` with the tool; the result, checked against GCS."""
    ids = {orjson.loads(v)["logId"] for v in values}
    topic = fresh_logs_topic(svc, values, len(ids), partitions, log)
    token = uuid.uuid4().hex[:8]
    client = GCSResource(bucket=svc.bucket, emulator_host=svc.gcs).get_client()
    bucket = client.create_bucket(f"reference-{token}")
    bucket.blob(OBJECT).upload_from_string(b"")
    log_dir.mkdir(parents=True, exist_ok=True)
    tool_log = log_dir / f"reference-{token}-{partitions}p-{setting.batch_size}.log"
    done_s = exit_code = cpu = None
    processed = 0
    with database(svc.admin_dsn, svc.admin_dsn) as dsn, tool_log.open("wb") as out:
        env = tool_env(svc, dsn, bucket.name, f"reference-{token}", setting)
        started = time.perf_counter()
        process = subprocess.Popen([str(binary)], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while time.perf_counter() - started < deadline_s:
                exit_code = process.poll()
                # The table appears after the start-up sleep; rows only with a batch's commit.
                processed = processed_rows(dsn)
                if processed >= len(ids):
                    done_s = time.perf_counter() - started
                    break
                if exit_code is not None:
                    break
                time.sleep(0.25)
            cpu = cpu_seconds(process.pid)
        finally:
            process.kill()
            process.wait()
    output = tool_log.read_text(errors="replace")
    archive = check_archive(bucket.blob(OBJECT).download_as_bytes(), ids)
    bucket.delete(force=True)  # the emulator keeps every object on disk
    seconds = done_s - START_SLEEP_S if done_s is not None else None
    result = {
        "tool": "reference",
        "partitions": partitions,
        "messages": topic.messages,
        "distinct_log_ids": topic.distinct,
        "batch_size": setting.batch_size,
        "timeout": setting.timeout,
        "setting": setting.label,
        "produce_s": topic.produce_s,
        "raw_consume_msgs_per_s": topic.raw_msgs_per_s,
        "batches": output.count("Processing batch"),
        # Short of distinct_log_ids when the deadline or the tool's exit came first.
        "processed_log_ids": processed,
        "seconds": seconds,
        "msgs_per_s": topic.messages / seconds if seconds else None,
        "ratio_to_raw": topic.messages / seconds / topic.raw_msgs_per_s if seconds else None,
        "cpu_s": cpu,
        "exit_code": exit_code,
        "archive": archive,
        "complete": seconds is not None and archive["ok"],
        "log": str(tool_log),
    }
    if not result["complete"]:
        tail = "\n    ".join(output.strip().splitlines()[-8:])
        log(
            f"  reference {setting.label} {partitions}p FAILED (exit {exit_code}; "
            f"{processed:,} of {len(ids):,} ids processed):\n    {tail}"
        )
    else:
        log(
            f"  reference {setting.label} {partitions}p: {seconds:.1f} s after the start-up "
            f"sleep, {result['msgs_per_s']:,.0f} msg/s, {result['batches']} batches, archive ok"
        )
    return result


# --------------------------------------------------------------------------------------------
# report


def print_table(results: list[dict[str, Any]]) -> None:
    head = (
        f"  {'setting':<14}{'part':>5}{'msgs':>10}{'batches':>8}{'seconds':>9}{'msg/s':>9}"
        f"{'%raw':>7}{'cpu s':>7}{'archive':>9}"
    )
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in results:
        ratio = r["ratio_to_raw"]
        archive = "ok" if r["archive"]["ok"] else "BAD"
        print(
            f"  {r['setting']:<14}{r['partitions']:>5}{r['messages']:>10,}{r['batches']:>8}"
            f"{fmt(r['seconds']):>9}{fmt(r['msgs_per_s'], ',.0f'):>9}"
            f"{fmt(100 * ratio if ratio else None):>7}{fmt(r['cpu_s']):>7}{archive:>9}"
        )
    print(
        "  (seconds: process start -> processed_logs holds every distinct id, minus its 10 s "
        "start-up sleep;\n   archive: log.pb decoded, every distinct id exactly once)"
    )


def skipped(name: str, reason: str) -> int:
    """The one-line explanation and the JSON line of a benchmark that could not run."""
    print(reason)
    print(json.dumps({"benchmark": name, "skipped": reason}, separators=(",", ":")))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="20k messages, best setting, 1p")
    parser.add_argument("--reference-src", default=None, help=f"default ${SOURCE_ENV}")
    parser.add_argument("--messages", "-n", type=int, default=None)
    parser.add_argument(
        "--settings", default=BEST, help="BATCH_SIZE:TIMEOUT,... (default %(default)s)"
    )
    parser.add_argument("--partitions", default=None, help="comma separated (default 1,4)")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds per measurement")
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--log-dir", default=None, help="the tool's output (default: tmp)")
    add_service_args(parser)
    args = parser.parse_args()
    src = reference_source(args.reference_src)
    if src is None:
        return skipped("reference_tool", HOW_TO)
    svc = services_from(parser, args)
    n = args.messages or (20_000 if args.smoke else 1_000_000)
    partitions = [int(p) for p in (args.partitions or ("1" if args.smoke else "1,4")).split(",")]
    log_dir = Path(args.log_dir or f"/tmp/protoagg-bench-reference-{uuid.uuid4().hex[:6]}")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.time()
    binary = build(src, log)
    results = []
    for p in partitions:
        values, _ = make_values(n, 0.05, args.seed + 1000 * p + n)
        for setting in parse_settings(args.settings):
            results.append(measure(svc, binary, values, p, setting, args.deadline, log_dir, log))
    report = {
        "benchmark": "reference_tool",
        "smoke": args.smoke,
        "messages": n,
        "binary": str(binary),
        "cpus": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "seed": args.seed,
        "results": results,
        "wall_s": time.time() - started,
    }
    print()
    print(f"the reference tool (Go, patched) on the bench services ({report['cpus']} CPUs shared)")
    print_table(results)
    print(
        f"  whole benchmark: {report['wall_s']:.0f} s; load average at the end "
        f"{report['loadavg_end'][0]:.1f}"
    )
    print(json.dumps(_rounded(report), separators=(",", ":")))
    return 0  # an incomplete measurement is reported ("complete": false), as e2e_dagster does


if __name__ == "__main__":
    sys.exit(main())
