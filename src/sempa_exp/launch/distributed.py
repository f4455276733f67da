"""The distributed environment of a run: torchrun sets it; a submitit job with several tasks gets it from SLURM.

HF Trainer (through accelerate) initialises ``torch.distributed`` from the ``env://`` variables (MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK), so each SLURM task only has to export them before the trainer exists.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """(world size, global rank) of this process; (1, 0) outside a distributed launch."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def device_for(want: str) -> torch.device:
    """``run.device`` as a torch device: ``auto`` is CUDA when there is one; under torchrun / a multi-task SLURM job
    each process takes ``cuda:LOCAL_RANK`` (accelerate's convention)."""
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(want)


def export_from_submitit() -> bool:
    """In a submitit job (SLURM or local) with several tasks, export the torch.distributed variables; True if done.

    A no-op when the variables are already set (torchrun inside the job) or the job has a single task.
    CUDA_VISIBLE_DEVICES is left alone: every task sees the node's GPUs and uses ``cuda:LOCAL_RANK``, as accelerate
    does.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return False
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks < 2:
        return False
    dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    log.info("distributed from %s: rank %d of %d (local rank %d), master %s:%d", env.cluster, dist.rank,
             dist.world_size, dist.local_rank, dist.master_addr, dist.master_port)
    return True
