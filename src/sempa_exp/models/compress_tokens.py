"""The <EMBED*> tokens AutoRegEmbed adds to a backbone (sempa_exp.objectives.autoregembed), and loading a model it
trained back: shared by the objective, the ``embed=autoregembed`` read-out and ``method=checkpoint``."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sempa_exp.config.schema import ConfigError

ADAPTER_CONFIG = "adapter_config.json"


def compress_token_names(k: int) -> list[str]:
    return [f"<EMBED{i}>" for i in range(k)]


def add_compress_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, k: int,
                        seed: int) -> list[int]:
    """Adds ``<EMBED0..k-1>`` to the tokenizer (special tokens) and rows for them to the model's embeddings, as the
    authors do (transformers' mean resizing, here seeded); a no-op when the tokenizer has them. Returns their ids."""
    names = compress_token_names(k)
    if any(tokenizer.convert_tokens_to_ids(n) in (None, tokenizer.unk_token_id) for n in names):
        tokenizer.add_tokens(names, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(names)
    rows = model.get_input_embeddings().weight.shape[0]
    if max(ids) >= rows:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model.resize_token_embeddings(max(ids) + 1)
    return ids


def original_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, k: int) -> int:
    """Rows of the LM head that the frozen decoder scores over: the vocabulary before the EMBED tokens."""
    return min(tokenizer.convert_tokens_to_ids(compress_token_names(k)))


def full_weights_folder(path: Path) -> Path | None:
    """The folder of a fully fine-tuned model (config.json and weights, no adapter_config.json) at or under ``path``."""
    for candidate in (path, path / "adapter"):
        if (candidate / "config.json").exists() and not (candidate / ADAPTER_CONFIG).exists() and any(
                candidate.glob("*.safetensors")):
            return candidate
    return None


def full_weights_model(path: str | Path, like: PreTrainedModel) -> PreTrainedModel:
    """A fully fine-tuned AutoRegEmbed model saved by a run (its adapter/ folder or a checkpoint), in ``like``'s
    dtype and device."""
    from transformers import AutoModelForCausalLM

    folder = Path(path).expanduser()
    found = full_weights_folder(folder)
    if found is not None:
        return AutoModelForCausalLM.from_pretrained(found, dtype=like.dtype).to(next(like.parameters()).device)
    raise ConfigError(f"{folder} holds no fully fine-tuned model (config.json and weights, no adapter_config.json): "
                      f"pass the run directory of a stage-1 run with objective.full_finetune=true")
