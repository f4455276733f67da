"""What a training objective is to a run: the records it trains on and the HF Trainer that optimises it.

An objective is chosen by the ``objective`` config group; ``_target_`` names its class, which
``hydra.utils.instantiate`` builds from the group's fields (a new objective = a class here, a dataclass schema in
sempa_exp.config.schema and a YAML in conf/objective/). Everything else of a run (data, LoRA, the optimisation recipe
in sempa_exp.objectives.recipe, checkpoints, evaluation, logging, resume) is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from datasets import Dataset
from hydra.utils import instantiate
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

from sempa_exp.config.schema import Config
from sempa_exp.data.nli import Triplet


class Objective(ABC):
    #: the dataclass schema of the objective's config group option (its fields and defaults, stated once)
    config_class: ClassVar[type]
    #: whether step 0 is the bare backbone (its embeddings may then come from the on-disk cache of earlier runs)
    starts_from_backbone: ClassVar[bool] = True

    def __init__(self, **settings: Any) -> None:
        self.config = self.config_class(**settings)

    @property
    def name(self) -> str:
        """The report's method key of what this objective trains (sempa, contrastive)."""
        return self.config.name

    @abstractmethod
    def dataset(self, cfg: Config, triplets: list[Triplet]) -> Dataset:
        """The training records of the NLI triplets."""

    def examples_in(self, dataset: Dataset) -> int:
        """Training examples the records of :meth:`dataset` make (one per record unless an objective groups them)."""
        return len(dataset)

    @abstractmethod
    def build_trainer(self, cfg: Config, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      dataset: Dataset, output_dir: Path, callbacks: list[TrainerCallback], world_size: int,
                      use_cpu: bool) -> Trainer:
        """The HF Trainer (LoRA attached) with the shared recipe's arguments and these callbacks."""


def build_objective(cfg: Config) -> Objective:
    """The objective object of a validated config."""
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.structured(cfg.objective))
