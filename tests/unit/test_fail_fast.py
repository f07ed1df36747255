"""A refused login or a wrong setting fails a run once: no op retry, and no run retry either."""

from __future__ import annotations

import dagster as dg
from dagster._core.storage.tags import RETRY_ON_ASSET_OR_OP_FAILURE_TAG

from protoagg_dagster.archive.ops import TRANSIENT_RETRY, fail_fast
from protoagg_dagster.core.errors import AccessRefused

attempts: list[int] = []


@dg.op(retry_policy=TRANSIENT_RETRY)
@fail_fast
def refused() -> None:
    attempts.append(1)
    raise AccessRefused("Kafka authentication failed at b:9093: invalid credentials")


@dg.job
def refused_job() -> None:
    refused()


def test_a_refusal_is_not_retried_by_the_op_nor_by_run_retries() -> None:
    # In memory: a SQLite instance costs seconds of schema creation (tests/helpers.py).
    with dg.DagsterInstance.ephemeral() as instance:
        result = refused_job.execute_in_process(instance=instance, raise_on_error=False)
        run = instance.get_run_by_id(result.run_id)
    assert not result.success
    assert attempts == [1]
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "Kafka authentication failed" in str(failure.step_failure_data.error.message)
    assert run is not None and run.tags[RETRY_ON_ASSET_OR_OP_FAILURE_TAG] == "false"
