"""How an entry point reports a user error: one line naming the key, file or line, exit status 2, no traceback.

A user error is a :class:`~sempa_exp.config.schema.ConfigError` (bad config, bad data file, damaged run record, a
run directory that holds another experiment...). Anything else is a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1``
shows the traceback of a user error too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from sempa_exp.config.schema import ConfigError

USER_ERROR_EXIT = 2
USER_ERROR_PREFIX = "[sempa-exp] error: "  # the sweep client finds a job's message in its log by it


@contextmanager
def reporting_user_errors() -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{USER_ERROR_PREFIX}{exc}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None
