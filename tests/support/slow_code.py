"""protoagg's code location with delays injected, for tests that must catch a run mid-step.

``PROTOAGG_TEST_DELAYS="consume=3,compose=2"`` sleeps that many seconds in the consume step
(after reading Kafka) and in the append step (after the upload, before the compose). The code
server and every run worker load this module, so the delays apply in each real run process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from protoagg_dagster.archive import ops
from protoagg_dagster.archive import store as archive_store
from protoagg_dagster.definitions import defs

HOOKS: dict[str, tuple[ModuleType, str]] = {
    "consume": (ops, "read_together"),
    "compose": (archive_store, "_compose_queued"),
}


def _delayed(original: Callable[..., Any], seconds: float, before: bool) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            time.sleep(seconds)
        result = original(*args, **kwargs)
        if not before:
            time.sleep(seconds)
        return result

    return wrapper


for item in filter(None, os.environ.get("PROTOAGG_TEST_DELAYS", "").split(",")):
    step, seconds = item.split("=")
    module, name = HOOKS[step]
    setattr(module, name, _delayed(getattr(module, name), float(seconds), before=step != "consume"))

__all__ = ["defs"]
