"""Generation capability of one model state (``python -m sempa_exp.gen_eval [gen.target=DIR] [gen=quick] ...``).

Evaluates the generation capability of one model state with lm-evaluation-harness (sempa_exp.evaluation.generation)
and the perplexity proxy (sempa_exp.evaluation.perplexity):

- ``gen.target`` unset: the untrained backbone (``backbone=...``); results go to ``<runs_dir>/base/<backbone>/``.
- ``gen.target=<run dir>``: the run's final ``adapter/``, on the backbone, data and template the run was trained with.
- ``gen.target=<run dir>/checkpoints/checkpoint-N``: that checkpoint's adapter.

The record lands in the run's ``results.json`` under ``generation.<base|final|checkpoint-N>`` (rewritten atomically,
nothing else in the file touched) and in W&B / metrics.jsonl as ``gen/<task>``, ``gen/avg``, ``gen/ppl_nli``, ...
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sempa_exp.config.schema import Config, ConfigError, data_dir, refuse_unknown_keys, validate
from sempa_exp.data import nli
from sempa_exp.embedding.checkpoint import load_trained, trained_objective
from sempa_exp.evaluation.generation import evaluate_generation, flat_metrics
from sempa_exp.evaluation.perplexity import build_proxy_set
from sempa_exp.launch.distributed import device_for
from sempa_exp.models.backbones import load_backbone
from sempa_exp.records import identity, rundir
from sempa_exp.records.archive import archive_finished_run
from sempa_exp.records.metrics import RunLogger
from sempa_exp.records.results import Results, RunKind, add_generation, read_results

log = logging.getLogger("sempa_exp")

BASE_GROUP = "base"


@dataclass
class Target:
    run_dir: Path
    label: str  # base | final | checkpoint-N
    adapter: Path | None
    step: int
    saved: dict | None  # the run's resolved config (config.json)


def resolve_target(target: str | None, runs_dir: str, backbone_name: str) -> Target:
    if not target:
        return Target(Path(runs_dir).expanduser() / BASE_GROUP / backbone_name, "base", None, 0, None)
    path = Path(target).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"gen.target is not a directory: {path}")
    if path.name.startswith("checkpoint-") and path.parent.name == "checkpoints":
        if not (path / "adapter_config.json").exists():
            raise ConfigError(f"gen.target {path} holds no adapter_config.json (an incomplete checkpoint?)")
        run_dir, label, adapter, step = path.parent.parent, path.name, path, int(path.name.split("-")[-1])
    else:
        run_dir, label, adapter = path, "final", path / "adapter"
        if not (adapter / "adapter_config.json").exists():
            found = sorted((path / "checkpoints").glob("checkpoint-*"))
            hint = f"; pass a checkpoint instead, e.g. gen.target={found[-1]}" if found else ""
            raise ConfigError(f"gen.target {path} has no trained adapter/ (not a finished run?){hint}")
        results = read_results(path)
        if results is None or not results.finished:
            raise ConfigError(f"gen.target {path} is not a finished run (results.json status is not 'finished'); "
                              f"wait for it, or pass one of its checkpoints/checkpoint-N")
        step = results.final_step
    saved = identity.saved_config(run_dir)
    if saved is None:
        raise ConfigError(f"{run_dir} is not a run directory: no config.json")
    return Target(run_dir, label, adapter, step, saved)


def effective_config(cfg: DictConfig, target: Target) -> DictConfig:
    """The composed config with the run's own backbone, data and template (what it was trained on)."""
    if target.saved is None:
        return cfg
    try:
        return OmegaConf.merge(cfg, {k: target.saved[k] for k in identity.MODEL_STATE_SECTIONS if k in target.saved})
    except Exception as exc:
        raise ConfigError(f"{target.run_dir}/config.json does not fit the current config schema: {exc}") from exc


def load_model(config: Config, target: Target, device: torch.device):
    dtype = config.gen.dtype or ("float32" if device.type == "cpu" else config.backbone.dtype)
    merged = False
    if target.adapter is None:
        model, tokenizer = load_backbone(config.backbone, config.paths.cache_dir, dtype=dtype)
    else:
        from peft import PeftModel

        model, tokenizer = load_trained(config.backbone, config.paths.cache_dir, target.adapter, target.saved, dtype)
        if config.gen.merge_adapter and isinstance(model, PeftModel):
            model, merged = model.merge_and_unload(), True
    model.to(device).eval()
    info = {"backbone": config.backbone.name, "adapter": str(target.adapter) if target.adapter else None,
            "merged": merged, "dtype": dtype, "device": str(device), "label": target.label, "step": target.step,
            "method": trained_objective(target.saved) or "base"}
    return model, tokenizer, info


def samples_seen(target: Target) -> int | None:
    """Samples seen at the target's step (the x axis of the run's W&B charts): what the run logged at that step."""
    if target.saved is None:
        return 0
    from sempa_exp.records.metrics import read_metrics

    return next((int(r["samples_seen"]) for r in read_metrics(target.run_dir)
                 if r.get("step") == target.step and isinstance(r.get("samples_seen"), (int, float))), None)


def new_record(target: Target, config: Config, resolved: dict) -> Results:
    """The results.json to seed when the target has none: the untrained backbone's generation-only record, or an
    unfinished run's (its training writes the whole record when it finishes, keeping these generation records)."""
    if target.saved is None:
        return Results(kind=RunKind.GENERATION, group=BASE_GROUP, name=target.run_dir.name,
                       run_dir=str(target.run_dir), method="base", backbone=config.backbone.name,
                       versions=rundir.library_versions(), git_commit=rundir.git_commit(), config=resolved)
    return Results(kind=RunKind.TRAINING, status="unfinished", group=target.run_dir.parent.name,
                   name=target.run_dir.name, run_dir=str(target.run_dir),
                   method=trained_objective(target.saved) or "unknown", backbone=config.backbone.name,
                   config=target.saved)


def run(cfg: DictConfig) -> dict:
    refuse_unknown_keys(cfg)
    composed: Config = OmegaConf.to_object(cfg)
    target = resolve_target(composed.gen.target, composed.paths.runs_dir, composed.backbone.name)
    cfg = effective_config(cfg, target)
    config: Config = OmegaConf.to_object(cfg)
    validate(config)
    root = data_dir(config)
    if not root.is_dir():
        raise ConfigError(f"paths.data_dir does not exist: {root}")
    proxy = None
    if config.gen.proxy:
        triplets, _ = nli.load_triplets(config.data, root)
        train_size = 0 if target.saved is None else (config.data.size or len(triplets))
        proxy = build_proxy_set(triplets, config.eval.ppl_sample, config.data.subset_seed, config.template.text,
                                config.data.system_prompt, train_size=train_size)
    if config.run.num_threads:
        torch.set_num_threads(config.run.num_threads)
    model, tokenizer, info = load_model(config, target, device_for(config.run.device))
    log.info("generation evaluation of %s (%s) -> %s", target.label, info, target.run_dir)
    record = evaluate_generation(model, tokenizer, config.gen, root, proxy, info)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    path = add_generation(target.run_dir, target.label, record, new=new_record(target, config, resolved))
    group = (target.saved or {}).get("run", {}).get("group", BASE_GROUP)
    run_logger = RunLogger(target.run_dir, config.logger, run_id=identity.wandb_run_id(target.run_dir), group=group,
                           name=target.run_dir.name, config=target.saved or resolved)
    metrics = flat_metrics(record)
    try:
        run_logger.log(metrics, step=target.step, samples_seen=samples_seen(target) or 0)
        run_logger.summary(metrics)
    finally:
        run_logger.finish()
    archive_finished_run(target.run_dir, config.run.archive_to or (target.saved or {}).get("run", {}).get("archive_to"))
    from sempa_exp.evaluation.generation_table import print_record

    print_record(record, title=f"{target.run_dir} [{target.label}] -> {path}")
    return record
