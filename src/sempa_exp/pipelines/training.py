"""One training run (``python -m sempa_exp.train``).

Validate the config (no model, no run directory yet), load and subset the NLI triplets, then in the run directory:
evaluate the untrained backbone (step 0 = the PromptEOL baseline of the run), train the LoRA adapter with the
configured objective (a checkpoint every ``trainer.checkpoint_every_samples`` samples), evaluate each checkpoint and
the final adapter, write ``results.json``. A finished run is reported, not redone; an unfinished one resumes from its
latest checkpoint; a directory holding another experiment is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from sempa_exp.config.schema import (
    Config,
    ConfigError,
    data_dir,
    refuse_unknown_keys,
    validate,
    validate_against_data,
)
from sempa_exp.data import nli
from sempa_exp.embedding.encoder import SentenceEncoder
from sempa_exp.evaluation.perplexity import build_proxy_set
from sempa_exp.evaluation.suites import (
    GEOMETRY_SAMPLE_DOC,
    EmbeddingCache,
    EvalData,
    eval_data_digest,
    eval_groups,
    evaluate,
    load_eval_data,
    save_pairs,
)
from sempa_exp.launch.distributed import device_for, world
from sempa_exp.launch.memory import return_freed_memory
from sempa_exp.models.backbones import backbone_fingerprint, load_backbone
from sempa_exp.models.lora import lora_folded
from sempa_exp.objectives.base import Objective, build_objective
from sempa_exp.records import identity, rundir
from sempa_exp.records.archive import archive_finished_run
from sempa_exp.records.metrics import RunLogger, read_metrics, rewind_metrics
from sempa_exp.records.results import (
    Results,
    RunKind,
    SampleClock,
    best_by,
    group_evaluations,
    is_finished,
    read_results,
    write_results,
)
from sempa_exp.records.summary import print_training_summary
from sempa_exp.records.wandb_sync import rebuild_offline

log = logging.getLogger("sempa_exp")

# Which suites a logged evaluation row shows were run (a resumed run does not redo them).
SUITE_MARKERS = (("sts", "eval/sts_avg"), ("stsb_dev", "eval/stsb_dev"), ("geometry", "eval/uniformity"),
                 ("ppl", "eval/ppl_nli"), ("gar", "eval/gar"))


@dataclass
class Prepared:
    config: Config
    resolved: dict
    triplets: list[nli.Triplet]
    cleaning: nli.CleaningReport
    data_file: Path
    eval_data: EvalData
    run_dir: Path
    world_size: int
    rank: int
    data_identity: dict[str, str]  # content digests of the training and evaluation data (records.identity)
    callbacks: list[TrainerCallback]  # trainer.callbacks, built


def prepare(cfg: DictConfig) -> Prepared:
    """Every check that needs neither a model nor a run directory; raises ConfigError with the offending key."""
    refuse_unknown_keys(cfg)
    config: Config = OmegaConf.to_object(cfg)
    validate(config)
    from sempa_exp.objectives.recipe import configured_callbacks

    callbacks = configured_callbacks(config)
    run_dir = identity.run_dir(cfg)
    world_size, rank = world()
    root = data_dir(config)
    if not root.is_dir():
        raise ConfigError(f"paths.data_dir does not exist: {root}")
    data_file = nli.resolve_source(config.data, root)
    triplets, cleaning = nli.read_triplets(data_file, config.data.max_sentence_chars, config.data.deduplicate)
    log.info("data: %s", cleaning.summary())  # before the size check, so a too-small remainder is explained
    size = validate_against_data(config, len(triplets), world_size)
    chosen = nli.subset(triplets, size, config.data.subset_seed)
    suites = set(config.eval.at_start) | set(config.eval.at_checkpoint) | set(config.eval.at_end) | set(
        config.eval.at_best)
    e = config.eval
    eval_data = load_eval_data(root, suites, e.geometry_sample, e.gar_sample, e.gar_top_k, e.gar_match)
    if "ppl" in suites or (config.gen.at_end and config.gen.proxy):
        eval_data.proxy = build_proxy_set(triplets, config.eval.ppl_sample, config.data.subset_seed,
                                          config.template.text, config.data.system_prompt, train_size=size)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    trained_on = [[t.premise, t.entailment, t.contradiction] for t in chosen]
    data_identity = {"train_data": identity.content_digest(trained_on), "eval_data": eval_data_digest(eval_data)}
    return Prepared(config, resolved, chosen, cleaning, data_file, eval_data, run_dir, world_size, rank, data_identity,
                    callbacks)


class TrainingRun:
    """One training run inside its run directory."""

    def __init__(self, prep: Prepared) -> None:
        self.prep = prep
        self.cfg = prep.config
        self.is_main = prep.rank == 0
        self.device = device_for(self.cfg.run.device)
        self.objective: Objective = build_objective(self.cfg)
        self.evaluations: dict[int, dict] = {}  # step -> {step, samples_seen, eval/...}: what results.json records
        self.clock: SampleClock | None = None  # known once the trainer has the training pairs
        self._step_encoder: tuple[int, SentenceEncoder] | None = None

    def samples_at(self, step: int) -> int:
        return self.clock.at(step) if self.clock is not None else 0

    def evaluated_suites(self, step: int) -> set[str]:
        row = self.evaluations.get(step, {})
        return {suite for suite, key in SUITE_MARKERS if key in row}

    def encoder_for_step(self, step: int) -> SentenceEncoder:
        """One encoder (and its memo of embedded sentences) per training step: the last checkpoint's evaluation and
        the end-of-training one see the same weights, so sentences embedded by the first (STS-B dev, which holds the
        geometry sample) are not embedded again by the second."""
        if self._step_encoder is None or self._step_encoder[0] != step:
            e = self.cfg.eval
            encoder = SentenceEncoder(self.trainer.model, self.tokenizer, self.cfg.embed, batch_size=e.batch_size,
                                      max_length=e.max_length, groups=eval_groups(self.prep.eval_data),
                                      share_prompt_prefix=e.share_prompt_prefix)
            self._step_encoder = (step, encoder)
        return self._step_encoder[1]

    def evaluate_step(self, step: int, suites: list[str], *, untrained: bool = False) -> dict[str, float]:
        todo = [s for s in suites if s not in self.evaluated_suites(step)]
        if not todo or not self.is_main:
            return {}
        started = time.time()
        encoder = self.encoder_for_step(step)
        cache = None
        if untrained and self.cfg.eval.cache_embeddings:
            cache = EmbeddingCache(self.cfg.paths.cache_dir, {
                "backbone": backbone_fingerprint(self.cfg.backbone), "dtype": self.cfg.backbone.dtype,
                "embed": self.prep.resolved["embed"], "batching": encoder.batching_key()})
            cache.load_into(encoder)
        samples = self.samples_at(step)
        metrics: dict[str, float] = {}

        def record(scores: dict[str, float]) -> None:
            self.run_logger.log(scores, step=step, samples_seen=samples)
            self.evaluations.setdefault(step, {"step": step, "samples_seen": samples}).update(scores)
            metrics.update(scores)

        with lora_folded(self.trainer.model, enabled=self.cfg.eval.merge_adapter and not untrained):
            # each suite recorded as soon as it is scored: a run stopped in the middle (a time limit, a preemption)
            # redoes only the suites it lacks, and their scores do not depend on which ran before (encoder groups)
            for suite in todo:
                pairs: dict = {}
                scores = evaluate(encoder, self.prep.eval_data, [suite], pairs)
                save_pairs(self.prep.run_dir, step, pairs)  # before the scores: a logged sts suite has its pairs
                record(scores)
        if cache is not None:
            cache.save_from(encoder)
        record({"eval/seconds": time.time() - started})
        log.info("step %d (%d samples): %s", step, samples,
                 ", ".join(f"{k.removeprefix('eval/')}={v:.2f}" for k, v in metrics.items() if k.count("/") == 1))
        return metrics

    def drop_partial_step(self, num_pairs: int) -> int:
        """trainer.drop_partial_step: the training pairs cut to whole optimizer steps (the last rows of the subset's
        order go, the same ones whatever the number of processes); returns how many are left."""
        t = self.cfg.trainer
        per_step = t.per_device_batch_size * t.grad_accum_steps * self.prep.world_size
        whole = num_pairs // per_step * per_step
        if whole == 0:
            raise ConfigError(f"trainer.drop_partial_step: {num_pairs} training pairs do not fill one step of "
                              f"{per_step} (per_device_batch_size x grad_accum_steps x {self.prep.world_size} "
                              f"processes)")
        if whole < num_pairs:
            log.info("trainer.drop_partial_step: %d of %d pairs trained (%d whole steps of %d); the last %d left out",
                     whole, num_pairs, whole // per_step, per_step, num_pairs - whole)
            self.trainer.train_dataset = self.trainer.train_dataset.select(range(whole))
        return whole

    def continue_counters(self, checkpoint: Path) -> None:
        """TRL counts the training tokens seen (``train/num_tokens``) in the trainer object, which a resume builds
        anew: the count starts again from the value logged at the checkpoint's step, not from 0."""
        step = int(checkpoint.name.split("-")[-1])
        logged = [r["train/num_tokens"] for r in read_metrics(self.prep.run_dir)
                  if r.get("step") == step and isinstance(r.get("train/num_tokens"), (int, float))]
        if logged and hasattr(self.trainer, "_total_train_tokens"):
            self.trainer._total_train_tokens = int(logged[-1])

    def resume_point(self) -> Path | None:
        checkpoints = self.prep.run_dir / "checkpoints"
        resume_from = rundir.latest_checkpoint(checkpoints, set_aside=self.is_main) if self.cfg.run.resume else None
        if self.is_main:
            rundir.start_run_dir(self.prep.run_dir, self.prep.resolved)
            identity.write_data_identity(self.prep.run_dir, self.prep.data_identity)
            # a fresh start supersedes every record of an earlier attempt; a resume, those after its checkpoint
            step = int(resume_from.name.split("-")[-1]) if resume_from is not None else -1
            dropped = rewind_metrics(self.prep.run_dir, step)
            if resume_from is not None:
                log.info("resuming from %s (%d later metric records superseded)", resume_from, dropped)
                # evaluations of an earlier process: the only time they are read back from disk
                self.evaluations = {e["step"]: e for e in group_evaluations(read_metrics(self.prep.run_dir))}
            elif dropped:
                log.info("an earlier attempt's %d metric records moved to metrics.superseded.jsonl", dropped)
            progress = {"checkpoint": max(step, 0), "records": len(read_metrics(self.prep.run_dir))}
            rundir.record_attempt(self.prep.run_dir, progress, self.cfg.run.max_attempts_without_progress)
        return resume_from

    def execute(self) -> Results | None:
        cfg, prep = self.cfg, self.prep
        run_dir = prep.run_dir
        resume_from = self.resume_point()
        self.run_logger = RunLogger(
            run_dir, cfg.logger, run_id=identity.wandb_run_id(run_dir), group=cfg.run.group, name=run_dir.name,
            config=prep.resolved, enabled=self.is_main)
        exit_code = 1
        try:
            if cfg.run.num_threads:
                torch.set_num_threads(cfg.run.num_threads)
            model, self.tokenizer = load_backbone(cfg.backbone, cfg.paths.cache_dir)
            model.to(self.device)
            return_freed_memory()  # a first load converts the backbone (~1.8 GB for SmolLM2) before training starts
            from sempa_exp.objectives.recipe import CheckpointEvalCallback, MetricsCallback, check_target_modules

            check_target_modules(model, cfg)

            dataset = self.objective.dataset(cfg, prep.triplets)
            callbacks = [MetricsCallback(self.run_logger, self.samples_at),
                         CheckpointEvalCallback(lambda step: self.evaluate_step(step, cfg.eval.at_checkpoint)),
                         *prep.callbacks]
            self.trainer = self.objective.build_trainer(cfg, model, self.tokenizer, dataset, run_dir / "checkpoints",
                                                        callbacks, prep.world_size, use_cpu=self.device.type == "cpu")
            num_pairs = len(self.trainer.train_dataset)
            offered = self.objective.examples_in(dataset)
            if num_pairs < offered:
                log.warning("%d of %d examples are left out: longer than trainer.max_length=%d tokens (ms-swift "
                            "too)", offered - num_pairs, offered, cfg.trainer.max_length)
            t = cfg.trainer
            if t.drop_partial_step:
                num_pairs = self.drop_partial_step(num_pairs)
            self.clock = SampleClock(num_pairs, t.per_device_batch_size, t.grad_accum_steps, prep.world_size)
            self.evaluate_step(0, cfg.eval.at_start, untrained=self.objective.starts_from_backbone)
            started = time.time()
            if resume_from is not None:
                self.continue_counters(resume_from)
            self.trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            final_step = self.trainer.state.global_step
            return_freed_memory()  # the training steps' activations, before the final evaluation grows the process
            results = None
            if self.is_main:
                self.trainer.save_model(str(run_dir / "adapter"))
                self.evaluate_step(final_step, cfg.eval.at_end)
                best = self.evaluate_best(final_step) if cfg.eval.at_best else None
                results = self.results(final_step, num_pairs, time.time() - started, best)
                write_results(run_dir, results)
                self.run_logger.summary({k: v for k, v in results.final.items() if k.startswith("eval/")})
                if cfg.gen.at_end:
                    self.evaluate_generation(final_step)
                archive_finished_run(run_dir, cfg.run.archive_to)
            exit_code = 0
            return results
        finally:
            self.run_logger.finish(exit_code)
            if exit_code == 0 and self.is_main and self.run_logger.wandb_mode == "offline":
                try:
                    rebuild_offline(run_dir)
                except Exception as exc:  # W&B is never a reason to lose a run; sync_wandb can do it later
                    log.warning("W&B offline history not rebuilt (%s); python -m sempa_exp.sync_wandb %s does it",
                                exc, run_dir)

    def evaluate_best(self, final_step: int) -> dict | None:
        """eval.at_best: the suites on the trained checkpoint with the highest STS-B dev, loaded from its folder as
        ``evaluate method=checkpoint`` loads it (the final step: the model in memory). Logged as best/<metric> at the
        final step, where a resumed run finds them; returns {step, samples_seen, eval/...} of that checkpoint."""
        trained = [self.evaluations[s] for s in sorted(self.evaluations) if s > 0]
        chosen = best_by(trained, "eval/stsb_dev")
        if chosen is None:
            log.warning("eval.at_best: no trained checkpoint has a finite STS-B dev score; nothing scored")
            return None
        step, suites = chosen["step"], list(dict.fromkeys(self.cfg.eval.at_best))
        final_row = self.evaluations.get(final_step, {})
        todo = suites
        if final_row.get("best/step") == step:  # a resumed run: the suites already logged are not redone
            todo = [s for s, key in SUITE_MARKERS
                    if s in suites and "best/" + key.removeprefix("eval/") not in final_row]
        scores: dict[str, float] = {}
        if todo and step == final_step:
            self.evaluate_step(final_step, todo)
            scores = {k: v for k, v in self.evaluations[final_step].items()
                      if k.startswith("eval/") and k != "eval/seconds"}
        elif todo:
            scores = self.evaluate_checkpoint(step, todo)
        new = {f"best/{k.removeprefix('eval/')}": v for k, v in scores.items()}
        if new:
            record = {"best/step": step, **new}
            self.run_logger.log(record, step=final_step, samples_seen=self.samples_at(final_step))
            self.evaluations.setdefault(final_step, {"step": final_step,
                                                     "samples_seen": self.samples_at(final_step)}).update(record)
        row = self.evaluations[final_step]
        best = {**chosen, **{f"eval/{k.removeprefix('best/')}": v for k, v in row.items()
                             if k.startswith("best/") and k != "best/step"}}
        log.info("best checkpoint by STS-B dev: step %d (%.2f); %s", step, chosen["eval/stsb_dev"],
                 ", ".join(f"{k}={v:.2f}" for k, v in best.items() if k.startswith("eval/") and k.count("/") == 1))
        return best

    def evaluate_checkpoint(self, step: int, suites: list[str]) -> dict[str, float]:
        """Scores an earlier checkpoint of this run, loaded from disk on its own (the training model stays)."""
        from sempa_exp.config.schema import MethodConfig
        from sempa_exp.embedding.loading import load

        folder = self.prep.run_dir / "checkpoints" / f"checkpoint-{step}"
        method = MethodConfig(_target_="sempa_exp.embedding.checkpoint.CheckpointMethod", name="checkpoint",
                              path=str(folder))
        # in the weights' dtype during training: the computation that scored the checkpoint's STS-B dev
        same_dtype = dataclasses.replace(self.cfg.eval, dtype=self.cfg.backbone.dtype)
        loaded = load(dataclasses.replace(self.cfg, method=method, eval=same_dtype), self.device)
        e = self.cfg.eval
        encoder = SentenceEncoder(loaded.model, loaded.tokenizer, self.cfg.embed, batch_size=e.batch_size,
                                  max_length=e.max_length, method=loaded.method,
                                  groups=eval_groups(self.prep.eval_data))
        started = time.time()
        pairs: dict = {}
        scores = evaluate(encoder, self.prep.eval_data, suites, pairs)
        save_pairs(self.prep.run_dir, step, pairs)
        log.info("checkpoint-%d scored on %s in %.0f s", step, ", ".join(suites), time.time() - started)
        return scores

    def evaluate_generation(self, final_step: int) -> None:
        """gen.at_end: lm-eval benchmarks + perplexity proxy on the saved final adapter, loaded as ``gen_eval
        gen.target=<this run>`` loads it (gen_eval's precision, merged as it merges), so the record is gen_eval's
        computation of the run and compares like with like against the untrained backbone's gen_eval record. The
        training's model in memory is not that: its base weights were loaded in the training's precision (SmolLM2-135M
        SemPA, bf16 weights scored in float32: proxy margin 0.682 against gen_eval's 0.723)."""
        from sempa_exp.evaluation.generation import evaluate_generation, flat_metrics
        from sempa_exp.pipelines.generation import Target, load_model
        from sempa_exp.records.results import add_generation

        cfg, run_dir = self.cfg, self.prep.run_dir
        if self.device.type == "cuda":  # the training's model is done with: its GPU memory goes to the copy loaded next
            self.trainer.model.to("cpu")
            torch.cuda.empty_cache()
        target = Target(run_dir, "final", run_dir / "adapter", final_step, self.prep.resolved)
        model, tokenizer, info = load_model(cfg, target, self.device)
        record = evaluate_generation(model, tokenizer, cfg.gen, data_dir(cfg),
                                     self.prep.eval_data.proxy if cfg.gen.proxy else None, info)
        add_generation(run_dir, "final", record, new=read_results(run_dir))
        metrics = flat_metrics(record)
        self.run_logger.log(metrics, step=final_step, samples_seen=self.samples_at(final_step))
        self.run_logger.summary(metrics)

    def results(self, final_step: int, num_pairs: int, train_seconds: float, best: dict | None = None) -> Results:
        prep, cfg = self.prep, self.cfg
        history = [self.evaluations[s] for s in sorted(self.evaluations)]
        previous = read_results(prep.run_dir)  # gen_eval records of checkpoints, written while the run was unfinished
        return Results(
            kind=RunKind.TRAINING,
            group=cfg.run.group,
            name=prep.run_dir.name,
            run_dir=str(prep.run_dir),
            method=self.objective.name,
            backbone=cfg.backbone.name,
            template=cfg.template.name,
            embed=cfg.embed.name,
            data_size=len(prep.triplets),
            train_pairs=num_pairs,
            final_step=final_step,
            samples_seen=self.samples_at(final_step),
            start=self.evaluations.get(0, {}),
            final=self.evaluations.get(final_step, {}),
            best_by_stsb_dev=best_by(history, "eval/stsb_dev"),
            best_checkpoint=best,
            evaluations=history,
            generation=previous.generation if previous is not None else {},
            details={
                "data": {"file": str(prep.data_file), "sha256": rundir.sha256_file(prep.data_file),
                         "cleaning": prep.cleaning.summary()},
                "geometry_sample": GEOMETRY_SAMPLE_DOC.replace("N", str(cfg.eval.geometry_sample)),
                "train_seconds_this_session": train_seconds,
            },
            world_size=prep.world_size,
            versions=rundir.library_versions(),
            git_commit=rundir.git_commit(),
            config=prep.resolved,
        )


def run(cfg: DictConfig) -> Results | None:
    """Trains one run; returns its record (None on ranks other than 0)."""
    prep = prepare(cfg)
    # before the skip: a finished run of another config is no answer
    identity.check_same_experiment(prep.run_dir, prep.resolved, RunKind.TRAINING)
    identity.check_same_data(prep.run_dir, prep.data_identity)
    if prep.config.run.skip_finished and is_finished(prep.run_dir):
        log.info("already finished, skipped: %s", prep.run_dir)
        print(f"[sempa-exp] already finished, skipped: {prep.run_dir}")
        return read_results(prep.run_dir)
    with rundir.exclusive(prep.run_dir) if prep.rank == 0 else contextlib.nullcontext():
        results = TrainingRun(prep).execute()
    if results is not None:
        print_training_summary(results)
    return results
