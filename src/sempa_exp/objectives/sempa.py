"""SemPA's objective: DPO on NLI paraphrase pairs with the backbone (adapter disabled) as the reference policy, the
way the official run computes it with ms-swift 3.10.1 (the trainer: sempa_exp.objectives.dpo)."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import DPOConfig

from sempa_exp.config.schema import Config, SempaObjectiveConfig
from sempa_exp.data import nli
from sempa_exp.objectives.base import Objective
from sempa_exp.objectives.recipe import peft_config, recipe_kwargs


class SempaObjective(Objective):
    config_class = SempaObjectiveConfig

    def dataset(self, cfg: Config, triplets: list[nli.Triplet]) -> Dataset:
        """Conversational preference records: system prompt + paraphrase instruction, entailment vs contradiction."""
        return Dataset.from_list(nli.dpo_records(triplets, cfg.template.text, cfg.data.system_prompt))

    def dpo_args(self, cfg: Config, output_dir: Path, world_size: int, use_cpu: bool) -> DPOConfig:
        o = self.config
        return DPOConfig(
            **recipe_kwargs(cfg, output_dir, world_size, use_cpu),
            beta=o.beta,
            loss_type=[str(o.loss_type)],
            max_length=cfg.trainer.max_length,
            disable_dropout=o.disable_dropout,
            precompute_ref_log_probs=o.precompute_ref_logps,
            train_sampling_strategy="group_by_length" if o.group_by_length else "random",
        )

    def trainer(self, **kwargs):
        """The trainer class of this objective, built with ``kwargs``."""
        from sempa_exp.objectives.dpo import SempaDPOTrainer

        return SempaDPOTrainer(**kwargs)

    def build_trainer(self, cfg: Config, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      dataset: Dataset, output_dir: Path, callbacks: list[TrainerCallback], world_size: int,
                      use_cpu: bool):
        """TRL's PEFT path: the reference is the backbone with the adapter disabled (no second model copy)."""
        from sempa_exp.objectives.dpo import prepared_data_cache, turn_end_ids

        o = self.config
        return self.trainer(
            turn_end=None if o.score_template_tail else turn_end_ids(tokenizer, cfg.backbone.turn_end),
            completion_only_logits=o.completion_only_logits,
            data_cache=prepared_data_cache(cfg, tokenizer, use_cpu) if o.cache_prepared_data else None,
            add_length_column=o.group_by_length,
            sort_within_step=o.sort_within_step,
            share_prompt=o.share_prompt_prefix,
            max_tokens_per_micro_batch=o.max_tokens_per_micro_batch,
            model=model,
            ref_model=None,
            args=self.dpo_args(cfg, output_dir, world_size, use_cpu),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config(cfg),
            callbacks=callbacks,
        )
