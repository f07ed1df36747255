import pytest
from hypothesis import given
from hypothesis import strategies as st

from protoagg_dagster.core.dead_letters import encode_envelopes, iter_dead_letters
from protoagg_dagster.core.errors import ArchiveFormatError
from protoagg_dagster.core.records import KafkaMessage, Rejection

messages = st.builds(
    KafkaMessage,
    topic=st.text(min_size=1, max_size=20),
    partition=st.integers(0, 1000),
    offset=st.integers(0, 2**62),
    timestamp_ms=st.integers(-1, 2**45),
    key=st.none() | st.binary(max_size=50),
    value=st.none() | st.binary(max_size=300),
    headers=st.lists(
        st.tuples(st.text(max_size=10), st.none() | st.binary(max_size=20)), max_size=3
    ).map(tuple),
)


@given(st.lists(st.tuples(messages, st.text(min_size=1, max_size=20), st.text()), max_size=20))
def test_envelopes_keep_every_byte_and_the_reason(
    items: list[tuple[KafkaMessage, str, str]],
) -> None:
    rejections = [Rejection(message, reason, detail) for message, reason, detail in items]
    back = list(iter_dead_letters(encode_envelopes(rejections).splitlines()))
    assert [(d.message, d.reason, d.detail) for d in back] == items


def test_a_broken_envelope_names_its_line() -> None:
    good = encode_envelopes([Rejection(KafkaMessage("t", 0, 1, 0, None, b"x"), "not_json", "")])
    with pytest.raises(ArchiveFormatError, match="line 2"):
        list(iter_dead_letters([good, b'{"topic": "t"}']))
