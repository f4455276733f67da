"""Aligned tokens and the GAR score of sentence embeddings.

Aligned tokens (Nie et al., 2025): the sentence embedding, which lives in the LM's final hidden space, is projected
through the LM head; the top-K vocabulary entries are the tokens the embedding is aligned with.

GAR (global alignment rate), over a fixed sample of sentences S with token sets T(s) and top-K aligned sets A(s):

    GAR = | U_s (A(s) & T(s)) | / | U_s T(s) |

i.e. the share of the sample's vocabulary that some sentence's embedding aligns with while containing it. A sentence's
token set is its own tokenization (no prompt, no special tokens). With ``match="text"`` tokens are compared as their
decoded strings stripped of surrounding whitespace and lower-cased (" cat", "cat" and "Cat" are one token; a token that
is only whitespace is dropped), since an aligned token and the same word inside a sentence often differ only by the
leading-space marker; ``match="id"`` compares raw vocabulary ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from sempa_exp.data import sts

GAR_SAMPLE_SEED = 0
GAR_SAMPLE_DOC = ("a seeded (numpy seed 0) sample without replacement of N distinct sentences of the 7 STS test sets "
                  "(STS12-16 sub-datasets, STS-B test, SICK-R test; kept in first-occurrence order); the paper's 10K "
                  "Wikipedia sentences are not available offline")


def gar_sentences(tasks: dict[str, list[sts.StsSplit]], n: int, seed: int = GAR_SAMPLE_SEED) -> list[str]:
    distinct = list(dict.fromkeys(s for splits in tasks.values() for split in splits for s in split.sentences))
    if n >= len(distinct):
        return distinct
    chosen = np.sort(np.random.default_rng(seed).choice(len(distinct), size=n, replace=False))
    return [distinct[i] for i in chosen]


@torch.inference_mode()
def aligned_token_ids(embeddings: np.ndarray, lm_head: torch.nn.Module, k: int, batch_size: int = 256) -> np.ndarray:
    """(n, k) vocabulary ids of the largest LM-head logits of each embedding, best first."""
    weight = lm_head.weight.detach().float()
    bias = getattr(lm_head, "bias", None)
    out = []
    for start in range(0, len(embeddings), batch_size):
        x = torch.as_tensor(np.asarray(embeddings[start:start + batch_size]), dtype=torch.float32,
                            device=weight.device)
        logits = x @ weight.T
        if bias is not None:
            logits = logits + bias.detach().float()
        out.append(logits.topk(k, dim=-1).indices.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


class TokenKeys:
    """Maps vocabulary ids to the keys GAR compares (see the module docstring), memoised per id."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, match: str = "text") -> None:
        self.tokenizer = tokenizer
        self.match = match
        self.memo: dict[int, str | int | None] = {}

    def key(self, token_id: int) -> str | int | None:
        if self.match == "id":
            return int(token_id)
        if token_id not in self.memo:
            text = self.tokenizer.decode([int(token_id)]).strip().lower()
            self.memo[token_id] = text or None
        return self.memo[token_id]

    def keys(self, ids: Sequence[int]) -> set:
        return {k for k in (self.key(i) for i in ids) if k is not None}


def sentence_token_ids(tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str]) -> list[list[int]]:
    return list(tokenizer(list(sentences), add_special_tokens=False)["input_ids"])


def gar(aligned: Sequence[set], own: Sequence[set]) -> float:
    vocabulary = set().union(*own) if own else set()
    if not vocabulary:
        raise ValueError("GAR needs sentences with at least one token")
    hits = set().union(*(a & o for a, o in zip(aligned, own, strict=True)))
    return len(hits) / len(vocabulary)


def gar_score(embeddings: np.ndarray, sentences: Sequence[str], lm_head: torch.nn.Module,
              tokenizer: PreTrainedTokenizerBase, k: int = 10, match: str = "text") -> float:
    keys = TokenKeys(tokenizer, match)
    aligned = [keys.keys(row) for row in aligned_token_ids(embeddings, lm_head, k)]
    own = [keys.keys(ids) for ids in sentence_token_ids(tokenizer, sentences)]
    return gar(aligned, own)


def aligned_token_examples(embeddings: np.ndarray, sentences: Sequence[str], lm_head: torch.nn.Module,
                           tokenizer: PreTrainedTokenizerBase, k: int = 10) -> list[dict]:
    """Per sentence: its top-k aligned tokens (decoded, best first) and which of them occur in the sentence."""
    keys = TokenKeys(tokenizer, "text")
    rows = []
    for sentence, ids, own in zip(sentences, aligned_token_ids(embeddings, lm_head, k),
                                  sentence_token_ids(tokenizer, sentences), strict=True):
        own_keys = keys.keys(own)
        tokens = [tokenizer.decode([int(i)]) for i in ids]
        rows.append({"sentence": sentence, "aligned_tokens": tokens,
                     "in_sentence": [keys.key(int(i)) in own_keys for i in ids]})
    return rows
