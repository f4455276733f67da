"""What every embedding method shares: the interface SentenceEncoder drives, left padding, the decoder forward, pooling.

A method turns sentences into model inputs (``features``) and one batch of those inputs into vectors (``embed_batch``).
SentenceEncoder owns everything else: de-duplication, length-sorted batching, eval mode, memoisation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from sempa_exp.config.schema import LAYER_SETTINGS, Config, MethodSettings
from sempa_exp.models.architecture import decoder_parts


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer stack below the LM head, through a PEFT wrapper if there is one (LoRA layers stay active);
    found by architecture (sempa_exp.models.architecture), an unsupported one is refused by name."""
    return decoder_parts(model).decoder


def lm_head_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output projection onto the vocabulary, or None for encoders without one."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def settings_cache_key(cfg: Config, settings: MethodSettings) -> dict:
    """The disk-cache key part of a training-free method: its whole config with the settings it runs with."""
    from omegaconf import OmegaConf

    method = OmegaConf.to_container(OmegaConf.structured(cfg.method))
    return {"method": {**method, **{k: getattr(settings, k) for k in LAYER_SETTINGS}}}


@dataclass
class LoadedMethod:
    model: torch.nn.Module
    tokenizer: Any
    method: EmbeddingMethod
    #: provenance to record with the results (adapter folder, sbert model folder, ...)
    info: dict = field(default_factory=dict)


class EmbeddingMethod(ABC):
    """How one sentence becomes model input and one batch of inputs becomes vectors.

    A method is chosen by ``method._target_`` (conf/method/*.yaml). The class methods below are what the evaluate
    entry uses: ``check_config`` before any model loads, ``load`` to get the model and the method object.
    """

    #: what determines the vectors besides the backbone, dtype, embed config and max_length (the key parts of
    #: evaluation.EmbeddingCache); None = never cache them on disk (e.g. trained adapters)
    cache_key: dict | None = None
    #: whether the vectors live in the LM's hidden space, so projecting them through the LM head means something
    has_lm_head: bool = True
    #: MethodSettings fields the method cannot run without (backbone.methods.<name> or method.<key>=)
    required_settings: tuple[str, ...] = ()
    #: whether the vectors come from the ``embed`` prompt (the results then name it)
    uses_embed: bool = False
    #: whether the method runs on the decoder backbone (False: an encoder of its own; results name no backbone)
    uses_backbone: bool = True

    @abstractmethod
    def features(self, sentences: Sequence[str]) -> list[dict]:
        """One dict per sentence; ``input_ids`` (a list) is required: batches are formed by its length."""

    @abstractmethod
    def embed_batch(self, model: torch.nn.Module, batch: list[dict]) -> torch.Tensor:
        """(batch, dim) vectors for a batch of ``features`` dicts."""

    @classmethod
    def check_config(cls, cfg: Config, settings: MethodSettings) -> None:
        """Checks of the method's config that need no model; raises ConfigError naming the key."""
        return None

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Config, settings: MethodSettings, tokenizer: Any) -> EmbeddingMethod:
        """The method object for a loaded decoder backbone's tokenizer."""

    @classmethod
    def load(cls, cfg: Config, settings: MethodSettings, device: torch.device) -> LoadedMethod:
        """The backbone in ``cfg.eval.dtype`` on ``device`` and the method object; methods with a model of their own
        (an encoder, an adapter) override this."""
        from sempa_exp.models.backbones import load_backbone

        model, tokenizer = load_backbone(cfg.backbone, cfg.paths.cache_dir, dtype=cfg.eval.dtype)
        model.to(device)
        return LoadedMethod(model, tokenizer, cls.from_config(cfg, settings, tokenizer))


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(input_ids, attention_mask, offsets): left padding puts every sequence's last token at position -1;
    ``offsets[row]`` is where that row's first real token sits."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    offsets = []
    for row, seq in enumerate(sequences):
        start = width - len(seq)
        input_ids[row, start:] = torch.as_tensor(list(seq), dtype=torch.long)
        attention[row, start:] = 1
        offsets.append(start)
    return input_ids, attention, offsets


def left_pad_mask(masks: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """Per-token 0/1 masks aligned with :func:`left_pad` rows of the given width."""
    out = torch.zeros((len(masks), width), dtype=torch.long)
    for row, mask in enumerate(masks):
        out[row, width - len(mask):] = torch.as_tensor(list(mask), dtype=torch.long)
    return out


def decoder_hidden(decoder: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor,
                   output_layer: int | Sequence[int] | None = None) -> torch.Tensor:
    """Hidden states (batch, seq, dim) of the final layer after the final norm, or of ``hidden_states[output_layer]``
    (0 = token embeddings, k = output of decoder layer k - 1 before any norm, -1 = final after norm) when an early
    exit is asked for. Several layers (a sequence) come concatenated along the last axis: (batch, seq, k * dim), so
    one forward scores every candidate layer of a selection."""
    device = input_ids.device
    if output_layer is None:
        return decoder(input_ids=input_ids, attention_mask=attention.to(device), use_cache=False).last_hidden_state
    out = decoder(input_ids=input_ids, attention_mask=attention.to(device), use_cache=False, output_hidden_states=True)
    if isinstance(output_layer, int):
        return out.hidden_states[output_layer]
    return torch.cat([out.hidden_states[i] for i in output_layer], dim=-1)


def decoder_hidden_after_prefix(decoder: torch.nn.Module, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                                pad_id: int, output_layer: int | None = None) -> torch.Tensor:
    """``decoder_hidden`` of the rows ``prefix + suffix``, the shared prefix run once: its key/value cache is repeated
    over the batch and the suffixes (left padded after it, positions continuing from it) attend to it. The same
    tokens, so the same computation as the full rows (the result covers the suffix positions only)."""
    device = next(decoder.parameters()).device
    width = len(prefix)
    cache = decoder(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(suffixes))
    input_ids, attention, _ = left_pad(suffixes, pad_id)
    mask = torch.cat([torch.ones((len(suffixes), width), dtype=attention.dtype), attention], dim=1).to(device)
    positions = (width + attention.cumsum(dim=1) - 1).clamp(min=width).to(device)  # a pad's position is masked out
    out = decoder(input_ids=input_ids.to(device), attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=True, output_hidden_states=output_layer is not None)
    return out.last_hidden_state if output_layer is None else out.hidden_states[output_layer]


def pool(hidden: torch.Tensor, pooling: str, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``last``: the last position (left padding: every row's final token); ``mean``: the mean over ``keep``."""
    if pooling == "last":
        return hidden[:, -1, :]
    if keep is None:
        raise ValueError("mean pooling needs a mask of the positions to average")
    weights = keep.to(hidden.device, hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


@contextmanager
def hooks(registrations: Iterable[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """Keeps the hooks (registered as ``registrations`` is consumed, e.g. a generator) for the block and removes every
    one of them on exit, also after an error."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for handle in registrations:
            handles.append(handle)
        yield
    finally:
        for handle in handles:
            handle.remove()
