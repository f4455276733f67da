"""A training callback for the SLURM tests (given through ``trainer.callbacks``; the jobs import it from tests/ on
PYTHONPATH): it holds a run at a step while a file exists, so that a test preempts, cancels or times out a job that is
certainly still training, however fast the machine is, instead of racing the job to its end."""

from __future__ import annotations

import os
import time
from pathlib import Path

from transformers import TrainerCallback

HOLD_FILE_ENV = "SEMPA_TEST_HOLD_FILE"  # the file, from the job's environment (a path in the run name would crowd it)
MARKER = "held"  # written in the run directory when the hold begins
STEP = 7  # after the first checkpoint of the tests' LONG runs (every 5 steps)
OVERRIDE = "+trainer.callbacks.hold._target_=slurm_hold.HoldAtStep"


class HoldAtStep(TrainerCallback):
    """At the end of optimizer step ``step``: while the file named by $SEMPA_TEST_HOLD_FILE exists, writes
    ``<run dir>/held`` and waits (at most ``max_wait_s``, a guard against a test that died). Signals reach the waiting
    job as they reach a training one."""

    def __init__(self, step: int = STEP, max_wait_s: float = 1800.0) -> None:
        self.step, self.max_wait_s = step, max_wait_s
        self.hold_file = Path(os.environ[HOLD_FILE_ENV])

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step or not self.hold_file.exists():
            return
        (Path(args.output_dir).parent / MARKER).write_text(f"step {self.step}\n")
        end = time.time() + self.max_wait_s
        while self.hold_file.exists() and time.time() < end:
            time.sleep(0.2)
