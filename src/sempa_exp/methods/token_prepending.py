"""Token Prepending (Fu et al., ACL 2025): a placeholder token <PST> sits right before the sentence in the prompt; at
the input of each decoder layer in [start_layer, exit_layer) its hidden state is overwritten with the sentence
embedding decoded so far (the last token's hidden state entering that layer). Under causal attention the sentence's
early tokens then attend to a summary of the whole sentence. The embedding is the last token's final hidden state.

Done with forward hooks on the unchanged model: the placeholder is an existing token id whose input embedding is
replaced by zeros (an empty slot until the first prepending), so no vocabulary entry is added and no weight changes.
Hooks are removed after every batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from sempa_exp.methods.base import (
    EmbeddingMethod,
    decoder_hidden,
    decoder_of,
    hooks,
    left_pad,
    model_device,
    pool,
)
from sempa_exp.schema import ConfigError
from sempa_exp.templates import fill, prompteol_preprocess

# PromptEOL with the placeholder before the quoted sentence, as in the paper's prompts.
DEFAULT_TP_TEMPLATE = 'This sentence : {pst} "{s}" means in one word:"'


def _split_template(template: str) -> tuple[str, str]:
    if template.count("{pst}") != 1 or template.count("{s}") != 1 or template.index("{pst}") > template.index("{s}"):
        raise ConfigError(f"a token-prepending template needs one '{{pst}}' before one '{{s}}': {template!r}")
    before, after = template.split("{pst}")
    return before.rstrip(), after


class TokenPrependingMethod(EmbeddingMethod):
    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str = DEFAULT_TP_TEMPLATE, start_layer: int = 1,
                 exit_layer: int = 7, preprocess: bool = True, output_layer: int | None = None) -> None:
        self.before, self.after = _split_template(template)
        if not 0 <= start_layer < exit_layer:
            raise ConfigError(f"token prepending needs 0 <= method.start_layer < method.exit_layer, "
                              f"got {start_layer} and {exit_layer}")
        self.tokenizer = tokenizer
        self.start_layer = start_layer
        self.exit_layer = exit_layer
        self.preprocess = preprocess
        self.output_layer = output_layer
        self.placeholder_id = tokenizer.pad_token_id  # any id: its embedding is zeroed, then overwritten

    def features(self, sentences: Sequence[str]) -> list[dict]:
        head = self.tokenizer(self.before)["input_ids"]  # with BOS where the tokenizer adds one
        texts = [fill(self.after, prompteol_preprocess(s) if self.preprocess else s) for s in sentences]
        tails = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [{"input_ids": [*head, self.placeholder_id, *tail], "pst_index": len(head)} for tail in tails]

    def embed_batch(self, model: torch.nn.Module, batch: list[dict]) -> torch.Tensor:
        decoder = decoder_of(model)
        if self.exit_layer > len(decoder.layers):
            raise ConfigError(f"method.exit_layer={self.exit_layer} exceeds the model's {len(decoder.layers)} layers")
        input_ids, attention, offsets = left_pad([f["input_ids"] for f in batch], self.tokenizer.pad_token_id)
        rows = torch.arange(len(batch))
        pst = torch.as_tensor([off + f["pst_index"] for off, f in zip(offsets, batch, strict=True)])

        def empty_slot(_module, _args, output):
            output = output.clone()
            output[rows, pst] = 0
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
            if self.start_layer > 0:
                yield decoder.embed_tokens.register_forward_hook(empty_slot)
            for layer in decoder.layers[self.start_layer:self.exit_layer]:
                yield layer.register_forward_pre_hook(prepend, with_kwargs=True)

        with hooks(registrations()):
            hidden = decoder_hidden(decoder, input_ids.to(model_device(model)), attention, self.output_layer)
        return pool(hidden, "last")
