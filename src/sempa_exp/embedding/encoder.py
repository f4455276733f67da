"""Sentence embeddings: the one batching path every embedding method goes through.

Each distinct sentence is embedded once; inputs are sorted by token length so batches carry little padding. What a
sentence's input is and how a batch becomes vectors is the method's (sempa_exp.embedding.loading). The default
method is the ``embed`` config: a raw prompt around the sentence, left padding, last-token or mean pooling of the
last layer's hidden state after the final norm (what ``hidden_states[-1]`` of the causal LM returns); only the
decoder stack runs."""

from __future__ import annotations

import logging
from collections.abc import Sequence

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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.embed = embed
        self.batch_size = batch_size
        self.max_length = max_length
        self.progress = progress
        self.method = method or PromptMethod(tokenizer, embed, max_length)
        self.memo: dict[str, np.ndarray] = {}

    def __call__(self, sentences: Sequence[str]) -> np.ndarray:
        return self.encode(sentences)

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        todo = [s for s in dict.fromkeys(sentences) if s not in self.memo]
        if todo:
            for sentence, vector in zip(todo, self._embed(todo), strict=True):
                self.memo[sentence] = vector
        return np.stack([self.memo[s] for s in sentences]) if sentences else np.zeros((0, 0), np.float32)

    @torch.inference_mode()
    def _embed(self, sentences: list[str]) -> np.ndarray:
        features = self.method.features(sentences)
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        was_training = self.model.training
        self.model.eval()
        out = np.zeros((len(sentences), 0), dtype=np.float32)
        batches = range(0, len(order), self.batch_size)
        try:
            for start in tqdm(batches, desc="embedding", unit="batch", disable=not self.progress, mininterval=10):
                idx = order[start:start + self.batch_size]
                vectors = self.method.embed_batch(self.model, [features[i] for i in idx]).float().cpu().numpy()
                if out.shape[1] == 0:
                    out = np.zeros((len(sentences), vectors.shape[1]), dtype=np.float32)
                out[idx] = vectors
        finally:
            self.model.train(was_training)
        return out
