import pytest

from protoagg_dagster.core.archive_object import (
    LAST_APPEND_KEY,
    LEGACY_OFFSETS_KEY,
    MARKER_BYTES,
    TEMP_PREFIX,
    UPLOAD_MARKER_BYTES,
    Piece,
    Queued,
    archive_format,
    check_one_format_per_object,
    last_compose,
    legacy_covers,
    legacy_offsets,
    marker_bytes,
    metadata_after_compose,
    object_name,
    piece_ends,
    rolls_over,
    sequence_base,
    sequence_member,
    sequence_number,
    temp_object_name,
    upload_of_row,
    validate_template,
)
from protoagg_dagster.core.errors import ConfigError
from protoagg_dagster.core.planning import OffsetRange

# 2026-11-28T05:15:00Z
MOMENT_MS = 1_795_842_900_000


def test_default_template_is_the_reference_tools_object() -> None:
    assert object_name("log.pb", "logs", 3, MOMENT_MS) == "log.pb"


def test_template_fields_come_from_the_batch() -> None:
    name = object_name(
        "{topic}/{partition}/{year}/{month}/{day}/{hour}-{date}.pb", "logs", 3, MOMENT_MS
    )
    assert name == "logs/3/2026/11/28/05-2026-11-28.pb"


@pytest.mark.parametrize("template", ["", "  ", "{nope}.pb", "{topic", "_protoagg/tmp/x"])
def test_bad_templates_name_the_setting(template: str) -> None:
    with pytest.raises(ConfigError, match="PROTOAGG_GCS_OBJECT"):
        validate_template(template)


def test_metadata_is_one_marker_whatever_the_number_of_partitions() -> None:
    metadata: dict[str, str] = {"owner": "team", LEGACY_OFFSETS_KEY: '{"logs/0": 5}'}
    for batch_id in range(1, 2001):  # 2,000 batches of 2,000 partitions
        metadata = metadata_after_compose(metadata, [Piece(batch_id, "records", 10**12)])
    assert set(metadata) == {"owner", LAST_APPEND_KEY}
    assert last_compose(metadata) == [Piece(2000, "records", 10**12)]
    assert sum(len(k) + len(v) for k, v in metadata.items()) < 100


def test_a_full_compose_marker_stays_below_the_8_kib_metadata_limit() -> None:
    # The longest pieces there are: as few fit as ever can.
    pieces: list[Piece] = []
    while (
        marker_bytes([*pieces, piece := Piece(10**18 + len(pieces), "dead_letters", 10**18)])
        <= MARKER_BYTES
    ):
        pieces.append(piece)
    metadata = metadata_after_compose({"owner": "team"}, pieces, "record", "zstd")
    assert last_compose(metadata) == pieces
    assert marker_bytes(pieces) == len(metadata[LAST_APPEND_KEY]) <= MARKER_BYTES
    assert sum(len(k) + len(v) for k, v in metadata.items()) < 3_500
    # Typical pieces (ids of eight digits, pieces of a few KB): about 140 a compose.
    typical = [Piece(12_000_000 + n, "records", 4_321) for n in range(135)]
    assert marker_bytes(typical) <= MARKER_BYTES
    assert UPLOAD_MARKER_BYTES * 2 + 1 <= MARKER_BYTES


@pytest.mark.parametrize("pieces", [1, 2, 150])
def test_an_upload_of_several_pieces_has_one_queue_row_per_piece(pieces: int) -> None:
    upload = Queued(
        tuple(Piece(n, "records", 10) for n in range(pieces)), f"{TEMP_PREFIX}t/0/0-5-ab", "log"
    )
    rows = upload.row_names()
    assert len(set(rows)) == pieces
    assert [upload_of_row(row) for row in rows] == [
        (upload.temp_name, i, pieces) for i in range(pieces)
    ]


def test_piece_ends_locate_the_last_composed_pieces_at_the_end_of_the_object() -> None:
    pieces = [Piece(1, "records", 10), Piece(2, "records", 0), Piece(3, "dead_letters", 5)]
    assert piece_ends(100, pieces) == [95, 95, 100]


def test_no_marker_and_a_corrupt_marker() -> None:
    assert last_compose(None) == []
    assert last_compose({"owner": "team"}) == []
    with pytest.raises(ConfigError):
        last_compose({LAST_APPEND_KEY: "12:stuff:3"})
    with pytest.raises(ConfigError):
        last_compose({LAST_APPEND_KEY: "12:records:3,,"})


def test_temp_names_differ_per_attempt_and_sit_under_the_reserved_prefix() -> None:
    batch = OffsetRange("logs", 0, 5, 9)
    a, b = temp_object_name(batch, "a"), temp_object_name(batch, "b")
    assert a != b
    assert a.startswith("_protoagg/tmp/logs/0/5-9-")


def test_metadata_records_the_format_and_refuses_a_second_one() -> None:
    first = metadata_after_compose(None, [Piece(1, "records", 10)], "record")
    assert archive_format(first) == "record"
    assert archive_format(metadata_after_compose(first, [Piece(2, "records", 3)], "record")) == (
        "record"
    )
    with pytest.raises(ConfigError, match=r"cannot mix formats.*\{topic\}"):
        metadata_after_compose(first, [Piece(3, "records", 5)], "log")
    # Dead letters are in no archive format: they neither record nor check one.
    dead = metadata_after_compose(first, [Piece(4, "dead_letters", 5)])
    assert archive_format(dead) == "record"
    # Objects written before formats were recorded hold log frames.
    legacy = {LEGACY_OFFSETS_KEY: '{"logs/0":5}'}
    assert archive_format(legacy) == "log"
    with pytest.raises(ConfigError, match="cannot mix formats"):
        metadata_after_compose(legacy, [Piece(5, "records", 5)], "record")
    assert archive_format(metadata_after_compose(legacy, [Piece(5, "records", 5)], "log")) == "log"


@pytest.mark.parametrize(
    ("base", "second"),
    [
        ("log.pb", "log.0001.pb"),
        ("logs/3/2026/11/28/05.pb.gz", "logs/3/2026/11/28/05.0001.pb.gz"),
        ("archive", "archive.0001"),
        ("dir.v2/.pb", "dir.v2/.pb.0001"),
        ("x.0001.pb", "x.0001.0001.pb"),
    ],
)
def test_sequence_members_number_the_name_before_its_extension(base: str, second: str) -> None:
    assert sequence_member(base, 0) == base
    assert sequence_member(base, 1) == second
    for number in (0, 1, 2, 12345):
        assert sequence_number(base, sequence_member(base, number)) == number
    if not base.endswith("/.pb"):
        assert sequence_base(second) == base
    assert sequence_base(base) is None or base.startswith("x.0001")


@pytest.mark.parametrize(
    "name", ["log.pb.0001", "log.001.pb", "log.0000.pb", "log.x001.pb", "logs.pb"]
)
def test_other_names_are_no_members(name: str) -> None:
    assert sequence_number("log.pb", name) is None


def test_a_batch_rolls_over_only_when_it_would_pass_the_limit_of_a_non_empty_object() -> None:
    assert not rolls_over(0, 10**6, 100)  # an oversized batch still goes somewhere
    assert not rolls_over(60, 40, 100)
    assert rolls_over(60, 41, 100)


@pytest.mark.parametrize(
    ("legacy_map", "batch", "covered"),
    [
        ('{"t/0": 20, "t/1": 5}', OffsetRange("t", 0, 10, 20), True),  # composed, not confirmed
        ('{"t/0": 25}', OffsetRange("t", 0, 10, 20), True),
        ('{"t/0": 10}', OffsetRange("t", 0, 10, 20), False),  # its compose never happened
        ('{"t/1": 20}', OffsetRange("t", 0, 10, 20), False),  # another partition's entry
        (None, OffsetRange("t", 0, 10, 20), False),  # an object of a release with the marker
    ],
)
def test_the_offsets_map_of_releases_before_the_marker_says_which_claims_landed(
    legacy_map: str | None, batch: OffsetRange, covered: bool
) -> None:
    metadata = {} if legacy_map is None else {LEGACY_OFFSETS_KEY: legacy_map}
    assert legacy_covers(legacy_offsets(metadata), batch) is covered


def test_a_broken_offsets_map_is_named() -> None:
    with pytest.raises(ConfigError, match=LEGACY_OFFSETS_KEY):
        legacy_offsets({LEGACY_OFFSETS_KEY: "[1, 2"})


@pytest.mark.parametrize(
    ("template", "formats", "refused"),
    [
        ("log.pb", {"log", "record"}, True),
        ("{partition}/{date}.pb", {"log", "record"}, True),
        ("{topic}/{partition}.pb", {"log", "record"}, False),
        ("log.pb", {"record"}, False),  # one format: one shared object is fine
        ("log.pb", {"log"}, False),
    ],
)
def test_a_template_mixing_formats_in_one_object_is_refused(
    template: str, formats: set[str], refused: bool
) -> None:
    if refused:
        with pytest.raises(ConfigError, match=r"put \{topic\} in it"):
            check_one_format_per_object(template, formats)
    else:
        check_one_format_per_object(template, formats)
