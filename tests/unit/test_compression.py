import gzip
import io
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protoagg_dagster.core import settings
from protoagg_dagster.core.archive_object import (
    COMPRESSION_METADATA_KEY,
    Piece,
    archive_compression,
    metadata_after_compose,
)
from protoagg_dagster.core.compression import (
    CODECS,
    Codec,
    decompressed,
    detect,
    parse_codec,
    sniffed,
)
from protoagg_dagster.core.errors import ArchiveFormatError, ConfigError
from protoagg_dagster.core.framing import encode_records, iter_records
from protoagg_dagster.core.records import LogRecord
from tests.helpers import DECOMPRESSORS

COMPRESSED = ("gzip", "zstd")


def records(start: int, count: int) -> list[LogRecord]:
    return [
        LogRecord(i, f"id-{i}", 1_700_000_000 + i, i, f"GET /api/v1/items/{i} 200 12ms")
        for i in range(start, start + count)
    ]


def pieces(codec: Codec, sizes: list[int]) -> tuple[list[bytes], bytes]:
    """Each batch compressed alone, as the encode op does, and the frames they hold."""
    framed, start = [], 0
    for size in sizes:
        framed.append(encode_records(records(start, size)))
        start += size
    return [codec.compress(f) for f in framed], b"".join(framed)


def read_all(stream: io.IOBase) -> bytes:
    return stream.read()  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", CODECS)
def test_composed_pieces_decompress_to_the_frames_exactly(name: str) -> None:
    compressed, framed = pieces(Codec(name), [3, 0, 500, 1])
    assert read_all(decompressed(io.BytesIO(b"".join(compressed)), name)) == framed


@pytest.mark.parametrize("name", COMPRESSED)
@given(st.lists(st.binary(max_size=3000), max_size=6))
def test_any_pieces_round_trip(name: str, datas: list[bytes]) -> None:
    codec = Codec(name, 1)
    joined = b"".join(codec.compress(d) for d in datas)
    assert read_all(decompressed(io.BytesIO(joined), name)) == b"".join(datas)


@pytest.mark.parametrize("name", COMPRESSED)
def test_debians_tools_read_the_composed_pieces(name: str) -> None:
    if shutil.which(DECOMPRESSORS[name][0]) is None:
        pytest.skip(f"{DECOMPRESSORS[name][0]} is not installed (scripts/test installs it)")
    compressed, framed = pieces(Codec(name), [10, 0, 200])
    out = subprocess.run(
        DECOMPRESSORS[name], input=b"".join(compressed), capture_output=True, check=True
    )
    assert out.stdout == framed


def test_a_gzip_piece_is_what_pythons_gzip_reads() -> None:
    assert gzip.decompress(Codec("gzip", 9).compress(b"abc" * 100)) == b"abc" * 100


@pytest.mark.parametrize("name", COMPRESSED)
def test_a_corrupt_member_is_located_by_byte_and_frame(name: str) -> None:
    compressed, _ = pieces(Codec(name), [50, 50, 50])
    broken = bytearray(b"".join(compressed))
    second = len(compressed[0])
    # Inside the second piece's compressed payload, past any header.
    broken[second + len(compressed[1]) // 2] ^= 0xFF
    stream = decompressed(io.BytesIO(bytes(broken)), name)
    with pytest.raises(ArchiveFormatError) as caught:
        list(iter_records(stream))
    message = str(caught.value)
    assert f"1 at byte {second} of the object" in message
    assert "record " in message.split(":")[0]


@pytest.mark.parametrize("name", COMPRESSED)
def test_a_truncated_object_says_its_last_member_is_cut(name: str) -> None:
    compressed, _ = pieces(Codec(name), [20, 20])
    joined = b"".join(compressed)[:-3]
    with pytest.raises(ArchiveFormatError, match=f"1 at byte {len(compressed[0])} .*truncated"):
        read_all(decompressed(io.BytesIO(joined), name))


def test_trailing_bytes_that_are_no_member_are_an_error() -> None:
    joined = Codec("zstd").compress(b"frames") + b"junk"
    with pytest.raises(ArchiveFormatError, match="zstd frame 1 at byte"):
        read_all(decompressed(io.BytesIO(joined), "zstd"))


@pytest.mark.parametrize("name", CODECS)
def test_local_files_are_recognised_by_their_magic_bytes(name: str, tmp_path: Path) -> None:
    compressed, framed = pieces(Codec(name), [5, 5])
    path = tmp_path / "archive"
    path.write_bytes(b"".join(compressed))
    stream, found = sniffed(path.open("rb"))
    with stream:
        assert (found, read_all(stream)) == (name, framed)
    assert detect(b"") == "none"


def test_an_unknown_recorded_codec_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="records compression 'lz4'"):
        decompressed(io.BytesIO(b""), "lz4")


@pytest.mark.parametrize(
    ("name", "level", "match"),
    [
        ("lz4", "", "PROTOAGG_COMPRESSION must be one of none, gzip, zstd"),
        ("gzip", "10", "PROTOAGG_COMPRESSION_LEVEL for gzip must be 1..9"),
        ("zstd", "0", "PROTOAGG_COMPRESSION_LEVEL for zstd must be 1..22"),
        ("zstd", "fast", "PROTOAGG_COMPRESSION_LEVEL must be an integer"),
        ("none", "3", "PROTOAGG_COMPRESSION_LEVEL is set, but PROTOAGG_COMPRESSION is none"),
    ],
)
def test_bad_settings_name_the_setting(name: str, level: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_codec(name, level)


def test_settings_give_the_codec_and_default_names_their_suffix() -> None:
    environ = {"PROTOAGG_COMPRESSION": "ZSTD", "PROTOAGG_COMPRESSION_LEVEL": "9"}
    assert settings.read_codec(environ) == Codec("zstd", 9)
    assert settings.read_codec({}) == Codec("none")
    assert settings.object_template(settings.GCS_OBJECT, ".zst", {}) == "log.pb.zst"
    assert (
        settings.object_template(settings.GCS_DEAD_LETTERS, ".gz", {})
        == "dead-letters/{topic}/{partition}.jsonl.gz"
    )
    # An explicit template is used as written.
    explicit = {"PROTOAGG_GCS_OBJECT": "{topic}.pb"}
    assert settings.object_template(settings.GCS_OBJECT, ".zst", explicit) == "{topic}.pb"


def test_the_codec_is_recorded_and_carried_through_every_compose() -> None:
    first = metadata_after_compose({"owner": "me"}, [Piece(1, "records", 9)], "log", "zstd")
    assert first[COMPRESSION_METADATA_KEY] == "zstd"
    again = metadata_after_compose(first, [Piece(2, "records", 9)], "log", "zstd")
    assert archive_compression(again) == "zstd" and again["owner"] == "me"


def test_uncompressed_objects_keep_todays_metadata() -> None:
    metadata = metadata_after_compose(None, [Piece(1, "records", 9)], "log")
    assert COMPRESSION_METADATA_KEY not in metadata
    assert archive_compression(metadata) == "none"


@pytest.mark.parametrize(("existing", "setting"), [("none", "zstd"), ("zstd", "gzip")])
def test_changing_the_codec_of_an_existing_object_is_refused(existing: str, setting: str) -> None:
    metadata = metadata_after_compose(None, [Piece(1, "dead_letters", 9)], None, existing)
    with pytest.raises(ConfigError, match=r"point PROTOAGG_GCS_OBJECT .* at a new object name"):
        metadata_after_compose(metadata, [Piece(2, "dead_letters", 9)], None, setting)


@pytest.mark.parametrize("name", COMPRESSED)
@given(st.data())
def test_a_damaged_archive_fails_only_with_a_located_error(name: str, data: st.DataObject) -> None:
    compressed, framed = pieces(Codec(name), [30, 30])
    damaged = bytearray(b"".join(compressed))
    for _ in range(data.draw(st.integers(1, 4))):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(damaged)))
    try:
        back = list(iter_records(decompressed(io.BytesIO(bytes(damaged[:cut])), name)))
    except ArchiveFormatError as exc:
        assert " at byte " in str(exc)
    else:
        # Damage the checksums do not cover (a gzip header's time) or a cut between members.
        assert back == list(iter_records(io.BytesIO(framed)))[: len(back)]
