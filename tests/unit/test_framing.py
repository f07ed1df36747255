import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protoagg_dagster.core.errors import ArchiveFormatError
from protoagg_dagster.core.framing import encode_records, iter_frames, iter_records
from protoagg_dagster.core.records import LogRecord
from protoagg_dagster.pb.log_pb2 import ProtoLog

ROOT = Path(__file__).resolve().parents[2]

records_strategy = st.lists(
    st.builds(
        LogRecord,
        offset=st.integers(0, 2**40),
        log_id=st.uuids().map(str),
        seconds=st.integers(-62_135_596_800, 253_402_300_799),
        nanos=st.integers(0, 999_999_999),
        message=st.text(),
    ),
    max_size=40,
)


def test_frame_is_length_prefix_then_protobuf_bytes() -> None:
    record = LogRecord(0, "0b5c1a1e-0000-4000-8000-000000000001", 1_700_000_000, 5, "hello")
    data = encode_records([record])
    expected = ProtoLog(logId=record.log_id, message="hello")
    expected.timestamp.seconds = 1_700_000_000
    expected.timestamp.nanos = 5
    payload = expected.SerializeToString()
    assert data == len(payload).to_bytes(4, "little") + payload
    # Field 1 (logId) is tag 0x0a, then its length: the reference tool's layout.
    assert data[4:6] == bytes([0x0A, len(record.log_id)])


@given(records=records_strategy)
def test_encode_then_read_round_trips(records: list[LogRecord]) -> None:
    back = list(iter_records(io.BytesIO(encode_records(records))))
    assert [(r.log_id, r.seconds, r.nanos, r.message) for r in back] == [
        (r.log_id, r.seconds, r.nanos, r.message) for r in records
    ]
    assert [r.number for r in back] == list(range(len(records)))


@given(records=records_strategy.filter(bool), cut=st.integers(1, 10_000))
def test_truncated_archive_reports_where(records: list[LogRecord], cut: int) -> None:
    data = encode_records(records)
    last_frame = len(encode_records(records[-1:]))
    cut = 1 + cut % (last_frame - 1)  # inside the last frame, never on a frame boundary
    truncated = data[: len(data) - cut]
    with pytest.raises(ArchiveFormatError, match=r"record \d+ at byte \d+: truncated"):
        list(iter_frames(io.BytesIO(truncated)))


def test_garbage_length_prefix_is_refused_without_allocating() -> None:
    with pytest.raises(ArchiveFormatError, match="exceeds"):
        list(iter_frames(io.BytesIO(b"\xff\xff\xff\x7f" + b"x" * 10)))


def test_frames_written_by_us_decode_with_protoc() -> None:
    """An independent decoder (protoc) reads each frame we write."""
    records = [
        LogRecord(i, f"0b5c1a1e-0000-4000-8000-00000000000{i}", 1_700_000_000 + i, i, f"msg {i} ü")
        for i in range(3)
    ]
    data = encode_records(records)
    protoc = shutil.which("protoc")
    command = [protoc] if protoc else [sys.executable, "-m", "grpc_tools.protoc"]
    includes = [f"-I{ROOT / 'proto'}"]
    if not protoc:
        import grpc_tools

        includes.append(f"-I{Path(grpc_tools.__file__).parent / '_proto'}")
    for index, payload in enumerate(iter_frames(io.BytesIO(data))):
        out = subprocess.run(
            [*command, *includes, "--decode=protoagg.ProtoLog", "log.proto"],
            input=payload,
            capture_output=True,
            check=True,
        ).stdout.decode()
        assert f'logId: "{records[index].log_id}"' in out
        assert f"seconds: {records[index].seconds}" in out
        assert f'message: "msg {index} \\303\\274"' in out or f"msg {index} ü" in out


@st.composite
def mutated_archives(draw: st.DrawFn) -> bytes:
    """A valid archive with random bytes flipped, cut, inserted or replaced."""
    data = bytearray(encode_records(draw(records_strategy)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "prefix"]))
        position = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            index = min(position, len(data) - 1)
            data[index] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[position : position + draw(st.integers(1, 16))]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        else:
            data[position:position] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "little")
    return bytes(data)


@given(data=mutated_archives() | st.binary(max_size=200))
def test_reader_on_corrupt_input_either_decodes_or_says_where(data: bytes) -> None:
    """Never an unexpected exception, never a hang, never a huge allocation."""
    try:
        for record in iter_records(io.BytesIO(data)):
            assert 0 <= record.byte_offset < len(data)
    except ArchiveFormatError as exc:
        assert "at byte" in str(exc)


# Decodes 300k records of an in-memory archive in a fresh interpreter and prints how much its
# peak RSS grew while reading (the archive itself is built before the first measurement).
_DECODE_GROWTH = """
import io, resource, struct
from protoagg_dagster.core.framing import iter_records
from protoagg_dagster.pb.log_pb2 import ProtoLog
out = io.BytesIO()
for i in range(300_000):
    # A fresh message each time: one reused here would grow as the reader's did.
    payload = ProtoLog(logId=f"{i:08x}-0000-4000-8000-0000", message="x" * 80 + str(i))
    out.write(struct.pack("<I", payload.ByteSize()) + payload.SerializeToString())
data = out.getvalue()
del out
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
count = sum(1 for _ in iter_records(io.BytesIO(data)))
print(count, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, len(data) // 1024)
"""


def test_reading_an_archive_does_not_grow_with_its_size() -> None:
    """upb keeps what a reused message held until it is freed: the reader must renew it."""
    out = subprocess.run(
        [sys.executable, "-c", _DECODE_GROWTH], capture_output=True, text=True, check=True
    ).stdout.split()
    count, grown_kib, archive_kib = (int(x) for x in out)
    assert count == 300_000
    assert grown_kib < archive_kib / 4, f"reading grew RSS by {grown_kib} KiB"
