"""Token Prepending (Fu et al., ACL 2025), as the authors' code computes it: a new placeholder token ``<PST>`` stands
before the quoted sentence (``This sentence : <PST> "..." means in one word:"``, the whole prompt tokenized in one
call, so the space before the placeholder stays a token of its own); its input embedding is one N(0, I) vector drawn
once (seeded). At the input of each decoder layer in [start_layer, exit_layer) the placeholder's hidden state is
overwritten with the last token's (the sentence embedding decoded so far, raw residual stream). Under causal
attention the sentence's tokens then attend to a summary of the whole sentence. The embedding is the last token's
``hidden_states[output_layer]`` (the authors exit early: layer 27 of 32 on LLaMA-2-7B, -2 elsewhere).

Done with forward hooks on the unchanged model: the placeholder is added to a private copy of the tokenizer, its id
is swapped for an existing one before the forward and the embedding output at its position is replaced by the drawn
vector (times the embedding's own scale, e.g. Gemma's sqrt(d), as for any row of the table). No vocabulary entry is
added to the model and no weight changes; hooks are removed after every batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from sempa_exp.config.schema import Config, ConfigError, MethodSettings
from sempa_exp.data.prompts import fill, prompteol_preprocess
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

PLACEHOLDER = "<PST>"
# PromptEOL with the placeholder before the quoted sentence (the authors' evaluate.py prompt).
DEFAULT_TP_TEMPLATE = 'This sentence : {pst} "{s}" means in one word:"'


def placeholder_vector(dim: int, seed: int) -> torch.Tensor:
    """The placeholder's input embedding: N(0, I) in float32 from a seeded CPU generator. The authors draw one such
    vector with torch.randn on their GPU after seeding 3407; that exact draw cannot be reproduced off their GPU."""
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


class TokenPrependingMethod(EmbeddingMethod):
    required_settings = ("start_layer", "exit_layer")

    @classmethod
    def check_config(cls, cfg: Config, settings: MethodSettings) -> None:
        if not 0 <= settings.start_layer < settings.exit_layer:
            raise ConfigError(f"method.start_layer={settings.start_layer} and method.exit_layer={settings.exit_layer}:"
                              f" need 0 <= start_layer < exit_layer")

    @classmethod
    def from_config(cls, cfg: Config, settings: MethodSettings, tokenizer) -> TokenPrependingMethod:
        method = cls(tokenizer, cfg.method.template or DEFAULT_TP_TEMPLATE, settings.start_layer, settings.exit_layer,
                     cfg.embed.prompteol_preprocess, settings.output_layer, cfg.method.pst_seed)
        method.cache_key = settings_cache_key(cfg, settings)
        return method

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str = DEFAULT_TP_TEMPLATE, start_layer: int = 1,
                 exit_layer: int = 7, preprocess: bool = True, output_layer: int | Sequence[int] | None = None,
                 seed: int = 3407) -> None:
        if template.count("{pst}") != 1 or template.count("{s}") != 1 or template.index("{pst}") > template.index(
                "{s}"):
            raise ConfigError(f"a token-prepending template needs one '{{pst}}' before one '{{s}}': {template!r}")
        if not 0 <= start_layer < exit_layer:
            raise ConfigError(f"token prepending needs 0 <= method.start_layer < method.exit_layer, "
                              f"got {start_layer} and {exit_layer}")
        self.tokenizer = tokenizer
        self.prompt_tokenizer = copy.deepcopy(tokenizer)
        self.prompt_tokenizer.add_tokens([PLACEHOLDER])
        self.pst_id = self.prompt_tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        self.template = template.replace("{pst}", PLACEHOLDER)
        self.start_layer = start_layer
        self.exit_layer = exit_layer
        self.preprocess = preprocess
        self.output_layer = output_layer
        self.seed = seed
        self._vector: torch.Tensor | None = None

    def features(self, sentences: Sequence[str]) -> list[dict]:
        texts = [fill(self.template, prompteol_preprocess(s) if self.preprocess else s).strip() for s in sentences]
        out = []
        for ids in self.prompt_tokenizer(texts)["input_ids"]:
            if ids.count(self.pst_id) != 1:
                raise ValueError(f"token prepending: the placeholder is not one token in {ids}")
            index = ids.index(self.pst_id)
            ids = list(ids)
            ids[index] = self.tokenizer.pad_token_id  # any existing id: its embedding is replaced below
            out.append({"input_ids": ids, "pst_index": index})
        return out

    def embed_batch(self, model: torch.nn.Module, batch: list[dict]) -> torch.Tensor:
        parts = decoder_parts(model)
        if self.exit_layer > parts.num_layers:
            raise ConfigError(f"method.exit_layer={self.exit_layer} exceeds the model's {parts.num_layers} layers")
        input_ids, attention, offsets = left_pad([f["input_ids"] for f in batch], self.tokenizer.pad_token_id)
        rows = torch.arange(len(batch))
        pst = torch.as_tensor([off + f["pst_index"] for off, f in zip(offsets, batch, strict=True)])
        if self._vector is None:
            self._vector = placeholder_vector(parts.embed_tokens.weight.shape[1], self.seed)

        def placeholder_embedding(module, _args, output):
            output = output.clone()
            row = self._vector.to(output.device, module.weight.dtype)  # as a row of the table would be stored
            scale = getattr(module, "embed_scale", None)  # embeddings that scale their rows (Gemma) scale this one too
            if scale is not None:
                row = row * torch.as_tensor(scale).to(row.device, module.weight.dtype)
            output[rows, pst] = row.to(output.dtype)
            return output

        def prepend(_module, args, kwargs):
            if args:
                hidden, args = args[0], args[1:]
            else:
                hidden = kwargs.pop("hidden_states")
            hidden = hidden.clone()
            hidden[rows, pst] = hidden[:, -1, :].clone()  # the sentence embedding entering this layer
            return (hidden, *args), kwargs

        def registrations():
            yield parts.embed_tokens.register_forward_hook(placeholder_embedding)
            for layer in parts.layers[self.start_layer:self.exit_layer]:
                yield layer.register_forward_pre_hook(prepend, with_kwargs=True)

        with hooks(registrations()):
            hidden = decoder_hidden(parts.decoder, input_ids.to(model_device(model)), attention, self.output_layer)
        return pool(hidden, "last")
