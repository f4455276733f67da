"""eval.at_best: the 7 STS tasks (or any suites) scored once, at the end, on the trained checkpoint with the highest
STS-B dev; and the pair similarities every sts evaluation leaves for a paired bootstrap (sts_pairs/step-N.npz)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from rich.console import Console

from sempa_exp.config.location import CONF_DIR
from sempa_exp.config.registry import register_all
from sempa_exp.config.schema import ConfigError
from sempa_exp.data.sts import spearman100
from sempa_exp.evaluation.suites import STS_PAIRS_DIR, load_pairs
from sempa_exp.pipelines import evaluation as evaluate
from sempa_exp.pipelines import training
from sempa_exp.records.metrics import read_metrics
from sempa_exp.records.summary import training_table

AT_BEST = ["eval.at_start=[stsb_dev]", "eval.at_end=[stsb_dev]", "eval.at_best=[sts]", "eval.dtype=float32"]
STS_KEYS = ["eval/sts12", "eval/sts13", "eval/sts14", "eval/sts15", "eval/sts16", "eval/stsb", "eval/sickr",
            "eval/sts_avg"]


def checkpoint_scores(data_root: Path, runs_dir: Path, folder: Path) -> dict:
    """What `python -m sempa_exp.evaluate method=checkpoint method.path=FOLDER` reports for the checkpoint."""
    register_all()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            "backbone=tiny", "eval.dtype=float32", "eval.at_end=[sts]", "eval.pca_fraction=0", "logger=none",
            f"paths.runs_dir={runs_dir}", f"paths.data_dir={data_root}", "method=checkpoint",
            f"method.path={folder}", f"run.name={folder.name}"])
    return evaluate.run(cfg).final


def shift_the_final_steps_dev_score(monkeypatch, delta: float) -> None:
    """STS-B dev of the last step's model (the third encoder: steps 0, 2, 4) moved by ``delta``: below every other
    step, the best trained checkpoint is an earlier one, which the run loads from its folder; above, the final one."""
    real, encoders = training.evaluate, []

    def evaluate_(encoder, data, suites, pairs=None):
        metrics = real(encoder, data, suites, pairs)
        if not any(e is encoder for e in encoders):
            encoders.append(encoder)
        if "eval/stsb_dev" in metrics and encoders.index(encoder) == 2:
            metrics["eval/stsb_dev"] += delta
        return metrics

    monkeypatch.setattr(training, "evaluate", evaluate_)


def test_the_best_earlier_checkpoint_is_loaded_and_scored_as_the_evaluate_entry_scores_it(tiny_cfg, data_root,
                                                                                        tmp_path, monkeypatch):
    shift_the_final_steps_dev_score(monkeypatch, -100.0)
    results = training.run(tiny_cfg(*AT_BEST))
    run_dir = Path(results.run_dir)
    trained = [e for e in results.evaluations if e["step"] > 0]
    assert [e["step"] for e in trained] == [2, 4]
    best = results.best_checkpoint
    assert best["step"] == 2 and best["eval/stsb_dev"] == trained[0]["eval/stsb_dev"]
    assert "eval/sts_avg" not in results.final  # the test sets were read once, on the chosen checkpoint
    reference = checkpoint_scores(data_root, tmp_path / "eval_runs", run_dir / "checkpoints" / "checkpoint-2")
    assert {k: best[k] for k in STS_KEYS} == {k: reference[k] for k in STS_KEYS}
    assert results.final["best/step"] == 2 and results.final["best/sts_avg"] == best["eval/sts_avg"]
    logged = [r for r in read_metrics(run_dir) if "best/sts_avg" in r]
    assert len(logged) == 1 and logged[0]["step"] == results.final_step
    # the pair similarities reproduce every task's score: what a bootstrap over the STS pairs resamples
    pairs = load_pairs(run_dir / STS_PAIRS_DIR / "step-2.npz")
    assert len(pairs) == 7
    for task, (pred, gold) in pairs.items():
        assert len(pred) == len(gold) and spearman100(pred, gold) == pytest.approx(best[f"eval/{task}"], abs=1e-4)
    assert sorted(p.name for p in (run_dir / STS_PAIRS_DIR).iterdir()) == ["step-2.npz"]
    console = Console(width=200, record=True)
    console.print(training_table(results))
    text = console.export_text()
    assert "best by STS-B dev: step 2" in text and "delta (best - step 0)" in text
    sts_avg = next(line for line in text.splitlines() if "sts_avg" in line)
    assert f"{best['eval/sts_avg']:.2f}" in sts_avg


def test_when_the_final_model_is_best_it_is_scored_in_memory_and_a_resume_does_not_score_it_again(
        tiny_cfg, monkeypatch):
    shift_the_final_steps_dev_score(monkeypatch, +100.0)
    cfg = tiny_cfg(*AT_BEST)
    stopped = []
    real = training.TrainingRun.evaluate_best

    def stop_after(self, final_step):
        out = real(self, final_step)
        if not stopped:
            stopped.append(out)
            raise KeyboardInterrupt  # killed after the best suites were logged, before results.json
        return out

    monkeypatch.setattr(training.TrainingRun, "evaluate_best", stop_after)
    with pytest.raises(KeyboardInterrupt):
        training.run(cfg)
    calls = []
    monkeypatch.setattr(training, "evaluate", lambda e, d, s, p=None: calls.append(list(s)) or {})
    resumed = training.run(cfg)
    assert calls == []  # nothing evaluated again: the suites of the final step and of the best are on record
    assert resumed.best_checkpoint == stopped[0] and resumed.best_checkpoint["step"] == resumed.final_step == 4
    assert resumed.final["eval/sts_avg"] == resumed.best_checkpoint["eval/sts_avg"]  # scored once, in memory
    run_dir = Path(resumed.run_dir)
    assert len([r for r in read_metrics(run_dir) if "best/sts_avg" in r]) == 1


def test_at_best_needs_dev_scores_at_checkpoints_and_every_checkpoint_kept(tiny_cfg, no_model_load):
    with pytest.raises(ConfigError, match="eval.at_checkpoint"):
        training.prepare(tiny_cfg("eval.at_best=[sts]", "eval.at_checkpoint=[geometry]"))
    with pytest.raises(ConfigError, match="trainer.save_total_limit"):
        training.prepare(tiny_cfg("eval.at_best=[sts]", "trainer.save_total_limit=1"))


def test_the_evaluate_entry_leaves_its_pair_similarities(data_root, tmp_path):
    register_all()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            "backbone=tiny", "eval.dtype=float32", "eval.at_end=[sts]", "eval.pca_fraction=0", "logger=none",
            f"paths.runs_dir={tmp_path}", f"paths.data_dir={data_root}", "method=prompteol"])
    results = evaluate.run(cfg)
    pairs = load_pairs(Path(results.run_dir) / STS_PAIRS_DIR / "step-0.npz")
    scores = [spearman100(pred, gold) for pred, gold in pairs.values()]
    assert np.mean(scores) == pytest.approx(results.final["eval/sts_avg"], abs=1e-4)
