"""Sweeps through hydra/launcher=submitit_slurm against a real SLURM (launch/slurm_local.sh start): one job array per
sweep, real preemption with requeue and resume, a real time limit (resumed over several allocations; a run that
cannot fit stops and says so), a cancelled run reported by name, a relaunch that recomputes nothing, and a two-task
(one process per GPU) DDP job. Run with ``pytest -m slurm``; the cluster profile is cluster=local_slurm.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import slurm_hold
from conftest import compose_config, make_data_root
from sempa_exp.pipelines import training
from sempa_exp.records import identity
from sempa_exp.records.metrics import read_metrics
from sempa_exp.records.results import Results

REPO = Path(__file__).resolve().parents[1]


def _slurm_missing() -> str | None:
    if shutil.which("sinfo") is None:
        return "no SLURM here (`sinfo` not found); start the local one with: launch/slurm_local.sh start"
    out = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.strip():
        return f"SLURM does not answer (sinfo: {out.stderr.strip() or 'no nodes'}); launch/slurm_local.sh start"
    return None


pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def _needs_slurm():
    """Asked only when a SLURM test runs (the default suite deselects them without calling sinfo)."""
    reason = _slurm_missing()
    if reason:
        pytest.skip(reason)

# Every wait below is a guard against a hang, never a condition of passing: generous for a slow, shared machine.
# A job that a test must stop while it trains is held at a step (slurm_hold) until the test has done so: no test
# races a job to its end, however fast the machine.
GUARD_S = 900

# Tiny backbone, 1 CPU per job, torch on one thread (results do not depend on how the node is shared).
BASE = ["backbone=tiny", "trainer=cpu", "trainer.bf16=false", "trainer.per_device_batch_size=4",
        "trainer.grad_accum_steps=2", "trainer.max_length=512", "eval=geometry", "eval.geometry_sample=40",
        "logger=none", "run.num_threads=1"]
SHORT = ["data.size=32", "trainer.checkpoint_every_samples=16"]  # 4 steps, a checkpoint every 2
LONG = ["data.size=160", "trainer.checkpoint_every_samples=40"]  # 20 steps per epoch, a checkpoint every 5


@pytest.fixture(scope="module")
def slurm_data(tmp_path_factory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("slurm_data"))  # under /tmp: visible to slurmd (same machine)


def _env(runs_dir: Path, data_root: Path, hold: Path | None = None) -> dict[str, str]:
    python_path = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "SEMPA_RUNS_DIR": str(runs_dir), "SEMPA_DATA_DIR": str(data_root),
            "SEMPA_CACHE_DIR": str(runs_dir.parent / "cache"), "WANDB_MODE": "offline",
            "PYTHONPATH": python_path,  # the jobs import slurm_hold (trainer.callbacks)
            **({slurm_hold.HOLD_FILE_ENV: str(hold)} if hold else {})}


def sweep_cmd(*overrides: str) -> list[str]:
    given = {o.split("=", 1)[0] for o in overrides}  # an override of a BASE key replaces it
    base = [o for o in BASE if o.split("=", 1)[0] not in given]
    return [sys.executable, "-m", "sempa_exp.train", "-m", "cluster=local_slurm", *base, *overrides]


def run_sweep(runs_dir: Path, data_root: Path, *overrides: str, timeout: int = GUARD_S) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_cmd(*overrides), cwd=REPO, env=_env(runs_dir, data_root), capture_output=True,
                          text=True, timeout=timeout)


def start_sweep(runs_dir: Path, data_root: Path, *overrides: str, log: Path | None = None,
                hold: Path | None = None) -> subprocess.Popen:
    """The sweep client; its output in a pipe, or in ``log`` (to be read while it runs). With ``hold``, every run
    waits at step slurm_hold.STEP while that file exists (it is created here)."""
    if hold is not None:
        hold.touch()
        overrides = (*overrides, slurm_hold.OVERRIDE)
    out = subprocess.PIPE if log is None else log.open("w")
    return subprocess.Popen(sweep_cmd(*overrides), cwd=REPO, env=_env(runs_dir, data_root, hold), stdout=out,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def run_dirs(runs_dir: Path, group: str) -> list[Path]:
    return sorted(p for p in (runs_dir / group).iterdir() if p.is_dir() and not p.name.startswith("."))


def job_ids(runs_dir: Path, group: str) -> dict[str, str]:
    """Run name -> SLURM job id, from the markers the launcher leaves at submission."""
    folder = runs_dir / group / ".hydra" / "jobs"
    if not folder.exists():
        return {}
    return {p.stem: json.loads(p.read_text())["job_id"] for p in folder.glob("*.json")}


def sacct_states(job_id: str, requeues: bool = False) -> list[str]:
    """The job's state; with ``requeues``, that of every allocation, oldest first (not for array tasks, whose
    first task sacct lists twice)."""
    out = subprocess.run(["sacct", "--noheader", "--parsable2", "--allocations", "-j", job_id, "--format=State",
                          *(["--duplicates"] if requeues else [])], capture_output=True, text=True, timeout=30)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def cancel_leftovers(runs_dir: Path, group: str) -> None:
    """After a failed test: no job of it keeps running into the next one."""
    ids = list(job_ids(runs_dir, group).values())
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "--noheader", "--array", "-j", job_id, "--format=%T"], capture_output=True,
                         text=True, timeout=30)
    return out.stdout.strip()


def submitit_logs(runs_dir: Path, group: str, job_id: str) -> str:
    files = sorted((runs_dir / group / ".hydra").glob(f"sweep_*/.submitit/{job_id}/{job_id}_*_log.*"))
    return "\n".join(f.read_text(errors="replace") for f in files)


def attempts_of(run_dir: Path) -> list[dict]:
    """The run's attempts.jsonl: one record per allocation that started it (complete lines only: it may be read while
    a job writes it)."""
    path = run_dir / "attempts.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line) for line in lines]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


@pytest.fixture
def reference_run():
    """An uninterrupted in-process run of the same overrides (torch's thread count restored afterwards)."""
    threads = torch.get_num_threads()

    def run(data_root: Path, runs_dir: Path, *overrides: str) -> Results:
        cfg = compose_config([*BASE, *overrides, f"paths.runs_dir={runs_dir}"], data_root)
        return training.run(cfg)

    yield run
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- a sweep, then its relaunch

@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, slurm_data):
    runs_dir = tmp_path_factory.mktemp("sweep") / "runs"
    started = time.time()
    try:
        proc = run_sweep(runs_dir, slurm_data, *SHORT, "run.group=lr", "trainer.learning_rate=1e-4,2e-4,3e-4")
        # the command returns once its jobs have left the queue, not while their processes are still exiting
        still_queued = {i: squeue_state(i) for i in job_ids(runs_dir, "lr").values() if squeue_state(i)}
    finally:
        cancel_leftovers(runs_dir, "lr")
    assert not still_queued, f"the sweep command returned while these jobs were still in the queue: {still_queued}"
    return runs_dir, proc, time.time() - started


def test_sweep_is_one_job_array_and_every_run_finishes(finished_sweep):
    runs_dir, proc, seconds = finished_sweep
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dirs = run_dirs(runs_dir, "lr")
    assert len(dirs) == 3
    for d in dirs:
        results = json.loads((d / "results.json").read_text())
        assert results["status"] == "finished" and results["final_step"] == 4
    ids = sorted(job_ids(runs_dir, "lr").values())
    array_ids = {i.split("_")[0] for i in ids}
    assert len(array_ids) == 1 and sorted(i.split("_")[1] for i in ids) == ["0", "1", "2"], ids
    assert all(sacct_states(i) == ["COMPLETED"] for i in ids)
    scripts = list((runs_dir / "lr" / ".hydra").glob("sweep_*/.submitit/**/*_submission.sh"))
    assert scripts and all("#SBATCH --requeue\n" in f.read_text() for f in scripts)  # not left to JobRequeue
    print(f"3-run sweep on SLURM: {seconds:.0f} s")


def test_relaunch_of_a_finished_sweep_submits_nothing(finished_sweep, slurm_data):
    runs_dir, first, _ = finished_sweep
    assert first.returncode == 0
    before = set((runs_dir / "lr" / ".hydra").glob("sweep_*/.submitit"))
    mtimes = {d: (d / "results.json").stat().st_mtime for d in run_dirs(runs_dir, "lr")}
    proc = run_sweep(runs_dir, slurm_data, *SHORT, "run.group=lr", "trainer.learning_rate=1e-4,2e-4,3e-4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("skipped (already finished)") == 3
    assert "[sempa-exp] submitted" not in proc.stdout
    assert set((runs_dir / "lr" / ".hydra").glob("sweep_*/.submitit")) == before  # no new submitit folder
    assert {d: (d / "results.json").stat().st_mtime for d in run_dirs(runs_dir, "lr")} == mtimes


# --------------------------------------------------------------------------- cancellation

def test_cancelled_run_is_reported_by_name_and_the_others_finish(tmp_path, slurm_data):
    runs_dir = tmp_path / "runs"
    # The victim is the 2nd run of the array; the runs train 2, 30 and 3 epochs (40, 600 and 60 steps), each held at
    # step 7 until the victim has been cancelled.
    hold = tmp_path / "hold"
    sweep = ["run.group=cancel", *LONG, "trainer.epochs=2,30,3"]
    client = start_sweep(runs_dir, slurm_data, *sweep, hold=hold)
    second = None
    try:
        ids = wait_for(lambda: len(job_ids(runs_dir, "cancel")) == 3 and job_ids(runs_dir, "cancel"), GUARD_S,
                       "the sweep's submission")
        victim = next(name for name, job_id in ids.items() if job_id.endswith("_1"))  # the 2nd run of the array
        # A second launch while the jobs are queued or running (the first client lost, say) submits nothing again:
        # it waits for the jobs of the first one.
        second_log = tmp_path / "second_client.log"
        second = start_sweep(runs_dir, slurm_data, *sweep, log=second_log, hold=hold)
        # the victim is cancelled only once the second client has found it (else it would rightly submit it again)
        wait_for(lambda: f"{victim}: still queued or running" in second_log.read_text(), GUARD_S,
                 "the second launch to find the victim's job")
        # cancelled in the middle of training: SIGTERM stops it
        wait_for(lambda: (runs_dir / "cancel" / victim / slurm_hold.MARKER).exists(), GUARD_S,
                 f"job {ids[victim]} to reach step 7")
        assert identity.saved_config(runs_dir / "cancel" / victim)["trainer"]["epochs"] == 30, ids
        subprocess.run(["scancel", ids[victim]], check=True, timeout=30)
        hold.unlink()
        out, _ = client.communicate(timeout=GUARD_S)
        second.wait(timeout=GUARD_S)
        out_second = second_log.read_text()
    finally:
        for proc in (client, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        cancel_leftovers(runs_dir, "cancel")
    assert client.returncode != 0
    assert "SweepError: 1 of 3 runs did not finish" in out
    assert f"cancel/{victim} (job {ids[victim]}): CANCELLED" in out
    # SIGTERM stopped the training at once (submitit alone would bypass it and train on until KillWait's SIGKILL)
    assert "signal SIGTERM: training stopped" in submitit_logs(runs_dir, "cancel", ids[victim])
    assert sacct_states(ids[victim])[-1].startswith("CANCELLED")
    for name, job_id in ids.items():
        finished = (runs_dir / "cancel" / name / "results.json").exists()
        assert finished == (name != victim), name
        if name != victim:
            assert sacct_states(job_id) == ["COMPLETED"]
            assert f"{name}: finished" in out

    assert second.returncode != 0 and "[sempa-exp] submitted" not in out_second
    summary = out_second[out_second.index("sweep summary"):]
    assert f"{victim}: NOT FINISHED: CANCELLED" in summary
    assert all(f"{name}: finished (job {job_id} of an earlier launch)" in summary or
               f"{name}: skipped (already finished)" in summary for name, job_id in ids.items() if name != victim)


def test_a_task_cancelled_while_pending_ends_the_wait_and_is_reported(tmp_path, slurm_data):
    """A pending array task cancelled before it starts leaves no record in squeue or sacct; the sweep command must
    not wait for it forever but report it by name, and the other run still finishes."""
    runs_dir = tmp_path / "runs"
    # one task at a time: the 2nd run of the array waits (JobArrayTaskLimit) while the 1st trains 40 steps
    hold = tmp_path / "hold"  # the 1st run waits at step 7 until the 2nd has been cancelled
    sweep = ["run.group=vanish", *LONG, "trainer.epochs=2", "trainer.learning_rate=1e-4,2e-4",
             "hydra.launcher.array_parallelism=1"]
    client = start_sweep(runs_dir, slurm_data, *sweep, hold=hold)
    try:
        ids = wait_for(lambda: len(job_ids(runs_dir, "vanish")) == 2 and job_ids(runs_dir, "vanish"), GUARD_S,
                       "the sweep's submission")
        waiting = next(name for name, job_id in ids.items() if job_id.endswith("_1"))
        wait_for(lambda: squeue_state(ids[waiting]) == "PENDING", GUARD_S, f"job {ids[waiting]} to be pending")
        subprocess.run(["scancel", ids[waiting]], check=True, timeout=30)
        hold.unlink()
        out, _ = client.communicate(timeout=GUARD_S)  # the guard against the old endless wait, not a timing condition
    finally:
        if client.poll() is None:
            client.kill()
        cancel_leftovers(runs_dir, "vanish")
    assert client.returncode != 0, out[-3000:]
    assert "SweepError: 1 of 2 runs did not finish" in out
    line = next(x for x in out.splitlines() if f"vanish/{waiting} (job {ids[waiting]}):" in x)
    assert "VANISHED" in line or "CANCELLED" in line, line  # CANCELLED where the cluster's accounting kept a row
    other = next(name for name in ids if name != waiting)
    assert (runs_dir / "vanish" / other / "results.json").exists() and f"{other}: finished" in out


# --------------------------------------------------------------------------- preemption

def test_preempted_run_is_requeued_resumes_and_matches_an_uninterrupted_run(tmp_path, slurm_data, reference_run):
    runs_dir = tmp_path / "runs"
    config = [*LONG, "trainer.epochs=2"]  # 40 steps; a checkpoint every 5
    hold = tmp_path / "hold"  # the job waits at step 7, after its first checkpoint, until preempted and requeued
    started = time.time()
    client = start_sweep(runs_dir, slurm_data, "run.group=preempt", *config, hold=hold)
    try:
        run_dir = wait_for(lambda: next((p.parent for p in (runs_dir / "preempt").glob(f"*/{slurm_hold.MARKER}")),
                                        None), GUARD_S, "the job to reach step 7")
        ckpt = run_dir / "checkpoints" / "checkpoint-5" / "trainer_state.json"
        assert ckpt.exists()
        # A job of the "urgent" partition needing every CPU of the node preempts the training job (USR2, requeue).
        cpus = subprocess.run(["sinfo", "--noheader", "--format=%c"], capture_output=True, text=True).stdout.split()[0]
        subprocess.run(["sbatch", "--partition=urgent", f"--cpus-per-task={cpus}", "--job-name=urgent",
                        "--output=/dev/null", "--wrap=sleep 2"], check=True, capture_output=True, timeout=30)
        wait_for(lambda: len(attempts_of(run_dir)) >= 2, GUARD_S, "the requeued job to start again")
        hold.unlink()
        out, _ = client.communicate(timeout=GUARD_S)
    finally:
        if client.poll() is None:
            client.kill()
        cancel_leftovers(runs_dir, "preempt")
    seconds = time.time() - started
    assert client.returncode == 0, out[-4000:]
    job_id = job_ids(runs_dir, "preempt")[run_dir.name]
    logs = submitit_logs(runs_dir, "preempt", job_id)
    assert "this job is preempted" in logs and f"Requeued job {job_id}" in logs
    assert "resuming from" in logs
    states = sacct_states(job_id, requeues=True)
    assert states[0] in ("REQUEUED", "PREEMPTED") and states[-1] == "COMPLETED", states

    resumed = json.loads((run_dir / "results.json").read_text())
    reference = reference_run(slurm_data, tmp_path / "reference", "run.group=preempt", *config)
    assert resumed["final_step"] == reference.final_step == 40
    losses = train_losses(run_dir)
    assert [s for s, _ in losses] == list(range(1, 41))  # no duplicated or out-of-order steps after the resume
    assert losses == train_losses(Path(reference.run_dir))
    assert [e["step"] for e in resumed["evaluations"]] == [e["step"] for e in reference.evaluations]
    final = {k: v for k, v in resumed["final"].items() if k != "eval/seconds"}
    assert final == {k: v for k, v in reference.final.items() if k != "eval/seconds"}
    print(f"preempted + requeued run: {seconds:.0f} s")


# --------------------------------------------------------------------------- time limits

# A 2-minute limit with USR2 60 s before it: each allocation trains about a minute, then submitit checkpoints and
# requeues itself. (Below 10 minutes submitit counts every USR2 as a timeout, against max_num_timeout.)
TIME_LIMIT = ["hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=60"]


def starts_and_timeouts(runs_dir: Path, group: str, job_id: str) -> tuple[int, int]:
    """How often the job started, and how often submitit took a USR2 for a timeout (its logger's lines in the job's
    stdout logs; its "Requeued job" line can be lost to the kill that the requeue itself triggers). A line is not
    anchored: the job's stdout and stderr share the file, so a logger line can follow a print that has not yet
    written its newline."""
    files = sorted((runs_dir / group / ".hydra").glob(f"sweep_*/.submitit/{job_id}/{job_id}_0_log.out"))
    logs = "\n".join(f.read_text(errors="replace") for f in files)
    assert "this job is preempted" not in logs
    starts = re.findall(r"submitit INFO \([^)]*\) - Starting with JobEnvironment", logs)
    timeouts = re.findall(r"submitit INFO \([^)]*\) - Job has timed out\.", logs)
    return len(starts), len(timeouts)


def test_time_limited_run_requeues_itself_resumes_and_matches_an_uninterrupted_run(tmp_path, slurm_data,
                                                                                 reference_run):
    """The run needs several allocations of its time limit; it resumes from its checkpoints each time and ends with
    the same losses, evaluations and final scores as a run that was never stopped."""
    runs_dir = tmp_path / "runs"
    # 32 epochs of 20 steps (here about 285 steps fit in an allocation), a checkpoint every 5 (every allocation
    # reaches several), the final evaluation saved suite by suite
    config = [*LONG, "trainer.epochs=32", "eval.at_end=[geometry,stsb_dev]"]
    hold = tmp_path / "hold"  # the first allocation waits at step 7 for its time limit: one requeue on any machine
    started = time.time()
    client = start_sweep(runs_dir, slurm_data, "run.group=limit", *config, *TIME_LIMIT, "logger=wandb",
                         "logger.mode=offline", hold=hold)
    try:
        run_dir = wait_for(lambda: next((p.parent for p in (runs_dir / "limit").glob(f"*/{slurm_hold.MARKER}")),
                                        None), GUARD_S, "the job to reach step 7")
        wait_for(lambda: len(attempts_of(run_dir)) >= 2, GUARD_S, "the requeued job to start again")
        hold.unlink()
        out, _ = client.communicate(timeout=2 * GUARD_S)
    finally:
        if client.poll() is None:
            client.kill()
        cancel_leftovers(runs_dir, "limit")
    seconds = time.time() - started
    assert client.returncode == 0, out[-4000:]
    assert run_dirs(runs_dir, "limit") == [run_dir]
    job_id = job_ids(runs_dir, "limit")[run_dir.name]
    logs = submitit_logs(runs_dir, "limit", job_id)
    starts, timeouts = starts_and_timeouts(runs_dir, "limit", job_id)
    assert timeouts >= 1 and starts == timeouts + 1 and "resuming from" in logs, logs[-3000:]
    attempts = attempts_of(run_dir)
    assert len(attempts) == starts and [a["slurm_restart"] for a in attempts] == list(range(len(attempts)))
    progress = [(a["progress"]["checkpoint"], a["progress"]["records"]) for a in attempts]
    assert progress == sorted(set(progress)), progress  # every allocation started further on than the one before

    resumed = json.loads((run_dir / "results.json").read_text())
    reference = reference_run(slurm_data, tmp_path / "reference", "run.group=limit", *config)
    assert resumed["final_step"] == reference.final_step == 640
    losses = train_losses(run_dir)
    assert [s for s, _ in losses] == list(range(1, 641))
    assert losses == train_losses(Path(reference.run_dir))
    assert [e["step"] for e in resumed["evaluations"]] == [e["step"] for e in reference.evaluations]
    final = {k: v for k, v in resumed["final"].items() if k != "eval/seconds"}
    assert final == {k: v for k, v in reference.final.items() if k != "eval/seconds"}
    tokens = [(r["step"], r["train/num_tokens"]) for r in read_metrics(run_dir) if "train/num_tokens" in r]
    assert tokens == [(r["step"], r["train/num_tokens"]) for r in read_metrics(Path(reference.run_dir))
                      if "train/num_tokens" in r]  # the counter continues across allocations

    # What W&B gets: each allocation left an offline folder; the finished run replaced them with one rebuilt from
    # metrics.jsonl, which `wandb sync` uploads: every step once, in order, with the run's values.
    from wandb_offline import history

    (run_file,) = (run_dir / "wandb").glob(f"offline-run-*-{identity.wandb_run_id(run_dir)}/run-*.wandb")
    synced = [(r["_step"], r["train/loss"]) for r in history(run_file) if "train/loss" in r]
    assert [s for s, _ in synced] == list(range(1, 641))
    assert [v for _, v in synced] == pytest.approx([v for _, v in losses])
    print(f"time-limited run: {timeouts} timeouts, {len(attempts)} allocations, {seconds:.0f} s")


def test_run_that_cannot_fit_its_time_limit_stops_and_says_so(tmp_path, slurm_data):
    """No checkpoint before the end of a run far longer than one allocation: every requeued attempt would start from
    the beginning again. After run.max_attempts_without_progress such attempts the job stops with a message naming
    the run and what to change, instead of requeueing until max_num_timeout is used up."""
    runs_dir = tmp_path / "runs"
    config = [*LONG, "trainer.epochs=1000", "trainer.checkpoint_every_samples=160000",
              "run.max_attempts_without_progress=1"]
    try:
        proc = run_sweep(runs_dir, slurm_data, "run.group=nofit", *config, *TIME_LIMIT, timeout=2 * GUARD_S)
    finally:
        cancel_leftovers(runs_dir, "nofit")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    (run_dir,) = run_dirs(runs_dir, "nofit")
    job_id = job_ids(runs_dir, "nofit")[run_dir.name]
    assert "SweepError: 1 of 1 runs did not finish" in out
    line = next(x for x in out.splitlines() if f"nofit/{run_dir.name} (job {job_id}):" in x)
    # the run's own message, from the job's log, by run name
    assert "FAILED: " in line and "recorded nothing new" in line and "hydra.launcher.timeout_min" in line, line
    assert starts_and_timeouts(runs_dir, "nofit", job_id) == (2, 1)  # one requeue, then the stop: no loop
    attempts = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["slurm_restart"] for a in attempts] == [0, 1]
    assert not (run_dir / "results.json").exists()
    assert sacct_states(job_id)[-1] == "FAILED"


# --------------------------------------------------------------------------- one process per GPU

def test_two_task_job_trains_with_ddp_like_one_process(tmp_path, slurm_data, reference_run):
    runs_dir = tmp_path / "runs"
    common = [*SHORT, "trainer.learning_rate=5e-3", "trainer.warmup_ratio=0", "lora.dropout=0"]
    started = time.time()
    try:
        proc = run_sweep(runs_dir, slurm_data, "run.group=ddp", "hydra.launcher.tasks_per_node=2", *common,
                         "trainer.grad_accum_steps=1", timeout=GUARD_S)
    finally:
        cancel_leftovers(runs_dir, "ddp")
    seconds = time.time() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = run_dirs(runs_dir, "ddp")
    job_id = job_ids(runs_dir, "ddp")[run_dir.name]
    logs = submitit_logs(runs_dir, "ddp", job_id)
    assert "rank 0 of 2" in logs and "rank 1 of 2" in logs
    two = json.loads((run_dir / "results.json").read_text())
    one = reference_run(slurm_data, tmp_path / "reference", "run.group=ddp", *common, "trainer.grad_accum_steps=2")
    assert two["world_size"] == 2 and two["final_step"] == one.final_step == 4
    losses_two, losses_one = train_losses(run_dir), train_losses(Path(one.run_dir))
    assert [s for s, _ in losses_two] == [1, 2, 3, 4]
    assert [v for _, v in losses_two] == pytest.approx([v for _, v in losses_one], rel=1e-5)
    print(f"2-task DDP job: {seconds:.0f} s")
