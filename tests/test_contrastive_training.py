"""The contrastive foil: SimCSE's InfoNCE and its batches (its full tiny run: test_train_tiny.py, beside SemPA's)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import tiny_trainer
from sempa_exp.config.schema import EmbedConfig, data_dir
from sempa_exp.data import nli
from sempa_exp.models.backbones import build_tiny_tokenizer
from sempa_exp.objectives.infonce import TripletCollator, info_nce

PROMPTEOL = EmbedConfig(name="prompteol", template='This sentence : "{s}" means in one word:"')


def test_info_nce_is_cross_entropy_over_positives_and_all_negatives():
    torch.manual_seed(0)
    a, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    t = 0.05
    manual = 0.0
    for i in range(4):
        sims = torch.stack([F.cosine_similarity(a[i], c, dim=0) for c in [*p, *n]]) / t
        manual += -torch.log_softmax(sims, dim=0)[i]
    assert torch.allclose(info_nce(a, p, n, t), manual / 4, atol=1e-5)
    # anchors equal to their positives and orthogonal to everything else: loss near zero; swapped: large
    eye = torch.eye(8)
    assert info_nce(eye[:4], eye[:4], eye[4:], t) < 1e-6
    assert info_nce(eye[:4], eye[4:], eye[:4], t) > 10
    assert math.isclose(info_nce(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), t).item(), math.log(4),
                        rel_tol=1e-5)


def test_collator_left_pads_anchors_positives_negatives_in_order():
    tokenizer = build_tiny_tokenizer()
    rows = [{"anchor": "A cat.", "positive": "A pet.", "negative": "No animal at all here."},
            {"anchor": "Two men talk.", "positive": "People talk.", "negative": "Nobody says a word."}]
    batch = TripletCollator(tokenizer, PROMPTEOL, max_length=200)(rows)
    assert batch["input_ids"].shape[0] == 6
    texts = [tokenizer.decode(row[mask.bool()]) for row, mask in zip(batch["input_ids"], batch["attention_mask"],
                                                                      strict=True)]
    assert [t.split('"')[1] for t in texts] == ["A cat.", "Two men talk.", "A pet.", "People talk.",
                                                 "No animal at all here.", "Nobody says a word."]
    assert batch["attention_mask"][:, -1].all()  # left padding: every row ends on its last real token
    short = TripletCollator(tokenizer, PROMPTEOL, max_length=12)(rows)
    assert short["input_ids"].shape[1] == 12 and tokenizer.decode(short["input_ids"][0]).endswith('word:"')


def test_lora_init_is_drawn_from_the_runs_seed(tiny_cfg, tmp_path):
    """The foil's LoRA matrices come from ``seed`` (as TRL seeds DPO's), whatever the global generator held: the
    same seed gives the same adapter, another seed another one, so seeds 1-3 of a study differ in their init too."""
    def lora_a(seed: int, noise: int) -> torch.Tensor:
        composed = tiny_cfg("objective=contrastive", f"seed={seed}")
        cfg = OmegaConf.to_object(composed)
        triplets, _ = nli.load_triplets(cfg.data, data_dir(cfg))
        torch.manual_seed(noise)  # whatever ran before
        trainer = tiny_trainer(composed, triplets[:4], tmp_path / "out")
        return torch.cat([p.detach().flatten() for n, p in sorted(trainer.model.named_parameters()) if "lora_A" in n])

    first = lora_a(1, noise=0)
    assert torch.equal(first, lora_a(1, noise=123))
    assert not torch.equal(first, lora_a(2, noise=0))
