"""Sentence embeddings: the one batching path every embedding method goes through.

Each distinct sentence is embedded once; inputs are sorted by token length so batches carry little padding. With
``groups`` (named sentence sets: an evaluation's STS tasks, STS-B dev), a sentence of a group is always embedded in the
same batch: the group's own length-sorted batching, computed whole for every batch that holds a requested sentence.
Its vector then depends on the model alone, never on what was embedded before (bf16 and padding make a vector depend
on its batch-mates in the last bits): a run resumed mid-evaluation scores exactly as an uninterrupted one. What a
sentence's input is and how a batch becomes vectors is the method's (sempa_exp.embedding.loading). The default
method is the ``embed`` config: a raw prompt around the sentence, left padding, last-token or mean pooling of the
last layer's hidden state after the final norm (what ``hidden_states[-1]`` of the causal LM returns); only the
decoder stack runs."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sempa_exp.config.schema import EmbedConfig
from sempa_exp.embedding.base import EmbeddingMethod, decoder_of  # noqa: F401 - decoder_of re-exported
from sempa_exp.embedding.prompt import PromptMethod

log = logging.getLogger(__name__)


class SentenceEncoder:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        embed: EmbedConfig,
        batch_size: int = 32,
        max_length: int | None = None,
        progress: bool = True,
        method: EmbeddingMethod | None = None,
        groups: Mapping[str, Sequence[str]] | None = None,
        share_prompt_prefix: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.embed = embed
        self.batch_size = batch_size
        self.max_length = max_length
        self.progress = progress
        self.method = method or PromptMethod(tokenizer, embed, max_length, share_prompt_prefix=share_prompt_prefix)
        self.memo: dict[str, np.ndarray] = {}  # sentences embedded outside any group
        self.groups = {name: list(dict.fromkeys(members)) for name, members in (groups or {}).items()}
        self.group_memo: dict[str, dict[str, np.ndarray]] = {name: {} for name in self.groups}
        self._group_batches: dict[str, list[list[str]]] = {}
        self._features: dict[str, dict] = {}  # the method's input of every sentence batched so far

    def __call__(self, sentences: Sequence[str]) -> np.ndarray:
        return self.encode(sentences)

    def encode(self, sentences: Sequence[str], group: str | None = None) -> np.ndarray:
        """The sentences' vectors; ``group``: they belong to that group (a ValueError if one does not) and are
        embedded in its fixed batches. Without a group (or one this encoder was not given), in batches of whatever
        is not embedded yet."""
        if not sentences:
            return np.zeros((0, 0), np.float32)
        if group is None or group not in self.groups:
            todo = [s for s in dict.fromkeys(sentences) if s not in self.memo]
            if todo:
                self.memo.update(self._embed_batches(self._length_sorted_batches(todo)))
            return np.stack([self.memo[s] for s in sentences])
        memo = self.group_memo[group]
        missing = {s for s in sentences if s not in memo}
        if missing:
            batches = self._batches_of(group)
            outside = missing - {s for batch in batches for s in batch}
            if outside:
                raise ValueError(f"{len(outside)} sentences are not in the encoder's group {group!r}, e.g. "
                                 f"{next(iter(outside))!r}")
            memo.update(self._embed_batches([b for b in batches if not missing.isdisjoint(b)]))
        return np.stack([memo[s] for s in sentences])

    def batching_key(self) -> dict:
        """What fixes the batches of the grouped sentences (the vectors depend on it in the last bits)."""
        key = {"batch_size": self.batch_size, "max_length": self.max_length,
               "groups": {name: hashlib.sha256(json.dumps(members).encode()).hexdigest()[:16]
                          for name, members in sorted(self.groups.items())}}
        if getattr(self.method, "share_prompt_prefix", False):  # another computation: vectors differ in the last bits
            key["share_prompt_prefix"] = True
        return key

    def _batches_of(self, group: str) -> list[list[str]]:
        if group not in self._group_batches:
            self._group_batches[group] = self._length_sorted_batches(self.groups[group])
        return self._group_batches[group]

    def _length_sorted_batches(self, sentences: list[str]) -> list[list[str]]:
        self._features.update(zip(sentences, self.method.features(sentences), strict=True))
        lengths = [len(self._features[s]["input_ids"]) for s in sentences]
        order = sorted(range(len(sentences)), key=lambda i: lengths[i])  # stable: ties keep the given order
        return [[sentences[i] for i in order[start:start + self.batch_size]]
                for start in range(0, len(order), self.batch_size)]

    @torch.inference_mode()
    def _embed_batches(self, batches: list[list[str]]) -> dict[str, np.ndarray]:
        was_training = self.model.training
        self.model.eval()
        out: dict[str, np.ndarray] = {}
        try:
            for batch in tqdm(batches, desc="embedding", unit="batch", disable=not self.progress, mininterval=10):
                features = [self._features[s] for s in batch]
                vectors = self.method.embed_batch(self.model, features).float().cpu().numpy()
                out.update(zip(batch, vectors, strict=True))
        finally:
            self.model.train(was_training)
        return out
