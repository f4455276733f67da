"""Contrastive Prompting (Cheng et al., ACL 2025): an auxiliary prompt asks for the sentence's *irrelevant*
information; at one attention layer the last token's contextualized value vector of the normal prompt (the attention
output before the output projection) is replaced by its difference with the auxiliary prompt's, so the rest of the
forward pass carries less non-essential content into the last token.

Per batch: (1) the auxiliary prompts run up to the attention of layer ``layer`` only (the pass is stopped there) and
their last-token contextualized values are captured; (2) the normal prompts run in full with that layer's value at the
last token replaced by ``alpha * (v_nor - v_aux)`` (norm="scaled", the paper's norm scaling) or by
``(v_nor - v_aux) * |v_nor| / (|v_nor - v_aux| + 1e-7)`` (norm="preserve", norm preservation). The embedding is the
last token's ``hidden_states[output_layer]``: the authors exit early (layer 27 of 32 on LLaMA-2-7B, -2 on LLaMA-3-8B)
and choose layer, alpha and exit per backbone (backbone.methods.contrastive_prompting). Everything happens in forward
pre-hooks that are removed after each batch; no weight and no model file is changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from sempa_exp.config.schema import Config, ConfigError, EmbedConfig, MethodSettings
from sempa_exp.data.prompts import embedding_prompt
from sempa_exp.embedding.base import (
    EmbeddingMethod,
    decoder_hidden,
    hooks,
    left_pad,
    model_device,
    pool,
    settings_cache_key,
)
from sempa_exp.models.architecture import decoder_parts

# The paper's auxiliary prompt, with the spacing of this project's PromptEOL template.
DEFAULT_AUX_TEMPLATE = 'The irrelevant information of this sentence : "{s}" means in one word:"'
NORMS = ("scaled", "preserve")


class _AuxiliaryCaptured(Exception):
    """Raised from the hook to stop the auxiliary pass once the value it is needed for exists."""


def steer(v_normal: torch.Tensor, v_aux: torch.Tensor, norm: str, alpha: float) -> torch.Tensor:
    delta = v_normal - v_aux
    if norm == "scaled":
        return alpha * delta
    return delta * v_normal.norm(dim=-1, keepdim=True) / (delta.norm(dim=-1, keepdim=True) + 1e-7)  # the authors' eps


class ContrastivePromptingMethod(EmbeddingMethod):
    required_settings = ("layer", "alpha")
    uses_embed = True

    @classmethod
    def check_config(cls, cfg: Config, settings: MethodSettings) -> None:
        if cfg.embed.pooling != "last":
            raise ConfigError("method=contrastive_prompting steers the last token: it needs an embed with pooling=last")

    @classmethod
    def from_config(cls, cfg: Config, settings: MethodSettings, tokenizer) -> ContrastivePromptingMethod:
        method = cls(tokenizer, cfg.embed, cfg.method.template or DEFAULT_AUX_TEMPLATE, settings.layer, settings.alpha,
                     cfg.method.norm, cfg.eval.max_length, settings.output_layer)
        method.cache_key = settings_cache_key(cfg, settings)
        return method

    def __init__(self, tokenizer: PreTrainedTokenizerBase, embed: EmbedConfig, aux_template: str = DEFAULT_AUX_TEMPLATE,
                 layer: int = 4, alpha: float = 0.5, norm: str = "scaled", max_length: int | None = None,
                 output_layer: int | Sequence[int] | None = None) -> None:
        if embed.pooling != "last":
            raise ConfigError("contrastive prompting steers the last token: embed.pooling must be 'last'")
        if norm not in NORMS:
            raise ConfigError(f"method.norm={norm!r} is not valid; choose one of: {', '.join(NORMS)}")
        if aux_template.count("{s}") != 1:
            raise ConfigError(f"the auxiliary template must contain '{{s}}' exactly once: {aux_template!r}")
        self.tokenizer = tokenizer
        self.embed = embed
        self.aux_template = aux_template
        self.layer = layer
        self.alpha = alpha
        self.norm = norm
        self.max_length = max_length
        self.output_layer = output_layer

    def _ids(self, template: str, sentences: Sequence[str]) -> list[list[int]]:
        prompts = [embedding_prompt(template, s, self.embed.prompteol_preprocess) for s in sentences]
        enc = self.tokenizer(prompts, truncation=self.max_length is not None, max_length=self.max_length)
        return list(enc["input_ids"])

    def features(self, sentences: Sequence[str]) -> list[dict]:
        normal, aux = self._ids(self.embed.template, sentences), self._ids(self.aux_template, sentences)
        return [{"input_ids": n, "aux_ids": a} for n, a in zip(normal, aux, strict=True)]

    def auxiliary_values(self, model: torch.nn.Module, batch: list[dict]) -> torch.Tensor:
        """(batch, hidden) contextualized values at the last token of the auxiliary prompts, at ``layer``."""
        parts = decoder_parts(model)
        captured: list[torch.Tensor] = []

        def capture(_module, args):
            captured.append(args[0][:, -1, :].detach().clone())
            raise _AuxiliaryCaptured

        input_ids, attention, _ = left_pad([f["aux_ids"] for f in batch], self.tokenizer.pad_token_id)
        device = model_device(model)
        projection = parts.attention_output_projection(self.layer)
        with hooks([projection.register_forward_pre_hook(capture)]), contextlib.suppress(_AuxiliaryCaptured):
            parts.decoder(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
        if not captured:
            raise RuntimeError(f"layer {self.layer}'s attention never ran on the auxiliary prompts")
        return captured[0]

    def embed_batch(self, model: torch.nn.Module, batch: list[dict]) -> torch.Tensor:
        v_aux = self.auxiliary_values(model, batch)
        parts = decoder_parts(model)

        def intervene(_module, args):
            values = args[0].clone()
            values[:, -1, :] = steer(values[:, -1, :], v_aux.to(values.dtype), self.norm, self.alpha)
            return (values, *args[1:])

        input_ids, attention, _ = left_pad([f["input_ids"] for f in batch], self.tokenizer.pad_token_id)
        projection = parts.attention_output_projection(self.layer)
        with hooks([projection.register_forward_pre_hook(intervene)]):
            hidden = decoder_hidden(parts.decoder, input_ids.to(model_device(model)), attention, self.output_layer)
        return pool(hidden, "last")
