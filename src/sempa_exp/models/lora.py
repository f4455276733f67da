"""A LoRA adapter folded into its backbone's weights for the duration of an evaluation.

An unmerged adapter adds two small matmuls per adapted layer to every forward (on CPU the many small kernels cost
more than their FLOPs: a checkpoint's evaluation ran 1.65x slower than the bare backbone's). Folded, the forward is
the bare backbone's. PEFT's ``merge_adapter``/``unmerge_adapter`` would change the weights in place and subtract the
delta again afterwards, which in bf16 does not give the original weights back; here each adapted weight is replaced by
a new tensor ``W + delta`` (summed in fp32, rounded once to the weight's dtype) and the original tensor is put back
when the block ends, bit for bit. Extra memory: one copy of the adapted weights while the block runs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger(__name__)


def fold_lora(model: torch.nn.Module) -> Callable[[], None] | None:
    """Folds ``model``'s active LoRA deltas into new base weight tensors and switches the adapter layers off; returns
    the function that puts the original tensors back and the layers on, or None when nothing was folded: no LoRA
    layers, or LoRA layers of another kind than Linear (embedding, convolution) or already merged (a warning)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or not hasattr(model, "base_model") or not hasattr(model.base_model, "disable_adapter_layers"):
        return None
    if any(not isinstance(m, LoraLinear) or m.merged for m in layers):
        log.warning("the adapter has non-Linear or already merged LoRA layers: evaluated unmerged")
        return None
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    with torch.no_grad():
        for layer in layers:
            weight = layer.get_base_layer().weight
            folded = weight.data.to(torch.float32, copy=True)  # never .float(): a no-op alias on fp32 weights
            for adapter in [a for a in layer.active_adapters if a in layer.lora_A]:
                folded += layer.get_delta_weight(adapter).float()
            saved.append((weight, weight.data))
            weight.data = folded.to(weight.dtype)
    model.base_model.disable_adapter_layers()

    def unfold() -> None:
        for weight, original in saved:
            weight.data = original
        model.base_model.enable_adapter_layers()

    return unfold


@contextlib.contextmanager
def lora_folded(model: torch.nn.Module, enabled: bool = True) -> Iterator[torch.nn.Module]:
    """Inside the block ``model`` computes with its LoRA deltas folded in (:func:`fold_lora`); afterwards it is exactly
    the model it was, exception or not. ``enabled=False``: the model as it is."""
    unfold = fold_lora(model) if enabled else None
    try:
        yield model
    finally:
        if unfold is not None:
            unfold()
