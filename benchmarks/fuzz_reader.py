"""Fuzz the archive reader: random and mutated archives must decode or fail with a location.

Plain archives, then damaged gzip and zstd archives (each codec a tenth of the examples).

Usage: python benchmarks/fuzz_reader.py [--examples N]   (CI runs the unit test's short version)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_compression import (
    test_a_damaged_archive_fails_only_with_a_located_error as damaged_compressed,
)
from tests.unit.test_framing import (
    mutated_archives,
    test_reader_on_corrupt_input_either_decodes_or_says_where,
)


def damaging(codec: str) -> Callable[[st.DataObject], None]:
    """The unit test's damaged-archive check for one codec, ready for @given."""

    def damaged(data: st.DataObject) -> None:
        damaged_compressed.hypothesis.inner_test(codec, data)

    return damaged


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
    compressed = max(args.examples // 10, 10)
    for codec in ("gzip", "zstd"):
        started = time.monotonic()
        settings(
            max_examples=compressed,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(given(data=st.data())(damaging(codec)))()
        elapsed = time.monotonic() - started
        print(f"fuzz_reader: {compressed} damaged {codec} archives, no failure, {elapsed:.1f} s")


if __name__ == "__main__":
    main()
