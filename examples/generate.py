"""Writes examples/messages.jsonl: seed-shaped log messages, some logIds repeated.

Deterministic (fixed seed), so the checked-in file only changes when this script does.
Usage: python examples/generate.py [--count N] [--repeats N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

SERVICES = ("auth", "billing", "search", "checkout", "gateway")
EVENTS = (
    "user {user} logged in from {ip}",
    "user {user} logged out",
    "payment {ref} authorised for {amount} EUR",
    "query '{term}' answered in {ms} ms",
    "cart {ref} checked out with {items} items",
    "upstream {ip} answered 503, retrying in {ms} ms",
)
TERMS = ("kafka", "protobuf", "gcs", "dagster", "postgres", "exactly once")


def messages(count: int, repeats: int, seed: int = 7) -> list[dict[str, str]]:
    rng = random.Random(seed)
    start = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
    result = []
    for i in range(count):
        moment = start + timedelta(milliseconds=i * 1_250 + rng.randrange(1_000))
        text = rng.choice(EVENTS).format(
            user=rng.randrange(1, 5_000),
            ip=f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            ref=f"{rng.getrandbits(32):08x}",
            amount=f"{rng.randrange(100, 50_000) / 100:.2f}",
            term=rng.choice(TERMS),
            ms=rng.randrange(1, 900),
            items=rng.randrange(1, 12),
        )
        result.append(
            {
                "logId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "timestamp": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "message": f"[{rng.choice(SERVICES)}] {text}",
            }
        )
    # A redelivered message keeps its logId (and content): that is what dedupe must catch.
    for position in sorted(rng.sample(range(count // 2, count), repeats)):
        result.insert(position, dict(result[rng.randrange(position // 2)]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("messages.jsonl"))
    args = parser.parse_args()
    with args.out.open("w") as out:
        for message in messages(args.count, args.repeats):
            out.write(json.dumps(message) + "\n")
    print(f"wrote {args.count + args.repeats} lines to {args.out}")


if __name__ == "__main__":
    main()
