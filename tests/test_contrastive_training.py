"""The contrastive foil: SimCSE's InfoNCE and its batches (its full tiny run: test_train_tiny.py, beside SemPA's)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sempa_exp.config.schema import EmbedConfig
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
