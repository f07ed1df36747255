"""Records kafka-python cannot send (a null key with a null value, a null header value) are
archived and restored whole, whichever client is the default."""

from __future__ import annotations

import confluent_kafka
import dagster as dg

from tests.e2e.test_record_format import committed, create
from tests.e2e.test_restore import contents
from tests.helpers import Stack, run_restore, run_sensor_until_idle, topic_of, with_topics

RECORDS = [
    (None, None, []),  # null key and null value
    (b"k", b"v", [("h", None), ("g", b"")]),  # a header with a null value
    (None, b"x", [("h", None)]),
    (b"k2", None, []),  # a plain tombstone
]


def test_null_key_and_value_and_null_header_values_are_restored(stack: Stack) -> None:
    topic = topic_of(stack)
    stack = with_topics(stack, f"{topic}:record")
    create(stack, topic)
    # kafka-python refuses to produce them too: the source is written with librdkafka.
    source = confluent_kafka.Producer({"bootstrap.servers": stack.kafka.bootstrap_servers})
    for i, (key, value, headers) in enumerate(RECORDS):
        source.produce(topic, value, key, 0, timestamp=1_700_000_000_000 + i, headers=headers)
    assert source.flush(30) == 0
    with dg.instance_for_test() as instance:
        run_sensor_until_idle(stack, instance)
    target = f"{topic}-restored"
    url = f"gs://{stack.gcs.bucket}/{stack.gcs.object_template}"
    done = run_restore(url, "--to-topic", target, "--create-topic")  # the default client
    assert done.returncode == 0, done.stderr
    assert contents(committed(stack, target)) == contents(committed(stack, topic))
    assert [(r[4], r[5], r[6]) for r in committed(stack, target)] == [
        (key, value, tuple(headers)) for key, value, headers in RECORDS
    ]
