"""Damaged state and bad input (issue 14): a one-line error that names the problem, never a mixed, escaped or blocked
run. On the tiny backbone and synthetic data roots.

The command-line cases go through a fork server: one process imports the framework's dependencies once, then runs
each ``python -m sempa_exp.train|evaluate ...`` in a forked child (``runpy``, as ``-m`` does), with its own
environment, argv and stdout/stderr files. One case also runs as a plain ``python -m`` subprocess, to show the two
agree.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException

import sempa_exp
from conftest import TINY_OVERRIDES, compose_config, make_data_root, tiny_trainer, write_nli
from sempa_exp.config.schema import ConfigError, data_dir
from sempa_exp.data import nli
from sempa_exp.pipelines import training
from sempa_exp.records import rundir
from sempa_exp.records.metrics import read_metrics
from sempa_exp.records.results import read_results

REPO = Path(sempa_exp.__file__).resolve().parents[2]  # the tree under test (a worktree of an older commit too)
NLI_FILE = "nli/nli_triplets_devsets_subset.csv.gz"
ERROR_PREFIX = "[sempa-exp] error:"
CLI_TIMEOUT = 600  # a safety net against a hung child, never an expectation


# ---------------------------------------------------------------------------------------------------------- helpers


def file_states(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_config(root: Path, runs: Path, *overrides: str):
    return compose_config([*TINY_OVERRIDES, f"paths.runs_dir={runs}", f"paths.cache_dir={runs.parent / 'cache'}",
                           *overrides], root)


def copy_root(root: Path, dst: Path) -> Path:
    shutil.copytree(root, dst)
    return dst


def with_other_nli(root: Path, dst: Path, seed: int = 7) -> Path:
    """A copy of ``root`` whose NLI file holds other triplets (its STS files are the same)."""
    copy_root(root, dst)
    (dst / NLI_FILE).unlink()
    write_nli(dst / NLI_FILE, random.Random(seed), 160)
    return dst


def unfinished_copy(run_dir: Path, runs: Path) -> Path:
    """A copy of a finished run directory as a run killed after its last checkpoint: no results.json, no adapter."""
    copy = runs / run_dir.parent.name / run_dir.name
    shutil.copytree(run_dir, copy)
    (copy / "results.json").unlink()
    shutil.rmtree(copy / "adapter")
    return copy


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


# ----------------------------------------------------------------------------------------- command line (forked)


FORK_SERVER = r"""
import json, os, runpy, sys, traceback
# the answers go on a copy of stdout; fd 1 is stderr until a child redirects it: a library that prints on import
# (transformers does under WANDB_MODE=offline) cannot garble them
answers = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
# the heavy imports, once; not the entry modules themselves (runpy executes those fresh, as `python -m` does)
import hydra, torch, transformers, trl, peft
import sempa_exp.pipelines.training, sempa_exp.pipelines.evaluation, sempa_exp.config.registry
for line in sys.stdin:
    case = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.clear()
            os.environ.update(case["env"])
            os.chdir(case["cwd"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.argv = [case["module"], *case["argv"]]
            runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), file=answers, flush=True)
"""


class Cli:
    """The fork server: ``cli(module, argv, env=...)`` -> (returncode, stdout, stderr)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})

    def __call__(self, module: str, argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
        self.count += 1
        out, err = self.workdir / f"{self.count}.out", self.workdir / f"{self.count}.err"
        environ = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1", **(env or {})}
        case = {"module": module, "argv": argv, "env": environ, "cwd": str(REPO), "stdout": str(out),
                "stderr": str(err)}
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(CLI_TIMEOUT):
                pytest.fail(f"{module} {argv}: no answer from the fork server")
        line = self.proc.stdout.readline()
        assert line, f"the fork server died (rc {self.proc.poll()})"
        return json.loads(line)["rc"], out.read_text(), err.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=CLI_TIMEOUT)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    server = Cli(tmp_path_factory.mktemp("cli"))
    yield server
    server.close()


def assert_one_line_error(rc: int, stdout: str, stderr: str, *fragments: str) -> str:
    """Exit status 2, no traceback, stderr is exactly one line: '[sempa-exp] error: ...' holding every fragment."""
    shown = f"rc={rc}\n--- stderr\n{stderr[-3000:]}\n--- stdout\n{stdout[-2000:]}"
    assert "Traceback" not in stderr + stdout, shown
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), shown
    for fragment in fragments:
        assert fragment in lines[0], shown
    assert rc == 2, shown
    return lines[0]


def train_argv(root: Path, runs: Path, *overrides: str) -> list[str]:
    return [*TINY_OVERRIDES, f"paths.data_dir={root}", f"paths.runs_dir={runs}",
            f"paths.cache_dir={runs.parent / 'cache'}", *overrides]


@pytest.fixture
def malformed_sts_root(tmp_path, data_root) -> tuple[Path, Path]:
    """A data root whose STS-B dev file has a line with two fields (line 3)."""
    root = copy_root(data_root, tmp_path / "malformed")
    path = root / "sts" / "STSBenchmark" / "dev.tsv"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = "A man is playing a guitar.\t3.2\n"
    path.write_text("".join(lines))
    return root, path


# ---------------------------------------------------------------------------------- 1. user errors: one line, rc 2


def test_bad_config_on_the_command_line_is_one_line_exit_2(data_root, tmp_path):
    """The real `python -m sempa_exp.train` (the fork server's cases below run the same code path)."""
    runs = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "sempa_exp.train", *train_argv(data_root, runs, "data.size=0")],
                          capture_output=True, text=True, cwd=REPO, timeout=CLI_TIMEOUT,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "data.size must be > 0, got 0")


def test_bad_config_through_the_fork_server_is_the_same(cli, data_root, tmp_path):
    rc, out, err = cli("sempa_exp.train", train_argv(data_root, tmp_path / "runs", "data.size=0"))
    assert_one_line_error(rc, out, err, "data.size must be > 0, got 0")


@pytest.mark.parametrize(("override", "fragment"), [
    ("+trainer.callbacks.stop=3", "trainer.callbacks.stop must be a mapping with a '_target_'"),
    ("+trainer.callbacks.stop._target_=no_such_module.Stop", "trainer.callbacks.stop: cannot build"),
    ("+trainer.callbacks.stop._target_=collections.OrderedDict", "is not a transformers.TrainerCallback")])
def test_bad_trainer_callback_is_one_line_before_a_model_loads(data_root, tmp_path, no_model_load, override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        training.run(compose_config(train_argv(data_root, tmp_path / "runs", override)))
    assert not list((tmp_path / "runs").rglob("checkpoint-*"))


def test_malformed_sts_file_is_one_line_naming_file_and_line(cli, malformed_sts_root, tmp_path):
    root, path = malformed_sts_root
    rc, out, err = cli("sempa_exp.train", train_argv(root, tmp_path / "runs"))
    assert_one_line_error(rc, out, err, f"{path}:3:", "expected 3 tab-separated fields, got 2")
    # the evaluation entry point too
    rc, out, err = cli("sempa_exp.evaluate", ["backbone=tiny", "method=prompteol", "logger=none",
                                             f"paths.data_dir={root}", f"paths.runs_dir={tmp_path / 'runs'}"])
    assert_one_line_error(rc, out, err, f"{path}:3:", "expected 3 tab-separated fields, got 2")


@pytest.mark.parametrize(("file", "content", "fragment"), [
    ("results.json", '{"kind": "training", "gro', "is damaged"),
    ("results.json", '[{"kind": "training"}]', "not a results record (a JSON object was expected)"),
    ("config.json", '{"backbone": {"name": "ti', "is damaged"),
])
def test_damaged_run_record_is_one_line_naming_the_file(cli, data_root, tmp_path, file, content, fragment):
    runs = tmp_path / "runs"
    run_dir = runs / "default" / "damaged"
    run_dir.mkdir(parents=True)
    (run_dir / file).write_text(content)
    before = file_states(run_dir)
    rc, out, err = cli("sempa_exp.train", train_argv(data_root, runs, "run.name=damaged"))
    assert_one_line_error(rc, out, err, str(run_dir / file), fragment)
    assert file_states(run_dir) == before


def test_hydra_full_error_shows_the_traceback(cli, data_root, tmp_path):
    rc, out, err = cli("sempa_exp.train", train_argv(data_root, tmp_path / "runs", "data.size=0"),
                       env={"HYDRA_FULL_ERROR": "1"})
    assert rc != 0
    assert "Traceback (most recent call last)" in err and "data.size must be > 0, got 0" in err, err[-3000:]


# ------------------------------------------------------------------------------- 2. run identity includes the data


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run (4 steps, checkpoints 2 and 4) on its own data root: (results, data root)."""
    base = tmp_path_factory.mktemp("finished")
    root = make_data_root(base / "data")
    results = training.run(run_config(root, base / "runs", "run.name=ref"))
    assert results.finished and results.final_step == 4
    return results, root


def test_unfinished_run_relaunched_on_other_training_data_is_refused(finished, tmp_path, no_model_load):
    results, root = finished
    run_dir = unfinished_copy(Path(results.run_dir), tmp_path / "runs")
    assert (run_dir / "checkpoints" / "checkpoint-4").is_dir() and not (run_dir / "results.json").exists()
    other = with_other_nli(root, tmp_path / "other")
    before = file_states(run_dir)
    with pytest.raises(ConfigError) as err:
        training.run(run_config(other, tmp_path / "runs", "run.name=ref"))
    message = str(err.value)
    assert str(run_dir) in message and "train_data" in message and "eval_data" not in message, message
    assert file_states(run_dir) == before


def test_finished_run_relaunched_on_other_data_is_refused_not_skipped(finished, tmp_path, no_model_load, capsys):
    results, _ = finished
    run_dir = Path(results.run_dir)
    other = make_data_root(tmp_path / "other", seed=3)
    before = file_states(run_dir)
    with pytest.raises(ConfigError, match=r"holds a run computed on other data \(eval_data, train_data differ"):
        training.run(run_config(other, run_dir.parents[1], "run.name=ref"))
    assert "already finished, skipped" not in capsys.readouterr().out
    assert file_states(run_dir) == before


def test_finished_run_relaunched_on_the_same_data_elsewhere_is_skipped(finished, tmp_path, no_model_load, capsys):
    results, root = finished
    run_dir = Path(results.run_dir)
    moved = copy_root(root, tmp_path / "moved")
    before = file_states(run_dir)
    again = training.run(run_config(moved, run_dir.parents[1], "run.name=ref"))
    assert again == read_results(run_dir)
    assert f"already finished, skipped: {run_dir}" in capsys.readouterr().out
    assert file_states(run_dir) == before


# --------------------------------------------------------------------- 3. run directories stay inside the runs root


@pytest.mark.parametrize(("override", "key"), [("run.name=..", "run.name"), ("run.group=../x", "run.group"),
                                               ("run.group=ABS", "run.group")])
def test_run_dir_outside_the_runs_root_is_refused_in_process(data_root, tmp_path, no_model_load, override, key):
    base = tmp_path / "base"
    base.mkdir()
    override = override.replace("ABS", str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError) as err:
        training.run(run_config(data_root, base / "runs", override))
    assert str(err.value).startswith(f"{key}=") and "must name one folder inside paths.runs_dir" in str(err.value)
    assert [p.name for p in base.iterdir()] == []  # not even the runs root
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize(("override", "key"), [("run.name=..", "run.name"), ("run.group=../x", "run.group"),
                                               ("run.group=ABS", "run.group")])
def test_run_dir_outside_the_runs_root_is_refused_on_the_command_line(cli, data_root, tmp_path, override, key):
    base = tmp_path / "base"
    base.mkdir()
    override = override.replace("ABS", str(tmp_path / "elsewhere"))
    rc, out, err = cli("sempa_exp.train", train_argv(data_root, base / "runs", override))
    assert_one_line_error(rc, out, err, f"{key}=", "must name one folder inside paths.runs_dir")
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    outside = [p for p in written if not p.startswith("base/runs/")]
    assert outside == [], f"written outside paths.runs_dir: {outside}"
    assert not (tmp_path / "elsewhere").exists()


# ---------------------------------------------------------------------------------------------- 4. damaged state


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "truncated adapter": ("adapter_model.safetensors", truncate),
    "garbage optimizer": ("optimizer.pt", lambda p: p.write_bytes(b"not a torch file" * 64)),
}


def test_intact_checkpoints_are_resumed_from_and_none_is_set_aside(finished, tmp_path):
    results, _ = finished
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(Path(results.run_dir) / "checkpoints", checkpoints)
    assert rundir.latest_checkpoint(checkpoints) == checkpoints / "checkpoint-4"
    assert sorted(p.name for p in checkpoints.glob("*checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_checkpoint_is_set_aside(finished, tmp_path, caplog, damage):
    results, _ = finished
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(Path(results.run_dir) / "checkpoints", checkpoints)
    name, spoil = DAMAGES[damage]
    spoil(checkpoints / "checkpoint-4" / name)
    damaged = (checkpoints / "checkpoint-4" / name).read_bytes()
    with caplog.at_level(logging.WARNING):
        assert rundir.latest_checkpoint(checkpoints) == checkpoints / "checkpoint-2"
    assert not (checkpoints / "checkpoint-4").exists()
    assert (checkpoints / "damaged-checkpoint-4" / name).read_bytes() == damaged  # kept as it was
    assert any(str(checkpoints / "checkpoint-4") in m and name in m and "damaged-checkpoint-4" in m
               for m in messages(caplog)), messages(caplog)


def test_run_with_a_damaged_latest_checkpoint_resumes_from_the_previous_one(finished, tmp_path, caplog):
    results, root = finished
    run_dir = unfinished_copy(Path(results.run_dir), tmp_path / "runs")
    truncate(run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    with caplog.at_level(logging.INFO):
        resumed = training.run(run_config(root, tmp_path / "runs", "run.name=ref"))
    assert any(f"resuming from {run_dir / 'checkpoints' / 'checkpoint-2'}" in m for m in messages(caplog))
    assert any(str(run_dir / "checkpoints" / "checkpoint-4") in m and "adapter_model.safetensors" in m
               for m in messages(caplog)), messages(caplog)
    assert resumed.finished and resumed.final_step == 4
    assert [e["step"] for e in resumed.evaluations] == [0, 2, 4]
    assert (run_dir / "checkpoints" / "damaged-checkpoint-4" / "adapter_model.safetensors").exists()
    assert (run_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()  # written again


def dpo_trainer(tiny_cfg, tmp_path: Path):
    composed = tiny_cfg("data.size=4", "objective.cache_prepared_data=true", "objective.precompute_ref_logps=true")
    from omegaconf import OmegaConf

    config = OmegaConf.to_object(composed)
    triplets, _ = nli.load_triplets(config.data, data_dir(config))
    return tiny_trainer(composed, nli.subset(triplets, 4, config.data.subset_seed), tmp_path / "out")


def ref_logps(trainer) -> np.ndarray:
    return np.asarray([trainer.train_dataset["ref_chosen_logps"], trainer.train_dataset["ref_rejected_logps"]])


def test_damaged_dpo_caches_are_recomputed_with_a_warning(tiny_cfg, tmp_path, caplog):
    first = dpo_trainer(tiny_cfg, tmp_path)
    cache = first.data_cache
    assert cache.ref_file.exists() and (cache.tokenized_dir / "row_hashes.npy").exists()
    expected_ref, expected_ids = ref_logps(first), first.train_dataset["chosen_ids"]

    truncate(cache.ref_file)
    with caplog.at_level(logging.WARNING):
        second = dpo_trainer(tiny_cfg, tmp_path)
    assert any(str(cache.ref_file) in m and "damaged" in m for m in messages(caplog)), messages(caplog)
    assert second.data_cache.last_event["ref_logps"] == "built"
    np.testing.assert_allclose(ref_logps(second), expected_ref, rtol=1e-5, atol=1e-6)

    caplog.clear()
    (cache.tokenized_dir / "row_hashes.npy").write_bytes(b"garbage, not a numpy file")
    with caplog.at_level(logging.WARNING):
        third = dpo_trainer(tiny_cfg, tmp_path)
    assert any(str(cache.tokenized_dir) in m and "damaged" in m for m in messages(caplog)), messages(caplog)
    assert third.data_cache.last_event["tokenized"] == "built"
    assert third.train_dataset["chosen_ids"] == expected_ids


@pytest.mark.parametrize(("line", "what"), [(b"[1, 2, 3]", "a JSON list"), (b"\"step\"", "a JSON string"),
                                            (b'{"step": 3, "eval/x": "caf\xe9"}', "not UTF-8"),
                                            (b'{"step": "three", "eval/x": 1.0}', "a step that is not a number")])
def test_metrics_line_that_is_not_a_record_is_skipped_naming_file_and_line(tmp_path, caplog, line, what):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 0, "samples_seen": 0, "eval/stsb_dev": 50.0}\n' + line + b"\n"
                     + b'{"step": 2, "samples_seen": 16, "eval/stsb_dev": 51.0}\n')
    with caplog.at_level(logging.WARNING):
        rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 2], what
    assert any(str(path) in m and "line 2" in m for m in messages(caplog)), messages(caplog)


def test_config_of_a_failed_attempt_does_not_block_the_corrected_relaunch(tiny_cfg, tmp_path):
    """The first attempt (a bad lora.target_modules, found once the model is loaded) leaves only its config."""
    with pytest.raises(ConfigError) as err:
        training.run(tiny_cfg("lora.target_modules=nope", "run.name=attempt"))
    assert "lora.target_modules='nope'" in str(err.value)
    run_dir = tmp_path / "runs" / "default" / "attempt"
    assert (run_dir / "config.json").exists() and not (run_dir / "metrics.jsonl").exists()
    results = training.run(tiny_cfg("run.name=attempt"))
    assert results.finished and Path(results.run_dir) == run_dir
    assert json.loads((run_dir / "config.json").read_text())["lora"]["target_modules"] != "nope"


def test_metrics_file_deleted_mid_run_loses_no_evaluation(tiny_cfg, monkeypatch):
    evaluate_step = training.TrainingRun.evaluate_step

    def deleting(self, step, suites, **kwargs):
        metrics = evaluate_step(self, step, suites, **kwargs)
        if step == 2:  # a checkpoint's evaluation, between two others
            (self.prep.run_dir / "metrics.jsonl").unlink()
        return metrics

    monkeypatch.setattr(training.TrainingRun, "evaluate_step", deleting)
    results = training.run(tiny_cfg("run.name=deleted"))
    assert [e["step"] for e in results.evaluations] == [0, 2, 4]
    assert all("eval/stsb_dev" in e for e in results.evaluations)
    assert read_results(results.run_dir).evaluations == results.evaluations


# ------------------------------------------------------------------------------------------ 5. silent acceptance


def test_unknown_added_key_is_refused_with_the_closest_one(tiny_cfg, tmp_path, no_model_load):
    with pytest.raises(ConfigError) as err:
        training.run(tiny_cfg("+trainer.lerning_rate=0.5"))
    assert "trainer.lerning_rate is not a config key" in str(err.value)
    assert "did you mean trainer.learning_rate?" in str(err.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("override", "key"), [
    ("objective.loss_type=bogus", "objective.loss_type"),
    ("trainer.adam_beta1=1.5", "trainer.adam_beta1"),
    ("trainer.lr_scheduler=nope", "trainer.lr_scheduler"),
    ("trainer.weight_decay=-1", "trainer.weight_decay"),
])
def test_out_of_range_recipe_value_is_refused_before_training(tiny_cfg, tmp_path, no_model_load, override, key):
    with pytest.raises((ConfigError, ConfigCompositionException)) as err:
        training.run(tiny_cfg(override))
    message = f"{err.value} {err.value.__cause__ or ''}"
    assert key in message, message
    assert not (tmp_path / "runs").exists()


def test_second_launch_is_refused_while_the_first_holds_the_run_dir(tiny_cfg, tmp_path, no_model_load):
    cfg = tiny_cfg("run.name=locked")
    run_dir = tmp_path / "runs" / "default" / "locked"
    with rundir.exclusive(run_dir):
        with pytest.raises(ConfigError) as err:
            training.run(cfg)
        assert str(run_dir) in str(err.value) and f"pid {os.getpid()}" in str(err.value)
    with rundir.exclusive(run_dir):  # released when its holder is done
        pass


# `python -m sempa_exp.train`, stopped for good right after step 1's training record: it holds its run directory
# until it is killed. It writes PAUSED_FILE once it is there.
PAUSED_TRAIN = """
import os, runpy, signal, sys
from pathlib import Path
from sempa_exp.objectives.recipe import MetricsCallback

logged = MetricsCallback.on_log

def on_log(self, args, state, control, logs=None, **kwargs):
    logged(self, args, state, control, logs=logs, **kwargs)
    if state.global_step == 1 and logs and "loss" in logs:
        Path(os.environ["PAUSED_FILE"]).write_text(str(os.getpid()))
        while True:
            signal.pause()

MetricsCallback.on_log = on_log
sys.argv = ["sempa_exp.train", *sys.argv[1:]]
runpy.run_module("sempa_exp.train", run_name="__main__", alter_sys=True)
"""


def test_identical_launch_is_refused_while_the_first_runs_and_accepted_once_it_is_killed(
        data_root, tmp_path, no_model_load):
    runs, paused = tmp_path / "runs", tmp_path / "paused"
    script = tmp_path / "paused_train.py"
    script.write_text(PAUSED_TRAIN)
    argv = train_argv(data_root, runs, "run.name=twice")
    log_file = tmp_path / "first.log"
    with log_file.open("w") as log:  # a file, not a pipe: a full pipe would stop the first launch before its pause
        first = subprocess.Popen([sys.executable, str(script), *argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PAUSED_FILE": str(paused)})
    try:
        deadline = time.monotonic() + CLI_TIMEOUT  # a safety net, never an expectation
        while not paused.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert paused.exists(), f"the first launch ended (rc {first.poll()}): {log_file.read_text()[-3000:]}"
        run_dir = runs / "default" / "twice"
        before = file_states(run_dir)
        with pytest.raises(ConfigError) as err:
            training.run(run_config(data_root, runs, "run.name=twice"))
        assert str(run_dir) in str(err.value) and f"pid {first.pid}" in str(err.value), str(err.value)
        assert file_states(run_dir) == before
    finally:
        first.kill()  # SIGKILL: no handler or finally block of the holder runs
        first.wait(timeout=CLI_TIMEOUT)
    assert first.returncode == -signal.SIGKILL
    with rundir.exclusive(run_dir):  # the kernel released the killed holder's lock
        pass


def constant_dev_root(base: Path) -> Path:
    """A data root whose STS-B dev gold scores are all equal: its Spearman is NaN at every step."""
    root = make_data_root(base)
    path = root / "sts" / "STSBenchmark" / "dev.tsv"
    header, *rows = path.read_text().splitlines()
    path.write_text("\n".join([header, *("\t".join([*r.split("\t")[:2], "2.5"]) for r in rows)]) + "\n")
    return root


def test_constant_gold_scores_give_nan_which_is_recorded_printed_and_never_best(tmp_path, monkeypatch, capsys):
    """NaN from a fresh evaluation (a float) and from an earlier attempt's metrics.jsonl (stored as "nan"), through a
    resume: the run finishes, results.json records NaN, the summary prints it, best_by_stsb_dev is none of them."""
    from sempa_exp.objectives.recipe import CheckpointEvalCallback

    class Killed(Exception):
        pass

    def die(self, args, state, control, **kwargs):
        raise Killed

    root = constant_dev_root(tmp_path / "data")
    cfg = run_config(root, tmp_path / "runs", "run.name=nan")
    evaluate_on_save = CheckpointEvalCallback.on_save
    monkeypatch.setattr(CheckpointEvalCallback, "on_save", die)
    with pytest.raises(Killed):
        training.run(cfg)
    monkeypatch.setattr(CheckpointEvalCallback, "on_save", evaluate_on_save)
    capsys.readouterr()
    results = training.run(cfg)
    printed = capsys.readouterr().out
    assert results.finished and [e["step"] for e in results.evaluations] == [0, 2, 4]
    saved = json.loads((Path(results.run_dir) / "results.json").read_text())
    for evaluation in saved["evaluations"]:
        assert math.isnan(float(evaluation["eval/stsb_dev"])), evaluation
    assert math.isfinite(saved["start"]["eval/sts_avg"]) and math.isfinite(saved["final"]["eval/sts_avg"])
    assert saved["best_by_stsb_dev"] is None and results.best_by_stsb_dev is None
    (row,) = [line for line in printed.splitlines() if "stsb_dev" in line]
    assert row.lower().count("nan") >= 2, printed


def test_best_by_stsb_dev_skips_nan(tmp_path):
    from sempa_exp.records.results import best_by

    evaluations = [{"step": 0, "eval/stsb_dev": float("nan")}, {"step": 2, "eval/stsb_dev": 40.0},
                   {"step": 4, "eval/stsb_dev": "nan"}, {"step": 6, "eval/stsb_dev": 30.0}]
    assert best_by(evaluations, "eval/stsb_dev")["step"] == 2

