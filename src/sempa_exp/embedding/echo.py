"""Echo embeddings (Springer et al., 2024), as the authors' ``echo_embeddings.py`` computes them: the sentence written
twice in a prompt, the mean of the final hidden states over the tokens of the second copy and the closing EOS.

The template is in the authors' syntax: literal text, and brace pieces ``{...}`` holding ``%%text%%`` (the sentence)
or a special token; a brace piece starting with ``!`` is not pooled, every other one is. Each piece is tokenized on
its own (no special tokens added) and the ids are concatenated, which is what their parser does; ``<s>`` and ``</s>``
stand for the backbone's BOS (only where its tokenizer adds one: the authors' Llama/Mistral do, SmolLM2 does not)
and EOS token. The default is their zero-shot prompt, ``<s>Rewrite the sentence: {!%%text%%}, rewritten sentence:
{%%text%%}{</s>}``. The sentence is inserted as it is (no PromptEOL clean-up).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from sempa_exp.config.schema import Config, ConfigError, MethodSettings
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

DEFAULT_ECHO_TEMPLATE = "<s>Rewrite the sentence: {!%%text%%}, rewritten sentence: {%%text%%}{</s>}"
SENTENCE = "%%text%%"
_BRACES = re.compile(r"\{[\s\S]+?\}")


@dataclass(frozen=True)
class Piece:
    text: str
    slot: bool  # a brace piece (filled per sentence)
    pooled: bool


def parse_template(template: str) -> list[Piece]:
    pieces, end = [], 0
    for match in _BRACES.finditer(template):
        if match.start() > end:
            pieces.append(Piece(template[end:match.start()], slot=False, pooled=False))
        body = match.group()[1:-1]
        hidden = body.startswith("!")
        pieces.append(Piece(body[1:] if hidden else body, slot=True, pooled=not hidden))
        end = match.end()
    if end < len(template):
        pieces.append(Piece(template[end:], slot=False, pooled=False))
    copies = [p for p in pieces if p.slot and SENTENCE in p.text]
    if not any(p.pooled for p in copies) or not any(not p.pooled for p in copies):
        raise ConfigError(f"an echo template needs the sentence twice, '{{!{SENTENCE}}}' (read) and then "
                          f"'{{{SENTENCE}}}' (pooled): {template!r}")
    return pieces


class EchoMethod(EmbeddingMethod):
    @classmethod
    def from_config(cls, cfg: Config, settings: MethodSettings, tokenizer) -> EchoMethod:
        method = cls(tokenizer, cfg.method.template or DEFAULT_ECHO_TEMPLATE, cfg.eval.max_length,
                     settings.output_layer)
        method.cache_key = settings_cache_key(cfg, settings)
        return method

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str = DEFAULT_ECHO_TEMPLATE,
                 max_length: int | None = None, output_layer: int | Sequence[int] | None = None) -> None:
        self.pieces = parse_template(template)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.output_layer = output_layer
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        self.specials = {"<s>": [tokenizer.bos_token_id] if adds_bos else [], "</s>": [tokenizer.eos_token_id]}

    def _ids(self, text: str) -> list[int]:
        ids: list[int] = []
        # <s> / </s> are the backbone's own special tokens wherever they stand; the rest is tokenized as text
        for part in re.split(r"(<s>|</s>)", text):
            if part in self.specials:
                ids += self.specials[part]
            elif part:
                ids += self.tokenizer(part, add_special_tokens=False)["input_ids"]
        return ids

    def features(self, sentences: Sequence[str]) -> list[dict]:
        fixed = {i: self._ids(p.text) for i, p in enumerate(self.pieces) if not p.slot or SENTENCE not in p.text}
        out = []
        for sentence in sentences:
            ids: list[int] = []
            mask: list[int] = []
            for i, piece in enumerate(self.pieces):
                piece_ids = fixed[i] if i in fixed else self._ids(piece.text.replace(SENTENCE, sentence))
                ids += piece_ids
                mask += [int(piece.pooled)] * len(piece_ids)
            if self.max_length is not None and len(ids) > self.max_length:  # keep the end: the pooled copy
                ids, mask = ids[-self.max_length:], mask[-self.max_length:]
            out.append({"input_ids": ids, "pool_mask": mask})
        return out

    def embed_batch(self, model: torch.nn.Module, batch: list[dict]) -> torch.Tensor:
        input_ids, attention, _ = left_pad([f["input_ids"] for f in batch], self.tokenizer.pad_token_id)
        hidden = decoder_hidden(decoder_of(model), input_ids.to(model_device(model)), attention, self.output_layer)
        keep = left_pad_mask([f["pool_mask"] for f in batch], input_ids.shape[1])
        return pool(hidden, "mean", keep)
