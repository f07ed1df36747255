"""Records per second restored from a record-format archive into Kafka, and where the time goes.

    PYTHONPATH=. .venv/bin/python benchmarks/restore.py [--smoke] [--records 1000000]
        [--bootstrap HOST:PORT] [--gcs http://HOST:PORT] [--client kafka-python|confluent]

An archive of ``--records`` records (16-byte keys, 125-byte values, one header, 3 partitions) is
uploaded to the GCS emulator and restored by ``protoagg_dagster.restore.writer.restore`` into a
fresh 3-partition topic, 20,000 records per transaction. The restore is then split into its parts,
each timed alone on the same object: reading and decoding (``ArchiveFormat.decode``), the
planning pass (decode plus shaping every record), and the rest (sending and committing).
The table, then one JSON line ``{"benchmark": "restore", ...}`` (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protoagg_dagster.core import settings  # noqa: E402
from protoagg_dagster.core.kafka_record import (  # noqa: E402
    ArchivedKafkaRecord,
    encode_kafka_records,
)
from protoagg_dagster.core.restore import RestoreSpec  # noqa: E402
from protoagg_dagster.kafka.admin import create_topic  # noqa: E402
from protoagg_dagster.reading.archive_reader import open_archive_with_format  # noqa: E402
from protoagg_dagster.resources import GCSResource, KafkaResource  # noqa: E402
from protoagg_dagster.restore.writer import list_sources, plan_restore, restore  # noqa: E402

BUCKET = "bench-restore"


def upload_archive(gcs: GCSResource, name: str, records: int) -> int:
    """A record-format object of ``records`` records; returns its size in bytes."""
    value = b"v" * 125
    data = encode_kafka_records(
        ArchivedKafkaRecord(
            "bench",
            i % 3,
            i // 3,
            1_700_000_000_000 + i,
            0,
            b"key-%012d" % i,
            value,
            (("trace", b"t"),),
        )
        for i in range(records)
    )
    client = gcs.get_client()
    bucket = client.lookup_bucket(BUCKET) or client.create_bucket(BUCKET)
    blob = bucket.blob(name)
    blob.metadata = {"protoagg-format": "record"}
    blob.upload_from_string(data)
    return len(data)


def timed(step: object) -> float:
    started = time.perf_counter()
    step()  # type: ignore[operator]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="50,000 records")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--bootstrap", default=os.environ.get("PROTOAGG_KAFKA_BOOTSTRAP"))
    parser.add_argument("--gcs", default=os.environ.get("STORAGE_EMULATOR_HOST"))
    parser.add_argument(
        "--client", choices=settings.KAFKA_CLIENTS, default=settings.KAFKA_CLIENT.read()
    )
    args = parser.parse_args()
    if not args.bootstrap or not args.gcs:
        parser.error(
            "needs --bootstrap and --gcs (or PROTOAGG_KAFKA_BOOTSTRAP, STORAGE_EMULATOR_HOST)"
        )
    os.environ["STORAGE_EMULATOR_HOST"] = args.gcs
    records = args.records or (50_000 if args.smoke else 1_000_000)
    token = uuid.uuid4().hex[:8]
    gcs = GCSResource(bucket=BUCKET, emulator_host=args.gcs)
    size = upload_archive(gcs, f"{token}/archive.pb", records)
    url = f"gs://{BUCKET}/{token}/archive.pb"
    kafka = KafkaResource(bootstrap_servers=args.bootstrap, client=args.client)
    target = f"bench-restore-{token}"
    create_topic(kafka.get_admin(), target, 3)
    spec = RestoreSpec((url,), target)

    def decode() -> None:
        stream, archive = open_archive_with_format(url)
        with stream:
            for _ in archive.decode(stream):
                pass

    def plan() -> None:
        plan_restore(list_sources(spec.sources), spec)

    total = timed(lambda: restore(spec, kafka, False, lambda *_: None))
    decode_s = timed(decode)
    plan_s = timed(plan)
    again = timed(lambda: restore(spec, kafka, False, lambda *_: None))
    # A restore reads the object twice (plan, then write); sending is what the rest costs.
    send_s = total - plan_s - plan_s
    rows = [
        ("restore, end to end", total),
        ("  plan pass (read + decode + shape)", plan_s),
        ("    of it read + decode", decode_s),
        ("  write pass: read + shape again", plan_s),
        ("  write pass: send + commit (rest)", send_s),
        ("rerun that skips everything", again),
    ]
    print(
        f"restore of {records:,} records ({size / 1e6:.1f} MB archive), 3 partitions, "
        f"{args.client} producer"
    )
    print(f"{'step':40} {'seconds':>8} {'µs/record':>10} {'records/s':>12}")
    for name, seconds in rows:
        print(
            f"{name:40} {seconds:8.2f} {seconds / records * 1e6:10.2f} "
            f"{records / seconds if seconds > 0 else 0:12,.0f}"
        )
    report = {
        "benchmark": "restore",
        "smoke": args.smoke,
        "records": records,
        "client": args.client,
        "archive_bytes": size,
        "records_per_s": round(records / total),
        "seconds": {name.strip(): round(s, 3) for name, s in rows},
    }
    print(json.dumps(report, separators=(",", ":")))


if __name__ == "__main__":
    main()
