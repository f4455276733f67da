"""SIGTERM stops a training run at once.

SLURM sends SIGTERM on ``scancel``, on ``scontrol requeue`` and when a preempted job is requeued, then SIGKILL
``KillWait`` seconds later. submitit ignores it ("Bypassing signal SIGTERM"): it relies on USR2 for its own
checkpoint-and-requeue, so without this the run trains on and writes checkpoints until the SIGKILL, racing the job
that replaces it. Here the first SIGTERM raises :class:`StopRequested` in the main thread; the run unwinds through its
``finally`` blocks (the run logger closes, the lock is released) and leaves its directory as it was at the last
complete record: a resume starts from the last checkpoint (a checkpoint cut short is set aside, see
``records.rundir.latest_checkpoint``). Requeueing is SLURM's (``--requeue``) or submitit's (USR2), never this.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import types
from collections.abc import Iterator

EXIT_CODE = 128 + signal.SIGTERM  # what a process killed by SIGTERM reports


class StopRequested(BaseException):
    """SIGTERM arrived. A BaseException: no ``except Exception`` on the way (HF, submitit) swallows it."""


def _stop(signum: int, frame: types.FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop; further SIGTERMs must not cut the unwinding short
    raise StopRequested(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def stopping_on_sigterm() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`StopRequested`; the previous handler is back afterwards (main thread
    only: elsewhere Python cannot set signal handlers, and the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
