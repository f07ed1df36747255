import pytest

from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.planning import (
    BatchLimits,
    OffsetRange,
    PartitionView,
    RunBatch,
    next_range,
    plan_runs,
)

LIMITS = BatchLimits(batch_size=100, linger_seconds=15, max_batch_messages=1000)


def view(**changes: object) -> PartitionView:
    fields: dict[str, object] = {"topic": "logs", "partition": 0, "next_offset": 0, "end_offset": 0}
    fields.update(changes)
    return PartitionView(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "state", "launch", "due", "follows"),
    [
        ("empty", view(), None, False, False),
        ("full batch", view(end_offset=100), (0, 100), True, False),
        (
            "starts at the archived position",
            view(next_offset=40, end_offset=150),
            (40, 150),
            True,
            False,
        ),
        ("few waiting is not due", view(end_offset=5), (0, 5), False, False),
        ("capped by max_batch_messages", view(end_offset=5000), (0, 1000), True, False),
        (
            "a run of unknown range in flight waits",
            view(end_offset=5000, in_flight=1),
            None,
            False,
            False,
        ),
        (
            "a follow-up starts where the run in flight ends",
            view(next_offset=0, end_offset=5000, in_flight=1, in_flight_end=1000),
            (1000, 2000),
            True,
            True,
        ),
        (
            "no follow-up after a run that stalled before its lease",
            view(next_offset=0, end_offset=5000, in_flight=1, in_flight_end=1000, stalled=True),
            None,
            False,
            False,
        ),
        (
            "a short follow-up is not due",
            view(end_offset=1050, in_flight=1, in_flight_end=1000),
            (1000, 1050),
            False,
            True,
        ),
        (
            "nothing after the run in flight",
            view(end_offset=1000, in_flight=1, in_flight_end=1000),
            None,
            False,
            False,
        ),
        (
            "never a second follow-up",
            view(end_offset=5000, in_flight=2, in_flight_end=2000),
            None,
            False,
            False,
        ),
        (
            "a follow-up of the run finishing a pending claim",
            view(
                next_offset=10,
                end_offset=5000,
                pending=OffsetRange("logs", 0, 10, 60),
                in_flight=1,
                in_flight_end=60,
            ),
            (60, 1060),
            True,
            True,
        ),
        (
            "no follow-up past an unfinished claim the run in flight does not cover",
            view(
                next_offset=10,
                end_offset=5000,
                pending=OffsetRange("logs", 0, 10, 60),
                in_flight=1,
                in_flight_end=40,
            ),
            None,
            False,
            False,
        ),
        (
            "a pending claim is relaunched exactly",
            view(next_offset=10, end_offset=5000, pending=OffsetRange("logs", 0, 10, 60)),
            (10, 60),
            True,
            False,
        ),
    ],
)
def test_next_range(
    name: str,
    state: PartitionView,
    launch: tuple[int, int] | None,
    due: bool,
    follows: bool,
) -> None:
    found = next_range(state, LIMITS)
    if launch is None:
        assert found is None, name
        return
    assert found is not None, name
    assert (found.batch.start, found.batch.end) == launch, name
    assert (found.due, found.follows) == (due, follows), name


def quiet(partitions: int, waiting: int = 5) -> list[PartitionView]:
    return [view(partition=p, end_offset=waiting) for p in range(partitions)]


def starts(run: RunBatch) -> list[tuple[int, int, int]]:
    return [(r.partition, r.start, r.end) for r in run.ranges]


def test_quiet_partitions_linger_on_one_clock() -> None:
    plan = plan_runs(quiet(300), None, LIMITS, now=100.0)
    assert plan.runs == ()
    assert plan.backlog_since == 100.0
    later = plan_runs(quiet(300), plan.backlog_since, LIMITS, now=114.0)
    assert later.runs == () and later.backlog_since == 100.0
    assert plan_runs(quiet(300, waiting=0), 100.0, LIMITS, now=114.0).backlog_since is None


def test_a_lingered_backlog_launches_every_waiting_partition_in_few_runs() -> None:
    limits = BatchLimits(
        batch_size=100, linger_seconds=15, max_batch_messages=1000, max_partitions_per_run=64
    )
    plan = plan_runs(quiet(300), 80.0, limits, now=100.0)
    assert [len(r.ranges) for r in plan.runs] == [64, 64, 64, 64, 44]
    assert sorted(p for r in plan.runs for p, _, _ in starts(r)) == list(range(300))
    assert plan.backlog_since is None
    assert all(not r.follows and r.reason == "lingered 20.0 s" for r in plan.runs)


def test_one_full_partition_takes_every_waiting_range_along_whatever_its_topic() -> None:
    views = [
        view(partition=0, end_offset=100),
        view(partition=1, end_offset=3),
        view(topic="other", partition=0, end_offset=3),
    ]
    plan = plan_runs(views, None, LIMITS, now=100.0)
    assert [[(r.topic, r.partition, r.start, r.end) for r in run.ranges] for run in plan.runs] == [
        [("logs", 0, 0, 100), ("logs", 1, 0, 3), ("other", 0, 0, 3)]
    ]
    assert plan.backlog_since is None


def test_a_run_stays_within_the_message_budget_and_follow_ups_run_apart() -> None:
    views = [
        view(partition=0, end_offset=900),
        view(partition=1, end_offset=200),
        view(partition=2, end_offset=5000, in_flight=1, in_flight_end=1000),
    ]
    plan = plan_runs(views, None, LIMITS, now=1.0)
    assert sorted((starts(r), r.follows) for r in plan.runs) == [
        ([(0, 0, 900)], False),
        ([(1, 0, 200)], False),
        ([(2, 1000, 2000)], True),
    ]


def test_a_tick_launches_at_most_max_runs_per_tick_the_most_behind_first() -> None:
    limits = BatchLimits(
        batch_size=100, linger_seconds=15, max_batch_messages=1000, max_partitions_per_run=2,
        max_runs_per_tick=2,
    )  # fmt: skip
    views = [view(partition=p, end_offset=10 + p) for p in range(10)]
    plan = plan_runs(views, 80.0, limits, now=100.0)
    assert [starts(r) for r in plan.runs] == [[(9, 0, 19), (8, 0, 18)], [(7, 0, 17), (6, 0, 16)]]
    # The rest stays due: the next tick launches it without another linger.
    assert plan.backlog_since == 80.0
    left = [v for v in views if v.partition < 6]
    assert len(plan_runs(left, plan.backlog_since, limits, now=101.0).runs) == 2


def test_equally_far_behind_partitions_take_turns_over_the_ticks() -> None:
    limits = BatchLimits(linger_seconds=15, max_partitions_per_run=4, max_runs_per_tick=1)
    views = [view(partition=p, end_offset=1) for p in range(40)]
    first = {
        p
        for t in range(0, 300, 15)
        for r in plan_runs(views, -100.0, limits, now=float(t)).runs
        for p, _, _ in starts(r)
    }
    assert first == set(range(40))


def test_run_keys_tell_groups_apart() -> None:
    one = RunBatch((OffsetRange("logs", 0, 0, 5),), False, "")
    two = RunBatch((OffsetRange("logs", 0, 0, 5), OffsetRange("logs", 1, 0, 5)), False, "")
    other = RunBatch((OffsetRange("logs", 0, 0, 5), OffsetRange("logs", 2, 0, 5)), False, "")
    assert one.run_key == "logs-0-0-5"
    assert two.run_key.startswith("logs-0-0-5+1-")
    assert two.run_key != other.run_key


@pytest.mark.parametrize(
    "limits",
    [
        {"batch_size": 0},
        {"batch_size": 10, "max_batch_messages": 5},
        {"linger_seconds": -1},
        {"max_batch_bytes": 10},
        {"max_partitions_per_run": 0},
    ],
)
def test_invalid_limits(limits: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        BatchLimits(**limits)  # type: ignore[arg-type]


def test_backwards_range_is_refused() -> None:
    with pytest.raises(ConfigError):
        OffsetRange("logs", 0, 10, 5)
