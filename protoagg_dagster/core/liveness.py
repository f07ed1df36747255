"""Deciding which STARTED runs are dead, from observations of their run leases.

A live run holds its lease from just after it starts until just before it ends (see
``protoagg_dagster.archive.leases``). A run is declared dead only when its lease was seen free at
two observations at least ``grace`` seconds apart, none in between saw it held, and the run started
more than ``grace`` ago: one free sighting can be the moment before a run takes its lease or
after it let go, never long enough for the grace period.

A run that has never taken its lease is judged with ``startup_grace`` instead: between its
RUN_START and taking the lease it only starts up (imports, resources), which a starved CPU can
stretch far beyond ``grace``, and it has claimed nothing, so only its own retry waits. A run
that did take its lease and lost it is dead after ``grace``, however young.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass


@dataclass(frozen=True)
class StartedRun:
    run_id: str
    lease: str
    started_at: float  # epoch seconds
    took_lease: bool = True  # whether it is known to have held its lease at some moment


@dataclass(frozen=True)
class Verdict:
    dead: dict[str, float]  # run id -> epoch seconds its lease has been free since
    free_since: dict[str, float]  # what to remember for the next observation


def judge(
    runs: Sequence[StartedRun],
    held: Set[str],
    free_since: Mapping[str, float],
    now: float,
    grace: float,
    startup_grace: float | None = None,
) -> Verdict:
    """The runs whose worker is gone, and the free-since clocks of the ones still watched."""
    dead: dict[str, float] = {}
    watching: dict[str, float] = {}
    for run in runs:
        if run.lease in held:
            continue
        since = free_since.get(run.run_id, now)
        watching[run.run_id] = since
        wait = grace if run.took_lease or startup_grace is None else max(grace, startup_grace)
        if now - since >= wait and now - run.started_at >= wait:
            dead[run.run_id] = since
    return Verdict(dead, watching)
