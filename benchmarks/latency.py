"""Produce -> archived latency at a steady rate, through the real Dagster path.

    PYTHONPATH=. .venv/bin/python benchmarks/latency.py [--smoke] [--rate 1000]
        [--seconds 60] [--no-compare] [--compare-linger 1]
        [--bootstrap HOST:PORT] [--gcs http://HOST:PORT] [--admin-dsn postgresql://...]

A fresh Dagster deployment (``tests/support/dagster_deployment.DagsterDeployment``: real
``dagster-daemon``, ``kafka_offsets_sensor``, the queued run coordinator of
``deploy/dagster.local.yaml``) with the DEFAULT batch settings (PROTOAGG_BATCH_SIZE=500,
PROTOAGG_LINGER_SECONDS=15, PROTOAGG_MAX_BATCH_MESSAGES=200000) archives a fresh 1-partition topic
into a fresh database and object. After a warm-up (500 messages archived, so the daemon's boot
is not counted), a producer sends ``--rate`` seed-shaped messages per second for ``--seconds``;
each message carries its send time in its text, and its offset is taken from the delivery
report. A poller reads the archive object every 0.2 s: when it has grown, it downloads only the
new bytes (a range read from the previous size) and decodes them with
``protoagg_dagster.core.framing.iter_records``; a logId's *visible* time is the poll that first
saw it. Latency = visible - sent.

Each message's latency is split along the run that archived it (from the deployment's run
storage): sent -> run created (waiting for the sensor: its >= 5 s tick, the batch_size / linger
rule, and the partition's previous run still in flight), created -> dequeued (run queue),
dequeued -> RUN_START (the run's process starting), RUN_START -> visible (the run's work up to
its compose).

By default the same is repeated with PROTOAGG_LINGER_SECONDS=1 (``--compare-linger``); the smoke
run (10 s) skips the comparison unless ``--compare-linger`` is given.
The table, then one JSON line ``{"benchmark": "latency", ...}`` (the last line of stdout).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from google.cloud import storage  # noqa: E402

from benchmarks.e2e_dagster import (  # noqa: E402
    PRODUCER,
    ConfluentProducer,
    Services,
    add_service_args,
    archived_to,
    create_topic,
    deployment_env,
    fresh_database,
    median,
    sensor_tick_intervals,
    services_from,
)
from benchmarks.run_once import WORDS, _rounded, code_version  # noqa: E402
from protoagg_dagster.archive.job import archive_kafka_batch  # noqa: E402
from protoagg_dagster.core.framing import iter_records  # noqa: E402
from protoagg_dagster.core.settings import SENSOR_INTERVAL_SECONDS  # noqa: E402
from tests.support.dagster_deployment import (  # noqa: E402
    DagsterDeployment,
    RunSummary,
    run_summaries,
    settled,
)

WARMUP = 500  # = the default batch size: the first tick launches it
POLL_SECONDS = 0.2


def value(log_id: str, i: int, sent: float) -> bytes:
    stamp = datetime.fromtimestamp(sent, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    text = f"{WORDS[i % len(WORDS)]} #{i} sent={sent:.6f}"
    return orjson.dumps({"logId": log_id, "timestamp": stamp, "message": text})


class Producer:
    """Sends messages to partition 0 and records each one's send time and offset."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.sent: dict[str, float] = {}
        self.offset: dict[str, int] = {}
        self.failed = 0
        if PRODUCER == "confluent-kafka":
            self._confluent = ConfluentProducer(
                {"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5}
            )
        else:
            from protoagg_dagster.resources import KafkaResource

            self._confluent = None
            self._kafka = KafkaResource(bootstrap_servers=bootstrap, topics=topic).get_producer()

    def send(self, log_id: str, i: int) -> None:
        now = time.time()
        self.sent[log_id] = now
        data = value(log_id, i, now)
        if self._confluent is not None:

            def delivered(err: Any, msg: Any, log_id: str = log_id) -> None:
                if err is not None:
                    self.failed += 1
                else:
                    self.offset[log_id] = msg.offset()

            while True:
                try:
                    self._confluent.produce(self.topic, data, partition=0, on_delivery=delivered)
                    break
                except BufferError:
                    self._confluent.poll(0.01)
            self._confluent.poll(0)
        else:
            future = self._kafka.send(self.topic, value=data, partition=0)
            future.add_callback(
                lambda md, log_id=log_id: self.offset.__setitem__(log_id, md.offset)
            )

    def flush(self) -> None:
        if self._confluent is not None:
            self._confluent.flush(60)
        else:
            self._kafka.flush()

    def close(self) -> None:
        if self._confluent is None:
            self._kafka.close()


def steady(producer: Producer, rate: int, seconds: float, first_index: int) -> tuple[float, float]:
    """Send ``rate`` messages per second for ``seconds``, in 10 ms ticks; start and end times."""
    started = time.time()
    total = int(rate * seconds)
    i = 0
    while i < total:
        due = int((time.time() - started) * rate)
        while i < min(due, total):
            producer.send(str(uuid.uuid4()), first_index + i)
            i += 1
        time.sleep(0.01)
    producer.flush()
    return started, time.time()


@dataclass
class Poller:
    """Finds when each logId becomes visible in the archive object (range reads of new bytes)."""

    bucket: storage.Bucket
    name: str
    seen: dict[str, float] = field(default_factory=dict)
    size: int = 0
    polls: int = 0
    reads: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.poll_once()
                self.stop.wait(POLL_SECONDS)
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def poll_once(self) -> None:
        self.polls += 1
        blob = self.bucket.get_blob(self.name)
        observed = time.time()
        if blob is None or not blob.size or blob.size <= self.size:
            return
        new = blob.download_as_bytes(start=self.size, end=blob.size - 1)
        self.reads += 1
        for record in iter_records(io.BytesIO(new)):
            self.seen.setdefault(record.log_id, observed)
        self.size = blob.size


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def measure(
    svc: Services,
    label: str,
    settings: dict[str, str],
    rate: int,
    seconds: float,
    home_root: Path,
    log: Any,
) -> dict[str, Any]:
    token = uuid.uuid4().hex[:8]
    topic = f"bench-latency-{token}"
    object_name = f"bench-latency/{token}/log.pb"
    create_topic(svc.kafka(topic), topic, 1)
    bucket = svc.bucket_handle()
    producer = Producer(svc.bootstrap, topic)
    poller = Poller(bucket, object_name)
    thread = threading.Thread(target=poller.run, daemon=True)
    result: dict[str, Any] = {
        "config": label,
        "settings": settings,
        "rate": rate,
        "seconds": seconds,
        "topic": topic,
        "sensor_interval_s": float(
            settings.get(SENSOR_INTERVAL_SECONDS.env, SENSOR_INTERVAL_SECONDS.default)
        ),
    }
    with fresh_database(svc) as dsn:
        env = deployment_env(svc, topic, dsn, object_name, settings)
        deployment = DagsterDeployment(label, home_root / f"{token}-{label}", env)
        origin = time.time()
        try:
            deployment.start()
            thread.start()
            for i in range(WARMUP):
                producer.send(str(uuid.uuid4()), i)
            producer.flush()
            warm = set(producer.sent)
            deadline = time.monotonic() + 180
            while not archived_to(dsn, topic, {0: WARMUP}):
                if time.monotonic() > deadline or not deployment.running():
                    raise RuntimeError(f"warm-up not archived\n{deployment.log_tail()}")
                time.sleep(0.25)
            result["warmup_s"] = time.time() - origin
            log(
                f"  {label}: warm-up archived after {result['warmup_s']:.1f} s; "
                f"steady {rate}/s for {seconds:.0f} s"
            )
            started, ended = steady(producer, rate, seconds, WARMUP)
            wanted = [k for k in producer.sent if k not in warm]
            deadline = time.monotonic() + 120
            while any(k not in poller.seen for k in wanted):
                if time.monotonic() > deadline or poller.error:
                    break
                time.sleep(0.25)
            drained = time.time()
            settle_deadline = time.monotonic() + 60
            while not settled(deployment) and time.monotonic() < settle_deadline:
                time.sleep(0.5)
        finally:
            poller.stop.set()
            deployment.stop()
            producer.close()
        runs = [r for r in run_summaries(deployment) if r.job_name == archive_kafka_batch.name]
        result["sensor_ticks"] = sensor_tick_intervals(deployment.log_path)
    if poller.error:
        raise poller.error
    latencies = {k: poller.seen[k] - producer.sent[k] for k in wanted if k in poller.seen}
    values = list(latencies.values())
    result.update(
        {
            "sent": len(wanted),
            "achieved_rate": len(wanted) / (ended - started),
            "visible": len(values),
            "missing": len(wanted) - len(values),
            "delivery_failures": producer.failed,
            "drain_s": drained - ended,
            "latency_s": {
                "p50": percentile(values, 50),
                "p95": percentile(values, 95),
                "p99": percentile(values, 99),
                "max": max(values, default=None),
                "min": min(values, default=None),
            },
            "polls": poller.polls,
            "range_reads": poller.reads,
        }
    )
    result.update(breakdown(runs, producer, poller, latencies, origin, started, ended))
    lat = result["latency_s"]
    log(
        f"  {label}: {len(values):,}/{len(wanted):,} visible; p50 {lat['p50']:.1f} s, p95 "
        f"{lat['p95']:.1f} s, max {lat['max']:.1f} s; {result['runs_in_window']} runs"
    )
    return result


def breakdown(
    runs: list[RunSummary],
    producer: Producer,
    poller: Poller,
    latencies: dict[str, float],
    origin: float,
    started: float,
    ended: float,
) -> dict[str, Any]:
    """Split each message's latency along the run that archived its offset."""
    spans = []
    for r in runs:
        if not r.range_key or not r.end_time:
            continue
        start, end = (int(x) for x in r.range_key.rsplit("-", 2)[-2:])
        spans.append((start, end, r))
    parts: dict[str, list[float]] = {
        "sent_to_run_created": [],
        "created_to_dequeued": [],
        "dequeued_to_run_start": [],
        "run_start_to_visible": [],
        "visible_to_run_end": [],
    }
    used: set[str] = set()
    for log_id in latencies:
        offset = producer.offset.get(log_id)
        if offset is None:
            continue
        run = next((r for s, e, r in spans if s <= offset < e), None)
        if run is None or run.launched_time is None or run.start_time is None:
            continue
        used.add(run.run_id)
        sent, seen = producer.sent[log_id], poller.seen[log_id]
        parts["sent_to_run_created"].append(run.created_time - sent)
        parts["created_to_dequeued"].append(run.launched_time - run.created_time)
        parts["dequeued_to_run_start"].append(run.start_time - run.launched_time)
        parts["run_start_to_visible"].append(seen - run.start_time)
        parts["visible_to_run_end"].append((run.end_time or seen) - seen)
    window = [r for r in runs if r.run_id in used]
    window.sort(key=lambda r: r.created_time)
    created = [r.created_time for r in window]
    sizes = []
    for r in window:
        if r.range_key:
            s, e = (int(x) for x in r.range_key.rsplit("-", 2)[-2:])
            sizes.append(e - s)
    execute = [r.end_time - r.start_time for r in window if r.end_time and r.start_time]
    return {
        "components_median_s": {k: median(v) for k, v in parts.items()},
        "components_p95_s": {k: percentile(v, 95) for k, v in parts.items()},
        "runs_in_window": len(window),
        "runs_total": len(runs),
        "run_statuses": sorted({r.status for r in runs}),
        "run_interval_median_s": median([b - a for a, b in itertools.pairwise(created)]),
        "run_size_median": median(sizes),
        "run_execute_median_s": median(execute),
        "runs": [
            {
                "range": r.range_key.rsplit("-", 2)[-2:] if r.range_key else None,
                "created": round(r.created_time - origin, 2),
                "dequeued": round(r.launched_time - origin, 2) if r.launched_time else None,
                "start": round(r.start_time - origin, 2) if r.start_time else None,
                "end": round(r.end_time - origin, 2) if r.end_time else None,
                "status": r.status,
            }
            for r in sorted(runs, key=lambda r: r.created_time)
        ],
        "steady_window": [round(started - origin, 2), round(ended - origin, 2)],
    }


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_table(report: dict[str, Any]) -> None:
    print()
    print(
        f"protoagg produce -> archived latency through dagster-daemon ({report['cpus']} CPUs "
        f"shared; code {report['code']}; producer {report['producer']})"
    )
    head = (
        f"  {'config':<16}{'rate':>7}{'secs':>6}{'sent':>8}{'seen':>8}{'p50 s':>7}"
        f"{'p95 s':>7}{'p99 s':>7}{'max s':>7}{'runs':>6}{'every s':>8}{'size':>7}"
    )
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in report["configs"]:
        lat = r["latency_s"]
        print(
            f"  {r['config']:<16}{r['achieved_rate']:>7.0f}{r['seconds']:>6.0f}{r['sent']:>8,}"
            f"{r['visible']:>8,}{fmt(lat['p50']):>7}{fmt(lat['p95']):>7}{fmt(lat['p99']):>7}"
            f"{fmt(lat['max']):>7}{r['runs_in_window']:>6}{fmt(r['run_interval_median_s']):>8}"
            f"{r['run_size_median'] or 0:>7,.0f}"
        )
    print("  (every s: median time between run creations; size: median messages per run)")
    for r in report["configs"]:
        t = r["sensor_ticks"]
        print(
            f"  {r['config']}: sensor evaluated {t['ticks']} times, every {fmt(t['mean_s'])} s on "
            f"average (median {fmt(t['median_s'])}, max {fmt(t['max_s'])}; "
            f"{(t['share_at_least_9_s'] or 0):.0%} of the gaps >= 9 s) for "
            f"minimum_interval_seconds={r['sensor_interval_s']:g}"
        )
    print()
    print("  where a message's latency goes (median over messages, seconds):")
    names = list(report["configs"][0]["components_median_s"])
    print(f"  {'':<24}" + "".join(f"{r['config']:>16}" for r in report["configs"]))
    for name in names:
        print(
            f"  {name:<24}"
            + "".join(f"{fmt(r['components_median_s'][name]):>16}" for r in report["configs"])
        )
    print(
        f"  {'run execute (median)':<24}"
        + "".join(f"{fmt(r['run_execute_median_s']):>16}" for r in report["configs"])
    )
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="10 s, defaults only")
    parser.add_argument("--rate", type=int, default=1000, help="messages per second")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument(
        "--compare-linger",
        type=float,
        default=None,
        help="also run with this PROTOAGG_LINGER_SECONDS (default 1; smoke: off)",
    )
    parser.add_argument(
        "--compare-interval",
        type=float,
        action="append",
        default=[],
        help="also run with this PROTOAGG_SENSOR_INTERVAL_SECONDS (repeatable)",
    )
    parser.add_argument("--no-compare", action="store_true")
    parser.add_argument("--home", default=None)
    add_service_args(parser)
    args = parser.parse_args()
    svc = services_from(parser, args)
    seconds = args.seconds or (10.0 if args.smoke else 60.0)
    compare = (
        None
        if args.no_compare
        else (
            args.compare_linger
            if args.compare_linger is not None
            else (None if args.smoke else 1.0)
        )
    )
    home_root = Path(args.home or f"/tmp/protoagg-bench-latency-{uuid.uuid4().hex[:6]}")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.time()
    configs = [measure(svc, "defaults", {}, args.rate, seconds, home_root, log)]
    if compare is not None:
        configs.append(
            measure(
                svc,
                f"linger-{compare:g}",
                {"PROTOAGG_LINGER_SECONDS": f"{compare:g}"},
                args.rate,
                seconds,
                home_root,
                log,
            )
        )
    for interval in [] if args.no_compare else args.compare_interval:
        configs.append(
            measure(
                svc,
                f"interval-{interval:g}",
                {"PROTOAGG_SENSOR_INTERVAL_SECONDS": f"{interval:g}"},
                args.rate,
                seconds,
                home_root,
                log,
            )
        )
    report = {
        "benchmark": "latency",
        "smoke": args.smoke,
        "code": code_version(),
        "producer": PRODUCER,
        "cpus": os.cpu_count(),
        "configs": configs,
        "wall_s": time.time() - started,
        "loadavg_end": os.getloadavg(),
    }
    print_table(report)
    print(f"  whole benchmark: {report['wall_s']:.0f} s")
    print(json.dumps(_rounded(report), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
