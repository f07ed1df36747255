"""Where a machine's CPU goes, by kind of process, while a benchmark runs (Linux /proc).

A background thread reads every process's user + system time twice a second; a process's share is
the last value read for it (a process that lives less than half a second can be missed, so the
split is a lower bound per kind; ``machine`` is /proc/stat's total over the same window).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")

# First match wins: (kind, words its command line contains).
# The benchmark's own command line may name a service (``--dagster-storage postgres``), and a
# run worker's carries its run's JSON: both are matched before the services. The code server
# starts each run as a multiprocessing child (``spawn_main``).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("benchmark", ("benchmarks/",)),
    ("run workers", ("spawn_main", "execute_run", "api execute", "execute_step")),
    ("code server", ("api grpc", "code-server")),
    ("daemon", ("dagster-daemon", "dagster_daemon")),
    ("kafka", ("kafka.Kafka", "java")),
    ("postgres", ("postgres",)),
    ("gcs emulator", ("fake-gcs-server", "fake_gcs")),
)


def kind_of(cmdline: str) -> str:
    # Kernel threads have no command line: on this VM mostly kdamond (memory monitoring) and
    # the block layer's workers, busier the more the services write.
    if not cmdline.strip():
        return "kernel threads"
    for kind, words in KINDS:
        if any(word in cmdline for word in words):
            return kind
    return "other"


class CpuSplit:
    """Samples until ``stop()``; ``seconds()`` is the CPU seconds per kind over the window."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> CpuSplit:
        self._sample(baseline=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(baseline=False)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample(baseline=False)

    def _sample(self, baseline: bool) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                stat = (entry / "stat").read_text()
                raw = (entry / "cmdline").read_bytes()
                cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue  # exited between listing and reading
            fields = stat.rsplit(")", 1)[1].split()
            used = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
            if baseline:
                self.first[pid] = used
            else:
                self.first.setdefault(pid, 0.0)
                self.last[pid] = (kind_of(cmdline), used)

    def seconds(self) -> dict[str, float]:
        split: dict[str, float] = {}
        for pid, (kind, used) in self.last.items():
            split[kind] = split.get(kind, 0.0) + used - self.first[pid]
        return dict(sorted(split.items(), key=lambda item: -item[1]))


def measure(seconds: float) -> dict[str, float]:
    split = CpuSplit().start()
    time.sleep(seconds)
    split.stop()
    return split.seconds()


if __name__ == "__main__":
    import sys

    for kind, used in measure(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0).items():
        print(f"{kind:14} {used:8.1f} s")
