"""Template + pooling: PromptEOL and Pretended CoT (last token of the prompt), mean pooling (no prompt).

The pooled vector is the last layer's hidden state after the final norm (``hidden_states[-1]`` of the causal LM), or
the layer ``output_layer`` names. A LoRA adapter on the model (SemPA or the contrastive foil) is used as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from sempa_exp.config.schema import Config, ConfigError, EmbedConfig, MethodSettings
from sempa_exp.data.prompts import embedding_prompt
from sempa_exp.embedding.base import (
    EmbeddingMethod,
    decoder_hidden,
    decoder_of,
    left_pad,
    left_pad_mask,
    model_device,
    pool,
    settings_cache_key,
)
from sempa_exp.models.compress_tokens import compress_token_names


class PromptMethod(EmbeddingMethod):
    """PromptEOL, Pretended CoT (the ``embed`` prompt's last token) and mean pooling (``embed=mean``)."""

    uses_embed = True

    @classmethod
    def from_config(cls, cfg: Config, settings: MethodSettings, tokenizer) -> PromptMethod:
        method = cls(tokenizer, cfg.embed, cfg.eval.max_length, settings.output_layer)
        # A plain prompt adds nothing to the cache key, so it shares the cache of a training run's step 0.
        method.cache_key = {} if settings.output_layer is None else settings_cache_key(cfg, settings)
        return method

    def __init__(self, tokenizer: PreTrainedTokenizerBase, embed: EmbedConfig, max_length: int | None = None,
                 output_layer: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.embed = embed
        self.max_length = max_length
        self.output_layer = output_layer

    def prompt(self, sentence: str) -> str:
        return embedding_prompt(self.embed.template, sentence, self.embed.prompteol_preprocess)

    def features(self, sentences: Sequence[str]) -> list[dict]:
        mean = self.embed.pooling == "mean"
        enc = self.tokenizer([self.prompt(s) for s in sentences], truncation=self.max_length is not None,
                             max_length=self.max_length, return_special_tokens_mask=mean)
        compress = self.compress_ids()
        out = []
        for i in range(len(sentences)):
            row = {"input_ids": enc["input_ids"][i]}
            if compress:  # AutoRegEmbed: the mean over the <EMBED*> tokens appended to the prompt
                row = {"input_ids": row["input_ids"] + compress,
                       "pool_mask": [0] * len(row["input_ids"]) + [1] * len(compress)}
            elif mean:  # average over the sentence's own tokens, not BOS/EOS
                row["pool_mask"] = [1 - m for m in enc["special_tokens_mask"][i]]
            out.append(row)
        return out

    def compress_ids(self) -> list[int]:
        """The ids of the ``embed.compress_tokens`` <EMBED*> tokens (none for other prompts)."""
        k = self.embed.compress_tokens
        if not k:
            return []
        names = compress_token_names(k)
        ids = self.tokenizer.convert_tokens_to_ids(names)
        if any(i is None or i == self.tokenizer.unk_token_id for i in ids):
            raise ConfigError(f"embed={self.embed.name} reads {k} <EMBED*> tokens the tokenizer does not have: only "
                              f"a model trained with an autoregembed objective has them (evaluate its run with "
                              f"method=checkpoint)")
        return ids

    def embed_batch(self, model: torch.nn.Module, batch: list[dict]) -> torch.Tensor:
        input_ids, attention, _ = left_pad([f["input_ids"] for f in batch], self.tokenizer.pad_token_id)
        hidden = decoder_hidden(decoder_of(model), input_ids.to(model_device(model)), attention, self.output_layer)
        keep = None
        if self.embed.pooling == "mean":
            keep = left_pad_mask([f["pool_mask"] for f in batch], input_ids.shape[1])
        return pool(hidden, self.embed.pooling, keep)
