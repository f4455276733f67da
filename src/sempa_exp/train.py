"""Entry point: ``python -m sempa_exp.train [+experiment=NAME] [overrides] [-m]``.

One run = validate the config (no model, no run directory yet), load and subset the NLI triplets, then in the run
directory: evaluate the untrained backbone (step 0 = the PromptEOL baseline of the run), train LoRA-DPO with a
checkpoint every ``trainer.checkpoint_every_samples`` samples, evaluate each checkpoint and the final adapter, write
``results.json``. A finished run is reported, not redone; an unfinished one resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sempa_exp.config.schema import Config, ConfigError, data_dir, register_configs, validate, validate_against_data
from sempa_exp.data import nli
from sempa_exp.embedding.encoder import SentenceEncoder
from sempa_exp.evaluation.perplexity import build_proxy_set
from sempa_exp.evaluation.suites import GEOMETRY_SAMPLE_DOC, EmbeddingCache, EvalData, evaluate, load_eval_data
from sempa_exp.launch.distributed import export_from_submitit
from sempa_exp.launch.launcher import register_launcher_configs
from sempa_exp.models.backbones import backbone_fingerprint, load_backbone
from sempa_exp.records import rundir
from sempa_exp.records.metrics import RunLogger, read_metrics, rewind_metrics
from sempa_exp.records.summary import print_summary

log = logging.getLogger("sempa_exp")

CONF_DIR = str(Path(os.environ.get("SEMPA_CONF_DIR", Path(__file__).resolve().parents[2] / "conf")))
# Sections that define the experiment: a run directory holding a different one is never resumed into.
EXPERIMENT_KEYS = ("backbone", "template", "embed", "data", "lora", "trainer", "seed")


@dataclass
class Prepared:
    config: Config
    triplets: list[nli.Triplet]
    cleaning: nli.CleaningReport
    data_file: Path
    eval_data: EvalData
    run_dir: Path
    world_size: int
    rank: int


def distributed_env() -> tuple[int, int]:
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def resolve_run_name(cfg: DictConfig) -> str:
    if cfg.run.name:
        return rundir.run_name_from_overrides(cfg.run.name)
    try:
        from hydra.core.hydra_config import HydraConfig

        return rundir.run_name_from_overrides(HydraConfig.get().job.override_dirname)
    except ValueError:  # called outside a Hydra job (tests, notebooks)
        return "default"


def prepare(cfg: DictConfig) -> Prepared:
    """Every check that needs neither a model nor a run directory; raises ConfigError with the offending key."""
    config: Config = OmegaConf.to_object(cfg)
    validate(config)
    world_size, rank = distributed_env()
    root = data_dir(config)
    if not root.is_dir():
        raise ConfigError(f"paths.data_dir does not exist: {root}")
    data_file = nli.resolve_source(config.data, root)
    triplets, cleaning = nli.read_triplets(data_file, config.data.max_sentence_chars, config.data.deduplicate)
    log.info("data: %s", cleaning.summary())  # before the size check, so a too-small remainder is explained
    size = validate_against_data(config, len(triplets), world_size)
    chosen = nli.subset(triplets, size, config.data.subset_seed)
    suites = set(config.eval.at_start) | set(config.eval.at_checkpoint) | set(config.eval.at_end)
    e = config.eval
    eval_data = load_eval_data(root, suites, e.geometry_sample, e.gar_sample, e.gar_top_k, e.gar_match)
    if "ppl" in suites or (config.gen.at_end and config.gen.proxy):
        eval_data.proxy = build_proxy_set(triplets, config.eval.ppl_sample, config.data.subset_seed,
                                          config.template.text, config.data.system_prompt, train_size=size)
    run_dir = rundir.run_dir_for(config.paths.runs_dir, config.run.group, resolve_run_name(cfg))
    return Prepared(config, chosen, cleaning, data_file, eval_data, run_dir, world_size, rank)


def check_same_experiment(run_dir: Path, resolved: dict) -> None:
    saved_file = run_dir / "config.json"
    if not saved_file.exists():
        return
    import json

    saved = json.loads(saved_file.read_text())
    differing = [k for k in EXPERIMENT_KEYS if saved.get(k) != resolved.get(k)]
    if differing:
        raise ConfigError(
            f"{run_dir} holds a run with a different {', '.join(differing)} config; it is left untouched. "
            f"Pick another run.name or run.group, or move that directory away.")


class Run:
    """One training run inside its run directory."""

    def __init__(self, prep: Prepared, resolved: dict) -> None:
        self.prep = prep
        self.cfg = prep.config
        self.resolved = resolved
        self.is_main = prep.rank == 0
        self.device = self._device()
        self.evaluated: dict[int, set[str]] = {}
        self._step_encoder: tuple[int, SentenceEncoder] | None = None

    def _device(self) -> torch.device:
        want = self.cfg.run.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda" and "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device(want)

    def encoder(self, model) -> SentenceEncoder:
        e = self.cfg.eval
        return SentenceEncoder(model, self.tokenizer, self.cfg.embed, batch_size=e.batch_size, max_length=e.max_length)

    def encoder_for_step(self, step: int) -> SentenceEncoder:
        """One encoder (and its memo of embedded sentences) per training step: the last checkpoint's evaluation and
        the end-of-training one see the same weights, so sentences embedded by the first (STS-B dev, which holds the
        geometry sample) are not embedded again by the second."""
        if self._step_encoder is None or self._step_encoder[0] != step:
            self._step_encoder = (step, self.encoder(self.trainer.model))
        return self._step_encoder[1]

    def evaluate_step(self, step: int, suites: list[str], *, untrained: bool = False) -> dict[str, float]:
        todo = [s for s in suites if s not in self.evaluated.get(step, set())]
        if not todo or not self.is_main:
            return {}
        started = time.time()
        encoder = self.encoder_for_step(step)
        cache = None
        if untrained and self.cfg.eval.cache_embeddings:
            cache = EmbeddingCache(self.cfg.paths.cache_dir, {
                "backbone": backbone_fingerprint(self.cfg.backbone), "dtype": self.cfg.backbone.dtype,
                "embed": self.resolved["embed"], "max_length": self.cfg.eval.max_length})
            cache.load_into(encoder)
        metrics = evaluate(encoder, self.prep.eval_data, todo)
        if cache is not None:
            cache.save_from(encoder)
        metrics["eval/seconds"] = time.time() - started
        self.run_logger.log(metrics, step=step, samples_seen=step * self.samples_per_step)
        self.evaluated.setdefault(step, set()).update(todo)
        log.info("step %d (%d samples): %s", step, step * self.samples_per_step,
                 ", ".join(f"{k.removeprefix('eval/')}={v:.2f}" for k, v in metrics.items() if k.count("/") == 1))
        return metrics

    def execute(self) -> dict:
        from sempa_exp.objectives.recipe import (
            CheckpointEvalCallback,
            MetricsCallback,
            build_trainer,
            samples_per_step,
            train_dataset,
        )

        cfg, prep = self.cfg, self.prep
        run_dir = prep.run_dir
        checkpoints = run_dir / "checkpoints"
        self.samples_per_step = samples_per_step(cfg, prep.world_size)
        resume_from = rundir.latest_checkpoint(checkpoints) if cfg.run.resume else None
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            rundir.write_json_atomic(run_dir / "config.json", self.resolved)
            (run_dir / rundir.CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(self.resolved)))
            if resume_from is not None:
                step = int(resume_from.name.split("-")[-1])
                dropped = rewind_metrics(run_dir, step)
                log.info("resuming from %s (%d later metric records superseded)", resume_from, dropped)
                for row in read_metrics(run_dir):
                    self.evaluated.setdefault(row["step"], set()).update(
                        s for s, key in (("sts", "eval/sts_avg"), ("stsb_dev", "eval/stsb_dev"),
                                         ("geometry", "eval/uniformity"), ("ppl", "eval/ppl_nli"),
                                         ("gar", "eval/gar")) if key in row)
        self.run_logger = RunLogger(
            run_dir, cfg.logger, run_id=rundir.run_id_for(run_dir), group=cfg.run.group, name=run_dir.name,
            config=self.resolved, enabled=self.is_main)
        exit_code = 1
        try:
            if cfg.run.num_threads:
                torch.set_num_threads(cfg.run.num_threads)
            model, self.tokenizer = load_backbone(cfg.backbone, cfg.paths.cache_dir)
            model.to(self.device)
            dataset = train_dataset(cfg, prep.triplets)
            callbacks = [MetricsCallback(self.run_logger, self.samples_per_step),
                         CheckpointEvalCallback(lambda step: self.evaluate_step(step, cfg.eval.at_checkpoint))]
            self.trainer = build_trainer(cfg, model, self.tokenizer, dataset, checkpoints, callbacks,
                                         prep.world_size, use_cpu=self.device.type == "cpu")
            self.num_train_pairs = len(self.trainer.train_dataset)
            if self.num_train_pairs < len(dataset):
                log.warning("%d of %d pairs are left out: longer than trainer.max_length=%d tokens (ms-swift too)",
                            len(dataset) - self.num_train_pairs, len(dataset), cfg.trainer.max_length)
            self.evaluate_step(0, cfg.eval.at_start, untrained=True)
            started = time.time()
            self.trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            final_step = self.trainer.state.global_step
            results = {}
            if self.is_main:
                self.trainer.save_model(str(run_dir / "adapter"))
                self.evaluate_step(final_step, cfg.eval.at_end)
                results = self.write_results(final_step, time.time() - started)
                self.run_logger.summary({k: v for k, v in results["final"].items()})
                if cfg.gen.at_end:
                    self.evaluate_generation(final_step)
            exit_code = 0
            return results
        finally:
            self.run_logger.finish(exit_code)

    def evaluate_generation(self, final_step: int) -> None:
        """gen.at_end: lm-eval benchmarks + perplexity proxy on the trained policy (PEFT, not merged)."""
        from sempa_exp.evaluation.generation import evaluate_generation, flat_metrics, store_generation

        cfg = self.cfg
        info = {"backbone": cfg.backbone.name, "adapter": str(self.prep.run_dir / "adapter"), "merged": False,
                "step": final_step}
        record = evaluate_generation(self.trainer.model, self.tokenizer, cfg.gen, data_dir(cfg),
                                     self.prep.eval_data.proxy if cfg.gen.proxy else None, info)
        store_generation(self.prep.run_dir, "final", record)
        metrics = flat_metrics(record)
        self.run_logger.log(metrics, step=final_step, samples_seen=final_step * self.samples_per_step)
        self.run_logger.summary(metrics)

    def write_results(self, final_step: int, train_seconds: float) -> dict:
        prep, cfg = self.prep, self.cfg
        rows = read_metrics(prep.run_dir)
        evaluations: dict[int, dict] = {}
        for row in rows:
            scores = {k: v for k, v in row.items() if k.startswith("eval/")}
            if scores:
                evaluations.setdefault(row["step"], {"step": row["step"], "samples_seen": row["samples_seen"]})
                evaluations[row["step"]].update(scores)
        history = [evaluations[s] for s in sorted(evaluations)]
        # a degenerate model scores NaN (stored as the string "nan"): never the best, never a crash here
        with_dev = [e for e in history if isinstance(e.get("eval/stsb_dev"), (int, float))
                    and math.isfinite(e["eval/stsb_dev"])]
        best = max(with_dev, key=lambda e: e["eval/stsb_dev"], default=None)
        results = {
            "status": "finished",
            "run_dir": str(prep.run_dir),
            "group": cfg.run.group,
            "name": prep.run_dir.name,
            "method": cfg.trainer.method,
            "backbone": cfg.backbone.name,
            "template": cfg.template.name,
            "embed": cfg.embed.name,
            "data_size": len(prep.triplets),
            "train_pairs": self.num_train_pairs,
            "final_step": final_step,
            "samples_seen": min(final_step * self.samples_per_step, self.num_train_pairs * cfg.trainer.epochs),
            "train_seconds_this_session": train_seconds,
            "start": evaluations.get(0, {}),
            "final": evaluations.get(final_step, {}),
            "best_by_stsb_dev": best,
            "evaluations": history,
            "data": {"file": str(prep.data_file), "sha256": rundir.sha256_file(prep.data_file),
                     "cleaning": prep.cleaning.summary()},
            "geometry_sample": GEOMETRY_SAMPLE_DOC.replace("N", str(cfg.eval.geometry_sample)),
            "versions": rundir.library_versions(),
            "git_commit": rundir.git_commit(),
            "world_size": prep.world_size,
            "config": self.resolved,
        }
        previous = rundir.read_results(prep.run_dir) or {}
        if "generation" in previous:  # gen_eval records of checkpoints, written while the run was unfinished
            results["generation"] = previous["generation"]
        rundir.write_json_atomic(prep.run_dir / rundir.RESULTS_FILE, results)
        return results


def run(cfg: DictConfig) -> dict:
    prep = prepare(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    check_same_experiment(prep.run_dir, resolved)  # before the skip: a finished run of another config is no answer
    if prep.config.run.skip_finished and rundir.is_finished(prep.run_dir):
        results = rundir.read_results(prep.run_dir)
        log.info("already finished, skipped: %s", prep.run_dir)
        print(f"[sempa-exp] already finished, skipped: {prep.run_dir}")
        return results
    results = Run(prep, resolved).execute()
    if results:
        print_summary(results)
    return results


register_configs()
register_launcher_configs()


def sweep_objective(results: dict | None) -> float | None:
    """The value a run returns to Hydra's sweeper: the final STS average, else STS-B dev."""
    final = (results or {}).get("final", {})
    return final.get("eval/sts_avg", final.get("eval/stsb_dev"))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    export_from_submitit()  # one process per GPU under SLURM: before anything reads RANK/WORLD_SIZE
    return sweep_objective(run(cfg))


if __name__ == "__main__":
    sys.exit(main())
