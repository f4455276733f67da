"""Echo embeddings (Springer et al., "Repetition Improves Language Model Embeddings"): the sentence is written twice
in one prompt and the embedding is the mean of the hidden states of the *second* copy's tokens only. Under causal
attention those tokens have already read the whole sentence once, which a single pass cannot give early tokens.

The second copy's tokens are found from the tokenizer's character offsets of the one prompt (so the text is tokenized
exactly as the model sees it), not by tokenizing pieces separately.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from sempa_exp.methods.base import (
    EmbeddingMethod,
    decoder_hidden,
    decoder_of,
    left_pad,
    left_pad_mask,
    model_device,
    pool,
)
from sempa_exp.schema import ConfigError

# A zero-shot echo prompt in the form Springer et al. describe (instruction, the text, a cue, the text again);
# the exact wording of their MTEB prompts varies by task. method.template overrides it.
DEFAULT_ECHO_TEMPLATE = "Rewrite the sentence: {s}, rewritten sentence: {s}"


def echo_prompt(template: str, sentence: str) -> tuple[str, tuple[int, int]]:
    """The prompt and the character span [start, end) of the sentence's second occurrence in it."""
    parts = template.split("{s}")
    if len(parts) != 3:
        raise ConfigError(f"an echo template must contain '{{s}}' exactly twice: {template!r}")
    before, middle, after = parts
    start = len(before) + len(sentence) + len(middle)
    return before + sentence + middle + sentence + after, (start, start + len(sentence))


class EchoMethod(EmbeddingMethod):
    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str = DEFAULT_ECHO_TEMPLATE,
                 max_length: int | None = None, output_layer: int | None = None) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("echo embeddings need a fast tokenizer (character offsets locate the second copy)")
        echo_prompt(template, "x")  # fails early on a template without two {s}
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.output_layer = output_layer

    def features(self, sentences: Sequence[str]) -> list[dict]:
        built = [echo_prompt(self.template, s) for s in sentences]
        prompts, spans = [p for p, _ in built], [span for _, span in built]
        enc = self.tokenizer(prompts, return_offsets_mapping=True, return_special_tokens_mask=True)
        out = []
        for i, (start, end) in enumerate(spans):
            ids, offsets = enc["input_ids"][i], enc["offset_mapping"][i]
            special = enc["special_tokens_mask"][i]
            # a token belongs to the second copy when its characters overlap the copy's span
            mask = [int(not sp and a < end and b > start) for (a, b), sp in zip(offsets, special, strict=True)]
            if not any(mask):
                raise ValueError(f"echo: no token of the second copy found for {sentences[i]!r}")
            if self.max_length is not None and len(ids) > self.max_length:  # keep the end: the second copy
                ids, mask = ids[-self.max_length:], mask[-self.max_length:]
            out.append({"input_ids": ids, "pool_mask": mask})
        return out

    def embed_batch(self, model: torch.nn.Module, batch: list[dict]) -> torch.Tensor:
        input_ids, attention, _ = left_pad([f["input_ids"] for f in batch], self.tokenizer.pad_token_id)
        hidden = decoder_hidden(decoder_of(model), input_ids.to(model_device(model)), attention, self.output_layer)
        keep = left_pad_mask([f["pool_mask"] for f in batch], input_ids.shape[1])
        return pool(hidden, "mean", keep)
