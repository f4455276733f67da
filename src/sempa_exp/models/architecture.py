"""The one place that knows where a decoder LLM keeps its parts: the methods that hook into a model (token
prepending, contrastive prompting) and the pooling every decoder method shares ask :func:`decoder_parts` for them,
never for a module name of one architecture.

An architecture is supported when its ``config.model_type`` is listed in :data:`ARCHITECTURES`; any other stops with a
message naming it and the supported ones (adding one is one entry, once its module layout has been checked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sempa_exp.config.schema import ConfigError


@dataclass(frozen=True)
class Layout:
    """Attribute paths inside the decoder stack (the module below the LM head) and inside one decoder layer."""

    embed_tokens: str = "embed_tokens"  # token embeddings, as the first layer receives them (Gemma scales inside)
    layers: str = "layers"
    final_norm: str = "norm"
    attention_out: str = "self_attn.o_proj"  # its input: the heads' attention outputs, concatenated


LLAMA_LAYOUT = Layout()

#: config.model_type -> module layout. Gemma 3 keeps Llama's names (its extra norms sit inside each layer and do not
#: change what the methods hook: the layer input, the o_proj input, the stack's output after the final norm).
ARCHITECTURES: dict[str, Layout] = {
    "llama": LLAMA_LAYOUT,
    "mistral": LLAMA_LAYOUT,
    "qwen2": LLAMA_LAYOUT,
    "gemma": LLAMA_LAYOUT,
    "gemma2": LLAMA_LAYOUT,
    "gemma3_text": LLAMA_LAYOUT,
}


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


@dataclass(frozen=True)
class DecoderParts:
    model_type: str
    decoder: torch.nn.Module  # the transformer stack below the LM head (LoRA layers inside stay active)
    embed_tokens: torch.nn.Module
    layers: torch.nn.ModuleList
    final_norm: torch.nn.Module
    layout: Layout

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention_output_projection(self, layer: int) -> torch.nn.Module:
        """The output projection of decoder layer ``layer``'s attention (its input is the contextualized values)."""
        if not -self.num_layers <= layer < self.num_layers:
            raise ConfigError(f"method.layer={layer} is outside the model's {self.num_layers} layers")
        return _get(self.layers[layer], self.layout.attention_out)


def base_of(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM under a PEFT wrapper, if there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_type_of(model: torch.nn.Module) -> str | None:
    config = getattr(base_of(model), "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "model_type", None)


def decoder_parts(model: torch.nn.Module) -> DecoderParts:
    """The decoder stack of a causal LM (or of the stack itself) and its parts, by architecture."""
    model_type = model_type_of(model)
    layout = ARCHITECTURES.get(model_type)
    if layout is None:
        raise ConfigError(f"decoder architecture {model_type!r} is not supported by the embedding methods; supported: "
                          f"{', '.join(sorted(ARCHITECTURES))} (sempa_exp.models.architecture.ARCHITECTURES)")
    base = base_of(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    try:
        return DecoderParts(model_type, decoder, _get(decoder, layout.embed_tokens), _get(decoder, layout.layers),
                            _get(decoder, layout.final_norm), layout)
    except AttributeError as exc:
        raise ConfigError(f"the {model_type!r} model does not have the module layout listed for it in "
                          f"sempa_exp.models.architecture.ARCHITECTURES: {exc}") from exc
