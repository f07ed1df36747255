"""What compression buys and costs: ratio and MB/s per codec and level, then end to end.

    .venv/bin/python benchmarks/compression.py [--smoke] [-n N] [--piece-records R] \
        [--repeats K] [--bootstrap HOST:PORT] [--dsn postgresql://...] [--gcs http://...]

(a) **codecs**, pure CPU: archive pieces of ``--piece-records`` records (as one run's encode op
    makes them: frames of ``ProtoLog``, then ``Codec.compress``) on four data sets: the messages
    of ``examples/messages.jsonl`` (fresh logIds and times), synthetic 125-byte and 1 KB log
    lines, and random bytes of the same size. Ratio = framed bytes / compressed bytes;
    compress MB/s and decompress MB/s (``core.compression.decompressed``) of framed bytes, best
    of ``--repeats``.
(b) **end to end**, with services: one ``archive_kafka_batch`` run (``execute_in_process``, as
    ``run_once.py``) of N log lines of ``--line-bytes`` (default 125) per codec (fresh topic and
    object each, codecs in turn, ``--repeats`` rounds): median msg/s and the stored object's
    ratio. The target: zstd within 10% of none at a ratio of at least 4.

A table, then one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run_once import (  # noqa: E402
    _rounded,
    add_service_args,
    code_version,
    create_topic,
    produce,
    require_service_args,
    run_archive,
)
from protoagg_dagster.archive.partition_lease import PartitionLease  # noqa: E402
from protoagg_dagster.core.compression import Codec, decompressed  # noqa: E402
from protoagg_dagster.core.framing import encode_records  # noqa: E402
from protoagg_dagster.core.records import LogRecord  # noqa: E402
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource  # noqa: E402
from protoagg_dagster.resources.settings import ArchiverSettings  # noqa: E402

LEVELS = (("none", None), ("gzip", 1), ("gzip", 6), ("gzip", 9), ("zstd", 1), ("zstd", 3))
FULL_LEVELS = (*LEVELS, ("zstd", 9), ("zstd", 19))
E2E_CODECS = (("none", None), ("gzip", 6), ("zstd", 3))
SERVICES = ("api", "auth", "billing", "search", "gateway", "worker")
PATHS = ("/v1/items", "/v1/cart", "/v1/users/me", "/v1/search", "/healthz", "/v1/orders")
LEVEL_NAMES = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")


def log_line(rng: random.Random, i: int, size: int) -> str:
    """A realistic application log line of about ``size`` bytes (request logs, ids, timings)."""
    line = (
        f"2026-11-01T08:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}Z "
        f"{rng.choice(LEVEL_NAMES):5} {rng.choice(SERVICES)}[{rng.randrange(1, 64)}] "
        f"{rng.choice(('GET', 'GET', 'POST'))} {rng.choice(PATHS)}/{rng.randrange(10**6)} "
        f"{rng.choice((200, 200, 200, 404, 500))} {rng.randrange(1, 900)}ms "
        f"user={rng.randrange(10**5)} trace={rng.getrandbits(64):016x}"
    )
    while len(line) < size:
        # Longer lines carry the structured context such logs do: headers, query, upstream.
        line += (
            f" upstream={rng.choice(SERVICES)}:{rng.randrange(8000, 8100)}"
            f" bytes={rng.randrange(10**6)} agent=Mozilla/5.0 (X11; Linux x86_64)"
            f" region=europe-west{rng.randrange(1, 5)} cache={rng.choice(('hit', 'miss'))}"
        )
    return line[:size]


def examples(rng: random.Random, count: int) -> list[str]:
    lines = (ROOT / "examples" / "messages.jsonl").read_text().splitlines()
    messages = [json.loads(line)["message"] for line in lines if line.strip()]
    return [messages[i % len(messages)] for i in range(count)]


def records(messages: list[str], rng: random.Random) -> list[LogRecord]:
    return [
        LogRecord(i, str(uuid.UUID(int=rng.getrandbits(128), version=4)), 1_793_520_000 + i, 0, m)
        for i, m in enumerate(messages)
    ]


def data_sets(piece_records: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    framed = {
        "examples": encode_records(records(examples(rng, piece_records), rng)),
        "log lines 125 B": encode_records(
            records([log_line(rng, i, 125) for i in range(piece_records)], rng)
        ),
        "log lines 1 KB": encode_records(
            records([log_line(rng, i, 1024) for i in range(piece_records)], rng)
        ),
    }
    framed["random bytes"] = rng.randbytes(len(framed["log lines 125 B"]))
    return framed


def best_of(repeats: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def measure_codecs(
    sets: dict[str, bytes], levels: tuple[tuple[str, int | None], ...], repeats: int
) -> list[dict[str, Any]]:
    rows = []
    for set_name, data in sets.items():
        mb = len(data) / 1e6
        for name, level in levels:
            codec = Codec(name, level)
            piece = codec.compress(data)
            assert decompressed(io.BytesIO(piece), name).read() == data
            packing = best_of(repeats, lambda c=codec, d=data: c.compress(d))
            unpacking = best_of(
                repeats, lambda n=name, p=piece: decompressed(io.BytesIO(p), n).read()
            )
            rows.append(
                {
                    "data": set_name,
                    "codec": name,
                    "level": level,
                    "framed_bytes": len(data),
                    "ratio": len(data) / len(piece),
                    "compress_mb_s": mb / packing if name != "none" else None,
                    "decompress_mb_s": mb / unpacking if name != "none" else None,
                }
            )
    return rows


def end_to_end(args: argparse.Namespace, n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    token = uuid.uuid4().hex[:10]
    runs: dict[tuple[str, int | None], list[dict[str, Any]]] = {c: [] for c in E2E_CODECS}
    for round_number in range(args.repeats):
        for name, level in E2E_CODECS:
            topic = f"bench-compress-{token}-{name}-{round_number}"
            base = 1_793_520_000_000
            values = [
                orjson.dumps(
                    {
                        "logId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                        "timestamp": time.strftime(
                            "%Y-%m-%dT%H:%M:%S", time.gmtime((base + i * 7) // 1000)
                        )
                        + f".{(base + i * 7) % 1000:03d}Z",
                        "message": log_line(rng, i, args.line_bytes),
                    }
                )
                for i in range(n)
            ]
            kafka = KafkaResource(bootstrap_servers=args.bootstrap, topics=topic)
            gcs = GCSResource(
                bucket=args.bucket,
                object_template=f"bench/{token}/{topic}.pb",
                emulator_host=args.gcs,
                compression=name,
                compression_level=level,
                create_bucket=True,
            )
            resources = {
                "kafka": kafka,
                "postgres": PostgresResource(dsn=args.dsn),
                "gcs": gcs,
                "archiver": ArchiverSettings(max_batch_messages=n),
                "lease": PartitionLease(postgres=PostgresResource(dsn=args.dsn)),
            }
            create_topic(kafka, topic)
            produce(kafka, topic, values)
            run = run_archive(resources, topic, n)
            blob = gcs.get_bucket().get_blob(gcs.object_template)
            framed = len(decompressed(io.BytesIO(blob.download_as_bytes()), name).read())
            run["ratio"] = framed / blob.size
            runs[(name, level)].append(run)
    rows = []
    for (name, level), measured in runs.items():
        rows.append(
            {
                "codec": name,
                "level": level,
                "messages": n,
                "line_bytes": args.line_bytes,
                "msgs_per_s": statistics.median(r["msgs_per_s"] for r in measured),
                "encode_s": statistics.median(r["seconds"]["encode"] for r in measured),
                "ratio": statistics.median(r["ratio"] for r in measured),
            }
        )
    return rows


def print_tables(codecs: list[dict[str, Any]], e2e: list[dict[str, Any]] | None) -> None:
    if codecs:
        print(
            f"{'data':<16} {'codec':<8} {'ratio':>7} {'compress MB/s':>14} {'decompress MB/s':>16}"
        )
    for row in codecs:
        label = row["codec"] + (f" {row['level']}" if row["level"] is not None else "")
        packing = f"{row['compress_mb_s']:.0f}" if row["compress_mb_s"] else "-"
        unpacking = f"{row['decompress_mb_s']:.0f}" if row["decompress_mb_s"] else "-"
        print(f"{row['data']:<16} {label:<8} {row['ratio']:>7.2f} {packing:>14} {unpacking:>16}")
    if not e2e:
        return
    none = next(r for r in e2e if r["codec"] == "none")["msgs_per_s"]
    print(f"\nend to end, {e2e[0]['messages']} messages of {e2e[0]['line_bytes']}-byte lines")
    print(f"{'codec':<12} {'msg/s':>10} {'vs none':>8} {'encode s':>9} {'ratio':>7}")
    for row in e2e:
        label = row["codec"] + (f" {row['level']}" if row["level"] is not None else "")
        change = row["msgs_per_s"] / none - 1
        print(
            f"{label:<12} {row['msgs_per_s']:>10.0f} {change:>+8.1%} {row['encode_s']:>9.3f} "
            f"{row['ratio']:>7.2f}"
        )
    zstd = next(r for r in e2e if r["codec"] == "zstd")
    held = zstd["msgs_per_s"] >= 0.9 * none and zstd["ratio"] >= 4
    print(f"target (zstd within 10% of none at ratio >= 4): {'met' if held else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small pieces, 5k-message runs")
    parser.add_argument("--messages", "-n", type=int, default=None, help="default 100k")
    parser.add_argument("--piece-records", type=int, default=None, help="default 10000")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (smoke: 1)")
    parser.add_argument("--codecs-only", action="store_true", help="skip the end-to-end runs")
    parser.add_argument("--e2e-only", action="store_true", help="skip the codec table")
    parser.add_argument("--line-bytes", type=int, default=125, help="end to end: message size")
    parser.add_argument("--seed", type=int, default=None)
    add_service_args(parser)
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.smoke else 3)
    n = args.messages or (5_000 if args.smoke else 100_000)
    piece_records = args.piece_records or (1_000 if args.smoke else 10_000)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    if not args.codecs_only:
        require_service_args(parser, args, ("bootstrap", "dsn", "gcs"))

    codecs = (
        []
        if args.e2e_only
        else measure_codecs(
            data_sets(piece_records, seed), LEVELS if args.smoke else FULL_LEVELS, args.repeats
        )
    )
    e2e = None if args.codecs_only else end_to_end(args, n, seed)
    print_tables(codecs, e2e)
    report = {
        "benchmark": "compression",
        "code": code_version(),
        "seed": seed,
        "piece_records": piece_records,
        "cpus": os.cpu_count(),
        "codecs": codecs,
        "end_to_end": e2e,
    }
    print(json.dumps(_rounded(report), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
