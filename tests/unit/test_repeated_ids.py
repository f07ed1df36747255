"""The unique-records check's counting: exact even when different identities share a hash."""

from protoagg_dagster.archive.checks import repeated_ids


class Colliding(str):
    """Every instance hashes alike, as two different identities may."""

    __slots__ = ()

    def __hash__(self) -> int:
        return 7


def test_repeats_are_found_once_each() -> None:
    ids = ["a", "b", "a", "c", "b", "a"]
    assert sorted(repeated_ids(lambda: ids, len(ids))) == ["a", "b"]


def test_a_shared_hash_is_not_a_repeat() -> None:
    ids = [Colliding("a"), Colliding("b"), Colliding("c")]
    assert repeated_ids(lambda: ids, 3) == []
    assert repeated_ids(lambda: [*ids, Colliding("b")], 4) == ["b"]


def test_no_identities() -> None:
    assert repeated_ids(lambda: [], 0) == []


def test_many_distinct_with_a_few_repeats() -> None:
    ids = [f"{n:08x}-id" for n in range(50_000)] + ["00000007-id", "0000beef-id"]
    assert sorted(repeated_ids(lambda: ids, len(ids))) == ["00000007-id", "0000beef-id"]
