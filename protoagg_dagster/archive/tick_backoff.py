"""A sensor tick that fails for a reason we can name says it in one line, and backs off.

Without this, every tick of a sensor whose Kafka refuses its password writes a ~60-line
traceback to the daemon's log, every few seconds, for as long as nobody fixes it. A refusal
(``AccessRefused``) does not heal by asking again soon, so the ticks after one wait, doubling
from ``FIRST_WAIT_SECONDS`` up to ``MAX_WAIT_SECONDS``; other failures of ours (an unreachable
broker) are retried at the next tick as before. The waiting lives in the code server's memory,
per Kafka connection settings: changing a setting (or restarting the code server) asks at once.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec

import dagster as dg

from protoagg_dagster.core.errors import AccessRefused, ProtoaggError
from protoagg_dagster.resources import KafkaResource

FIRST_WAIT_SECONDS = 10.0
MAX_WAIT_SECONDS = 120.0
P = ParamSpec("P")


@dataclass
class Backoff:
    """Refusals in a row, and until when (monotonic) ticks skip without asking."""

    refusals: int = 0
    until: float = 0.0
    reason: str = ""

    def wait_after(self, reason: str, now: float) -> float:
        self.refusals += 1
        wait: float = min(FIRST_WAIT_SECONDS * 2.0 ** (self.refusals - 1), MAX_WAIT_SECONDS)
        self.until = now + wait
        self.reason = reason
        return wait


def one_line_failures(
    evaluate: Callable[P, dg.SensorResult],
) -> Callable[P, dg.SensorResult]:
    """Wrap a sensor's evaluation function (its first argument is the sensor's context)."""
    backoffs: dict[object, Backoff] = {}

    @functools.wraps(evaluate)
    def tick(*args: P.args, **kwargs: P.kwargs) -> dg.SensorResult:
        context: Any = args[0] if args else kwargs["context"]
        backoff = backoffs.setdefault(_connection(kwargs.get("kafka")), Backoff())
        now = time.monotonic()
        if now < backoff.until:
            return dg.SensorResult(
                skip_reason=f"{backoff.reason} (asking again in {backoff.until - now:.0f} s)"
            )
        try:
            result = evaluate(*args, **kwargs)
        except AccessRefused as exc:
            wait = backoff.wait_after(str(exc), now)
            context.log.error(f"{exc} (asking again in {wait:.0f} s)")
            return dg.SensorResult(skip_reason=str(exc))
        except ProtoaggError as exc:
            context.log.error(str(exc))
            return dg.SensorResult(skip_reason=str(exc))
        backoff.refusals = 0
        return result

    return tick


def _connection(kafka: object) -> object:
    """What the waiting is kept per: the Kafka connection settings, when they are valid."""
    try:
        return kafka.client_settings() if isinstance(kafka, KafkaResource) else None
    except ProtoaggError:  # the evaluation itself raises it, and says it in one line
        return None
