"""Faults lose nothing and runs are reproducible (issue 7), on the tiny backbone.

One uninterrupted reference run (module scope) on a data root whose NLI file holds bad rows serves the provenance,
skip-finished, reproducibility, W&B-sync and kill/resume comparisons.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES, compose_config, make_data_root
from sempa_exp import sync_wandb
from sempa_exp.config.schema import ConfigError, LoggerConfig
from sempa_exp.objectives.recipe import NonFiniteLossError
from sempa_exp.pipelines import training
from sempa_exp.records import identity, rundir, wandb_sync
from sempa_exp.records.metrics import RunLogger, read_metrics
from sempa_exp.records.results import Results, read_results, sweep_objective

# 64 pairs / (4 x 2) = 8 optimizer steps, a checkpoint every 2 steps
RUN_OVERRIDES = [*TINY_OVERRIDES, "data.size=64", "data.deduplicate=true"]  # the option; the default keeps them
NLI_FILE = "nli/nli_triplets_devsets_subset.csv.gz"
BAD_ROWS = [
    b"A man is playing a guitar near house 0.,,A woman is sleeping.\n",  # empty field
    b"A man is playing a guitar near house 1.,A man is playing something.\n",  # missing field
    b"Caf\xe9 au lait.,A drink.,Nothing.\n",  # not UTF-8
    b"A long one.," + b"word " * 1000 + b",Short.\n",  # absurd length
]


@pytest.fixture(scope="module")
def messy_root(tmp_path_factory) -> Path:
    """The synthetic data root, its NLI file extended with 2 duplicates and 4 broken rows (160 usable of 166)."""
    root = make_data_root(tmp_path_factory.mktemp("messy"))
    path = root / NLI_FILE
    with gzip.open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    with gzip.open(path, "wb") as f:
        f.writelines([*lines, lines[1], lines[7], *BAD_ROWS])
    return root


def run_config(root: Path, base: Path, *overrides: str):
    return compose_config([*RUN_OVERRIDES, f"paths.runs_dir={base / 'runs'}", f"paths.cache_dir={base / 'cache'}",
                           *overrides], root)


@pytest.fixture(scope="module")
def reference(messy_root, tmp_path_factory) -> Results:
    """An uninterrupted run; returns its results."""
    return training.run(run_config(messy_root, tmp_path_factory.mktemp("reference")))


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "train/loss" in r]


def eval_scores(results: Results) -> dict[int, dict[str, float]]:
    return {e["step"]: {k: v for k, v in e.items() if k.startswith("eval/") and k != "eval/seconds"}
            for e in results.evaluations}


def assert_same_scores(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert a[step].keys() == b[step].keys(), step
        for key in a[step]:
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-4), (step, key)


def file_states(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- provenance


def test_results_record_versions_commit_data_hash_and_cleaning(reference, messy_root):
    assert reference.finished and reference.final_step == 8
    for name in rundir.KEY_LIBRARIES:
        assert reference.versions[name] == metadata.version(name)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(training.__file__).parent, capture_output=True,
                          text=True).stdout.strip()
    assert reference.git_commit in (head, f"{head}-dirty")
    data = reference.details["data"]
    data_file = messy_root / NLI_FILE
    assert data["file"] == str(data_file)
    assert data["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    cleaning = data["cleaning"]
    assert "166 rows read, 160 kept" in cleaning
    for reason in ("2 duplicate", "2 empty or missing field", "1 non-UTF-8 bytes", "1 longer than 1000 characters"):
        assert reason in cleaning
    saved = json.loads((Path(reference.run_dir) / "results.json").read_text())
    assert saved["versions"] == reference.versions and saved["details"]["data"] == data


def test_too_few_rows_left_after_cleaning_is_an_error(messy_root, tmp_path, no_model_load):
    with pytest.raises(ConfigError, match="data.size=161 is larger than the 160 usable triplets"):
        training.run(run_config(messy_root, tmp_path, "data.size=161"))
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ finished runs are kept


def test_finished_run_is_reported_not_redone(reference, messy_root, no_model_load, caplog):
    run_dir = Path(reference.run_dir)
    before = file_states(run_dir)
    assert "results.json" in before and "checkpoints/checkpoint-8/trainer_state.json" in before
    with caplog.at_level(logging.INFO, logger="sempa_exp"):
        again = training.run(run_config(messy_root, run_dir.parents[2]))
    assert again == read_results(run_dir) == reference
    # what the entry point hands Hydra's sweeper: the same for the skipped run as for the run that wrote the record
    assert sweep_objective(again) == sweep_objective(reference) == reference.final["eval/sts_avg"]
    assert file_states(run_dir) == before
    assert any("already finished, skipped" in r.getMessage() for r in caplog.records)
    # the cleaning counts are logged at every start
    assert any("166 rows read, 160 kept" in r.getMessage() and "2 duplicate" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("skip_finished", ["true", "false"])
def test_changed_experiment_is_refused_in_a_finished_run_dir(reference, messy_root, no_model_load, skip_finished):
    run_dir = Path(reference.run_dir)
    before = file_states(run_dir)
    cfg = run_config(messy_root, run_dir.parents[2], "lora.r=4", f"run.skip_finished={skip_finished}")
    with pytest.raises(ConfigError, match=r"holds a training run with a different lora config; it is left untouched"):
        training.run(cfg)
    assert file_states(run_dir) == before


def test_a_run_made_before_a_config_key_existed_is_still_the_same_experiment(reference, messy_root, no_model_load,
                                                                           caplog):
    """A finished run whose config.json lacks a key added to the schema since (a new speed-up flag, say) is skipped as
    the same experiment, not refused; a saved key whose value differs is still a difference."""
    run_dir = Path(reference.run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    older = json.loads(json.dumps(saved))
    del older["objective"]["share_prompt_prefix"]
    (run_dir / "config.json").write_text(json.dumps(older))
    try:
        with caplog.at_level(logging.INFO):
            again = training.run(run_config(messy_root, run_dir.parents[2]))
        assert again.finished and any("already finished, skipped" in r.getMessage() for r in caplog.records)
        changed = json.loads(json.dumps(older))
        changed["objective"]["beta"] = 0.5
        (run_dir / "config.json").write_text(json.dumps(changed))
        with pytest.raises(ConfigError, match="a different objective config"):
            training.run(run_config(messy_root, run_dir.parents[2]))
    finally:
        (run_dir / "config.json").write_text(json.dumps(saved))


# ------------------------------------------------------------------------------------------------ reproducibility


def test_same_config_and_seed_reproduce_subset_losses_and_scores(reference, messy_root, tmp_path):
    cfg = run_config(messy_root, tmp_path)
    assert training.prepare(cfg).triplets == training.prepare(cfg).triplets
    # whatever ran before in this process must not matter
    torch.manual_seed(1234)
    torch.rand(1000)
    random.seed(99)
    np.random.seed(5)
    repeat = training.run(cfg)
    ref_rows, rep_rows = train_rows(Path(reference.run_dir)), train_rows(Path(repeat.run_dir))
    assert [r["step"] for r in rep_rows] == [r["step"] for r in ref_rows] == list(range(1, 9))
    for a, b in zip(ref_rows, rep_rows, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5, abs=1e-7)
    assert_same_scores(eval_scores(reference), eval_scores(repeat))
    assert repeat.details["data"]["sha256"] == reference.details["data"]["sha256"]


# ---------------------------------------------------------------------------------------------------------- W&B


def test_wandb_unreachable_at_start_keeps_local_metrics(tmp_path, monkeypatch, caplog):
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kw: (_ for _ in ()).throw(TimeoutError("no route to api.wandb.ai")))
    tmp_path.mkdir(exist_ok=True)
    with caplog.at_level(logging.WARNING):
        logger = RunLogger(tmp_path, LoggerConfig(mode="online"), run_id="x", group="g", name="n", config={})
    assert logger.wandb is None
    assert any("W&B could not start" in r.getMessage() for r in caplog.records)
    logger.log({"train/loss": 0.5}, step=1, samples_seen=8)
    logger.finish()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [(1, 0.5)]


def test_wandb_failing_mid_run_does_not_stop_training(tiny_cfg, fake_wandb, caplog):
    made = fake_wandb(fail_after=3)
    with caplog.at_level(logging.WARNING):
        results = training.run(tiny_cfg("logger=wandb", "logger.mode=offline"))
    assert results.finished and results.final_step == 4
    (kwargs, fake), = made
    assert kwargs["id"] == identity.wandb_run_id(Path(results.run_dir)) and kwargs["resume"] == "allow"
    assert len(fake.logged) == 3 and fake.finished == [1]  # dropped at the first failure, never called again
    assert any("W&B logging failed" in r.getMessage() for r in caplog.records)
    rows = read_metrics(Path(results.run_dir))
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert sorted(r["step"] for r in rows if "eval/stsb_dev" in r) == [0, 2, 4]


def test_a_wandb_run_answering_with_another_runs_id_is_started_again_on_a_fresh_service(tmp_path, fake_wandb,
                                                                                        caplog):
    """W&B's service once answered a run started right after another one finished in the same process with the
    earlier run's id (CI, wandb 0.31): every record went to that run. The wrong run is finished, the service
    restarted, the run started again; the records go to the right one only."""
    made = fake_wandb(wrong_ids=1)
    with caplog.at_level(logging.WARNING):
        logger = RunLogger(tmp_path, LoggerConfig(mode="offline"), run_id="e16ed0d821efef99", group="g", name="n",
                           config={})
    (_, wrong), (kwargs, right) = made
    assert kwargs["reinit"] == "create_new"  # never a run left active in this process
    assert fake_wandb.teardowns == [1] and wrong.finished == [0] and logger.wandb is right  # not marked failed
    assert any("W&B started run an0ther0run00000" in r.getMessage() and "e16ed0d821efef99" in r.getMessage()
               for r in caplog.records)
    logger.log({"train/loss": 0.5}, step=1, samples_seen=8)
    logger.finish()
    assert wrong.logged == [] and right.logged == [(1, {"samples_seen": 8, "train/loss": 0.5})]


def test_a_wandb_service_that_exits_badly_on_its_restart_does_not_end_the_run(tmp_path, fake_wandb, monkeypatch,
                                                                             caplog):
    """wandb.teardown() calls sys.exit with a failed service's status; the run goes on with the restarted W&B."""
    import wandb

    made = fake_wandb(wrong_ids=1)
    monkeypatch.setattr(wandb, "teardown", lambda: (_ for _ in ()).throw(SystemExit(1)))
    with caplog.at_level(logging.WARNING):
        logger = RunLogger(tmp_path, LoggerConfig(mode="offline"), run_id="e16ed0d821efef99", group="g", name="n",
                           config={})
    assert logger.wandb is made[1][1]
    assert any("did not shut down cleanly" in r.getMessage() for r in caplog.records)


def test_a_wandb_run_answering_with_another_runs_id_twice_leaves_wandb_out(tmp_path, fake_wandb, caplog):
    made = fake_wandb(wrong_ids=2)
    with caplog.at_level(logging.WARNING):
        logger = RunLogger(tmp_path, LoggerConfig(mode="offline"), run_id="e16ed0d821efef99", group="g", name="n",
                           config={})
    assert logger.wandb is None and len(made) == 2 and all(run.finished == [0] for _, run in made)
    assert any("W&B could not start" in r.getMessage() and "instead of e16ed0d821efef99" in r.getMessage()
               for r in caplog.records)
    logger.log({"train/loss": 0.5}, step=1, samples_seen=8)
    logger.finish()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [(1, 0.5)]
    assert all(run.logged == [] for _, run in made)


def test_a_wandb_run_left_active_in_the_process_does_not_take_the_next_runs_records(tmp_path):
    """A real offline W&B run left unfinished (a sweep job whose W&B finish failed): the next run directory's records
    still go to its own run file, not to the one left active (wandb.init's default hands that one back)."""
    import wandb

    from wandb_offline import history

    left = wandb.init(project="sempa-exp", id="leftactive0000aa", mode="offline", dir=str(tmp_path),
                      settings=wandb.Settings(console="off", silent=True))
    try:
        run_dir = tmp_path / "g" / "n"
        run_dir.mkdir(parents=True)
        run_id = identity.wandb_run_id(run_dir)
        logger = RunLogger(run_dir, LoggerConfig(mode="offline"), run_id=run_id, group="g", name="n", config={})
        for step in (1, 2, 3):
            logger.log({"train/loss": 1.0 / step}, step=step, samples_seen=8 * step)
        logger.finish()
    finally:
        left.finish()
    (own,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-*.wandb")
    assert [r["_step"] for r in history(own) if "train/loss" in r] == [1, 2, 3]
    (other,) = (tmp_path / "wandb").glob("offline-run-*-leftactive0000aa/run-*.wandb")
    assert [r for r in history(other) if "train/loss" in r] == []


def test_sync_wandb_says_in_one_line_when_wandb_answers_with_another_run_twice(copied_run, fake_wandb, capsys):
    fake_wandb(wrong_ids=2)
    with pytest.raises(SystemExit) as stopped:
        sync_wandb.main([str(copied_run), "--mode", "offline"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"instead of {identity.wandb_run_id(copied_run)}" in err and f"sync_wandb {copied_run}" in err


@pytest.fixture
def copied_run(reference, tmp_path) -> Path:
    """A copy of the reference run under the same group/name (so the same W&B id)."""
    source = Path(reference.run_dir)
    target = tmp_path / source.parent.name / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "adapter"))
    return target


def test_sync_wandb_replays_local_metrics_under_the_run_id(copied_run, fake_wandb):
    made = fake_wandb()
    run_id = wandb_sync.sync(copied_run, mode="offline")
    (kwargs, fake), = made
    assert run_id == kwargs["id"] == identity.wandb_run_id(copied_run)
    assert kwargs["resume"] == "allow" and kwargs["group"] == "default" and kwargs["name"] == "default/default"
    assert kwargs["mode"] == "offline" and kwargs["config"]["lora"]["r"] == 8
    rows = read_metrics(copied_run)
    assert fake.logged == [(r["step"], {k: v for k, v in r.items() if k not in ("step", "time")}) for r in rows]
    assert [s for s, m in fake.logged if "train/loss" in m] == list(range(1, 9))
    assert fake.summary == json.loads((copied_run / "results.json").read_text())["final"]
    assert fake.finished == [0]


def test_sync_wandb_restores_non_finite_values():
    rows = [{"step": 3, "time": 1.0, "samples_seen": 24, "train/loss": "nan", "train/grad_norm": "inf"}]
    ((step, metrics),) = wandb_sync.replay_records(rows)
    assert step == 3 and np.isnan(metrics["train/loss"]) and metrics["train/grad_norm"] == float("inf")
    assert metrics["samples_seen"] == 24 and "time" not in metrics


def test_sync_wandb_command_in_offline_mode(copied_run, capsys):
    assert sync_wandb.main([str(copied_run), "--mode", "offline"]) == 0
    run_id = identity.wandb_run_id(copied_run)
    assert f"W&B run {run_id}" in capsys.readouterr().out
    assert list((copied_run / "wandb").glob(f"offline-run-*-{run_id}")), "no offline W&B run with the run's id"


def test_sync_wandb_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="is not a run directory"):
        wandb_sync.sync(tmp_path, mode="offline")


# ----------------------------------------------------------------------------------------------------- NaN loss


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_cfg, monkeypatch):
    from trl import DPOTrainer

    compute_loss = DPOTrainer.compute_loss

    def poisoned(self, *args, **kwargs):
        out = compute_loss(self, *args, **kwargs)
        if self.state.global_step < 2:  # steps 1 and 2 are healthy; step 3 diverges
            return out
        return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")

    monkeypatch.setattr(DPOTrainer, "compute_loss", poisoned)
    cfg = tiny_cfg()
    with pytest.raises(NonFiniteLossError, match="training loss is nan at step 3; stopping") as err:
        training.run(cfg)
    run_dir = training.prepare(cfg).run_dir
    assert "The last good checkpoint is kept" in str(err.value)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (checkpoints / "checkpoint-2" / "trainer_state.json").exists()
    assert (checkpoints / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert not (run_dir / "results.json").exists()
    losses = [r["train/loss"] for r in train_rows(run_dir)]
    assert len(losses) == 2 and all(np.isfinite(losses))


# ------------------------------------------------------------------------------------------- killed and resumed


def train_command(root: Path, base: Path) -> list[str]:
    return [sys.executable, "-m", "sempa_exp.train", *RUN_OVERRIDES, f"paths.data_dir={root}",
            f"paths.runs_dir={base / 'runs'}", f"paths.cache_dir={base / 'cache'}"]


# `python -m sempa_exp.train`, SIGKILLed by itself right after step KILL_AT_STEP's training record is written: a real
# kill (no exception handler, no finally block runs), at a known point instead of whenever a poll notices a file.
KILLED_TRAIN = """
import os, signal, sys
from sempa_exp.objectives.recipe import MetricsCallback

logged = MetricsCallback.on_log

def on_log(self, args, state, control, logs=None, **kwargs):
    logged(self, args, state, control, logs=logs, **kwargs)
    if state.global_step == int(os.environ["KILL_AT_STEP"]) and logs and "loss" in logs:
        os.kill(os.getpid(), signal.SIGKILL)

MetricsCallback.on_log = on_log
from sempa_exp import train
from sempa_exp.config.registry import register_all

register_all()
train.main()
"""


def test_killed_run_resumes_from_its_last_checkpoint(reference, messy_root, tmp_path):
    command, runs = train_command(messy_root, tmp_path), tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    script = tmp_path / "killed_train.py"
    script.write_text(KILLED_TRAIN)
    # killed during step 5's optimizer step records: checkpoint-4 is complete and evaluated, step 5 logged, not saved
    first = subprocess.run([sys.executable, str(script), *command[3:]], capture_output=True, text=True,
                           env={**env, "KILL_AT_STEP": "5"}, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stdout[-3000:] + first.stderr[-3000:]
    (run_dir,) = [p for p in (runs / "default").iterdir() if p.name != ".hydra"]
    assert not (run_dir / "results.json").exists()
    assert rundir.latest_checkpoint(run_dir / "checkpoints") == run_dir / "checkpoints" / "checkpoint-4"
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4, 5]  # step 5: to be superseded on resume
    assert "166 rows read, 160 kept" in first.stdout + first.stderr  # the cleaning counts are logged at run start

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'checkpoint-4'}" in second.stdout + second.stderr
    superseded = [json.loads(line) for line in (run_dir / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in superseded] == [5]

    results = read_results(run_dir)
    assert results.finished and results.final_step == 8
    rows = train_rows(run_dir)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) == list(range(1, 9))
    eval_steps = [r["step"] for r in read_metrics(run_dir) if "eval/stsb_dev" in r]
    assert eval_steps == sorted(set(eval_steps)) == [0, 2, 4, 6, 8]
    # the same numbers as the uninterrupted run
    for a, b in zip(train_rows(Path(reference.run_dir)), rows, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5, abs=1e-7), a["step"]
    assert_same_scores(eval_scores(reference), eval_scores(results))
    assert results.samples_seen == reference.samples_seen == 64


# As under submitit, which ignores SIGTERM ("Bypassing signal SIGTERM"), then SIGTERM at step 5's training record, as
# scancel / scontrol requeue / a preemption send it.
TERMINATED_TRAIN = """
import os, signal
from sempa_exp.objectives.recipe import MetricsCallback

signal.signal(signal.SIGTERM, lambda signum, frame: print("Bypassing signal SIGTERM", flush=True))
logged = MetricsCallback.on_log

def on_log(self, args, state, control, logs=None, **kwargs):
    logged(self, args, state, control, logs=logs, **kwargs)
    if state.global_step == 5 and logs and "loss" in logs:
        os.kill(os.getpid(), signal.SIGTERM)

MetricsCallback.on_log = on_log
from sempa_exp import train
from sempa_exp.config.registry import register_all

register_all()
train.main()
"""


def test_sigterm_stops_training_at_once_and_the_run_resumes(reference, messy_root, tmp_path):
    """SIGTERM (even with submitit's ignoring handler installed first) stops the run where it is: no step after it,
    exit status 143, one line saying so; the relaunch resumes from the last checkpoint and ends as the reference."""
    command, runs = train_command(messy_root, tmp_path), tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    script = tmp_path / "terminated_train.py"
    script.write_text(TERMINATED_TRAIN)
    first = subprocess.run([sys.executable, str(script), *command[3:]], capture_output=True, text=True, env=env,
                           timeout=600)
    assert first.returncode == 143, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[sempa-exp] signal SIGTERM: training stopped" in first.stdout
    assert "Traceback" not in first.stdout + first.stderr
    (run_dir,) = [p for p in (runs / "default").iterdir() if p.name != ".hydra"]
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4, 5]  # nothing trained after the signal
    assert rundir.latest_checkpoint(run_dir / "checkpoints") == run_dir / "checkpoints" / "checkpoint-4"
    assert not (run_dir / "results.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    results = read_results(run_dir)
    assert results.finished and [r["step"] for r in train_rows(run_dir)] == list(range(1, 9))
    for a, b in zip(train_rows(Path(reference.run_dir)), train_rows(run_dir), strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5, abs=1e-7), a["step"]
        assert b["train/num_tokens"] == a["train/num_tokens"], a["step"]  # the counter continues after a resume

    # what reaches W&B the documented way (sync_wandb from metrics.jsonl; offline here, what `wandb sync` uploads):
    # every step of the stopped-and-resumed run once, in order, the resumed values, the counter continued
    from wandb_offline import history

    assert sync_wandb.main([str(run_dir), "--mode", "offline"]) == 0
    (run_file,) = (run_dir / "wandb").glob(f"offline-run-*-{identity.wandb_run_id(run_dir)}/run-*.wandb")
    rows = history(run_file)
    steps = [r["_step"] for r in rows]
    assert steps == sorted(set(steps)) and [r["_step"] for r in rows if "train/loss" in r] == list(range(1, 9))
    local = {r["step"]: r for r in train_rows(run_dir)}
    for row in (r for r in rows if "train/loss" in r):
        assert row["train/loss"] == pytest.approx(local[row["_step"]]["train/loss"])
        assert row["train/num_tokens"] == local[row["_step"]]["train/num_tokens"]


def test_a_requeued_job_that_keeps_restarting_at_the_same_point_stops_with_one_line(tiny_cfg, monkeypatch,
                                                                                     no_model_load):
    """Three earlier attempts started where this one would (no checkpoint, no record): under a requeued SLURM job
    the run stops before loading anything, naming the time limit; a manual relaunch, or run.max_attempts_without_
    progress=0, goes on."""
    cfg = tiny_cfg()
    run_dir = training.prepare(cfg).run_dir
    run_dir.mkdir(parents=True)
    stuck = json.dumps({"time": 0, "slurm_job": "7", "slurm_restart": 1, "progress": {"checkpoint": 0, "records": 0}})
    (run_dir / rundir.ATTEMPTS_FILE).write_text((stuck + "\n") * 3)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(rundir.RunStalledError, match="last 3 attempts all started from .* hydra.launcher.timeout_min"):
        training.run(cfg)
    attempts = (run_dir / rundir.ATTEMPTS_FILE).read_text().splitlines()
    assert len(attempts) == 4 and json.loads(attempts[-1])["slurm_restart"] == 3  # this attempt is on record too
    for env, override in ((None, "run.max_attempts_without_progress=3"), ("3", "run.max_attempts_without_progress=0")):
        if env is None:
            monkeypatch.delenv("SLURM_RESTART_COUNT")
        else:
            monkeypatch.setenv("SLURM_RESTART_COUNT", env)
        with pytest.raises(pytest.fail.Exception, match="a backbone was loaded"):  # past the check: it would train
            training.run(tiny_cfg(override))


def test_a_finished_runs_offline_wandb_folder_holds_every_step_once_after_a_resume(tiny_cfg, monkeypatch):
    """W&B offline, a run stopped at step 3 and resumed from checkpoint-2: two allocation folders with overlapping
    steps (3 twice); once the run finishes they are replaced by one folder rebuilt from metrics.jsonl, so that `wandb
    sync` of the run's wandb/ uploads each step once, in order."""
    from sempa_exp.objectives.recipe import MetricsCallback
    from wandb_offline import history

    class Stopped(Exception):
        pass

    logged = MetricsCallback.on_log

    def stop_at_3(self, args, state, control, logs=None, **kwargs):
        logged(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == 3 and logs and "loss" in logs:
            raise Stopped

    cfg = tiny_cfg("logger=wandb", "logger.mode=offline", "eval.at_start=[]", "eval.at_checkpoint=[stsb_dev]",
                   "eval.at_end=[stsb_dev]")
    monkeypatch.setattr(MetricsCallback, "on_log", stop_at_3)
    with pytest.raises(Stopped):
        training.run(cfg)
    run_dir = training.prepare(cfg).run_dir
    run_id = identity.wandb_run_id(run_dir)
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 1
    monkeypatch.setattr(MetricsCallback, "on_log", logged)
    results = training.run(cfg)
    assert results.finished
    (folder,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    rows = history(next(folder.glob("run-*.wandb")))
    steps = [r["_step"] for r in rows]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4]  # eval records share their step's row
    local = read_metrics(run_dir)
    for step in steps:
        expected = {k: v for r in local if r["step"] == step for k, v in r.items() if k not in ("step", "time")}
        got = next(r for r in rows if r["_step"] == step)
        assert {k: got[k] for k in expected} == pytest.approx(expected), step


def test_sigterm_raises_inside_the_block_only():
    from sempa_exp.launch.termination import StopRequested, stopping_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StopRequested), stopping_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes, right after the signal
            pass
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_run_stopped_in_its_final_evaluation_redoes_only_the_missing_suites(tiny_cfg, monkeypatch):
    """The end-of-run evaluation is resumable suite by suite (a time limit that hits it loses only the suite in
    progress), and the resumed run's final scores equal an uninterrupted run's exactly (bf16: the encoder's fixed
    batches, not what the stopped attempt had embedded)."""
    from sempa_exp.pipelines import training as training_module

    suites = ["eval.at_start=[]", "eval.at_checkpoint=[stsb_dev]", "eval.at_end=[stsb_dev,geometry,sts]",
              "backbone.dtype=bfloat16"]
    reference = training.run(tiny_cfg(*suites, "run.name=reference"))
    cfg = tiny_cfg(*suites, "run.name=stopped")
    real, calls = training_module.evaluate, []

    def stop_at_sts(encoder, data, todo, pairs=None):
        calls.append(list(todo))
        if todo == ["sts"]:
            raise KeyboardInterrupt  # what a time limit's kill looks like to this code: nothing after it runs
        return real(encoder, data, todo, pairs)

    monkeypatch.setattr(training_module, "evaluate", stop_at_sts)
    with pytest.raises(KeyboardInterrupt):
        training.run(cfg)
    assert calls == [["stsb_dev"], ["stsb_dev"], ["geometry"], ["sts"]]  # steps 2 and 4 (stsb_dev: once at step 4)
    calls.clear()
    monkeypatch.setattr(training_module, "evaluate",
                        lambda e, d, todo, pairs=None: calls.append(list(todo)) or real(e, d, todo, pairs))
    resumed = training.run(cfg)
    assert calls == [["sts"]]  # geometry and STS-B dev of step 4 were recorded before the stop
    drop = {"eval/seconds"}
    assert {k: v for k, v in resumed.final.items() if k not in drop} == {
        k: v for k, v in reference.final.items() if k not in drop}


def test_a_checkpoint_saved_but_not_yet_evaluated_is_evaluated_on_resume(tiny_cfg, monkeypatch):
    """The deterministic version of a kill that lands between saving a checkpoint and evaluating it."""
    from sempa_exp.objectives.recipe import CheckpointEvalCallback

    class Killed(Exception):
        pass

    def die(self, args, state, control, **kwargs):
        raise Killed

    evaluate_on_save = CheckpointEvalCallback.on_save
    monkeypatch.setattr(CheckpointEvalCallback, "on_save", die)
    cfg = tiny_cfg()
    with pytest.raises(Killed):
        training.run(cfg)
    run_dir = training.prepare(cfg).run_dir
    assert (run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()
    assert [r["step"] for r in read_metrics(run_dir) if "eval/stsb_dev" in r] == [0]

    monkeypatch.setattr(CheckpointEvalCallback, "on_save", evaluate_on_save)
    results = training.run(cfg)
    assert [e["step"] for e in results.evaluations] == [0, 2, 4]
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4]


def test_latest_checkpoint_skips_unfinished_ones(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step, state in [(2, '{"global_step": 2}'), (4, '{"global_step": 4}'), (6, '{"global_st'), (8, None)]:
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        if state is not None:
            (checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    # 8: killed before trainer_state.json, 6: killed while writing it
    assert rundir.latest_checkpoint(checkpoints) == checkpoints / "checkpoint-4"
    assert rundir.latest_checkpoint(tmp_path / "absent") is None


def test_a_saved_key_the_schema_dropped_is_the_same_experiment_only_at_its_retired_value():
    """eval.adapter_precision left the schema: an evaluation saved with its default (float32, today's computation) is
    the same experiment, one saved with ``weights`` is not; a dropped key nobody retired is a difference."""
    from sempa_exp.records.identity import _differs

    today = {"batch_size": 32, "merge_adapter": False}
    assert not _differs({**today, "adapter_precision": "float32"}, today, "eval.")
    assert _differs({**today, "adapter_precision": "weights"}, today, "eval.")
    assert _differs({**today, "unheard_of": 1}, today, "eval.")
    assert not _differs({"eval": {**today, "adapter_precision": "float32"}}, {"eval": today})
