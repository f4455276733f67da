"""Aligned tokens, the GAR score and the NLI PCA data, on hand-built inputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sempa_exp.data import nli, sts
from sempa_exp.evaluation.alignment import aligned_token_examples, aligned_token_ids, gar, gar_score, gar_sentences
from sempa_exp.evaluation.pca import nli_pca, pca_2d, pca_sample
from sempa_exp.models.backbones import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def one_hot_head(tokenizer) -> torch.nn.Linear:
    """An LM head whose logits are the embedding's coordinates: embedding = one-hot(id) aligns with token id."""
    vocab = len(tokenizer)
    head = torch.nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    return head


def one_hot(tokenizer, *chars: str, weights=None) -> np.ndarray:
    vec = np.zeros(len(tokenizer), dtype=np.float32)
    for c, w in zip(chars, weights or [1.0] * len(chars), strict=True):
        vec[tokenizer.convert_tokens_to_ids(c)] = w
    return vec


def test_aligned_tokens_are_the_top_lm_head_logits_best_first(tokenizer):
    emb = np.stack([one_hot(tokenizer, "x", "y", weights=[1.0, 2.0])])
    ids = aligned_token_ids(emb, one_hot_head(tokenizer), k=2)
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist()) == ["y", "x"]


def test_gar_is_the_share_of_the_sample_vocabulary_aligned_by_its_own_sentences():
    own = [{"a", "b"}, {"c", "d"}]
    assert gar([{"a", "z"}, {"z"}], own) == 0.25  # only 'a' is aligned inside its own sentence
    assert gar([{"c"}, {"z"}], own) == 0.0  # 'c' is aligned, but by a sentence that does not contain it
    assert gar([{"a", "b"}, {"c", "d"}], own) == 1.0
    with pytest.raises(ValueError):
        gar([], [])


def test_gar_score_end_to_end_with_text_and_id_matching(tokenizer):
    head = one_hot_head(tokenizer)
    sentences = ["ab", "Cd"]
    emb = np.stack([one_hot(tokenizer, "a"), one_hot(tokenizer, "c")])  # 'c' is in "Cd" only as upper-case 'C'
    # vocabulary {a, b, c, d} by text (case folded); hits: 'a' (sentence 1), 'c' ~ 'C' (sentence 2)
    assert gar_score(emb, sentences, head, tokenizer, k=1, match="text") == 0.5
    # by id: vocabulary {a, b, C, d}; 'c' is not 'C'
    assert gar_score(emb, sentences, head, tokenizer, k=1, match="id") == 0.25
    rows = aligned_token_examples(emb, sentences, head, tokenizer, k=2)
    assert rows[0]["sentence"] == "ab" and rows[0]["aligned_tokens"][0] == "a" and rows[0]["in_sentence"][0]


def test_gar_sample_is_a_fixed_seeded_subset_of_distinct_sts_sentences():
    split = sts.StsSplit("STS12", "x", [f"s{i}" for i in range(30)], [f"s{i}" for i in range(10, 40)], np.zeros(30))
    tasks = {"STS12": [split]}
    sample = gar_sentences(tasks, 15)
    assert len(sample) == len(set(sample)) == 15 and sample == gar_sentences(tasks, 15)
    assert sample == sorted(sample, key=lambda s: int(s[1:]))  # first-occurrence order kept
    assert gar_sentences(tasks, 100) == [f"s{i}" for i in range(40)]


def test_pca_sample_and_projection():
    triplets = [nli.Triplet(f"p{i}", f"e{i}", f"c{i}") for i in range(1000)]
    assert len(pca_sample(triplets, 0.002)) == 2 and pca_sample(triplets, 0.002) == pca_sample(triplets, 0.002)
    assert len(pca_sample(triplets[:10], 0.002)) == 1 and pca_sample(triplets, 0.0) == []
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, 5)) * np.array([10.0, 3.0, 0.1, 0.1, 0.1])
    coords, ratio = pca_2d(vectors)
    assert coords.shape == (12, 2) and 0 < ratio[1] <= ratio[0] and ratio.sum() <= 1.0 + 1e-9
    assert coords[0::3, 0].mean() >= 0  # oriented by the anchors
    data = nli_pca(triplets[:100], lambda s: rng.normal(size=(len(s), 4)), fraction=0.05)
    assert data["num_triplets"] == 5 and len(data["points"]) == 15
    assert [p["role"] for p in data["points"][:3]] == ["anchor", "positive", "negative"]
    assert {p["triplet"] for p in data["points"]} == set(range(5))
