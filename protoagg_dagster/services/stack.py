"""The three local services as one stack, in start order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from protoagg_dagster.services.gcs import GcsEmulatorService
from protoagg_dagster.services.kafka import KafkaService
from protoagg_dagster.services.postgres import PostgresService

DEFAULT_STATE_DIR = Path(".protoagg")


class LocalService(Protocol):
    name: ClassVar[str]

    def up(self) -> None: ...
    def down(self) -> bool: ...
    def is_running(self) -> bool: ...
    def describe(self) -> str: ...
    def exports(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Ports:
    kafka: int = 9094
    kafka_controller: int = 9095
    postgres: int = 5432
    gcs: int = 4443


def local_stack(state_dir: Path, ports: Ports = Ports()) -> list[LocalService]:
    state_dir = state_dir.resolve()
    return [
        PostgresService(state_dir, port=ports.postgres),
        GcsEmulatorService(state_dir, port=ports.gcs),
        KafkaService(state_dir, port=ports.kafka, controller_port=ports.kafka_controller),
    ]


def exports_of(stack: list[LocalService]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for service in stack:
        merged.update(service.exports())
    return merged
