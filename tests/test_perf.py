"""The DPO speed-ups of sempa_exp.objectives.dpo keep TRL's numbers: completion-only LM head, precomputed and cached
reference log-probs, the prepared-data cache and its keys (tiny backbone, fp32)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from omegaconf import OmegaConf

from conftest import tiny_trainer
from sempa_exp.config.schema import data_dir
from sempa_exp.data import nli
from sempa_exp.models.backbones import load_backbone
from sempa_exp.objectives.dpo import SOURCE_ROW, PreparedDataCache, cache_ingredients, cache_key, prepared_data_cache

ALL_OFF = ["objective.completion_only_logits=false", "objective.precompute_ref_logps=false",
           "objective.cache_prepared_data=false", "objective.sort_within_step=false",
           "objective.share_prompt_prefix=false"]


def make_trainer(tiny_cfg, tmp_path: Path, *overrides: str, size: int = 32):
    composed = tiny_cfg(f"data.size={size}", "trainer.max_steps=4", *overrides)
    cfg = OmegaConf.to_object(composed)
    triplets, _ = nli.read_triplets(nli.resolve_source(cfg.data, data_dir(cfg)), cfg.data.max_sentence_chars)
    return tiny_trainer(composed, nli.subset(triplets, size, cfg.data.subset_seed), tmp_path / "out")


def train_losses(trainer) -> list[float]:
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_completion_only_head_equals_trl_full_head(tiny_cfg, tmp_path):
    full = make_trainer(tiny_cfg, tmp_path, *ALL_OFF)
    fast = make_trainer(tiny_cfg, tmp_path, "objective.completion_only_logits=true",
                        "objective.precompute_ref_logps=false", "objective.cache_prepared_data=false")
    generator = torch.Generator().manual_seed(0)
    for trainer in (full, fast):  # the same non-zero adapter in both, so the LoRA gradients are not trivial
        trainer.model.eval()
        generator.manual_seed(0)
        for _name, p in sorted(trainer.model.named_parameters()):
            if p.requires_grad:
                p.data = torch.randn(p.shape, generator=generator) * 0.05
    batch = full.data_collator([full.train_dataset[i] for i in range(6)])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    outputs, grads = [], []
    for trainer in (full, fast):
        trainer.model.zero_grad()
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                            fused_lm_head=True)
        out.log_probs.sum().backward()
        outputs.append(out)
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    a, b = outputs
    assert a.log_probs.abs().sum() > 0
    for key in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(b, key), getattr(a, key), atol=1e-5, rtol=0)
    assert torch.equal(a.is_top1, b.is_top1)
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-5)


def randomize_adapter(trainer, seed: int = 0) -> None:
    """A non-zero adapter, the same in every trainer built from the same config, so LoRA gradients are not trivial."""
    generator = torch.Generator().manual_seed(seed)
    for _name, p in sorted(trainer.model.named_parameters()):
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=generator) * 0.05


def scored(trainer, batch: dict) -> tuple:
    trainer.model.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                        fused_lm_head=True, use_cache=False)
    out.log_probs.sum().backward()
    return out, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_shared_prompt_prefix_gives_the_full_sequences_log_probs_and_gradients(tiny_cfg, tmp_path, monkeypatch):
    """Each prompt run once for its two completions (its key/value cache reused) == TRL's two full sequences, per
    token, with the same LoRA gradients; the shared path is really taken (the prompt rows run once)."""
    from sempa_exp.objectives import dpo

    common = ["objective.precompute_ref_logps=false", "objective.cache_prepared_data=false"]
    full = make_trainer(tiny_cfg, tmp_path, *common, "objective.share_prompt_prefix=false")
    shared = make_trainer(tiny_cfg, tmp_path, *common, "objective.share_prompt_prefix=true")
    for trainer in (full, shared):
        trainer.model.eval()
        randomize_adapter(trainer)
    batch = full.data_collator([full.train_dataset[i] for i in range(7)])
    calls = []
    real = dpo.prefix_shared_hidden
    monkeypatch.setattr(dpo, "prefix_shared_hidden", lambda *a: calls.append(a[1].shape) or real(*a))
    (a, grads_a), (b, grads_b) = scored(full, batch), scored(shared, batch)
    assert calls == [batch["input_ids"].shape]
    assert torch.equal(a.label_mask, b.label_mask) and a.log_probs.abs().sum() > 0
    for key in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(b, key), getattr(a, key), atol=1e-5, rtol=0)
    assert torch.equal(a.is_top1, b.is_top1)
    for name, g in grads_a.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(grads_b[name], g, atol=1e-5, rtol=1e-5)


def test_a_batch_whose_prompts_differ_is_scored_as_full_sequences(tiny_cfg, tmp_path, monkeypatch):
    from sempa_exp.objectives import dpo

    common = ["objective.precompute_ref_logps=false", "objective.cache_prepared_data=false"]
    full = make_trainer(tiny_cfg, tmp_path, *common, "objective.share_prompt_prefix=false")
    shared = make_trainer(tiny_cfg, tmp_path, *common, "objective.share_prompt_prefix=true")
    batch = full.data_collator([full.train_dataset[i] for i in range(4)])
    batch["input_ids"][4 + 1, 2] += 1  # the rejected row of pair 1 (rows: 4 chosen, then 4 rejected): another prompt
    assert dpo.shared_prompt_layout(batch["input_ids"], batch["attention_mask"],
                                    batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)) is None
    monkeypatch.setattr(dpo, "prefix_shared_hidden", lambda *a: pytest.fail("a non-shareable batch was shared"))
    a, b = scored(full, batch)[0], scored(shared, batch)[0]
    torch.testing.assert_close(b.log_probs, a.log_probs, atol=1e-6, rtol=0)


def test_precomputed_and_cached_reference_give_trls_losses(tiny_cfg, tmp_path):
    """TRL's online reference (every flag off) == precomputed (cold cache) == read back from the cache (warm), with
    every default speed-up on (4 x 2 pairs: the step's micro-batches are regrouped by length too)."""
    trl_losses = train_losses(make_trainer(tiny_cfg, tmp_path, *ALL_OFF))
    cold = make_trainer(tiny_cfg, tmp_path)
    assert cold.data_cache.last_event == {"tokenized": "built", "ref_logps": "built"}
    cold_losses = train_losses(cold)
    warm = make_trainer(tiny_cfg, tmp_path)
    assert warm.data_cache.last_event == {"tokenized": "hit", "ref_logps": "hit"}
    warm_losses = train_losses(warm)
    assert len(trl_losses) == 4
    assert warm_losses == cold_losses  # the same numbers, from disk
    np.testing.assert_allclose(cold_losses, trl_losses, atol=1e-5, rtol=0)
    assert trl_losses[-1] != trl_losses[0]  # it trained


def test_cache_is_a_prefix_shared_by_nested_data_sizes(tiny_cfg, tmp_path):
    small = make_trainer(tiny_cfg, tmp_path, size=16)
    large = make_trainer(tiny_cfg, tmp_path, size=48)
    assert large.data_cache.last_event == {"tokenized": "extended", "ref_logps": "extended"}
    again = make_trainer(tiny_cfg, tmp_path, size=16)
    assert again.data_cache.last_event == {"tokenized": "hit", "ref_logps": "hit"}
    fresh = make_trainer(tiny_cfg, tmp_path, "objective.cache_prepared_data=false", size=48)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        np.testing.assert_allclose(large.train_dataset[column], fresh.train_dataset[column], atol=1e-5)
        assert again.train_dataset[column] == large.train_dataset[column][:16]
        assert small.train_dataset[column] == large.train_dataset[column][:16]
    assert large.train_dataset["prompt_ids"] == fresh.train_dataset["prompt_ids"]


def rows(texts: list[str]) -> Dataset:
    return Dataset.from_list([{"prompt": t, "chosen": t + "+", "rejected": t + "-"} for t in texts])


def fake_tokenize(calls: list[int]):
    def tokenize(part: Dataset) -> Dataset:
        calls.append(len(part))
        # drops rows like TRL's max_length filter does, so source rows have gaps
        part = part.filter(lambda r: not r["prompt"].endswith("7"))
        return part.map(lambda r: {"prompt_ids": [len(r["prompt"])], "chosen_ids": [1], "rejected_ids": [2]})
    return tokenize


def test_prefix_cache_tokenizes_only_new_rows_and_detects_changed_ones(tmp_path):
    cache = PreparedDataCache(tmp_path, "t", "r")
    calls: list[int] = []
    texts = [f"row {i}" for i in range(20)]
    pairs, _ = cache.tokenized(rows(texts[:10]), fake_tokenize(calls))
    assert calls == [10] and cache.last_event["tokenized"] == "built"
    assert pairs[SOURCE_ROW] == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    pairs, _ = cache.tokenized(rows(texts[:8]), fake_tokenize(calls))
    assert calls == [10] and cache.last_event["tokenized"] == "hit" and pairs[SOURCE_ROW] == [0, 1, 2, 3, 4, 5, 6]
    pairs, _ = cache.tokenized(rows(texts), fake_tokenize(calls))
    assert calls == [10, 10] and cache.last_event["tokenized"] == "extended"
    assert pairs[SOURCE_ROW] == [i for i in range(20) if i not in (7, 17)]
    changed = [*texts[:3], "another row 3", *texts[4:]]
    pairs, _ = cache.tokenized(rows(changed), fake_tokenize(calls))
    assert calls == [10, 10, 17]  # everything from the first changed row on
    assert pairs["prompt_ids"][3] == [len("another row 3")]


@pytest.mark.parametrize("change", [
    "backbone.tiny.seed=1", "template=p2", "data.system_prompt=Hi", "trainer.max_length=300", "data.subset_seed=1",
    "data.local_file=nli/other.csv.gz", "objective.score_template_tail=true", "chat_template", "trl_version",
])
def test_cache_keys_change_with_every_ingredient(tiny_cfg, change, monkeypatch):
    import trl

    def keys(cfg_overrides: list[str], template: str | None = None) -> tuple[str, str]:
        cfg = OmegaConf.to_object(tiny_cfg(*cfg_overrides))
        _, tokenizer = load_backbone(cfg.backbone, cfg.paths.cache_dir)
        if template:
            tokenizer.chat_template = template
        tokenize, reference = cache_ingredients(cfg, tokenizer, use_cpu=True)
        return cache_key(tokenize), cache_key(reference)

    base = keys([])
    if change == "chat_template":
        changed = keys([], template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    elif change == "trl_version":
        monkeypatch.setattr(trl, "__version__", "0.0.1")
        changed = keys([])
    else:
        changed = keys([change])
    assert changed[0] != base[0] and changed[1] != base[1]


@pytest.mark.parametrize("change", ["backbone.dtype=bfloat16", "trainer.bf16=true"])
def test_reference_key_also_tracks_precision(tiny_cfg, change):
    def keys(*overrides: str) -> tuple[str, str]:
        cfg = OmegaConf.to_object(tiny_cfg(*overrides))
        _, tokenizer = load_backbone(cfg.backbone, cfg.paths.cache_dir)
        return tuple(cache_key(x) for x in cache_ingredients(cfg, tokenizer, use_cpu=True))

    base, changed = keys(), keys(change)
    assert changed[0] == base[0] and changed[1] != base[1]  # same tokens, other reference log-probs


def test_data_size_and_training_seed_share_one_entry(tiny_cfg):
    caches = []
    for overrides in ([], ["data.size=16"], ["seed=7"]):
        cfg = OmegaConf.to_object(tiny_cfg(*overrides))
        _, tokenizer = load_backbone(cfg.backbone, cfg.paths.cache_dir)
        caches.append(prepared_data_cache(cfg, tokenizer, use_cpu=True))
    assert len({c.tokenized_dir for c in caches}) == 1 and len({c.ref_file for c in caches}) == 1


def test_group_by_length_trains(tiny_cfg, tmp_path):
    trainer = make_trainer(tiny_cfg, tmp_path, "objective.group_by_length=true")
    assert "length" in trainer.train_dataset.column_names
    assert len(train_losses(trainer)) == 4


def test_sort_within_step_keeps_each_steps_pairs_and_losses(tiny_cfg, tmp_path):
    seen: dict[bool, list[list[tuple]]] = {}
    losses = {}
    for on in (False, True):
        trainer = make_trainer(tiny_cfg, tmp_path, *ALL_OFF[:3], f"objective.sort_within_step={str(on).lower()}")
        steps = seen.setdefault(on, [])
        original = trainer.get_batch_samples

        def record(*args, _original=original, _steps=steps, **kwargs):
            batches, num_items = _original(*args, **kwargs)
            _steps.append([[tuple(r[m.bool()].tolist()) for r, m in zip(b["input_ids"], b["attention_mask"],
                                                                         strict=True)] for b in batches])
            return batches, num_items

        trainer.get_batch_samples = record
        losses[on] = train_losses(trainer)
    np.testing.assert_allclose(losses[True], losses[False], atol=1e-5, rtol=0)
    assert len(seen[True]) == len(seen[False]) == 4
    for plain, regrouped in zip(seen[False], seen[True], strict=True):
        assert sorted(s for b in plain for s in b) == sorted(s for b in regrouped for s in b)  # same sequences
        assert [len(b) for b in plain] == [len(b) for b in regrouped]
    longest = [[max(len(s) for s in b) for b in step] for step in seen[True]]
    assert all(step == sorted(step) for step in longest)  # short pairs together, long pairs together
    assert seen[True] != seen[False]


DDP_SCRIPT = """
import json, sys
from pathlib import Path
from omegaconf import OmegaConf
from conftest import compose_config, tiny_trainer, TINY_OVERRIDES
from sempa_exp.data import nli
from sempa_exp.config.schema import data_dir
root, cache, out = map(Path, sys.argv[1:4])
composed = compose_config([*TINY_OVERRIDES, f"paths.cache_dir={cache}"], root)
cfg = OmegaConf.to_object(composed)
triplets, _ = nli.read_triplets(nli.resolve_source(cfg.data, data_dir(cfg)), cfg.data.max_sentence_chars)
trainer = tiny_trainer(composed, nli.subset(triplets, 32, 42), out / "ckpt", world_size=2)
rank = trainer.accelerator.process_index
(out / f"rank{rank}.json").write_text(json.dumps({"events": trainer.data_cache.last_event,
    "ref": list(trainer.train_dataset["ref_chosen_logps"])}))
"""


def test_two_processes_share_the_cache_without_deadlock(data_root, tmp_path):
    """DDP: the main process fills the cache, the other reads it; a second job finds it warm on both ranks."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "build.py"
    script.write_text(DDP_SCRIPT)
    tests_dir = Path(__file__).parent
    results = []
    for attempt in ("cold", "warm"):
        out = tmp_path / attempt
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(data_root), str(tmp_path / "cache"), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": f"{tests_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-6000:]
        results.append([json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)])
    cold, warm = results
    assert cold[0]["events"] == {"tokenized": "built", "ref_logps": "built"}
    assert cold[1]["events"]["tokenized"] == "hit"  # it waited for rank 0 and read its entry
    assert all(r["events"] == {"tokenized": "hit", "ref_logps": "hit"} for r in warm)
    assert cold[0]["ref"] == cold[1]["ref"] == warm[0]["ref"] == warm[1]["ref"]


def counted(calls: list, real, batch, k, *groups):
    calls.append(k)
    return real(batch, k, *groups)


def test_a_token_budget_trains_in_equal_chunks_with_the_same_losses_and_metrics(tiny_cfg, tmp_path):
    """objective.max_tokens_per_micro_batch: each micro-batch of 4 pairs in 2 or 4 chunks; every step's loss and
    per-pair metric equal the unchunked run's (fp32), and the chunking really happens."""
    from sempa_exp.objectives import dpo

    common = ["trainer.per_device_batch_size=4", "trainer.grad_accum_steps=2", "objective.disable_dropout=true"]
    plain = make_trainer(tiny_cfg, tmp_path / "plain", *common)
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(
        plain.train_dataset["prompt_ids"], plain.train_dataset["chosen_ids"], plain.train_dataset["rejected_ids"]))
    baseline = train_losses(plain)
    logs = [{k: v for k, v in h.items() if k != "grad_norm"} for h in plain.state.log_history if "loss" in h]
    for budget, chunks in ((2 * 2 * longest, 2), (2 * longest, 4), (longest, 4)):
        trainer = make_trainer(tiny_cfg, tmp_path / str(budget), *common,
                               f"objective.max_tokens_per_micro_batch={budget}")
        assert trainer.chunks == chunks
        sizes = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dpo, "split_pairs", functools.partial(counted, sizes, dpo.split_pairs))
            losses = train_losses(trainer)
        assert sizes == [chunks] * 8  # 4 steps x 2 micro-batches
        np.testing.assert_allclose(losses, baseline, atol=1e-6, rtol=0)
        chunked = [{k: v for k, v in h.items() if k != "grad_norm"} for h in trainer.state.log_history if "loss" in h]
        for a, b in zip(logs, chunked, strict=True):
            assert a.keys() == b.keys()
            # per-pair metrics are means over equal chunks: the same; token-weighted ones (logits/*, entropy,
            # mean_token_accuracy) are averaged over the chunks, as TRL averages them over accumulated micro-batches
            for key in [k for k in a if k.split("/")[0] in ("loss", "rewards", "logps", "learning_rate", "epoch")]:
                assert b[key] == pytest.approx(a[key], abs=1e-5), key


def test_split_pairs_keeps_each_pair_and_its_reference_log_probs_together():
    from sempa_exp.objectives.dpo import split_pairs

    ids = torch.tensor([[1, 2, 0, 0], [3, 4, 5, 0], [6, 0, 0, 0], [7, 8, 9, 9], [1, 1, 0, 0], [2, 2, 2, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).long(), "completion_mask": (ids > 1).long(),
             "ref_chosen_logps": torch.tensor([0.1, 0.2, 0.3]), "ref_rejected_logps": torch.tensor([1.0, 2.0, 3.0])}
    first, second = split_pairs(batch, 2)
    assert first["input_ids"].tolist() == [[1, 2, 0, 0], [3, 4, 5, 0], [7, 8, 9, 9], [1, 1, 0, 0]]
    assert second["input_ids"].tolist() == [[6, 0, 0], [2, 2, 2]]  # cut to its own longest sequence
    assert first["ref_chosen_logps"].tolist() == pytest.approx([0.1, 0.2])
    assert second["ref_rejected_logps"].tolist() == pytest.approx([3.0])
    assert split_pairs(batch, 1) == [batch]


def test_a_token_budget_weighs_unequal_chunks_of_the_last_micro_batch_by_their_pairs(tiny_cfg, tmp_path):
    """29 pairs, 6 per micro-batch, 2 chunks each: the epoch's last micro-batch (5 pairs) splits 3 + 2, and its loss
    is still the unchunked mean over its 5 pairs."""
    common = ["trainer.per_device_batch_size=6", "trainer.grad_accum_steps=1", "trainer.max_steps=-1"]
    plain = make_trainer(tiny_cfg, tmp_path / "plain", *common, size=29)
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(
        plain.train_dataset["prompt_ids"], plain.train_dataset["chosen_ids"], plain.train_dataset["rejected_ids"]))
    chunked = make_trainer(tiny_cfg, tmp_path / "chunked", *common,
                           f"objective.max_tokens_per_micro_batch={3 * 2 * longest}", size=29)
    assert chunked.chunks == 2
    a, b = train_losses(plain), train_losses(chunked)
    assert len(a) == 5
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("embed", ["prompteol", "pretended_cot"])
def test_evaluation_prefix_cache_gives_the_full_prompts_vectors(tiny_cfg, data_root, embed):
    """eval.share_prompt_prefix: the template's prefix runs once per batch and the rows continue from its cache; in
    fp32 every STS-B dev vector equals the full prompt's to 1e-5, with a LoRA adapter attached too; a batch whose
    sentences merge with the prefix's last token shares only the tokens they all have."""
    from peft import LoraConfig, get_peft_model

    from sempa_exp.data.sts import load_stsb_dev
    from sempa_exp.embedding.encoder import SentenceEncoder

    config = OmegaConf.to_object(tiny_cfg(f"embed={embed}"))
    model, tokenizer = load_backbone(config.backbone, config.paths.cache_dir)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    sentences = list(dict.fromkeys(load_stsb_dev(data_dir(config)).sentences))[:300]
    full = SentenceEncoder(model, tokenizer, config.embed, batch_size=16, progress=False)
    shared = SentenceEncoder(model, tokenizer, config.embed, batch_size=16, progress=False, share_prompt_prefix=True)
    a, b = full.encode(sentences), shared.encode(sentences)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    method = shared.method
    prefix = method.prompt_prefix()
    assert len(prefix) >= 2
    rows = [f["input_ids"] for f in method.features(sentences)]
    assert method.shared_prefix_length(rows) == len(prefix) - (0 if all(r[:len(prefix)] == prefix for r in rows)
                                                               else 1)
    assert method.shared_prefix_length([prefix[:1] + [prefix[1] + 1] + prefix[2:], prefix + [5]]) == 1
    assert full.batching_key() != shared.batching_key()  # the disk cache keeps the two computations apart
