"""Template + pooling: PromptEOL and Pretended CoT (last token of the prompt), mean pooling (no prompt).

The pooled vector is the last layer's hidden state after the final norm (``hidden_states[-1]`` of the causal LM), or
the layer ``output_layer`` names. A LoRA adapter on the model (SemPA or the contrastive foil) is used as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from sempa_exp.config.schema import Config, ConfigError, EmbedConfig, MethodSettings
from sempa_exp.data.prompts import embedding_prompt, fill
from sempa_exp.embedding.base import (
    EmbeddingMethod,
    decoder_hidden,
    decoder_hidden_after_prefix,
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
        method = cls(tokenizer, cfg.embed, cfg.eval.max_length, settings.output_layer,
                     share_prompt_prefix=cfg.eval.share_prompt_prefix)
        # A plain prompt adds nothing to the cache key, so it shares the cache of a training run's step 0.
        method.cache_key = {} if settings.output_layer is None else settings_cache_key(cfg, settings)
        return method

    def __init__(self, tokenizer: PreTrainedTokenizerBase, embed: EmbedConfig, max_length: int | None = None,
                 output_layer: int | None = None, share_prompt_prefix: bool = False) -> None:
        self.tokenizer = tokenizer
        self.embed = embed
        self.max_length = max_length
        self.output_layer = output_layer
        self.share_prompt_prefix = share_prompt_prefix
        self._prefix: list[int] | None = None

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

    def prompt_prefix(self) -> list[int]:
        """The token ids of the template's text before the sentence, as the prompts' tokenization starts."""
        if self._prefix is None:
            marker = "\ue000"
            filled = fill(self.embed.template, marker).lstrip()
            head = filled.split(marker)[0] if marker in filled else ""
            self._prefix = list(self.tokenizer(head)["input_ids"]) if head else []
        return self._prefix

    def shared_prefix_length(self, rows: Sequence[Sequence[int]]) -> int:
        """How many leading tokens of the template's prefix every row of the batch has (a sentence's first characters
        can merge with the prefix's last token), leaving each row at least one token of its own."""
        prefix = self.prompt_prefix()
        shared = len(prefix)
        for row in rows:
            same = 0
            while same < min(len(prefix), len(row)) and prefix[same] == row[same]:
                same += 1
            shared = min(shared, same, len(row) - 1)
        return max(shared, 0)

    def embed_batch(self, model: torch.nn.Module, batch: list[dict]) -> torch.Tensor:
        rows = [f["input_ids"] for f in batch]
        if self.share_prompt_prefix and self.embed.pooling == "last" and not self.compress_ids():
            shared = self.shared_prefix_length(rows)
            if shared > 0:  # eval.share_prompt_prefix: the prefix's cache reused by the whole batch
                hidden = decoder_hidden_after_prefix(decoder_of(model), rows[0][:shared], [r[shared:] for r in rows],
                                                     self.tokenizer.pad_token_id, self.output_layer)
                return pool(hidden, "last")
        input_ids, attention, _ = left_pad(rows, self.tokenizer.pad_token_id)
        hidden = decoder_hidden(decoder_of(model), input_ids.to(model_device(model)), attention, self.output_layer)
        keep = None
        if self.embed.pooling == "mean":
            keep = left_pad_mask([f["pool_mask"] for f in batch], input_ids.shape[1])
        return pool(hidden, self.embed.pooling, keep)
