"""AutoRegEmbed (objective=autoregembed_compress, then autoregembed_align): both losses equal the authors' computation
re-implemented in bench/autoregembed_reference.py on one fixed batch (tiny backbone, fp32); both stages train end to
end, stage 2 from stage 1's run; the read-out embeds with the trained <EMBED*> tokens, also from a checkpoint."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import TINY_OVERRIDES
from sempa_exp.config.location import CONF_DIR
from sempa_exp.config.registry import register_all
from sempa_exp.config.schema import ConfigError, validate
from sempa_exp.pipelines import training

REPO = Path(__file__).resolve().parents[1]
STAGE1 = ["objective=autoregembed_compress", "objective.compression_data=nli_reconstruct"]


def reference_module():
    spec = importlib.util.spec_from_file_location("autoregembed_reference", REPO / "bench" /
                                                  "autoregembed_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_losses_are_the_authors_computation_on_a_fixed_batch(data_root, tmp_path):
    out = reference_module().compare("tiny", 6, data_root, tmp_path / "cache")
    assert out["stage1"]["project"] > 1  # a real loss, not a degenerate one
    assert out["stage1"]["abs_diff"] < 1e-4 and out["stage2"]["abs_diff"] < 1e-4, out
    assert out["stage2"]["logps_max_abs_diff"] < 1e-3 * out["stage2"]["logps_max_abs_value"], out


def test_stage1_without_pwc_names_the_file_and_the_alternative(tiny_cfg):
    cfg = OmegaConf.to_object(tiny_cfg("objective=autoregembed_compress"))
    from sempa_exp.objectives.autoregembed import compression_records

    with pytest.raises(ConfigError, match="pwc_train_unique.jsonl.*nli_reconstruct"):
        compression_records(cfg, [])


def test_autoregembed_config_is_checked_before_any_model_loads(tiny_cfg, no_model_load):
    with pytest.raises(ConfigError, match="objective.init_from"):
        validate(OmegaConf.to_object(tiny_cfg("objective=autoregembed_align")))
    with pytest.raises(ConfigError, match="embed=autoregembed"):
        validate(OmegaConf.to_object(tiny_cfg(*STAGE1, "embed=prompteol")))


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full_finetune"])
def test_both_stages_train_and_the_trained_tokens_embed_from_the_checkpoint(tiny_cfg, tmp_path, data_root, full):
    from sempa_exp.pipelines import evaluation

    common = ["data.size=16", "eval.at_end=[geometry,stsb_dev]", f"objective.full_finetune={str(full).lower()}"]
    stage1 = training.run(tiny_cfg(*STAGE1, *common, "run.group=stage1"))
    assert stage1.finished and stage1.method == "autoregembed_compress" and stage1.final_step == 2
    rows = [json.loads(x) for x in (Path(stage1.run_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    saved = Path(stage1.run_dir) / "adapter"
    if full:  # every weight, as the authors save them
        assert (saved / "config.json").exists() and not (saved / "adapter_config.json").exists()
    else:  # not the whole resized embedding matrix: the LoRA tensors and the 5 trained rows
        from safetensors import safe_open

        with safe_open(str(next(saved.glob("*.safetensors"))), "pt") as f:
            rows = [(k, tuple(f.get_tensor(k).shape)) for k in f.keys() if "lora_" not in k]  # noqa: SIM118
        assert rows == [("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta", (5, 32))]

    stage2 = training.run(tiny_cfg("objective=autoregembed_align", f"objective.init_from={stage1.run_dir}",
                                   *common, "run.group=stage2"))
    assert stage2.finished and stage2.method == "autoregembed_align"
    rows = [json.loads(x) for x in (Path(stage2.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    # the checkpoint method adds the tokens and loads the trained weights: the run's own final scores
    register_all()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            *TINY_OVERRIDES, "method=checkpoint", f"method.path={stage2.run_dir}", "embed=autoregembed",
            "eval.at_end=[geometry,stsb_dev]", "eval.dtype=float32", "eval.pca_fraction=0",
            f"paths.runs_dir={tmp_path / 'eval'}", f"paths.data_dir={data_root}"])
    again = evaluation.run(cfg)
    assert again.method == "autoregembed_align"
    for key in ("eval/stsb_dev", "eval/uniformity"):
        assert again.final[key] == pytest.approx(stage2.final[key], abs=1e-6), key


def test_the_best_stage2_checkpoint_is_loaded_with_its_tokens_for_at_best(tiny_cfg, monkeypatch):
    """eval.at_best on an earlier AutoRegEmbed checkpoint: loaded from its folder with the run's <EMBED*> tokens, it
    scores what the run scored at that step."""
    from test_best_checkpoint import shift_the_final_steps_dev_score

    stage1 = training.run(tiny_cfg(*STAGE1, "data.size=16", "eval.at_end=[stsb_dev]", "run.group=stage1"))
    shift_the_final_steps_dev_score(monkeypatch, -100.0)  # steps 0, 2, 4: the best trained one is step 2
    stage2 = training.run(tiny_cfg("objective=autoregembed_align", f"objective.init_from={stage1.run_dir}",
                                   "eval.at_start=[stsb_dev]", "eval.at_end=[stsb_dev]", "eval.at_best=[stsb_dev]",
                                   "run.group=stage2"))
    at_two = next(e for e in stage2.evaluations if e["step"] == 2)
    assert stage2.best_checkpoint["step"] == 2
    assert stage2.final["best/stsb_dev"] == pytest.approx(at_two["eval/stsb_dev"], abs=1e-6)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full_finetune"])
def test_generation_at_the_end_loads_the_run_with_its_tokens(tiny_cfg, data_root, full):
    """gen.at_end scores the saved run as gen_eval loads it: the backbone with the run's <EMBED*> tokens added, then
    its adapter (or its full weights); gen_eval on the run gives the same record."""
    from sempa_exp.pipelines import generation
    from sempa_exp.records.results import read_results

    common = ["eval=stsb_dev", "eval.ppl_sample=16", "gen.tasks=[]"]
    run = training.run(tiny_cfg(*STAGE1, *common, "data.size=16", "gen.at_end=true",
                                f"objective.full_finetune={str(full).lower()}"))
    at_end = read_results(Path(run.run_dir)).generation["final"]
    assert at_end["model"]["method"] == "autoregembed_compress" and at_end["model"]["merged"] is not full
    assert np.isfinite(at_end["proxy"]["ppl_nli"])
    if not full:  # gen_eval reads LoRA adapters (a fully fine-tuned run has none)
        assert generation.run(tiny_cfg(*common, f"gen.target={run.run_dir}"))["proxy"] == at_end["proxy"]
