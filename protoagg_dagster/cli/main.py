"""The ``protoagg`` command: local services, producing examples, reading and verifying archives."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from protoagg_dagster.core import settings
from protoagg_dagster.core.errors import ProtoaggError
from protoagg_dagster.services.stack import DEFAULT_STATE_DIR, Ports, exports_of, local_stack


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ProtoaggError as exc:
        print(f"protoagg: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`protoagg cat ... | head`): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protoagg",
        description="Archive Kafka topics into GCS exactly once. Settings come from the "
        "environment: " + ", ".join(s.env for s in settings.ALL_SETTINGS) + ".",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    services = commands.add_parser("services", help="start, stop or show the local services")
    services.add_argument("action", choices=["up", "down", "status"])
    services.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="where data, PID files and logs live (default .protoagg/)",
    )
    services.add_argument("--kafka-port", type=int, default=Ports.kafka)
    services.add_argument("--kafka-controller-port", type=int, default=Ports.kafka_controller)
    services.add_argument("--postgres-port", type=int, default=Ports.postgres)
    services.add_argument("--gcs-port", type=int, default=Ports.gcs)
    services.set_defaults(handler=_services)

    produce = commands.add_parser("produce", help="send each line of a JSON-lines file to Kafka")
    produce.add_argument("file", type=Path)
    produce.add_argument("--topic", default=None, help="default: first of PROTOAGG_TOPICS")
    produce.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="create the topic with this many partitions if it does not exist",
    )
    produce.set_defaults(handler=_produce)

    backfill = commands.add_parser(
        "backfill", help="archive an offset or time range as bounded runs queued in Dagster"
    )
    backfill.add_argument("--topic", required=True)
    backfill.add_argument(
        "--partition",
        type=int,
        action="append",
        dest="partitions",
        help="repeat for several; default: every partition",
    )
    backfill.add_argument("--from-offset", type=int)
    backfill.add_argument("--to-offset", type=int, help="exclusive; default: the log end")
    backfill.add_argument("--from-time", type=_time_ms, help="RFC 3339, e.g. 2026-11-01T00:00:00Z")
    backfill.add_argument("--to-time", type=_time_ms, help="RFC 3339 (exclusive)")
    backfill.add_argument(
        "--max-batch-messages",
        type=int,
        default=None,
        help="offsets per run (default PROTOAGG_MAX_BATCH_MESSAGES)",
    )
    backfill.add_argument(
        "--dagster",
        default="127.0.0.1:3000",
        help="host:port of the Dagster webserver (default 127.0.0.1:3000)",
    )
    backfill.add_argument("--no-wait", action="store_true", help="queue the runs and return")
    backfill.set_defaults(handler=_backfill)

    restore = commands.add_parser(
        "restore", help="write archived records back into a Kafka topic, exactly once"
    )
    restore.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="gs://BUCKET/OBJECT, gs://BUCKET/PREFIX/ (every object under it, by name) or a file",
    )
    restore.add_argument("--to-topic", required=True, help="the topic to write to")
    restore.add_argument("--partition", type=int, help="records of this source partition only")
    restore.add_argument("--from-offset", type=int)
    restore.add_argument("--to-offset", type=int, help="exclusive")
    restore.add_argument("--from-time", type=_time_ms, help="RFC 3339 record timestamp")
    restore.add_argument("--to-time", type=_time_ms, help="RFC 3339 (exclusive)")
    restore.add_argument(
        "--bootstrap", default=None, help="target cluster (default PROTOAGG_KAFKA_BOOTSTRAP)"
    )
    restore.add_argument(
        "--create-topic",
        action="store_true",
        help="create the target topic, with the partitions the archive needs, if it is missing",
    )
    restore.add_argument(
        "--partitioner",
        choices=["same", "key"],
        default="same",
        help="same: the source partition number (default); key: Kafka's murmur2 of the key",
    )
    restore.add_argument(
        "--key",
        choices=["none", "logId"],
        default="none",
        help="log archives: the record key (default none)",
    )
    restore.add_argument(
        "--source-headers",
        action="store_true",
        help="add protoagg-source-topic, -partition and -offset headers",
    )
    restore.add_argument(
        "--transaction-records",
        type=int,
        default=20_000,
        help="records per Kafka transaction (default 20000); a crash re-sends at most these",
    )
    restore.add_argument(
        "--dry-run", action="store_true", help="count what would be restored; write nothing"
    )
    restore.set_defaults(handler=_restore)

    cat = commands.add_parser("cat", help="print an archive as JSON lines")
    cat.add_argument("url", help="gs://BUCKET/OBJECT or a local file path")
    _format_argument(cat)
    cat.add_argument(
        "--base64",
        action="store_true",
        help='record format: print every key, value and header value as {"base64": ...} '
        "(default: text when valid UTF-8)",
    )
    cat.set_defaults(handler=_cat)

    dead = commands.add_parser("dead-letters", help="list the messages set aside, with reasons")
    dead.add_argument("url", help="gs://BUCKET/OBJECT or a local file path")
    dead.add_argument("--values", action="store_true", help="print each original value too")
    dead.set_defaults(handler=_dead_letters)

    verify = commands.add_parser(
        "verify", help="check an archive's framing, duplicate records and offset order"
    )
    verify.add_argument("url", help="gs://BUCKET/OBJECT or a local file path")
    _format_argument(verify)
    verify.add_argument(
        "--against-kafka",
        action="store_true",
        help="also read the partitions the object records back from Kafka and account for "
        "every offset (archived once, duplicate, dead letter or tombstone)",
    )
    verify.set_defaults(handler=_verify)

    schema = commands.add_parser(
        "schema", help="show or upgrade the PostgreSQL schema (PROTOAGG_POSTGRES_DSN)"
    )
    schema.add_argument(
        "action",
        choices=["upgrade", "status"],
        help="upgrade: apply the numbered migrations the database lacks (under a lock; runs "
        "and `services up` do it too); status: the version reached",
    )
    schema.set_defaults(handler=_schema)

    doctor = commands.add_parser(
        "doctor", help="check Kafka, PostgreSQL, GCS and Dagster settings; one line per check"
    )
    doctor.add_argument(
        "--dagster-yaml",
        type=Path,
        default=None,
        help="the Dagster instance's dagster.yaml (default: $DAGSTER_HOME/dagster.yaml)",
    )
    doctor.set_defaults(handler=_doctor)
    return parser


def _format_argument(parser: argparse.ArgumentParser) -> None:
    from protoagg_dagster.core.formats import FORMATS

    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="archive format (default: the object's metadata; a local file: log)",
    )


def _services(args: argparse.Namespace) -> int:
    ports = Ports(args.kafka_port, args.kafka_controller_port, args.postgres_port, args.gcs_port)
    stack = local_stack(args.state_dir, ports)
    if args.action == "up":
        for service in stack:
            print(f"starting {service.name} ...", flush=True)
            service.up()
        for service in stack:
            print(service.describe())
        exports = exports_of(stack)
        print(upgrade_schema(exports["PROTOAGG_POSTGRES_DSN"]))
        print("\n# point protoagg and Dagster at these services:")
        for name, value in exports.items():
            print(f"export {name}={shlex.quote(value)}")
    elif args.action == "down":
        for service in reversed(stack):
            print(f"{service.name}: {'stopped' if service.down() else 'was not running'}")
    else:
        for service in stack:
            print(service.describe())
    return 0


def _produce(args: argparse.Namespace) -> int:
    from protoagg_dagster.cli.produce import produce_file

    topic = args.topic or settings.split_list(settings.TOPICS.read())[0]
    sent = produce_file(args.file, topic, settings.KAFKA_BOOTSTRAP.read(), args.partitions)
    print(f"sent {sent} messages from {args.file} to topic {topic!r}")
    return 0


def _time_ms(text: str) -> int:
    from protoagg_dagster.core.records import RecordRejected, parse_rfc3339

    try:
        seconds, nanos = parse_rfc3339(text)
    except RecordRejected as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None
    return seconds * 1000 + nanos // 1_000_000


def _backfill(args: argparse.Namespace) -> int:
    from protoagg_dagster.cli.backfill import run_backfill

    return run_backfill(args)


def _restore(args: argparse.Namespace) -> int:
    from protoagg_dagster.cli.restore import run_restore

    return run_restore(args)


def _cat(args: argparse.Namespace) -> int:
    from protoagg_dagster.reading.archive_reader import BYTES_STYLES, cat_archive

    cat_archive(
        args.url, sys.stdout, args.format, BYTES_STYLES["base64" if args.base64 else "text"]
    )
    return 0


def _dead_letters(args: argparse.Namespace) -> int:
    from protoagg_dagster.reading.archive_reader import list_dead_letters

    list_dead_letters(args.url, sys.stdout, with_values=args.values)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from protoagg_dagster.reading.archive_reader import verify_archive

    report = verify_archive(args.url, args.format)
    print(report.summary())
    if not args.against_kafka:
        return 0 if report.ok else 1
    from protoagg_dagster.reading.archive_reader import check_url_against_kafka

    check = check_url_against_kafka(args.url)
    print(check.summary())
    return 0 if report.ok and check.ok else 1


def _schema(args: argparse.Namespace) -> int:
    print(upgrade_schema(settings.POSTGRES_DSN.read(), only_status=args.action == "status"))
    return 0


def upgrade_schema(dsn: str, only_status: bool = False) -> str:
    """Upgrade the database at ``dsn`` to this code's schema (or just look); say where it is."""
    from protoagg_dagster import schema
    from protoagg_dagster.archive.ledger import ensure_schema
    from protoagg_dagster.resources import PostgresResource

    with PostgresResource(dsn=dsn).connect() as conn:
        applied = () if only_status else ensure_schema(conn)
        reached = schema.version(conn)
    steps = "".join(f"\n  applied {m.version}: {m.name}" for m in applied)
    state = "current" if reached == schema.LATEST else f"behind: {schema.LATEST} is current"
    return f"schema: version {reached} ({state}){steps}"


def _doctor(args: argparse.Namespace) -> int:
    from protoagg_dagster.cli.doctor import Deployment, diagnose
    from protoagg_dagster.resources import GCSResource, KafkaResource

    dagster_yaml = args.dagster_yaml
    if dagster_yaml is None and os.environ.get("DAGSTER_HOME"):
        dagster_yaml = Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml"
    codec = settings.read_codec()
    deployment = Deployment(
        kafka=KafkaResource(
            bootstrap_servers=settings.KAFKA_BOOTSTRAP.read(),
            topics=settings.TOPICS.read(),
            security_protocol=settings.KAFKA_SECURITY_PROTOCOL.read(),
            sasl_mechanism=settings.KAFKA_SASL_MECHANISM.read() or None,
            sasl_username=settings.KAFKA_SASL_USERNAME.read() or None,
            sasl_password=settings.KAFKA_SASL_PASSWORD.read() or None,
            ssl_cafile=settings.KAFKA_SSL_CAFILE.read() or None,
        ),
        postgres_dsn=settings.POSTGRES_DSN.read(),
        gcs=GCSResource(
            bucket=settings.GCS_BUCKET.read(),
            object_template=settings.object_template(settings.GCS_OBJECT, codec.suffix),
            dead_letter_template=settings.object_template(settings.GCS_DEAD_LETTERS, codec.suffix),
            compression=codec.name,
            compression_level=codec.level,
            emulator_host=settings.STORAGE_EMULATOR_HOST.read(),
        ),
        linger_seconds=settings.LINGER_SECONDS.read_float(),
        dagster_yaml=dagster_yaml,
    )
    findings = diagnose(deployment)
    for finding in findings:
        print(finding.line(), flush=True)
    return 1 if any(f.status == "FAIL" for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
