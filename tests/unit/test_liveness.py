"""Which STARTED runs are dead, from lease observations (core.liveness)."""

from __future__ import annotations

import pytest

from protoagg_dagster.core.liveness import StartedRun, judge

GRACE = 20.0


def test_a_run_holding_its_lease_is_alive_however_long_it_runs() -> None:
    run = StartedRun("r", "run r", started_at=0.0)
    verdict = judge([run], {"run r"}, {"r": 5.0}, now=10_000.0, grace=GRACE)
    assert verdict.dead == {}
    assert verdict.free_since == {}  # seen held: the clock starts again


def test_one_free_sighting_only_starts_the_clock() -> None:
    run = StartedRun("r", "run r", started_at=0.0)
    verdict = judge([run], set(), {}, now=1_000.0, grace=GRACE)
    assert verdict.dead == {}
    assert verdict.free_since == {"r": 1_000.0}


def test_free_for_the_grace_period_is_dead() -> None:
    run = StartedRun("r", "run r", started_at=0.0)
    early = judge([run], set(), {"r": 1_000.0}, now=1_000.0 + GRACE - 1, grace=GRACE)
    assert early.dead == {}
    assert early.free_since == {"r": 1_000.0}
    late = judge([run], set(), {"r": 1_000.0}, now=1_000.0 + GRACE, grace=GRACE)
    assert late.dead == {"r": 1_000.0}


def test_a_run_that_just_started_is_not_dead_even_with_an_old_clock() -> None:
    run = StartedRun("r", "run r", started_at=995.0)
    verdict = judge([run], set(), {"r": 900.0}, now=1_010.0, grace=GRACE)
    assert verdict.dead == {}


def test_clocks_of_runs_no_longer_started_are_forgotten() -> None:
    alive = StartedRun("a", "run a", started_at=0.0)
    verdict = judge([alive], set(), {"gone": 1.0, "a": 50.0}, now=60.0, grace=GRACE)
    assert verdict.free_since == {"a": 50.0}
    assert verdict.dead == {}


def test_each_run_is_judged_by_its_own_lease() -> None:
    alive = StartedRun("a", "run a", started_at=0.0)
    dead = StartedRun("d", "run d", started_at=0.0)
    verdict = judge([alive, dead], {"run a"}, {"a": 1.0, "d": 1.0}, now=500.0, grace=GRACE)
    assert verdict.dead == {"d": 1.0}


STARTUP = 300.0


@pytest.mark.parametrize(
    ("took_lease", "free_for", "dead"),
    [
        (False, GRACE + 5, False),  # starved while starting up: alive
        (False, STARTUP - 1, False),
        (False, STARTUP, True),  # it died before ever taking its lease
        (True, GRACE, True),  # held its lease, lost it: dead after the usual grace
        (True, GRACE - 1, False),
    ],
)
def test_a_run_that_never_held_its_lease_gets_the_startup_grace(
    took_lease: bool, free_for: float, dead: bool
) -> None:
    run = StartedRun("r", "run r", started_at=0.0, took_lease=took_lease)
    now = 1_000.0
    verdict = judge([run], set(), {"r": now - free_for}, now, GRACE, STARTUP)
    assert ("r" in verdict.dead) is dead
