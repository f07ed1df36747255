"""Where an archive run's time goes, step by step, on real services but without Dagster.

    .venv/bin/python benchmarks/steps.py [--smoke] [-n N] [--batch B] [--repeats R] \
        [--bootstrap HOST:PORT] [--dsn postgresql://...] [--admin-dsn ...] [--gcs http://...]

On one fresh topic (1 partition) holding N seed-shaped messages (``run_once.make_values``: ~120-byte
JSON values, 5% repeated logIds) and, with ``--admin-dsn``, a fresh database:

(a) **ceiling**: kafka-python reads and discards the N messages (``run_once.raw_consume``), and
    so does librdkafka (``confluent-kafka``, the reader's settings);
(b) **per step**, on the same N, each with the package's own functions:
    consume (``read_range``, building the ``KafkaMessage`` list) with each client
    (PROTOAGG_KAFKA_CLIENT; both must give the same messages), parse (straight to frames, in
    10k chunks as the consume op does) and encode (the join of the frames dedupe keeps) of the
    ``log`` format and, on the same messages, of the ``record`` format (pure CPU; rates also per
    CPU-second of the thread, i.e. per core), then per batch of ``--batch`` messages: dedupe
    (``claim_batch``), append (``append_batch`` with the object lock, to the emulator), finish
    (``finish_batch``) and the op's read-back checks (``evaluate_batch``);
plus the **hand-off** a deployed run adds between ops: Dagster's default IO manager
(``fs_io_manager``; ``execute_in_process`` swaps in an in-memory one) pickles each op's output to
disk and the next op unpickles it; measured on the first batch's real outputs;
(c) **fixed cost per run**: tiny ``archive_kafka_batch`` runs (``run_once.run_archive``): launch
    to the first op and last op to RUN_SUCCESS, from Dagster's event timestamps; the first run of
    the process (cold) is reported apart from the median of the next ones (warm).

Consume and the CPU steps are repeated (``--repeats``, alternating ceilings and pipeline reads) and
reported as medians; the batch steps as the median over the batches. A table, then one JSON line.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import confluent_kafka
import dagster as dg

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
    raw_consume,
    require_service_args,
    run_archive,
)
from protoagg_dagster.archive.checks import Written, evaluate_batch  # noqa: E402
from protoagg_dagster.archive.ledger import (  # noqa: E402
    AppendedBatch,
    AppendLedger,
    Claim,
    claim_batch,
    finish_batch,
    gap_before,
    ledger_connection,
)
from protoagg_dagster.archive.ops import Claimed, Consumed, Encoded, collector_paused  # noqa: E402
from protoagg_dagster.archive.partition_lease import PartitionLease  # noqa: E402
from protoagg_dagster.archive.store import append_batch  # noqa: E402
from protoagg_dagster.core.archive_object import Piece  # noqa: E402
from protoagg_dagster.core.batch import FramedBatch, Row  # noqa: E402
from protoagg_dagster.core.formats import ArchiveFormat, LogFormat, RecordFormat  # noqa: E402
from protoagg_dagster.core.planning import OffsetRange  # noqa: E402
from protoagg_dagster.core.records import KafkaMessage  # noqa: E402
from protoagg_dagster.kafka.reader import RangeRead, read_range  # noqa: E402
from protoagg_dagster.resources import GCSResource, KafkaResource, PostgresResource  # noqa: E402
from protoagg_dagster.resources.settings import ArchiverSettings  # noqa: E402

T = TypeVar("T")
MAX_MESSAGE_BYTES = ArchiverSettings().max_message_bytes
ENCODE_TARGET_PER_CORE = 300_000


class Timed:
    """Wall, process CPU and this thread's CPU seconds of a block."""

    def __enter__(self) -> Timed:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        self._thread = time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
        self.thread = time.thread_time() - self._thread


def timed(call: Callable[[], T]) -> tuple[T, Timed]:
    with Timed() as t:
        result = call()
    return result, t


def summary(n: int, walls: list[float], cpus: list[float]) -> dict[str, Any]:
    """Medians of repeated timings of ``n`` messages, and the rates they give."""
    wall = statistics.median(walls)
    cpu = statistics.median(cpus)
    return {
        "messages": n,
        "repeats": len(walls),
        "wall_s": wall,
        "cpu_s": cpu,
        "msgs_per_s": n / wall if wall > 0 else None,
        "msgs_per_cpu_s": n / cpu if cpu > 0 else None,
        "walls_s": walls,
    }


# --------------------------------------------------------------------------------------------
# (a) + consume


def pipeline_read(kafka: KafkaResource, topic: str, n: int) -> list[KafkaMessage]:
    """The consume op's read: a fresh reader, ``read_range`` with the collector paused."""
    reader = kafka.get_reader()
    try:
        with collector_paused():
            read = read_range(reader, OffsetRange(topic, 0, 0, n), max_bytes=2**62)
    finally:
        reader.close()
    if len(read.messages) != n:
        raise RuntimeError(f"read_range returned {len(read.messages)} of {n} messages")
    return read.messages


def raw_confluent(kafka: KafkaResource, topic: str, n: int) -> int:
    """librdkafka's ceiling: read and discard partition 0 up to ``n`` with the reader's config."""
    consumer = confluent_kafka.Consumer(kafka.confluent_consumer_config())
    try:
        consumer.assign([confluent_kafka.TopicPartition(topic, 0, 0)])
        count = 0
        deadline = time.monotonic() + 300
        while count < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"raw librdkafka consume: only {count} of {n} in 300 s")
            count += sum(m.error() is None for m in consumer.consume(10_000, timeout=1.0))
    finally:
        consumer.close()
    return count


CONSUME_KINDS = ("ceiling", "consume", "ceiling_confluent", "consume_confluent")


def measure_consume(
    kafka: KafkaResource, topic: str, n: int, repeats: int
) -> tuple[dict[str, dict[str, Any]], list[KafkaMessage]]:
    """The four reads of ``CONSUME_KINDS``, alternated; the kafka-python read's messages."""
    confluent = KafkaResource(
        bootstrap_servers=kafka.bootstrap_servers, topics=kafka.topics, client="confluent"
    )
    walls: dict[str, list[float]] = {kind: [] for kind in CONSUME_KINDS}
    cpus: dict[str, list[float]] = {kind: [] for kind in CONSUME_KINDS}
    messages: list[KafkaMessage] = []

    def record(kind: str, t: Timed) -> None:
        walls[kind].append(t.wall)
        cpus[kind].append(t.cpu)

    for i in range(repeats):
        (_, count), t = timed(lambda: raw_consume(kafka, topic, {0: n}))
        record("ceiling", t)
        if count < n:
            raise RuntimeError(f"raw consume read {count} of {n}")
        messages = []
        gc.collect()
        messages, t = timed(lambda: pipeline_read(kafka, topic, n))
        record("consume", t)
        count, t = timed(lambda: raw_confluent(confluent, topic, n))
        record("ceiling_confluent", t)
        gc.collect()
        same, t = timed(lambda: pipeline_read(confluent, topic, n))
        record("consume_confluent", t)
        if i == 0 and same != messages:
            raise RuntimeError("the two Kafka clients read different messages")
        del same
    return {kind: summary(n, walls[kind], cpus[kind]) for kind in CONSUME_KINDS}, messages


# --------------------------------------------------------------------------------------------
# parse, encode


CHUNK = 10_000  # messages per poll of the reader, as the consume op parses them


def build_batch(messages: list[KafkaMessage], archive: ArchiveFormat) -> FramedBatch:
    """The consume op's parse: chunk by chunk as the reader delivers them, straight to frames."""
    builder = archive.batch_builder(messages[0].topic, messages[0].partition, MAX_MESSAGE_BYTES)
    for start in range(0, len(messages), CHUNK):
        builder.add(messages[start : start + CHUNK])
    return builder.finish()


def first_of_each_key(rows: list[Row]) -> list[Row]:
    """What dedupe keeps of a fresh window: the first record of each key (all when keyless)."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = row.dedupe_key
        if key is None or key not in seen:
            kept.append(row)
            if key is not None:
                seen.add(key)
    return kept


def measure_cpu_steps(
    messages: list[KafkaMessage], repeats: int, archive: ArchiveFormat
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], FramedBatch]:
    """Parse and encode of ``archive`` (the log format, or the record format) on ``messages``.

    Parse builds the ``FramedBatch`` (frames made at parse time); encode joins the frames of
    what dedupe would keep (the first record of each key).
    """
    n = len(messages)
    parse_w, parse_c, enc_w, enc_c, both_w, both_c = [], [], [], [], [], []
    batch: FramedBatch | None = None
    for _ in range(repeats):
        batch = None
        gc.collect()
        with collector_paused():
            with Timed() as p:
                batch = build_batch(messages, archive)
            kept = first_of_each_key(batch.rows())
            with Timed() as e:
                data = batch.frames_of(kept)
        if batch.rejections or len(batch) != n or not data:
            raise RuntimeError(f"parse: {len(batch)} records, {len(batch.rejections)} rejections")
        del data, kept
        parse_w.append(p.wall)
        parse_c.append(p.thread)
        enc_w.append(e.wall)
        enc_c.append(e.thread)
        both_w.append(p.wall + e.wall)
        both_c.append(p.thread + e.thread)
    assert batch is not None
    return (
        summary(n, parse_w, parse_c),
        summary(n, enc_w, enc_c),
        summary(n, both_w, both_c),
        batch,
    )


# --------------------------------------------------------------------------------------------
# dedupe, append, finish, checks (per batch)


BATCH_STEPS = ("dedupe", "append", "finish", "checks")


def measure_batches(
    dsn: str,
    gcs: GCSResource,
    topic: str,
    records: FramedBatch,
    batch: int,
    distinct: int,
    archive: ArchiveFormat,
) -> tuple[dict[str, Any], tuple[Claim, bytes]]:
    """Claim, append, finish and check ``records`` in consecutive batches, as a run does.

    Also returns the first batch's claim and framed bytes (for the hand-off measurement).
    """
    n = len(records)
    offsets = list(records.offsets)
    all_rows = records.rows()
    name = gcs.object_template
    rows: list[dict[str, Any]] = []
    postgres = PostgresResource(dsn=dsn)
    # get_connection() connects and runs ensure_schema on entry (every op does, once per run):
    # the first creates the schema; time a second, warm one too
    with Timed() as first_connect, ledger_connection(postgres):
        pass
    with contextlib.ExitStack() as stack:
        with Timed() as warm_connect:
            conn = stack.enter_context(ledger_connection(postgres))
        bucket = gcs.writable_bucket()
        lock = gcs.bucket
        appended = 0
        for start in range(0, n, batch):
            end = min(start + batch, n)
            rng = OffsetRange(topic, 0, start, end)
            lo, hi = bisect.bisect_left(offsets, start), bisect.bisect_left(offsets, end)
            chunk = all_rows[lo:hi]
            with collector_paused():
                with Timed() as t_claim:
                    claim = claim_batch(conn, rng, chunk, name, None)
                data = records.frames_of(claim.kept)
            if claim.batch_id is None:
                raise RuntimeError(f"nothing claimed in {rng}")
            with Timed() as t_append:
                piece = Piece(claim.batch_id, "records", len(data))
                result = append_batch(
                    bucket,
                    name,
                    claim.batch,
                    piece,
                    data,
                    AppendLedger(conn, lock),
                    format_name=archive.name,
                )
            with Timed() as t_finish:
                finish_batch(conn, claim.batch_id, result.generation, len(data), result.object_size)
            with Timed() as t_checks:
                checks = evaluate_batch(
                    bucket,
                    AppendedBatch(claim.batch_id, claim.batch, name, len(data), result.object_size),
                    gaps=gap_before(conn, claim.batch),
                    archive=archive,
                    written=Written(data, claim.kept),
                )
            if not all(c.passed for c in checks):
                raise RuntimeError(f"a check failed for {rng}: {checks}")
            appended += len(claim.kept)
            if not rows:
                first = (claim, data)
            rows.append(
                {
                    "messages": end - start,
                    "kept": len(claim.kept),
                    "bytes": len(data),
                    "object_size": result.object_size,
                    "dedupe": (t_claim.wall, t_claim.cpu),
                    "append": (t_append.wall, t_append.cpu),
                    "finish": (t_finish.wall, t_finish.cpu),
                    "checks": (t_checks.wall, t_checks.cpu),
                }
            )
    if appended != distinct:
        raise RuntimeError(f"appended {appended} records, expected {distinct}")
    out: dict[str, Any] = {
        "batch": batch,
        "batches": len(rows),
        "first_connect_and_schema_s": first_connect.wall,
        "warm_connect_and_schema_s": warm_connect.wall,
        "object_bytes_final": rows[-1]["object_size"],
    }
    for step in BATCH_STEPS:
        walls = [row[step][0] for row in rows]
        cpus = [row[step][1] for row in rows]
        wall = statistics.median(walls)
        out[step] = {
            "per_batch_median_s": wall,
            "per_batch_cpu_median_s": statistics.median(cpus),
            "msgs_per_s": batch / wall if wall > 0 else None,
            "first_batch_s": walls[0],
            "last_batch_s": walls[-1],
            "total_s": sum(walls),
            "walls_s": walls,
        }
    return out, first


# --------------------------------------------------------------------------------------------
# hand-off between ops in a deployed run


def measure_handoff(
    topic: str, messages: list[KafkaMessage], first: tuple[Claim, bytes], repeats: int
) -> dict[str, Any]:
    """Store and load each op's output with Dagster's default IO manager (fs_io_manager).

    ``execute_in_process`` (run_once, the tests) swaps in an in-memory IO manager, but a run
    launched by the daemon or the UI uses the job's default, the filesystem pickling one: each
    op's output is pickled to ``$DAGSTER_HOME/storage/<run>/<step>/result`` and unpickled by the
    next op. The outputs are built exactly as the ops build them, for the first batch.
    """
    claim, data = first
    n = len(messages)
    read = RangeRead(
        OffsetRange(topic, 0, messages[0].offset, messages[-1].offset + 1),
        [],  # the consume op parses the messages as they arrive and keeps none
        sum(len(m.value or b"") for m in messages),
        0,
    )
    seconds = {"consume": 1.0, "dedupe": 1.0, "encode": 1.0}
    records = build_batch(messages, LogFormat())
    # The claim's rows as the first batch's own (those of measure_batches are of all N).
    kept_offsets = {r.offset for r in claim.kept}
    claim = dataclasses.replace(
        claim, kept=tuple(r for r in records.rows() if r.offset in kept_offsets)
    )
    consumed = Consumed(read, LogFormat(), records, seconds)
    claimed = Claimed(read, LogFormat(), records, claim, (), 0, seconds)
    outputs = {
        "consume": consumed,
        "dedupe": claimed,
        "encode": Encoded(claimed, data, seconds),
    }
    per_output: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as base:
        manager = dg.FilesystemIOManager(base_dir=base).create_io_manager(
            dg.build_init_resource_context()
        )
        for step, value in outputs.items():
            walls, cpus = [], []
            size = 0
            for i in range(repeats):
                out = dg.build_output_context(step_key=step, name="result", run_id=f"r{i}")
                gc.collect()
                with collector_paused(), Timed() as t:
                    manager.handle_output(out, value)
                    manager.load_input(dg.build_input_context(upstream_output=out))
                walls.append(t.wall)
                cpus.append(t.thread)
                size = (Path(base) / f"r{i}" / step / "result").stat().st_size
            per_output[step] = {**summary(n, walls, cpus), "bytes": size}
    total_wall = sum(o["wall_s"] for o in per_output.values())
    total_cpu = sum(o["cpu_s"] for o in per_output.values())
    return {
        "messages": n,
        "outputs": per_output,
        "wall_s": total_wall,
        "cpu_s": total_cpu,
        "msgs_per_s": n / total_wall if total_wall > 0 else None,
        "msgs_per_cpu_s": n / total_cpu if total_cpu > 0 else None,
        "bytes": sum(o["bytes"] for o in per_output.values()),
    }


# --------------------------------------------------------------------------------------------
# (c) fixed cost of a run


FIXED_PARTS = (
    "launch_to_first_step",
    "last_step_to_run_success",
    "after_run_success",
    "before_run_start",
    "run_outside_steps",
    "in_steps_outside_timed",
)


def measure_fixed(
    kafka: KafkaResource, dsn: str, gcs: GCSResource, token: str, runs: int, size: int
) -> dict[str, Any]:
    results = []
    for i in range(runs):
        topic = f"bench-steps-{token}-fixed{i}"
        tiny = KafkaResource(bootstrap_servers=kafka.bootstrap_servers, topics=topic)
        create_topic(tiny, topic)
        produce(tiny, topic, make_values(size, 0.05, 1000 + i)[0])
        resources = {
            "kafka": tiny,
            "postgres": PostgresResource(dsn=dsn),
            "gcs": GCSResource(
                bucket=gcs.bucket,
                object_template=f"bench/{token}/fixed{i}.pb",
                emulator_host=gcs.emulator_host,
            ),
            "archiver": ArchiverSettings(),
            "lease": PartitionLease(postgres=PostgresResource(dsn=dsn)),
        }
        results.append(run_archive(resources, topic, size))

    def pick(run: dict[str, Any]) -> dict[str, float]:
        parts = run["fixed_breakdown_s"] or {}
        return {
            "wall": run["wall_s"],
            "steps_sum": run["steps_sum_s"],
            "fixed": run["fixed_s"],
            "instance_setup": run["instance_setup_s"],
            **{part: parts.get(part, float("nan")) for part in FIXED_PARTS},
        }

    cold = pick(results[0])
    warm_runs = [pick(r) for r in results[1:]]
    warm = {key: statistics.median(r[key] for r in warm_runs) for key in cold} if warm_runs else {}
    return {"messages": size, "runs": runs, "cold": cold, "warm_median": warm}


# --------------------------------------------------------------------------------------------
# report


def budget(
    reads: dict[str, dict[str, Any]],
    parse: dict[str, Any],
    encode: dict[str, Any],
    batches: dict[str, Any],
    handoff: dict[str, Any],
) -> dict[str, float]:
    """Wall microseconds per message of each step, and what one run would add up to."""
    per = {
        "ceiling_raw_consume": 1e6 * reads["ceiling"]["wall_s"] / reads["ceiling"]["messages"],
        "consume": 1e6 * reads["consume"]["wall_s"] / reads["consume"]["messages"],
        "consume_confluent": 1e6
        * reads["consume_confluent"]["wall_s"]
        / reads["consume_confluent"]["messages"],
        "parse": 1e6 * parse["wall_s"] / parse["messages"],
        "dedupe_claim": 1e6 * batches["dedupe"]["per_batch_median_s"] / batches["batch"],
        "encode": 1e6 * encode["wall_s"] / encode["messages"],
        "append": 1e6 * batches["append"]["per_batch_median_s"] / batches["batch"],
        "finish_and_checks": 1e6
        * (batches["finish"]["per_batch_median_s"] + batches["checks"]["per_batch_median_s"])
        / batches["batch"],
        "handoff_fs_io_manager": 1e6 * handoff["wall_s"] / handoff["messages"],
    }
    steps = ("consume", "parse", "dedupe_claim", "encode", "append", "finish_and_checks")
    per["sum_in_process"] = sum(per[k] for k in steps)
    per["sum_in_process_confluent"] = (
        per["sum_in_process"] - per["consume"] + per["consume_confluent"]
    )
    per["sum_deployed"] = per["sum_in_process"] + per["handoff_fs_io_manager"]
    return per


def rate(value: float | None) -> str:
    return f"{value:>12,.0f}" if value else f"{'-':>12}"


def print_report(report: dict[str, Any]) -> None:
    n = report["messages"]
    ceiling = report["ceiling"]["msgs_per_s"]
    print()
    print(
        f"protoagg steps benchmark: {n:,} messages (avg {report['avg_value_bytes']:.0f} B/value, "
        f"{report['distinct_log_ids']:,} distinct logIds), topic {report['topic']}; "
        f"code {report['code']}"
    )
    print(f"  produce (not measured): {report['produce_s']:.1f} s")
    print()
    head = (
        f"  {'step':<34}{'seconds':>9}{'msgs/s':>12}{'CPU s':>9}{'msgs/CPU-s':>12}{'/ceiling':>9}"
    )
    print(head)
    print("  " + "-" * (len(head) - 2))

    def line(label: str, s: dict[str, Any], cpu_label: str = "") -> None:
        share = f"{s['msgs_per_s'] / ceiling:8.2f}x" if s["msgs_per_s"] and ceiling else ""
        print(
            f"  {label:<34}{s['wall_s']:9.3f}{rate(s['msgs_per_s'])}{s['cpu_s']:9.3f}"
            f"{rate(s['msgs_per_cpu_s'])}{share:>9}{cpu_label}"
        )

    reps = report["ceiling"]["repeats"]
    line(f"(a) ceiling: raw kafka-python x{reps}", report["ceiling"])
    line(f"consume: read_range x{reps}", report["consume"])
    line(f"ceiling: raw librdkafka x{reps}", report["ceiling_confluent"])
    line(f"consume: read_range, confluent x{reps}", report["consume_confluent"])
    cpu_reps = report["parse"]["repeats"]
    line(f"parse: log format x{cpu_reps}", report["parse"], "  (thread CPU)")
    enc = report["encode"]
    verdict = "meets" if (enc["msgs_per_cpu_s"] or 0) >= ENCODE_TARGET_PER_CORE else "BELOW"
    line(
        f"encode: log format x{cpu_reps}",
        enc,
        f"  ({verdict} {ENCODE_TARGET_PER_CORE // 1000}k/core target)",
    )
    line("parse + encode", report["parse_encode"], "  (thread CPU)")
    rec = report["record_format"]
    line("parse: record format", rec["parse"], "  (thread CPU)")
    line("encode: record format", rec["encode"], "  (thread CPU)")
    line("parse + encode: record format", rec["parse_encode"], "  (thread CPU)")
    b = report["batches"]
    print()
    print(
        f"  per batch of {b['batch']:,} ({b['batches']} batches, one fresh database, one object "
        f"growing to {b['object_bytes_final'] / 1e6:.0f} MB):"
    )
    print(
        f"  {'step':<34}{'median s':>9}{'msgs/s':>12}{'CPU s':>9}{'first s':>12}{'last s':>9}"
        f"{'total s':>9}"
    )
    for step, label in (
        ("dedupe", "dedupe: claim_batch"),
        ("append", "append: append_batch (emulator)"),
        ("finish", "finish_batch"),
        ("checks", "checks: evaluate_batch read-back"),
    ):
        s = b[step]
        print(
            f"  {label:<34}{s['per_batch_median_s']:9.3f}{rate(s['msgs_per_s'])}"
            f"{s['per_batch_cpu_median_s']:9.3f}{s['first_batch_s']:12.3f}{s['last_batch_s']:9.3f}"
            f"{s['total_s']:9.2f}"
        )
    print(
        f"  connect + ensure_schema (each op's get_connection): first "
        f"{b['first_connect_and_schema_s'] * 1000:.0f} ms, warm "
        f"{b['warm_connect_and_schema_s'] * 1000:.0f} ms"
    )
    h = report["handoff"]
    print()
    print(
        f"  hand-off between ops in a deployed run (default fs_io_manager: pickle to disk and "
        f"back), first {h['messages']:,} messages:"
    )
    for step, o in h["outputs"].items():
        print(
            f"    {step + ' output':<32}{o['wall_s']:9.3f}{rate(o['msgs_per_s'])}{o['cpu_s']:9.3f}"
            f"{rate(o['msgs_per_cpu_s'])}   {o['bytes'] / 1e6:6.1f} MB"
        )
    print(
        f"    {'all three':<32}{h['wall_s']:9.3f}{rate(h['msgs_per_s'])}{h['cpu_s']:9.3f}"
        f"{rate(h['msgs_per_cpu_s'])}   {h['bytes'] / 1e6:6.1f} MB"
    )
    print()
    print("  budget, wall microseconds per message (median rates above):")
    for key, value in report["budget_us_per_msg"].items():
        print(f"    {key:<30}{value:8.2f}")
    f = report["fixed"]
    print()
    print(
        f"  (c) fixed cost of a run ({f['messages']}-message archive_kafka_batch, "
        f"execute_in_process; cold = 1st run of the process, warm = median of {f['runs'] - 1}):"
    )
    print(f"  {'':34}{'cold s':>9}{'warm s':>9}")
    labels = {
        "wall": "run wall (launch..return)",
        "steps_sum": "  sum of op-timed sections",
        "fixed": "  fixed = wall - steps",
        "launch_to_first_step": "launch -> first STEP_START",
        "last_step_to_run_success": "last STEP_SUCCESS -> RUN_SUCCESS",
        "after_run_success": "RUN_SUCCESS -> return",
        "before_run_start": "  launch -> RUN_START",
        "run_outside_steps": "  run, outside step walls",
        "in_steps_outside_timed": "  in steps, outside timed code",
        "instance_setup": "instance_for_test() (not in wall)",
    }
    for key, label in labels.items():
        warm = f["warm_median"].get(key)
        print(f"  {label:<34}{f['cold'][key]:9.3f}{warm if warm is None else f'{warm:9.3f}'}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (20k messages)")
    parser.add_argument("--messages", "-n", type=int, default=None, help="default 1,000,000")
    parser.add_argument("--batch", type=int, default=None, help="dedupe/append batch (100,000)")
    parser.add_argument("--repeats", type=int, default=None, help="consume/CPU repeats (3)")
    parser.add_argument("--fixed-runs", type=int, default=None, help="tiny runs (1 cold + 5)")
    parser.add_argument("--seed", type=int, default=1)
    add_service_args(parser)
    args = parser.parse_args()
    require_service_args(parser, args, ("bootstrap", "dsn", "gcs"))
    n = args.messages or (20_000 if args.smoke else 1_000_000)
    batch = args.batch or (5_000 if args.smoke else 100_000)
    repeats = args.repeats or (2 if args.smoke else 3)
    fixed_runs = args.fixed_runs or (3 if args.smoke else 6)
    token = uuid.uuid4().hex[:10]
    topic = f"bench-steps-{token}"
    started = time.perf_counter()

    values, distinct = make_values(n, 0.05, args.seed)
    kafka = KafkaResource(bootstrap_servers=args.bootstrap, topics=topic)
    gcs = GCSResource(
        bucket=args.bucket, object_template=f"bench/{token}/steps.pb", emulator_host=args.gcs
    )
    with database(args.dsn, args.admin_dsn) as dsn:
        create_topic(kafka, topic)
        produce_s = produce(kafka, topic, values)
        avg_bytes = sum(map(len, values)) / n
        del values
        reads, messages = measure_consume(kafka, topic, n, repeats)
        parse, encode, both, records = measure_cpu_steps(messages, repeats, LogFormat())
        record_steps = measure_cpu_steps(messages, repeats, RecordFormat())[:3]
        first_messages = messages[: min(batch, n)]
        del messages
        batches, first = measure_batches(dsn, gcs, topic, records, batch, distinct, LogFormat())
        del records
        gc.collect()
        handoff = measure_handoff(topic, first_messages, first, min(repeats, 2))
        del first_messages, first
        gc.collect()
        fixed = measure_fixed(kafka, dsn, gcs, token, fixed_runs, 100)

    report: dict[str, Any] = {
        "benchmark": "steps",
        "smoke": args.smoke,
        "messages": n,
        "code": code_version(),
        "fresh_database": bool(args.admin_dsn),
        "topic": topic,
        "avg_value_bytes": avg_bytes,
        "distinct_log_ids": distinct,
        "produce_s": produce_s,
        **reads,
        "parse": parse,
        "encode": encode,
        "parse_encode": both,
        "record_format": dict(zip(("parse", "encode", "parse_encode"), record_steps, strict=True)),
        "encode_target_per_core": ENCODE_TARGET_PER_CORE,
        "encode_meets_target": (encode["msgs_per_cpu_s"] or 0) >= ENCODE_TARGET_PER_CORE,
        "batches": batches,
        "handoff": handoff,
        "budget_us_per_msg": budget(reads, parse, encode, batches, handoff),
        "fixed": fixed,
        "duration_s": time.perf_counter() - started,
    }
    print_report(report)
    print(f"  duration {report['duration_s']:.0f} s")
    print(json.dumps(_rounded(report), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
