"""The restore job: `protoagg restore` as a Dagster job."""

from __future__ import annotations

import dagster as dg

from protoagg_dagster.restore.op import restore_records


@dg.job(
    executor_def=dg.in_process_executor,
    description="Restore archived records into a Kafka topic, exactly once: the options of "
    "`protoagg restore` as run config. Relaunching the same config continues where it stopped.",
)
def restore_archive() -> None:
    restore_records()
