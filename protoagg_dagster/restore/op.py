"""The ``restore`` op: ``protoagg restore`` as typed run config, progress in the run's logs."""

# No ``from __future__ import annotations``: Dagster resolves the op's string annotations in
# the module of ``fail_fast``'s wrapper, where RestoreConfig is not defined.
from typing import Literal

import dagster as dg
from pydantic import Field

from protoagg_dagster.archive.ops import fail_fast
from protoagg_dagster.core.errors import ArchiveFormatError, BackendError, ConfigError
from protoagg_dagster.core.records import RecordRejected, parse_rfc3339
from protoagg_dagster.core.restore import RestoreSpec, Selection, Tallies, summary
from protoagg_dagster.resources import KafkaResource
from protoagg_dagster.restore.writer import TRANSACTION_RECORDS, list_sources, plan_restore, restore


class RestoreConfig(dg.Config):
    """The options of ``protoagg restore``; a rerun with the same values continues, exactly once."""

    sources: list[str] = Field(
        description="gs://BUCKET/OBJECT, gs://BUCKET/PREFIX/ (every object under it) or a file."
    )
    to_topic: str = Field(description="The topic to write to.")
    partition: int | None = Field(default=None, description="Records of this partition only.")
    from_offset: int | None = Field(default=None, description="First source offset.")
    to_offset: int | None = Field(default=None, description="Source offset to stop before.")
    from_time: str | None = Field(default=None, description="RFC 3339: first record timestamp.")
    to_time: str | None = Field(default=None, description="RFC 3339: timestamp to stop before.")
    bootstrap: str | None = Field(
        default=None, description="Target cluster (default: the kafka resource's brokers)."
    )
    create_topic: bool = Field(
        default=False, description="Create a missing target with the partitions it needs."
    )
    partitioner: Literal["same", "key"] = Field(
        default="same", description="same: the source partition; key: murmur2 of the key."
    )
    key: Literal["none", "logId"] = Field(default="none", description="Log archives' key.")
    source_headers: bool = Field(
        default=False, description="Add protoagg-source-topic/-partition/-offset headers."
    )
    transaction_records: int = Field(
        default=TRANSACTION_RECORDS, description="Records per Kafka transaction."
    )
    dry_run: bool = Field(default=False, description="Count per partition; write nothing.")

    def spec(self) -> RestoreSpec:
        selection = Selection(
            self.partition,
            self.from_offset,
            self.to_offset,
            _ms(self.from_time, "from_time"),
            _ms(self.to_time, "to_time"),
        )
        return RestoreSpec(
            tuple(self.sources),
            self.to_topic,
            selection,
            self.partitioner,
            self.key,
            self.source_headers,
        )


def _ms(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    try:
        seconds, nanos = parse_rfc3339(text)
    except RecordRejected as exc:
        raise ConfigError(f"{name}: {exc.detail}") from None
    return seconds * 1000 + nanos // 1_000_000


@dg.op(description="Restore archived records into a Kafka topic, exactly once.")
@fail_fast
def restore_records(
    context: dg.OpExecutionContext, config: RestoreConfig, kafka: KafkaResource
) -> str:
    spec = config.spec()
    if config.dry_run:
        tallies, bad_frame = plan_restore(list_sources(spec.sources), spec)
        _add_metadata(context, tallies)
        text = f"would restore {tallies.records} records\n" + "\n".join(tallies.lines())
        context.log.info(text + (f"\nand stop at: {bad_frame}" if bad_frame else ""))
        return text
    target = kafka
    if config.bootstrap:
        target = KafkaResource(**{**kafka.model_dump(), "bootstrap_servers": config.bootstrap})

    def progress(done: int, written: int, seconds: float, total: int) -> None:
        rate = done / seconds if seconds else 0.0
        context.log.info(
            f"restore: {done}/{total} records, {written / 1e6:.1f} MB, {rate:,.0f} records/s"
        )

    try:
        result = restore(spec, target, config.create_topic, progress, config.transaction_records)
    except (ArchiveFormatError, BackendError) as exc:
        # A bad frame or an unreachable cluster: one sentence, not a traceback, in the run.
        raise dg.Failure(description=str(exc)) from exc
    _add_metadata(context, result.restored)
    text = summary(result.restored, result.skipped, result.already_done)
    context.log.info(text)
    return text


def _add_metadata(context: dg.OpExecutionContext, tallies: Tallies) -> None:
    context.add_output_metadata(
        {
            ("log" if p < 0 else f"partition {p}"): dg.MetadataValue.json(
                {"records": t.records, "bytes": t.bytes, "seconds": round(t.seconds, 3)}
            )
            for p, t in sorted(tallies.by_partition.items())
        }
        | {"records": tallies.records, "bytes": tallies.bytes}
    )
