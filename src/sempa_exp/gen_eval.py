"""Entry point: ``python -m sempa_exp.gen_eval [gen.target=DIR] [gen=quick] [gen.limit=N] [overrides]``.

Evaluates the generation capability of one model state with lm-evaluation-harness (sempa_exp.evaluation.generation) and the
perplexity proxy (sempa_exp.evaluation.perplexity):

- ``gen.target`` unset: the untrained backbone (``backbone=...``); results go to ``<runs_dir>/base/<backbone>/``.
- ``gen.target=<run dir>``: the run's final ``adapter/``, on the backbone, data and template the run was trained with.
- ``gen.target=<run dir>/checkpoints/checkpoint-N``: that checkpoint's adapter.

The record lands in the run's ``results.json`` under ``generation.<base|final|checkpoint-N>`` (rewritten atomically,
nothing else in the file touched) and in W&B / metrics.jsonl as ``gen/<task>``, ``gen/avg``, ``gen/ppl_nli``, ...
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sempa_exp.config.schema import Config, ConfigError, data_dir, register_configs, validate
from sempa_exp.data import nli
from sempa_exp.evaluation.generation import evaluate_generation, flat_metrics, store_generation
from sempa_exp.evaluation.perplexity import build_proxy_set
from sempa_exp.models.backbones import load_backbone
from sempa_exp.records import rundir
from sempa_exp.records.metrics import RunLogger
from sempa_exp.train import CONF_DIR

log = logging.getLogger("sempa_exp")

BASE_GROUP = "base"
# The sections of a run's saved config that decide what is evaluated: the weights, the held-out set, the prompt.
RUN_SECTIONS = ("backbone", "data", "template")


@dataclass
class Target:
    run_dir: Path
    label: str  # base | final | checkpoint-N
    adapter: Path | None
    step: int
    saved: dict | None  # the run's resolved config (config.json)


def resolve_target(target: str | None, runs_dir: str, backbone_name: str) -> Target:
    if not target:
        return Target(rundir.run_dir_for(runs_dir, BASE_GROUP, backbone_name), "base", None, 0, None)
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
        if not rundir.is_finished(path):
            raise ConfigError(f"gen.target {path} is not a finished run (results.json status is not 'finished'); "
                              f"wait for it, or pass one of its checkpoints/checkpoint-N")
        step = int(rundir.read_results(path)["final_step"])
    config_file = run_dir / "config.json"
    if not config_file.exists():
        raise ConfigError(f"{run_dir} is not a run directory: no config.json")
    return Target(run_dir, label, adapter, step, json.loads(config_file.read_text()))


def effective_config(cfg: DictConfig, target: Target) -> DictConfig:
    """The composed config with the run's own backbone, data and template (what it was trained on)."""
    if target.saved is None:
        return cfg
    try:
        return OmegaConf.merge(cfg, {k: target.saved[k] for k in RUN_SECTIONS if k in target.saved})
    except Exception as exc:
        raise ConfigError(f"{target.run_dir}/config.json does not fit the current config schema: {exc}") from exc


def pick_device(want: str) -> torch.device:
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def load_model(config: Config, target: Target, device: torch.device):
    dtype = config.gen.dtype or ("float32" if device.type == "cpu" else config.backbone.dtype)
    model, tokenizer = load_backbone(config.backbone, config.paths.cache_dir, dtype=dtype)
    merged = False
    if target.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(target.adapter))
        if config.gen.merge_adapter:
            model, merged = model.merge_and_unload(), True
    model.to(device).eval()
    info = {"backbone": config.backbone.name, "adapter": str(target.adapter) if target.adapter else None,
            "merged": merged, "dtype": dtype, "device": str(device), "label": target.label, "step": target.step,
            "method": (target.saved or {}).get("trainer", {}).get("method", "base") if target.saved else "base"}
    return model, tokenizer, info


def samples_seen(target: Target) -> int:
    """Samples seen at the target's step: the x axis of the run's W&B charts."""
    if target.saved is None:
        return 0
    trainer = target.saved.get("trainer", {})
    world = int((rundir.read_results(target.run_dir) or {}).get("world_size", 1))
    return target.step * int(trainer.get("per_device_batch_size", 0)) * int(trainer.get("grad_accum_steps", 0)) * world


def run(cfg: DictConfig) -> dict:
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
    model, tokenizer, info = load_model(config, target, pick_device(config.run.device))
    log.info("generation evaluation of %s (%s) -> %s", target.label, info, target.run_dir)
    record = evaluate_generation(model, tokenizer, config.gen, root, proxy, info)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    base = {"status": rundir.GENERATION_ONLY_STATUS, "run_dir": str(target.run_dir), "group": BASE_GROUP,
            "name": target.run_dir.name, "method": "base", "backbone": config.backbone.name,
            "versions": rundir.library_versions(),
            "git_commit": rundir.git_commit(), "config": resolved}
    path = store_generation(target.run_dir, target.label, record, base=base)
    group = (target.saved or {}).get("run", {}).get("group", BASE_GROUP)
    run_logger = RunLogger(target.run_dir, config.logger, run_id=rundir.run_id_for(target.run_dir), group=group,
                           name=target.run_dir.name, config=target.saved or resolved)
    metrics = flat_metrics(record)
    try:
        run_logger.log(metrics, step=target.step, samples_seen=samples_seen(target))
        run_logger.summary(metrics)
    finally:
        run_logger.finish()
    from sempa_exp.gen_report import print_record

    print_record(record, title=f"{target.run_dir} [{target.label}] -> {path}")
    return record


register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> int:
    record = run(cfg)
    failed = [name for name, r in record["tasks"].items() if r.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
