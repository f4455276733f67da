"""The optimisation recipe every objective trains under (LoRA, optimiser, schedule, checkpoints, DDP) and the callbacks
that log metrics and evaluate every checkpoint."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, TrainerCallback

from sempa_exp.config.schema import Config, ConfigError, checkpoint_every_steps
from sempa_exp.records.metrics import RunLogger

log = logging.getLogger(__name__)


DDP_TIMEOUT_S = 3 * 3600


class NonFiniteLossError(RuntimeError):
    pass


def check_target_modules(model: PreTrainedModel, cfg: Config) -> None:
    """``lora.target_modules`` against the loaded model, before PEFT fails on it: ``all-linear`` or a regular
    expression that PEFT matches against full module names."""
    target = cfg.lora.target_modules
    if target == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    try:
        pattern = re.compile(target)
    except re.error as exc:
        raise ConfigError(f"lora.target_modules={target!r} is not a regular expression ({exc})") from None
    if not any(pattern.fullmatch(name) for name in names):
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:3]
        raise ConfigError(f"lora.target_modules={target!r} matches no module of backbone {cfg.backbone.name}: it is "
                          f"'all-linear' or a regular expression over full module names, e.g. {', '.join(linear)}")


def configured_callbacks(cfg: Config) -> list[TrainerCallback]:
    """``trainer.callbacks``, built; a class that cannot be imported or built, or is not a TrainerCallback, is a
    ConfigError naming its key."""
    from hydra.utils import instantiate

    built = []
    for name, spec in cfg.trainer.callbacks.items():
        key = f"trainer.callbacks.{name}"
        try:
            callback = instantiate(spec)
        except Exception as exc:  # Hydra wraps import and constructor errors alike
            raise ConfigError(f"{key}: cannot build {spec['_target_']!r}: {exc}") from None
        if not isinstance(callback, TrainerCallback):
            raise ConfigError(f"{key}: {spec['_target_']!r} is not a transformers.TrainerCallback")
        built.append(callback)
    return built


def peft_config(cfg: Config) -> PeftLoraConfig:
    return PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules, bias="none", task_type="CAUSAL_LM")


def seeded_peft_model(model: PreTrainedModel, lora: PeftLoraConfig, seed: int) -> PeftModel:
    """``get_peft_model`` with LoRA's random init drawn from ``seed`` (as TRL's DPOTrainer seeds it), not from whatever
    the global generator held; the caller's random state is left as it was. Only the model's own CUDA device is
    forked: forking every visible GPU would open a context on each from every rank of a multi-GPU job."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return get_peft_model(model, lora)


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


class MetricsCallback(TrainerCallback):
    """Every TRL log record, against samples seen; a NaN/inf loss stops the run before the next checkpoint is saved."""

    def __init__(self, run_logger: RunLogger, samples_at: Callable[[int], int]) -> None:
        self.run_logger = run_logger
        self.samples_at = samples_at  # samples seen after a step (records.results.SampleClock.at)

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
                                samples_seen=self.samples_at(state.global_step))


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
