"""Sentence embeddings from a decoder LLM: a raw prompt around the sentence, left padding, last-token or mean pooling.

Each distinct sentence is embedded once; prompts are sorted by token length so batches carry little padding. Only the
decoder stack runs (no LM head): the pooled vector is the last layer's hidden state after the final norm, which is
what ``hidden_states[-1]`` of the causal LM returns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sempa_exp.schema import EmbedConfig
from sempa_exp.templates import embedding_prompt

log = logging.getLogger(__name__)


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer stack below the LM head, through a PEFT wrapper if there is one (LoRA layers stay active)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if hasattr(model, "get_decoder"):
        return model.get_decoder()
    return model.model


class SentenceEncoder:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        embed: EmbedConfig,
        batch_size: int = 32,
        max_length: int | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.embed = embed
        self.batch_size = batch_size
        self.max_length = max_length
        self.progress = progress
        self.memo: dict[str, np.ndarray] = {}

    def prompt(self, sentence: str) -> str:
        return embedding_prompt(self.embed.template, sentence, self.embed.prompteol_preprocess)

    def __call__(self, sentences: Sequence[str]) -> np.ndarray:
        return self.encode(sentences)

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        todo = [s for s in dict.fromkeys(sentences) if s not in self.memo]
        if todo:
            for sentence, vector in zip(todo, self._embed(todo)):
                self.memo[sentence] = vector
        return np.stack([self.memo[s] for s in sentences]) if sentences else np.zeros((0, 0), np.float32)

    def _tokenize(self, prompts: list[str]) -> list[dict]:
        enc = self.tokenizer(
            prompts, truncation=self.max_length is not None, max_length=self.max_length,
            return_special_tokens_mask=self.embed.pooling == "mean")
        keys = [k for k in ("input_ids", "special_tokens_mask") if k in enc]
        return [{k: enc[k][i] for k in keys} for i in range(len(prompts))]

    @torch.inference_mode()
    def _embed(self, sentences: list[str]) -> np.ndarray:
        features = self._tokenize([self.prompt(s) for s in sentences])
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        decoder = decoder_of(self.model)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out = np.zeros((len(sentences), 0), dtype=np.float32)
        batches = range(0, len(order), self.batch_size)
        try:
            for start in tqdm(batches, desc="embedding", unit="batch", disable=not self.progress, mininterval=10):
                idx = order[start:start + self.batch_size]
                vectors = self._embed_batch([features[i] for i in idx], decoder, device)
                if out.shape[1] == 0:
                    out = np.zeros((len(sentences), vectors.shape[1]), dtype=np.float32)
                out[idx] = vectors
        finally:
            self.model.train(was_training)
        return out

    def _embed_batch(self, batch: list[dict], decoder: torch.nn.Module, device: torch.device) -> np.ndarray:
        width = max(len(f["input_ids"]) for f in batch)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, f in enumerate(batch):  # left padding: the last position is every prompt's last token
            n = len(f["input_ids"])
            input_ids[row, width - n:] = torch.tensor(f["input_ids"])
            attention[row, width - n:] = 1
        hidden = decoder(input_ids=input_ids.to(device), attention_mask=attention.to(device)).last_hidden_state
        if self.embed.pooling == "last":
            pooled = hidden[:, -1, :]
        else:
            keep = attention.clone()
            for row, f in enumerate(batch):
                n = len(f["input_ids"])
                keep[row, width - n:] -= torch.tensor(f["special_tokens_mask"], dtype=torch.long)
            keep = keep.to(device).unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        return pooled.float().cpu().numpy()
