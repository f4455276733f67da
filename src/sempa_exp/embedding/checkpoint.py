"""A trained LoRA adapter (SemPA or the contrastive foil) on its backbone, evaluated with the ``embed`` prompt.

``method.path`` may be an adapter folder (``<run>/adapter``), an HF Trainer checkpoint (``<run>/checkpoints/
checkpoint-N``, which holds the adapter of that step) or a run directory (its final ``adapter/``). When the path lies
inside a run directory, that run's config must name the same backbone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from sempa_exp.config.schema import BackboneConfig, Config, ConfigError, MethodSettings
from sempa_exp.embedding.base import LoadedMethod
from sempa_exp.embedding.prompt import PromptMethod
from sempa_exp.models.compress_tokens import (
    ADAPTER_CONFIG,
    add_compress_tokens,
    full_weights_folder,
    full_weights_model,
)
from sempa_exp.models.lora import fold_lora

log = logging.getLogger(__name__)


def resolve_adapter(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(f"method.path does not exist: {folder}")
    for candidate in (folder, folder / "adapter"):
        if (candidate / ADAPTER_CONFIG).exists():
            return candidate
    raise ConfigError(f"method.path={folder} holds no LoRA adapter: expected {ADAPTER_CONFIG} in it or in its "
                      f"adapter/ folder (pass a run directory, its adapter/ or one of its checkpoints/checkpoint-N)")


def owning_run_config(adapter_dir: Path) -> dict | None:
    """The config.json of the run the adapter belongs to (adapter/, checkpoints/checkpoint-N), if any."""
    for folder in (adapter_dir.parent, adapter_dir.parent.parent):
        config = folder / "config.json"
        if config.exists():
            try:
                return json.loads(config.read_text())
            except json.JSONDecodeError:
                return None
    return None


def trained_samples(adapter_dir: Path) -> int | None:
    """How many training samples the adapter was trained on, from its run's records; None when they cannot tell."""
    from sempa_exp.records.metrics import read_metrics
    from sempa_exp.records.results import read_results

    if adapter_dir.name == "adapter":
        results = read_results(adapter_dir.parent)
        return results.samples_seen if results is not None and results.finished else None
    state = adapter_dir / "trainer_state.json"
    if not state.exists():
        return None
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (json.JSONDecodeError, AttributeError) as exc:  # the count is a record, not a reason to stop evaluating
        log.warning("samples seen unknown: unreadable %s (%s)", state, exc)
        return None
    rows = read_metrics(adapter_dir.parent.parent) if adapter_dir.parent.name == "checkpoints" else []
    return next((int(r["samples_seen"]) for r in rows
                 if r.get("step") == step and isinstance(r.get("samples_seen"), (int, float))), None)


def check_backbone(adapter_dir: Path, backbone_name: str, embed_name: str) -> dict | None:
    run_config = owning_run_config(adapter_dir)
    if run_config is None:
        log.warning("no run config found next to %s; assuming it was trained on backbone %s", adapter_dir,
                    backbone_name)
        return None
    trained_on = (run_config.get("backbone") or {}).get("name")
    if trained_on and trained_on != backbone_name:
        raise ConfigError(f"the adapter in {adapter_dir} was trained on backbone={trained_on}, not {backbone_name}; "
                          f"pass backbone={trained_on}")
    trained_embed = (run_config.get("embed") or {}).get("name")
    compressed = ((run_config.get("objective") or {}).get("compress_tokens"))
    if compressed and trained_embed and trained_embed != embed_name:
        # its <EMBED*> tokens are read only by its own read-out: another prompt scores an untrained-looking model
        raise ConfigError(f"the adapter in {adapter_dir} is an AutoRegEmbed run read out with embed={trained_embed}; "
                          f"pass embed={trained_embed} (this evaluation has embed={embed_name})")
    if trained_embed and trained_embed != embed_name:
        log.warning("the run evaluated with embed=%s; this evaluation uses embed=%s", trained_embed, embed_name)
    return run_config


def attach_adapter(model: torch.nn.Module, adapter_dir: Path) -> PeftModel:
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)


def load_trained(backbone: BackboneConfig, cache_dir: str | Path, trained: Path, run_config: dict | None,
                 dtype: str | None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The backbone (in ``dtype``) with what its run trained: the LoRA adapter in ``trained`` attached, not merged, or
    the full weights an AutoRegEmbed run with objective.full_finetune saved there; an AutoRegEmbed run's compress
    tokens are added first, as its run added them. The one way an evaluation (embeddings, generation) loads a run."""
    from sempa_exp.models.backbones import load_backbone

    full = full_weights_folder(trained)
    model, tokenizer = load_backbone(backbone, cache_dir, dtype=dtype)
    compress = ((run_config or {}).get("objective") or {}).get("compress_tokens")
    if compress:  # AutoRegEmbed: the adapter holds the trained rows of the tokens its run added
        add_compress_tokens(model, tokenizer, int(compress), seed=int(run_config.get("seed", 0)))
        if full:  # trained with objective.full_finetune: the run saved every weight
            return full_weights_model(full, model), tokenizer
    elif full:
        raise ConfigError(f"{trained} holds full model weights; they are read only for AutoRegEmbed runs "
                          f"(objective.full_finetune=true)")
    return attach_adapter(model, trained), tokenizer


class CheckpointMethod(PromptMethod):
    """The ``embed`` prompt on the backbone with a trained adapter attached (never cached on disk)."""

    @classmethod
    def check_config(cls, cfg: Config, settings: MethodSettings) -> None:
        if not cfg.method.path:
            raise ConfigError("method=checkpoint needs method.path=<run dir, its adapter/ or a checkpoint-N folder>")

    @classmethod
    def from_config(cls, cfg: Config, settings: MethodSettings, tokenizer) -> CheckpointMethod:
        method = cls(tokenizer, cfg.embed, cfg.eval.max_length, settings.output_layer,
                     share_prompt_prefix=cfg.eval.share_prompt_prefix)
        method.cache_key = None
        return method

    @classmethod
    def load(cls, cfg: Config, settings: MethodSettings, device: torch.device) -> LoadedMethod:
        adapter = full_weights_folder(Path(cfg.method.path).expanduser()) or resolve_adapter(cfg.method.path)
        run_config = check_backbone(adapter, cfg.backbone.name, cfg.embed.name)
        try:
            model, tokenizer = load_trained(cfg.backbone, cfg.paths.cache_dir, adapter, run_config, cfg.eval.dtype)
        except ConfigError as exc:
            raise ConfigError(f"method.path={cfg.method.path}: {exc}") from None
        model = model.to(device)
        merged = cfg.eval.merge_adapter and fold_lora(model) is not None  # for good: this model only evaluates
        info = {"adapter": str(Path(adapter).resolve()), "trained_with": trained_objective(run_config),
                "samples_seen": trained_samples(adapter), "merged": merged}
        return LoadedMethod(model, tokenizer, cls.from_config(cfg, settings, tokenizer), info)


def trained_objective(run_config: dict | None) -> str | None:
    """The objective a run trained with (its report method key); runs from before the objective group: trainer.method,
    where SemPA was 'dpo'."""
    if not run_config:
        return None
    objective = (run_config.get("objective") or {}).get("name")
    if objective:
        return objective
    legacy = (run_config.get("trainer") or {}).get("method")
    return {"dpo": "sempa"}.get(legacy, legacy)
