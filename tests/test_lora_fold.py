"""eval.merge_adapter: a LoRA adapter folded into the weights while a checkpoint is evaluated (sempa_exp.models.lora):
the same embeddings as the unmerged adapter up to rounding, and the model exactly as it was afterwards."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model

from sempa_exp.embedding.encoder import SentenceEncoder
from sempa_exp.models.backbones import load_backbone
from sempa_exp.models.lora import fold_lora, lora_folded

SENTENCES = ["a b c d", "e f g", "h i j k l m", "n o"]


def adapted(tiny_cfg, dtype: torch.dtype):
    cfg = OmegaConf.to_object(tiny_cfg())
    model, tokenizer = load_backbone(cfg.backbone, cfg.paths.cache_dir)
    model = get_peft_model(model.to(dtype), LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                        lora_dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name:
            p.data = (torch.randn(p.shape, generator=generator) * 0.1).to(dtype)
    return model.eval(), tokenizer, cfg


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_embeddings_equal_unmerged_and_the_model_is_restored_bit_for_bit(tiny_cfg, dtype):
    model, tokenizer, cfg = adapted(tiny_cfg, dtype)
    before = state(model)
    unmerged = SentenceEncoder(model, tokenizer, cfg.embed, progress=False).encode(SENTENCES)
    with model.disable_adapter():
        bare = SentenceEncoder(model, tokenizer, cfg.embed, progress=False).encode(SENTENCES)
    assert abs(unmerged - bare).max() > 1e-2  # the adapter matters
    with lora_folded(model):
        folded = SentenceEncoder(model, tokenizer, cfg.embed, progress=False).encode(SENTENCES)
    after = state(model)
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    again = SentenceEncoder(model, tokenizer, cfg.embed, progress=False).encode(SENTENCES)
    assert (again == unmerged).all()  # the adapter is on again, on the original weights
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2 * abs(unmerged).max()
    assert abs(folded - unmerged).max() < tolerance


def test_the_model_is_restored_when_the_evaluation_fails(tiny_cfg):
    model, _, _ = adapted(tiny_cfg, torch.float32)
    before = state(model)
    with pytest.raises(RuntimeError, match="boom"), lora_folded(model):
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if "base_layer" in k)
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_without_lora_is_left_alone(tiny_cfg):
    cfg = OmegaConf.to_object(tiny_cfg())
    model, _ = load_backbone(cfg.backbone, cfg.paths.cache_dir)
    assert fold_lora(model) is None
    with lora_folded(model) as inside:
        assert inside is model


def test_training_with_merged_checkpoint_evaluation_scores_as_unmerged(tiny_cfg):
    """A run's checkpoint evaluations with eval.merge_adapter=true: the unmerged run's geometry (tiny is fp32; the
    continuous scores, since the synthetic STS pairs' near-tied similarities make Spearman flip on 1e-7 noise)."""
    from sempa_exp.pipelines import training

    common = ["data.size=16", "trainer.per_device_batch_size=4", "trainer.grad_accum_steps=1",
              "trainer.checkpoint_every_samples=8", "eval.at_start=[]", "eval.at_checkpoint=[geometry]",
              "eval.at_end=[geometry]"]
    plain = training.run(tiny_cfg(*common, "run.name=plain"))
    merged = training.run(tiny_cfg(*common, "eval.merge_adapter=true", "run.name=merged"))
    assert [e["step"] for e in merged.evaluations] == [e["step"] for e in plain.evaluations] == [2, 4]
    for a, b in zip(plain.evaluations, merged.evaluations, strict=True):
        for key in ("eval/uniformity", "eval/isotropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
