import pytest

from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.planning import BatchLimits, OffsetRange, PartitionView, plan_batch

LIMITS = BatchLimits(batch_size=100, linger_seconds=15, max_batch_messages=1000)


def view(**changes: object) -> PartitionView:
    fields: dict[str, object] = {"topic": "logs", "partition": 0, "next_offset": 0, "end_offset": 0}
    fields.update(changes)
    return PartitionView(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "state", "now", "launch", "since"),
    [
        ("empty", view(), 100.0, None, None),
        ("full batch", view(end_offset=100), 100.0, (0, 100), None),
        (
            "starts at the archived position",
            view(next_offset=40, end_offset=150),
            1.0,
            (40, 150),
            None,
        ),
        ("few waiting starts the clock", view(end_offset=5), 100.0, None, 100.0),
        ("few waiting keeps the clock", view(end_offset=5, backlog_since=90.0), 100.0, None, 90.0),
        ("linger elapsed", view(end_offset=5, backlog_since=85.0), 100.0, (0, 5), None),
        ("capped by max_batch_messages", view(end_offset=5000), 1.0, (0, 1000), None),
        (
            "a run of unknown range in flight waits",
            view(end_offset=5000, in_flight=1, backlog_since=3.0),
            9.0,
            None,
            3.0,
        ),
        (
            "a follow-up starts where the run in flight ends",
            view(next_offset=0, end_offset=5000, in_flight=1, in_flight_end=1000),
            9.0,
            (1000, 2000),
            None,
        ),
        (
            "a follow-up lingers like any batch",
            view(end_offset=1050, in_flight=1, in_flight_end=1000),
            9.0,
            None,
            9.0,
        ),
        (
            "nothing after the run in flight",
            view(end_offset=1000, in_flight=1, in_flight_end=1000, backlog_since=2.0),
            9.0,
            None,
            None,
        ),
        (
            "never a second follow-up",
            view(end_offset=5000, in_flight=2, in_flight_end=2000, backlog_since=3.0),
            9.0,
            None,
            3.0,
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
            1.0,
            (60, 1060),
            None,
        ),
        (
            "no follow-up past an unfinished claim the run in flight does not cover",
            view(
                next_offset=10,
                end_offset=5000,
                pending=OffsetRange("logs", 0, 10, 600),
                in_flight=1,
                in_flight_end=60,
            ),
            1.0,
            None,
            None,
        ),
        (
            "pending claim is finished exactly",
            view(next_offset=10, end_offset=5000, pending=OffsetRange("logs", 0, 10, 60)),
            1.0,
            (10, 60),
            None,
        ),
        # A reset cursor only loses the clock: the next offset comes from the ledger.
        (
            "reset cursor",
            view(next_offset=700, end_offset=750, backlog_since=None),
            50.0,
            None,
            50.0,
        ),
        ("archive ahead of the log end", view(next_offset=900, end_offset=800), 1.0, None, None),
    ],
)
def test_plan_batch(
    name: str,
    state: PartitionView,
    now: float,
    launch: tuple[int, int] | None,
    since: float | None,
) -> None:
    plan = plan_batch(state, LIMITS, now)
    got = None if plan.launch is None else (plan.launch.start, plan.launch.end)
    assert got == launch, plan.reason
    assert plan.backlog_since == since
    assert plan.follows == (launch is not None and state.in_flight == 1)


def test_run_key_names_topic_partition_and_range() -> None:
    assert OffsetRange("logs", 3, 10, 20).run_key == "logs-3-10-20"


@pytest.mark.parametrize(
    "limits",
    [
        {"batch_size": 0},
        {"batch_size": 10, "max_batch_messages": 5},
        {"linger_seconds": -1},
        {"max_batch_bytes": 10},
    ],
)
def test_nonsensical_limits_are_refused(limits: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        BatchLimits(**limits)  # type: ignore[arg-type]


def test_backwards_range_is_refused() -> None:
    with pytest.raises(ConfigError):
        OffsetRange("logs", 0, 10, 5)
