"""LoRA-DPO with TRL (or the contrastive foil, sempa_exp.objectives.infonce): trainer construction and the callbacks that log
metrics and evaluate every checkpoint."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig as PeftLoraConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback
from trl import DPOConfig

from sempa_exp.config.schema import Config, checkpoint_every_steps, global_batch_size
from sempa_exp.data import nli
from sempa_exp.records.metrics import RunLogger

log = logging.getLogger(__name__)


DDP_TIMEOUT_S = 3 * 3600


class NonFiniteLossError(RuntimeError):
    pass


def peft_config(cfg: Config) -> PeftLoraConfig:
    return PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules, bias="none", task_type="CAUSAL_LM")


def recipe_kwargs(cfg: Config, output_dir: Path, world_size: int, use_cpu: bool) -> dict:
    """The recipe's optimisation, checkpointing, logging and DDP settings, as TrainingArguments keywords: shared by the
    DPO trainer and the contrastive foil, so both train under the same schedule and fault handling."""
    t = cfg.trainer
    return dict(
        output_dir=str(output_dir),
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        bf16=t.bf16,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=checkpoint_every_steps(t, world_size),
        save_total_limit=t.save_total_limit,
        save_only_model=False,  # optimizer, scheduler and RNG states are what a resume needs
        logging_steps=t.log_every_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # HF would log a NaN/inf loss as the running mean; MetricsCallback must see it
        report_to="none",
        gradient_checkpointing=t.gradient_checkpointing,
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if use_cpu and world_size > 1 else None,
        # Rank 0 evaluates each checkpoint while the other ranks wait in the next collective (HF default: 30 min).
        ddp_timeout=DDP_TIMEOUT_S,
    )


def dpo_args(cfg: Config, output_dir: Path, world_size: int, use_cpu: bool) -> DPOConfig:
    t = cfg.trainer
    return DPOConfig(
        **recipe_kwargs(cfg, output_dir, world_size, use_cpu),
        beta=t.beta,
        loss_type=[t.loss_type],
        max_length=t.max_length,
        disable_dropout=t.disable_dropout,
        precompute_ref_log_probs=t.precompute_ref_logps,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
    )


class MetricsCallback(TrainerCallback):
    """Every TRL log record, against samples seen; a NaN/inf loss stops the run before the next checkpoint is saved."""

    def __init__(self, run_logger: RunLogger, samples_per_step: int) -> None:
        self.run_logger = run_logger
        self.samples_per_step = samples_per_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss} at step {state.global_step}; stopping. The last good checkpoint is kept "
                f"in {args.output_dir}")
        if state.is_world_process_zero:
            metrics = {f"train/{k}": v for k, v in logs.items() if isinstance(v, (int, float))}
            self.run_logger.log(metrics, step=state.global_step,
                                samples_seen=state.global_step * self.samples_per_step)


class CheckpointEvalCallback(TrainerCallback):
    """Evaluates the policy at every checkpoint (rank 0 only)."""

    def __init__(self, evaluate_step: Callable[[int], None]) -> None:
        self.evaluate_step = evaluate_step

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.evaluate_step(state.global_step)

    def on_train_begin(self, args, state, control, **kwargs):
        # Resumed (the checkpoint's weights and state are loaded by now): a kill between saving the checkpoint and
        # evaluating it left no scores for it; evaluate_step only runs the suites that step lacks.
        if state.global_step > 0 and state.is_world_process_zero:
            self.evaluate_step(state.global_step)


def train_dataset(cfg: Config, triplets: list[nli.Triplet]) -> Dataset:
    """DPO: conversational preference records; contrastive: the raw (anchor, positive, negative) sentences."""
    if cfg.trainer.method == "contrastive":
        from sempa_exp.objectives.infonce import contrastive_records

        return Dataset.from_list(contrastive_records(triplets))
    return Dataset.from_list(nli.dpo_records(triplets, cfg.template.text, cfg.data.system_prompt))


def build_trainer(cfg: Config, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: Dataset,
                  output_dir: Path, callbacks: list[TrainerCallback], world_size: int, use_cpu: bool) -> Trainer:
    """DPO: the reference policy is the backbone with the adapter disabled (TRL's PEFT path: no second model copy).
    Contrastive: the InfoNCE foil of sempa_exp.objectives.infonce, same LoRA and recipe."""
    if cfg.trainer.method == "contrastive":
        from sempa_exp.objectives.infonce import build_contrastive_trainer

        return build_contrastive_trainer(cfg, model, tokenizer, dataset, output_dir, callbacks, world_size, use_cpu,
                                         peft_config(cfg))
    from sempa_exp.objectives.dpo import SempaDPOTrainer, prepared_data_cache, turn_end_ids

    t = cfg.trainer
    return SempaDPOTrainer(
        turn_end=None if t.score_template_tail else turn_end_ids(tokenizer, cfg.backbone.turn_end),
        completion_only_logits=t.completion_only_logits,
        data_cache=prepared_data_cache(cfg, tokenizer, use_cpu) if t.cache_prepared_data else None,
        add_length_column=t.group_by_length,
        sort_within_step=t.sort_within_step,
        model=model,
        ref_model=None,
        args=dpo_args(cfg, output_dir, world_size, use_cpu),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config(cfg),
        callbacks=callbacks,
    )


def samples_per_step(cfg: Config, world_size: int) -> int:
    return global_batch_size(cfg.trainer, world_size)
