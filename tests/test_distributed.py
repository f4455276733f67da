"""DDP on CPU: two gloo processes (torchrun) follow the loss trajectory of one process with the same global batch;
the distributed environment of a multi-task submitit job is exported from SLURM's variables."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES
from sempa_exp.launch import distributed
from sempa_exp.pipelines import training
from sempa_exp.records.metrics import read_metrics
from sempa_exp.records.results import SampleClock, read_results

REPO = Path(__file__).resolve().parents[1]
# A learning rate high enough for the loss to move well away from log(2) in 4 steps; no dropout, whose masks are
# drawn per process and would make the two trajectories differ for a reason that is not a bug. The one-process run
# keeps its two micro-batches as the two ranks get them (no sort_within_step regrouping): the same gradient, but
# summed in another order, which Adam's first step can amplify past the STS tolerance below.
DDP_OVERRIDES = ["trainer.learning_rate=5e-3", "trainer.warmup_ratio=0", "lora.dropout=0", "run.num_threads=1",
                 "objective.sort_within_step=false"]


def run_process_group(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Runs torchrun; on a timeout (a hang in a collective) its workers are killed too, not left behind."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (a DDP hang?):\n{out[-2000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_on_two_processes(data_root: Path, tmp_path: Path, *overrides: str) -> None:
    """`python -m sempa_exp.train` under torchrun, 2 gloo processes x 4 pairs x 1 accumulation, group "two"; later
    overrides replace the tiny defaults they name."""
    named = {o.split("=", 1)[0] for o in overrides}
    base = [o for o in TINY_OVERRIDES if o.split("=", 1)[0] not in named | {"trainer.grad_accum_steps"}]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sempa_exp.train", *base, *overrides, "trainer.grad_accum_steps=1", "run.group=two",
           f"paths.data_dir={data_root}", f"paths.runs_dir={tmp_path / 'runs'}"]
    proc = run_process_group(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_cfg, data_root, tmp_path):
    # two processes: 4 per device x 1 accumulation x 2 ranks = 8 samples per step
    train_on_two_processes(data_root, tmp_path, *DDP_OVERRIDES)
    # one process (after: the two above found the caches cold): 4 per device x 2 accumulation = 8 samples per step
    one = training.run(tiny_cfg(*DDP_OVERRIDES, "trainer.grad_accum_steps=2", "run.group=one"))

    two_dirs = [p for p in (tmp_path / "runs" / "two").iterdir() if not p.name.startswith(".")]
    assert len(two_dirs) == 1
    two = read_results(two_dirs[0])
    assert (one.world_size, two.world_size) == (1, 2)
    assert two.final_step == one.final_step == 4
    # the same samples seen after each step: 8 per step, 32 in all, whether 2 ranks x 4 or 1 process x 4 x 2
    assert SampleClock(32, 4, 1, world_size=2).at(4) == two.samples_seen == one.samples_seen == 32
    assert [r["samples_seen"] for r in read_metrics(two_dirs[0]) if "train/loss" in r] == [8, 16, 24, 32]
    losses_one, losses_two = _train_losses(Path(one.run_dir)), _train_losses(two_dirs[0])
    assert [s for s, _ in losses_two] == [1, 2, 3, 4]  # rank 0 alone logs: no duplicated steps
    assert losses_one[-1][1] < losses_one[0][1] - 0.01  # the comparison below is not between two flat lines
    assert [loss for _, loss in losses_two] == pytest.approx([loss for _, loss in losses_one], rel=1e-5)
    # only rank 0 evaluates: one record per evaluated step, same scores as the single process
    assert [e["step"] for e in two.evaluations] == [e["step"] for e in one.evaluations] == [0, 2, 4]
    assert two.final["eval/stsb_dev"] == pytest.approx(one.final["eval/stsb_dev"], abs=1e-3)


def test_with_whole_steps_only_two_processes_match_one_process_at_every_step(tiny_cfg, data_root, tmp_path):
    """30 pairs, 8 per step: the default's last step holds 6 and is another computation on 2 processes (accelerate
    pads each process's last batch with pairs from the epoch's start); trainer.drop_partial_step trains the 3 whole
    steps on both, and every step agrees."""
    common = [*DDP_OVERRIDES, "data.size=30", "trainer.drop_partial_step=true", "eval.at_start=[]",
              "eval.at_checkpoint=[]", "eval.at_end=[stsb_dev]"]
    train_on_two_processes(data_root, tmp_path, *common)
    one = training.run(tiny_cfg(*common, "trainer.grad_accum_steps=2", "run.group=one"))
    (two_dir,) = [p for p in (tmp_path / "runs" / "two").iterdir() if not p.name.startswith(".")]
    two = read_results(two_dir)
    assert two.train_pairs == one.train_pairs == 24 and two.samples_seen == one.samples_seen == 24
    losses_one, losses_two = _train_losses(Path(one.run_dir)), _train_losses(two_dir)
    assert [s for s, _ in losses_two] == [s for s, _ in losses_one] == [1, 2, 3]
    assert [loss for _, loss in losses_two] == pytest.approx([loss for _, loss in losses_one], rel=1e-5)


SLURM_TASK_1_OF_2 = {
    "SUBMITIT_EXECUTOR": "slurm",
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "0",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_JOB_NODELIST": "gpu-node-07",
}
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_dist_env(monkeypatch):
    for key in DIST_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_multi_task_slurm_job_exports_torch_distributed_env(clean_dist_env):
    for key, value in SLURM_TASK_1_OF_2.items():
        clean_dist_env.setenv(key, value)
    assert distributed.export_from_submitit()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["MASTER_ADDR"] == "gpu-node-07"
    assert distributed.world() == (2, 1)


def test_single_task_job_and_torchrun_are_left_alone(clean_dist_env):
    for key, value in {**SLURM_TASK_1_OF_2, "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        clean_dist_env.setenv(key, value)
    assert not distributed.export_from_submitit()
    assert "RANK" not in os.environ
    clean_dist_env.setenv("SLURM_NTASKS", "2")
    clean_dist_env.setenv("RANK", "0")  # torchrun inside the job already set it
    assert not distributed.export_from_submitit()


def test_device_for_follows_run_device_and_the_local_rank(clean_dist_env, monkeypatch):
    import torch

    assert distributed.world() == (1, 0)  # outside a distributed launch
    assert distributed.device_for("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.device_for("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.device_for("auto") == torch.device("cuda")
    clean_dist_env.setenv("LOCAL_RANK", "1")  # torchrun / a multi-task SLURM job: one GPU per process
    assert distributed.device_for("auto") == distributed.device_for("cuda") == torch.device("cuda", 1)
    assert distributed.device_for("cpu") == torch.device("cpu")
