"""Fuzz the archive reader: random and mutated archives must decode or fail with a location.

Usage: python benchmarks/fuzz_reader.py [--examples N]   (CI runs the unit test's short version)
"""

from __future__ import annotations

import argparse
import time

from hypothesis import HealthCheck, given, settings

from tests.unit.test_framing import (
    mutated_archives,
    test_reader_on_corrupt_input_either_decodes_or_says_where,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=20_000)
    args = parser.parse_args()
    check = settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )(
        given(data=mutated_archives())(
            test_reader_on_corrupt_input_either_decodes_or_says_where.hypothesis.inner_test
        )
    )
    started = time.monotonic()
    check()
    elapsed = time.monotonic() - started
    print(f"fuzz_reader: {args.examples} mutated archives, no failure, {elapsed:.1f} s")


if __name__ == "__main__":
    main()
