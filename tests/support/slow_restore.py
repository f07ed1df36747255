"""``protoagg restore`` pausing after each committed transaction, for kill tests.

With librdkafka a test restore of a few thousand records ends in well under a second, before a
test can see its progress and kill it mid-way; the pause makes the kill points land inside the
restore for either client without changing what it writes.
"""

import sys
import time
from typing import Any

from protoagg_dagster.cli import main as cli
from protoagg_dagster.restore import writer as restore

PAUSE_SECONDS = 0.1
_commit = restore._commit


def _commit_then_pause(*args: Any, **kwargs: Any) -> None:
    _commit(*args, **kwargs)
    time.sleep(PAUSE_SECONDS)


restore._commit = _commit_then_pause
sys.exit(cli.main(["restore", *sys.argv[1:]]))
